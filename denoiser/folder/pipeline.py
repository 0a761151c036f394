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

import numpy as np

from denoiser.errors import DenoiseError
from denoiser.folder.journal import Journal, JournalWriter, RemoteJournal
from denoiser.folder.reader import PixelBudget, load_all
from denoiser.folder.results import UP_TO_DATE, WHY_SKIPPED, FileResult, display_path
from denoiser.folder.scan import Job
from denoiser.folder.writer import save_all
from denoiser.routing import Router
from denoiser.trees import Tree

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
    for r in results:
        if on_result:
            on_result(r, len(results), total)

    done_count = len(results)
    groups: dict[tuple, deque] = {}  # (model, tile shape) -> (job, model input) waiting
    pending_tiles = 0  # tiles in ``groups``
    writes: deque[Future] = deque()

    def report(result: FileResult) -> None:
        nonlocal done_count
        results.append(result)
        done_count += 1
        if on_result:
            on_result(result, done_count, total)

    def drain_writes(block: bool) -> None:
        while writes and (block or writes[0].done()):
            for result in writes.popleft().result():
                report(result)

    def finish_batch() -> None:
        """Blend the oldest batch's outputs into their images; hand the
        finished images to the writers."""
        take, fut = predicting.popleft()
        outputs = fut.result()
        finished = [
            job for (job, i), out in zip(take, outputs, strict=True) if job.work.add(i, out)
        ]
        for task in _tasks(finished, dst.task_files):
            writes.append(writer_pool.submit(save_all, task, fmt, dst, writer, budget))
        drain_writes(block=False)

    def run_group(key: tuple, force: bool) -> None:
        nonlocal pending_tiles
        queue = groups.get(key)
        size = queue[0][0].work.batch_size if queue else 0
        while queue and (len(queue) >= size or force):
            take = [queue.popleft() for _ in range(min(size, len(queue)))]
            pending_tiles -= len(take)
            tiles = np.stack([job.work.input(i) for job, i in take])
            # the model runs this batch in its thread while this one gathers the next
            predicting.append((take, model_pool.submit(take[0][0].work.predict, tiles)))
            while len(predicting) > 1:
                finish_batch()

    def flush_all() -> None:
        """Every part-done image through the model and to the writers, which
        give their pixels back: what a reader waiting for the budget needs."""
        for shape in list(groups):
            run_group(shape, force=True)
        while predicting:
            finish_batch()

    predicting: deque[tuple[list, Future]] = deque()  # batches given to the model, in order
    budget = PixelBudget(PIXELS_IN_FLIGHT)
    with (
        ThreadPoolExecutor(src.threads, thread_name_prefix="read") as reader_pool,
        ThreadPoolExecutor(dst.threads, thread_name_prefix="write") as writer_pool,
        ThreadPoolExecutor(1, thread_name_prefix="model") as model_pool,
    ):
        reads: deque[tuple[list[Job], Future, int]] = deque()  # tasks, in the order of the jobs
        ready: deque[tuple[Job, Exception | None]] = deque()  # read, not yet taken
        tasks = _tasks(jobs, src.task_files)
        reading = 0  # bytes of the inputs being read and decoded ...
        in_flight = 0  # ... in this many files
        try:
            while True:
                # read ahead enough for the readers to stay busy while the model
                # runs a batch, within a budget of input bytes (bounds memory)
                while (
                    in_flight < src.threads * 4
                    or (reading < READ_AHEAD_BYTES and in_flight < READ_AHEAD_FILES)
                ) and pending_tiles < MAX_PENDING_TILES:
                    task = next(tasks, None)
                    if task is None:
                        break
                    size = sum(_budget(job) for job in task)
                    reading += size
                    in_flight += len(task)
                    reads.append(
                        (task, reader_pool.submit(load_all, task, router, src, dst, budget), size)
                    )
                if not ready:
                    if not reads:
                        break
                    task, fut, size = _take_read(reads, budget, flush_all)
                    reading -= size
                    in_flight -= len(task)
                    ready.extend(zip(task, fut.result(), strict=True))
                job, error = ready.popleft()
                if isinstance(error, DenoiseError):  # the image's or its model's, in one line
                    report(FileResult(display_path(job.rel), "failed", str(error), job.bytes))
                    continue
                if error is not None:
                    report(
                        FileResult(
                            display_path(job.rel), "failed", f"cannot read: {error}", job.bytes
                        )
                    )
                    continue
                if job.up_to_date:
                    report(
                        FileResult(
                            display_path(job.rel),
                            "skipped",
                            UP_TO_DATE,
                            job.bytes,
                            output=display_path(str(job.target)),
                            reason=WHY_SKIPPED,
                        )
                    )
                    continue
                key = job.work.key
                groups.setdefault(key, deque()).extend((job, i) for i in range(len(job.work)))
                pending_tiles += len(job.work)
                run_group(key, force=False)
                # keep memory bounded: too many part-done images -> flush the fullest group
                if pending_tiles > MAX_PENDING_TILES or len(groups) > 8:
                    biggest = max(groups, key=lambda s: len(groups[s]))
                    run_group(biggest, force=True)
            for shape in list(groups):
                run_group(shape, force=True)
            while predicting:
                finish_batch()
            drain_writes(block=True)
        except BaseException:
            for _, fut, _ in reads:
                fut.cancel()
            for _, fut in predicting:
                fut.cancel()
            for fut in writes:
                fut.cancel()
            raise
    return results


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
