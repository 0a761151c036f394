"""A folder run from end to end: :func:`denoise_tree` (scan, claims, the
pipeline, the journal compacted) and :func:`denoise_chunk_files` (one chunk
of a :class:`~denoiser.folder.plan.FolderPlan`).

Imports the scan, the journal, the plan's :func:`~denoiser.folder.plan.unclaimed`,
the writer, the predictor and the pipeline of this package.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from denoiser.core.errors import ConfigError, DenoiseError
from denoiser.folder.journal import OutputRecord, journal_for
from denoiser.folder.pipeline import run_jobs
from denoiser.folder.plan import unclaimed
from denoiser.folder.predictor import BatchPredictor, as_router
from denoiser.folder.results import FileResult, display_path
from denoiser.folder.routing import Router
from denoiser.folder.scan import Job, check_folders, make_job, name_target, scan
from denoiser.folder.trees import RemoteTree
from denoiser.folder.writer import prepare_output
from denoiser.imaging.tiling import TileSpec

logger = logging.getLogger(__name__)


def denoise_chunk_files(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    rels: list[str],
    predict: BatchPredictor | Router,
    spec: TileSpec | None = None,
    *,
    fmt: str = "same",
    overwrite: bool = False,
    records: list[OutputRecord] | None = None,
    on_result: Callable[[FileResult, int, int], None] | None = None,
) -> list[FileResult]:
    """Denoise one chunk of a :class:`FolderPlan` (``records``: the plan's
    records of its outputs; None: read the journal), with the same rules as
    :func:`denoise_tree` (skips by the journal, atomic outputs, per-file
    verdicts). A file gone or changed into something else since the plan is
    reported, not fatal. In object storage nothing is asked per file before
    it is read (no HEAD): its size and its output's state come from reading."""
    src, dst = check_folders(input_dir, output_dir)
    journal = journal_for(dst)
    known = journal.read() if records is None else {r.output: r for r in records}
    jobs: list[Job] = []
    results: list[FileResult] = []
    for rel in rels:
        target_rel = name_target(rel, fmt)
        if isinstance(src, RemoteTree) or isinstance(dst, RemoteTree):
            size, exists = None, None
        else:
            try:
                size = os.stat(src.path(rel)).st_size
            except OSError as exc:
                results.append(
                    FileResult(display_path(rel), "failed", f"cannot stat: {exc.strerror or exc}")
                )
                continue
            exists = dst.exists(dst.path(target_rel))
        # the plan claimed every output of its chunks: one there without a
        # record was written by an earlier attempt at this chunk
        work = make_job(
            src.path(rel),
            rel,
            dst.path(target_rel),
            target_rel,
            size,
            exists,
            overwrite,
            known,
            frozenset([target_rel]),
        )
        (jobs if isinstance(work, Job) else results).append(work)
    # batches of a quarter of the chunk at most: the model starts on the first
    # while the rest is read, and the last outputs are written while it runs
    router = as_router(predict, spec).at_most(max(MIN_CHUNK_BATCH, -(-len(rels) // 4)))
    return run_jobs(jobs, results, len(rels), src, dst, journal, router, fmt, on_result)


MIN_CHUNK_BATCH = 32


def denoise_tree(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    predict: BatchPredictor | Router,
    spec: TileSpec | None = None,
    *,
    pattern: str = "*",
    fmt: str = "same",
    overwrite: bool = False,
    on_result: Callable[[FileResult, int, int], None] | None = None,
    settle: float = 0.0,
) -> list[FileResult]:
    """Denoise every image under ``input_dir`` into ``output_dir`` (each a
    local folder or an object-storage prefix), each through the model
    ``predict`` picks for it (a :class:`~denoiser.folder.routing.Router`), or all
    through one (a BatchPredictor and its tiling ``spec``).

    An image is skipped while its output exists and both still match the
    output's record in the journal (``overwrite`` redoes everything); each
    result's ``reason`` says why it was done or skipped.
    ``on_result(result, done, total)`` is called (from this thread) as files
    finish; raising from it stops the run cleanly (finished outputs stay,
    recorded). ``settle``: files modified more recently are left (see :func:`scan`).
    """
    if fmt not in ("same", "png"):
        raise ConfigError(f"format must be 'same' or 'png', not {fmt!r}")
    router = as_router(predict, spec)
    src, dst = check_folders(input_dir, output_dir)
    journal = journal_for(dst)
    records, claims = journal.read_all()
    items = list(scan(src, dst, pattern, fmt, overwrite, records, claims, settle))
    jobs = [i for i in items if isinstance(i, Job)]
    results: list[FileResult] = [i for i in items if isinstance(i, FileResult)]
    if stale := prepare_output(dst):
        logger.info("removed %d temporary files left by an interrupted run", stale)
    journal.claim(unclaimed(jobs, claims))
    try:
        return run_jobs(jobs, results, len(items), src, dst, journal, router, fmt, on_result)
    finally:
        try:
            journal.compact()
        except (OSError, DenoiseError, TimeoutError) as exc:  # appended lines stay valid
            logger.warning("could not compact the journal of %s: %s", dst, exc)
