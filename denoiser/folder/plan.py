"""A folder run planned as chunks that can be denoised anywhere, in any
order, each more than once: one scan, its verdicts, and the jobs cut into
chunks of files and bytes (:class:`FolderPlan`, :class:`ChunkFiles`).

Imports the scan, the journal and the writer's :func:`prepare_output` of
this package.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from denoiser.core.errors import ConfigError
from denoiser.folder.journal import OutputRecord, journal_for
from denoiser.folder.results import FileResult
from denoiser.folder.scan import Job, check_folders, scan
from denoiser.folder.writer import prepare_output

logger = logging.getLogger(__name__)


@dataclass
class FolderPlan:
    """A folder run cut into chunks of inputs (relative paths) that can be
    denoised anywhere the two folders are visible, in any order, each more than
    once (outputs are atomic and journalled, so a chunk run twice redoes
    nothing); ``verdicts``: the files the scan already decided (not images,
    bad symlinks, output clashes); ``records``: per chunk, the journal's
    records of its outputs at planning time, so that a chunk need not read
    the whole journal again (a record gone stale only means a redo)."""

    verdicts: list[FileResult]
    chunks: list[list[str]]
    total: int
    records: list[list[OutputRecord]]


def plan_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    pattern: str = "*",
    fmt: str = "same",
    overwrite: bool = False,
    chunk_files: int | None = None,
    workers: int = 1,
    settle: float = 0.0,
) -> FolderPlan:
    """Scan ``input_dir`` once and cut the work into chunks of at most
    ``chunk_files`` (None: :func:`auto_chunk_files` for ``workers``)."""
    if fmt not in ("same", "png"):
        raise ConfigError(f"format must be 'same' or 'png', not {fmt!r}")
    if chunk_files is not None and chunk_files < 1:
        raise ConfigError(f"--chunk-files must be at least 1, not {chunk_files}")
    src, dst = check_folders(input_dir, output_dir)
    journal = journal_for(dst)
    records, claims = journal.read_all()
    items = list(scan(src, dst, pattern, fmt, overwrite, records, claims, settle))
    jobs = [i for i in items if isinstance(i, Job)]
    if stale := prepare_output(dst):
        logger.info("removed %d temporary files left by an interrupted run", stale)
    journal.claim(unclaimed(jobs, claims))
    chunks = cut_chunks(jobs, chunk_files or auto_chunk_files(len(jobs), workers))
    return FolderPlan(
        [i for i in items if isinstance(i, FileResult)],
        [[job.rel for job in chunk] for chunk in chunks],
        len(items),
        [[records[j.target_rel] for j in chunk if j.target_rel in records] for chunk in chunks],
    )


CHUNK_BYTES = 4 << 20  # a chunk also ends after this much input: large images spread out
CHUNKS_PER_WORKER = 4  # enough for the last chunks to even out between workers
CHUNK_FILES_RANGE = (64, 1024)  # below, orchestration per file shows; above, balance suffers


def unclaimed(jobs: list[Job], claims: set[str] | frozenset[str]) -> list[str]:
    """The outputs of ``jobs`` to claim before any is written: those without
    a record or an earlier claim."""
    return [j.target_rel for j in jobs if j.record is None and j.target_rel not in claims]


def auto_chunk_files(files: int, workers: int) -> int:
    """Files per chunk when none is asked for: about CHUNKS_PER_WORKER chunks
    per worker, within CHUNK_FILES_RANGE."""
    low, high = CHUNK_FILES_RANGE
    per = -(-files // max(1, workers * CHUNKS_PER_WORKER))
    return max(low, min(high, per))


def cut_chunks(
    jobs: list[Job], chunk_files: int, chunk_bytes: int = CHUNK_BYTES
) -> list[list[Job]]:
    """Consecutive jobs in chunks of at most ``chunk_files`` files and, past
    its first file, ``chunk_bytes`` of input, so that a few large images in a
    folder of small ones go to different workers instead of one chunk."""
    chunks: list[list[Job]] = []
    current: list[Job] = []
    size = 0
    for job in jobs:
        n = job.bytes or 0
        if current and (len(current) >= chunk_files or size + n > chunk_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(job)
        size += n
    if current:
        chunks.append(current)
    return chunks


class ChunkFiles:
    """One chunk of a plan: its files' relative paths and the plan's journal
    records of their outputs (as dicts), carried as one object, so that an
    orchestrator passing it to a task need not look through thousands of
    entries (Prefect searches lists and dicts of task parameters for futures)."""

    __slots__ = ("rels", "records")

    def __init__(self, rels: list[str], records: list[dict]):
        self.rels = rels
        self.records = records

    def __reduce__(self):
        return (ChunkFiles, (self.rels, self.records))

    def __repr__(self) -> str:
        return f"ChunkFiles({len(self.rels)} files)"
