"""What every task shares: a cache that hits across flow runs, and a way to
bypass it when the files a cached result points at are gone or damaged."""

from __future__ import annotations

from collections.abc import Sequence

from prefect.cache_policies import INPUTS, TASK_SOURCE

# Prefect's default policy includes the flow run id and never hits across runs.
CACHE_ACROSS_RUNS = INPUTS + TASK_SOURCE


def unless_output_invalid(task, damaged: Sequence[str]):
    """The task itself while its output verifies (``damaged`` is empty: what a
    ``verify_*`` function of the output found); otherwise a copy that ignores
    (and then refreshes) its cache entry, so the task body runs and repairs the
    files instead of handing downstream tasks a cached result that points at
    missing or corrupt ones. The key stays the same in both cases, so the next
    run hits again."""
    return task if not damaged else task.with_options(refresh_cache=True)
