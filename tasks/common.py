"""What every task shares: a cache that hits across flow runs, and a way to
bypass it when the files a cached result points at have gone."""

from __future__ import annotations

from pathlib import Path

from prefect.cache_policies import INPUTS, TASK_SOURCE

# Prefect's default policy includes the flow run id and never hits across runs.
CACHE_ACROSS_RUNS = INPUTS + TASK_SOURCE


def unless_output_missing(task, marker: Path):
    """The task itself while its output's marker file exists; otherwise a copy
    that ignores (and then refreshes) its cache entry, so a cached result never
    hands downstream tasks paths that were deleted. The key stays the same in
    both cases, so the next run hits again."""
    return task if Path(marker).exists() else task.with_options(refresh_cache=True)
