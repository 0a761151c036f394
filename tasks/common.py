"""What every task shares: a cache policy that hits across flow runs, but never
when the files a cached result points at have gone."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy, CachePolicy


def cache_across_runs(locate_output: Callable[[dict[str, Any]], Path | None]) -> CachePolicy:
    """INPUTS + TASK_SOURCE (Prefect's default adds the run id and never hits
    across runs), plus a fingerprint of the output the task would produce.

    ``locate_output(inputs)`` names the file that marks the task's output as
    complete (a manifest, say). If it is missing the key is random, so a cached
    result never hands downstream tasks paths that were deleted.
    """

    def output_fingerprint(_ctx: Any, inputs: dict[str, Any]) -> str:
        marker = locate_output(inputs)
        if marker is None or not marker.exists():
            return f"missing-{uuid.uuid4().hex}"
        stat = marker.stat()
        return f"{marker}:{stat.st_size}:{stat.st_mtime_ns}"

    return INPUTS + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=output_fingerprint)
