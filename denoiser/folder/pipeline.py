"""Jobs in flight: reader threads read and decode the inputs ahead, tiles of
many files are batched for their models, writer threads encode and write
the finished images, within budgets of bytes read ahead, tiles waiting and
decoded pixels; every file gets its result as it finishes.

Imports the reader, the writer, the journal, the scan's :class:`Job` and the
results of this package.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from denoiser.core.errors import DenoiseError
from denoiser.folder.journal import Journal, JournalWriter, RemoteJournal
from denoiser.folder.reader import PixelBudget, load_all
from denoiser.folder.results import UP_TO_DATE, WHY_SKIPPED, FileResult, display_path
from denoiser.folder.routing import Router
from denoiser.folder.scan import Job
from denoiser.folder.trees import Tree
from denoiser.folder.writer import save_all

MAX_PENDING_TILES = 512 * 64  # tiles read ahead and waiting for a batch: bounds memory
# decoded pixels in flight (decode to write), whatever the images' number and size;
# a 36-megapixel photograph is one at a time (see README, "memory")
PIXELS_IN_FLIGHT = 64 << 20
READ_AHEAD_BYTES = 16 << 20  # encoded input bytes being read and decoded at once ...
READ_AHEAD_FILES = 1024  # ... in at most this many files
UNKNOWN_SIZE = 1 << 20  # what an input of unknown size counts for in that budget
TASK_BYTES = 1 << 20  # a task of a reader or writer thread ends after this much input


def run_jobs(
    jobs: list[Job],
    results: list[FileResult],
    total: int,
    src: Tree,
    dst: Tree,
    journal: Journal | RemoteJournal,
    router: Router,
    fmt: str,
    on_result: Callable[[FileResult, int, int], None] | None,
) -> list[FileResult]:
    writer = JournalWriter(dst, journal)
    try:
        return _pipeline(jobs, results, total, src, dst, writer, router, fmt, on_result)
    finally:
        writer.flush()  # the records of every output written, whatever ended the run


def _pipeline(
    jobs: list[Job],
    results: list[FileResult],
    total: int,
    src: Tree,
    dst: Tree,
    writer: JournalWriter,
    router: Router,
    fmt: str,
    on_result: Callable[[FileResult, int, int], None] | None,
) -> list[FileResult]:
    """Reader threads read and decode the inputs ahead, in tasks of up to
    ``src.task_files`` files; each model runs on batches of tiles (one shape
    each) from many files; writer threads encode and write the finished images, in tasks of up
    to ``dst.task_files``. A file's result is reported once it is read (when
    it fails or is skipped there) or once it is written."""
    report = _Reporter(results, total, on_result)
    report.report_scanned()
    budget = PixelBudget(PIXELS_IN_FLIGHT)
    with (
        ThreadPoolExecutor(src.threads, thread_name_prefix="read") as reader_pool,
        ThreadPoolExecutor(dst.threads, thread_name_prefix="write") as writer_pool,
        ThreadPoolExecutor(1, thread_name_prefix="model") as model_pool,
    ):
        pools = _Pools(reader_pool, writer_pool, model_pool)
        flight = _InFlight(src, dst, writer, router, fmt, budget, pools, report)
        try:
            flight.run(_tasks(jobs, src.task_files))
        except BaseException:
            flight.cancel()
            raise
    return results


class _Reporter:
    """Where each file's result goes: the run's list of results, and
    ``on_result(result, done, total)``."""

    def __init__(
        self,
        results: list[FileResult],
        total: int,
        on_result: Callable[[FileResult, int, int], None] | None,
    ):
        self.results = results
        self.total = total
        self.on_result = on_result
        self.done = len(results)

    def report_scanned(self) -> None:
        """Report the results the scan already decided (those in the list)."""
        for r in self.results:
            if self.on_result:
                self.on_result(r, len(self.results), self.total)

    def __call__(self, result: FileResult) -> None:
        self.results.append(result)
        self.done += 1
        if self.on_result:
            self.on_result(result, self.done, self.total)


class _Pools(NamedTuple):
    """The threads of a run: readers, writers, and the one that runs the models."""

    read: ThreadPoolExecutor
    write: ThreadPoolExecutor
    model: ThreadPoolExecutor


@dataclass
class _InFlight:
    """One run's work in flight: read tasks (in the order of the jobs) and
    the jobs read but not yet taken; tiles waiting for a batch, by model and
    tile shape; batches given to the model, in order; write tasks. Each
    finished file's result goes to ``report``."""

    src: Tree
    dst: Tree
    writer: JournalWriter
    router: Router
    fmt: str
    budget: PixelBudget
    pools: _Pools
    report: _Reporter
    # read tasks (the jobs, their future, their bytes), in the order of the jobs
    reads: deque[tuple[list[Job], Future, int]] = field(default_factory=deque)
    ready: deque[tuple[Job, Exception | None]] = field(default_factory=deque)  # read, not taken
    reading: int = 0  # bytes of the inputs being read and decoded ...
    in_flight: int = 0  # ... in this many files
    # (model, tile shape) -> (job, model input) waiting
    groups: dict[tuple, deque] = field(default_factory=dict)
    pending_tiles: int = 0  # tiles in ``groups``
    # batches given to the model (the (job, model input) of each tile, the future), in order
    predicting: deque[tuple[list, Future]] = field(default_factory=deque)
    writes: deque[Future] = field(default_factory=deque)

    def run(self, tasks: Iterator[list[Job]]) -> None:
        """Every task read, its jobs through their models, every output written."""
        while True:
            self.read_ahead(tasks)
            if not self.ready:
                if not self.reads:
                    break
                self.take_read()
            self.take(*self.ready.popleft())
        self.flush_all()
        self.drain_writes(block=True)

    def read_ahead(self, tasks: Iterator[list[Job]]) -> None:
        """Read ahead enough for the readers to stay busy while the model
        runs a batch, within a budget of input bytes (bounds memory)."""
        while self._may_read_more():
            task = next(tasks, None)
            if task is None:
                break
            size = sum(_budget(job) for job in task)
            self.reading += size
            self.in_flight += len(task)
            self.reads.append(
                (
                    task,
                    self.pools.read.submit(
                        load_all, task, self.router, self.src, self.dst, self.budget
                    ),
                    size,
                )
            )

    def _may_read_more(self) -> bool:
        return (
            self.in_flight < self.src.threads * 4
            or (self.reading < READ_AHEAD_BYTES and self.in_flight < READ_AHEAD_FILES)
        ) and self.pending_tiles < MAX_PENDING_TILES

    def take_read(self) -> None:
        """The jobs of the next finished read task, ready to be taken."""
        task, fut, size = _take_read(self.reads, self.budget, self.flush_all)
        self.reading -= size
        self.in_flight -= len(task)
        self.ready.extend(zip(task, fut.result(), strict=True))

    def take(self, job: Job, error: Exception | None) -> None:
        """A job read: its result when it ends there, else its tiles to its model."""
        verdict = _judge_read(job, error)
        if verdict is not None:
            self.report(verdict)
        else:
            self.add_tiles(job)

    def add_tiles(self, job: Job) -> None:
        key = job.work.key
        self.groups.setdefault(key, deque()).extend((job, i) for i in range(len(job.work)))
        self.pending_tiles += len(job.work)
        self.run_group(key, force=False)
        # keep memory bounded: too many part-done images -> flush the fullest group
        if self.pending_tiles > MAX_PENDING_TILES or len(self.groups) > 8:
            biggest = max(self.groups, key=lambda s: len(self.groups[s]))
            self.run_group(biggest, force=True)

    def run_group(self, key: tuple, force: bool) -> None:
        """The group's full batches (``force``: all it holds) to its model."""
        queue = self.groups.get(key)
        size = queue[0][0].work.batch_size if queue else 0
        while queue and (len(queue) >= size or force):
            take = [queue.popleft() for _ in range(min(size, len(queue)))]
            self.pending_tiles -= len(take)
            tiles = np.stack([job.work.input(i) for job, i in take])
            # the model runs this batch in its thread while this one gathers the next
            self.predicting.append((take, self.pools.model.submit(take[0][0].work.predict, tiles)))
            while len(self.predicting) > 1:
                self.finish_batch()

    def finish_batch(self) -> None:
        """Blend the oldest batch's outputs into their images; hand the
        finished images to the writers."""
        take, fut = self.predicting.popleft()
        outputs = fut.result()
        finished = [
            job for (job, i), out in zip(take, outputs, strict=True) if job.work.add(i, out)
        ]
        for task in _tasks(finished, self.dst.task_files):
            self.writes.append(
                self.pools.write.submit(
                    save_all, task, self.fmt, self.dst, self.writer, self.budget
                )
            )
        self.drain_writes(block=False)

    def flush_all(self) -> None:
        """Every part-done image through the model and to the writers, which
        give their pixels back: what a reader waiting for the budget needs."""
        for shape in list(self.groups):
            self.run_group(shape, force=True)
        while self.predicting:
            self.finish_batch()

    def drain_writes(self, block: bool) -> None:
        """Report the results of the finished write tasks, in order (``block``: of all)."""
        while self.writes and (block or self.writes[0].done()):
            for result in self.writes.popleft().result():
                self.report(result)

    def cancel(self) -> None:
        """Cancel every task not yet started (the run is ending on an exception)."""
        for _, fut, _ in self.reads:
            fut.cancel()
        for _, fut in self.predicting:
            fut.cancel()
        for fut in self.writes:
            fut.cancel()


def _judge_read(job: Job, error: Exception | None) -> FileResult | None:
    """A read job's result when it ends at reading (it failed, or its output
    is up to date); None when it goes on to its model."""
    if isinstance(error, DenoiseError):  # the image's or its model's, in one line
        return FileResult(display_path(job.rel), "failed", str(error), job.bytes)
    if error is not None:
        return FileResult(display_path(job.rel), "failed", f"cannot read: {error}", job.bytes)
    if job.up_to_date:
        return FileResult(
            display_path(job.rel),
            "skipped",
            UP_TO_DATE,
            job.bytes,
            output=display_path(str(job.target)),
            reason=WHY_SKIPPED,
        )
    return None


def _take_read(
    reads: deque[tuple[list[Job], Future, int]], budget: PixelBudget, flush: Callable[[], None]
) -> tuple[list[Job], Future, int]:
    """The first finished read task (in order when the first is done, as it
    mostly is). While none is and a reader waits for pixels, ``flush`` the
    images in flight so that their writes give pixels back: a reader waiting
    on images that only a later read would let go of never deadlocks."""
    while True:
        for i, entry in enumerate(reads):
            if entry[1].done():
                del reads[i]
                return entry
        if budget.waiting:
            flush()
        wait([fut for _, fut, _ in reads], timeout=0.05, return_when=FIRST_COMPLETED)


def _budget(job: Job) -> int:
    """What an input counts for in the read-ahead budget: its size, if known."""
    return job.bytes if job.bytes is not None else UNKNOWN_SIZE


def _tasks(jobs: list[Job], files: int) -> Iterator[list[Job]]:
    """Consecutive jobs in tasks of at most ``files`` files, each ending once
    it holds TASK_BYTES of input: the fixed cost of a task (a future, waking a
    thread) is shared by many small files, while large ones go alone."""
    task: list[Job] = []
    size = 0
    for job in jobs:
        task.append(job)
        size += _budget(job)
        if len(task) >= files or size >= TASK_BYTES:
            yield task
            task, size = [], 0
    if task:
        yield task
