"""Denoising a whole folder tree, in batch, without ever touching the input.

Files are decoded by reader threads, cut into tiles, and tiles from many files
are batched together for the model; finished images are encoded and written
by writer threads while the model works on the next batch. Every output is
written to a temporary name and renamed, then recorded in a journal beside
the outputs (the input's size and sha256, the output's size and sha256). An
output is skipped only while both still match their record, so a rerun
finishes an interrupted one, and redoes an output whose input was replaced
(whatever its mtime) or that was damaged. Every file gets a row in the
report, saying why it was done or skipped, whatever went wrong with it.

The run touches nothing in the output folder but its outputs, its journal
and lock file, and its own temporary files; an output folder that holds the
input folder is refused.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from denoiser.errors import ConfigError, DenoiseError, ImageError
from denoiser.faults import failpoint
from denoiser.files import host_tag, is_url, pid_alive
from denoiser.images import (
    IMAGE_SUFFIXES,
    LoadedImage,
    decode_image,
    encode_image,
    output_format,
    read_bytes,
    rebuild_image,
    temp_owner,
    write_atomic,
)
from denoiser.tiling import Blender, TiledImage, TileSpec, split

logger = logging.getLogger(__name__)

JOURNAL_NAME = ".denoise-journal.jsonl"
JOURNAL_LOCK_NAME = ".denoise-journal.lock"
JOURNAL_LOCK_TIMEOUT = (
    120.0  # seconds; the lock is only held to append a line or rewrite the journal
)
FOREIGN_TEMP_AGE = 86400.0  # seconds before another host's temporary file counts as abandoned

UP_TO_DATE = "output is up to date"
WHY_SKIPPED = "input and output match their record"
WHY_NEW = "no output yet"
WHY_OVERWRITE = "overwrite requested"
WHY_NO_RECORD = "output exists but there is no record of it being made from this input"
WHY_INPUT_CHANGED = "input changed since its output was made"
WHY_OUTPUT_CHANGED = "output does not match its record (changed or damaged since it was made)"


def display_path(rel: str) -> str:
    """File names that are not valid UTF-8 shown with escapes, safe for CSV/JSON."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


@dataclass
class FileResult:
    path: str  # relative to the input folder, display-safe
    status: str  # denoised | skipped | failed
    error: str = ""
    bytes: int | None = None
    mode: str = ""
    width: int | None = None
    height: int | None = None
    ms: float | None = None
    output: str = ""
    reason: str = ""  # why it was (re)done or skipped


@dataclass(frozen=True)
class OutputRecord:
    """What one output was made from: the evidence a rerun needs to skip it."""

    output: str  # relative to the output folder
    input: str  # relative to the input folder
    input_size: int
    input_sha256: str
    output_size: int
    output_sha256: str


_RECORD_TYPES = {f.name: (int if f.type == "int" else str) for f in fields(OutputRecord)}


@dataclass
class Job:
    source: Path
    rel: str
    target: Path
    bytes: int
    reason: str = WHY_NEW
    record: OutputRecord | None = None  # set when only the contents can tell whether to skip
    up_to_date: bool = False
    input_size: int = 0
    input_sha256: str = ""
    started: float = 0.0
    loaded: LoadedImage | None = None
    tiled: TiledImage | None = None
    blender: Blender | None = None


def check_folders(input_dir: str | os.PathLike, output_dir: str | os.PathLike) -> tuple[Path, Path]:
    for role, where in (("input", input_dir), ("output", output_dir)):
        if is_url(where):
            raise ConfigError(
                f"{role} folder {where}: folders in object storage are not supported yet; "
                "give a local or shared-file-system folder (the store may be a bucket)"
            )
    src = Path(input_dir).expanduser()
    if not src.is_dir():
        raise ConfigError(f"input folder {src} does not exist or is not a folder")
    src = src.resolve()
    dst = Path(output_dir).expanduser().resolve()
    if dst == src:
        raise ConfigError(
            "the output folder is the input folder; give another one (the input is never written)"
        )
    if dst in src.parents:
        raise ConfigError(
            f"the output folder {display_path(str(dst))} contains the input folder "
            f"{display_path(str(src))}; give one outside it (the input is never written)"
        )
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"output {dst} exists and is not a folder")
    return src, dst


def _target(dst_root: Path, rel: str, fmt: str) -> Path:
    target = dst_root / rel
    return target.with_suffix(".png") if fmt == "png" else target


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def scan(
    src: Path,
    dst: Path,
    pattern: str = "*",
    fmt: str = "same",
    overwrite: bool = False,
    records: dict[str, OutputRecord] | None = None,
) -> Iterator[Job | FileResult]:
    """Walk ``src`` (never following symlinked folders); yield work or verdicts.

    ``records`` (from the output folder's journal) say what each existing
    output was made from; whether it is still up to date is decided by the
    reader, which hashes the input anyway.
    """
    records = records or {}
    writable: dict[Path, bool] = {}  # output folders, resolved once each
    claimed: dict[Path, str] = {}  # output -> the input it is made from (x.jpg and x.png -> x.png)
    stack = [src]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            rel = os.path.relpath(folder, src)
            yield FileResult(display_path(rel), "failed", f"cannot list folder: {exc.strerror}")
            continue
        subdirs = []
        for entry in entries:
            path = Path(entry.path)
            rel = os.path.relpath(path, src)
            shown = display_path(rel)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if path.resolve() == dst:
                        logger.warning("skipping %s: it is the output folder", path)
                        continue
                    subdirs.append(path)
                    continue
                if not fnmatch.fnmatch(entry.name, pattern):
                    continue
                if entry.is_symlink():
                    target = Path(os.path.realpath(path))
                    if not target.exists():
                        yield FileResult(shown, "failed", "broken symlink")
                        continue
                    if target != src and src not in target.parents:
                        yield FileResult(
                            shown, "failed", "symlink points outside the input folder; not followed"
                        )
                        continue
                    if target.is_dir():
                        yield FileResult(shown, "skipped", "symlinked folder; not followed")
                        continue
                st = os.stat(path)
                if not stat.S_ISREG(st.st_mode):
                    yield FileResult(shown, "failed", "not a regular file")
                    continue
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    yield FileResult(shown, "skipped", "not an image file type", bytes=st.st_size)
                    continue
                target_path = _target(dst, rel, fmt)
                parent = target_path.parent
                if parent not in writable:
                    writable[parent] = _inside(parent.resolve(), dst)
                if not writable[parent]:
                    yield FileResult(
                        shown,
                        "failed",
                        "its output folder is a symlink leading out of the output "
                        "folder; not written",
                        st.st_size,
                    )
                    continue
                if target_path in claimed:
                    yield FileResult(
                        shown,
                        "failed",
                        f"its output {display_path(os.path.relpath(target_path, dst))} "
                        f"is already the output of {claimed[target_path]}; not written",
                        st.st_size,
                    )
                    continue
                claimed[target_path] = shown
                yield _job(path, rel, target_path, st.st_size, dst, overwrite, records)
            except OSError as exc:
                yield FileResult(shown, "failed", f"cannot stat: {exc.strerror or exc}")
        stack.extend(reversed(subdirs))


def _job(
    path: Path,
    rel: str,
    target: Path,
    size: int,
    dst: Path,
    overwrite: bool,
    records: dict[str, OutputRecord],
) -> Job:
    """The work for one input, with why it is done (or the record that the
    reader, which hashes the input anyway, compares to decide skipping)."""
    job = Job(path, rel, target, size)
    if overwrite:
        job.reason = WHY_OVERWRITE
    elif target.exists():
        record = records.get(os.path.relpath(target, dst))
        if record is None or record.input != rel:
            job.reason = WHY_NO_RECORD
        elif record.input_size != size:
            job.reason = WHY_INPUT_CHANGED
        else:
            job.record = record
    return job


@dataclass
class FolderPlan:
    """A folder run cut into chunks of inputs (relative paths) that can be
    denoised anywhere the two folders are visible, in any order, each more than
    once (outputs are atomic and journalled, so a chunk run twice redoes
    nothing); ``verdicts``: the files the scan already decided (not images,
    bad symlinks, output clashes)."""

    verdicts: list[FileResult]
    chunks: list[list[str]]
    total: int


def plan_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    pattern: str = "*",
    fmt: str = "same",
    overwrite: bool = False,
    chunk_files: int = 256,
) -> FolderPlan:
    """Scan ``input_dir`` once and cut the work into chunks of at most ``chunk_files``."""
    if fmt not in ("same", "png"):
        raise ConfigError(f"format must be 'same' or 'png', not {fmt!r}")
    if chunk_files < 1:
        raise ConfigError(f"--chunk-files must be at least 1, not {chunk_files}")
    src, dst = check_folders(input_dir, output_dir)
    items = list(
        scan(src, dst, pattern, fmt, overwrite, Journal(dst).read() if dst.is_dir() else {})
    )
    rels = [i.rel for i in items if isinstance(i, Job)]
    dst.mkdir(parents=True, exist_ok=True)
    if stale := remove_stale_parts(dst):
        logger.info("removed %d temporary files left by an interrupted run", stale)
    return FolderPlan(
        [i for i in items if isinstance(i, FileResult)],
        [rels[k : k + chunk_files] for k in range(0, len(rels), chunk_files)],
        len(items),
    )


def denoise_chunk_files(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    rels: list[str],
    predict: BatchPredictor,
    spec: TileSpec,
    *,
    fmt: str = "same",
    overwrite: bool = False,
    on_result: Callable[[FileResult, int, int], None] | None = None,
) -> list[FileResult]:
    """Denoise one chunk of a :class:`FolderPlan`, with the same rules as
    :func:`denoise_tree` (skips by the journal, atomic outputs, per-file
    verdicts). A file gone or changed into something else since the plan is
    reported, not fatal."""
    src, dst = check_folders(input_dir, output_dir)
    journal = Journal(dst)
    records = journal.read()
    jobs: list[Job] = []
    results: list[FileResult] = []
    for rel in rels:
        path = src / rel
        try:
            st = os.stat(path)
        except OSError as exc:
            results.append(
                FileResult(display_path(rel), "failed", f"cannot stat: {exc.strerror or exc}")
            )
            continue
        jobs.append(_job(path, rel, _target(dst, rel, fmt), st.st_size, dst, overwrite, records))
    return _run(jobs, results, len(rels), journal, predict, spec, fmt, 2, 2, 512, on_result)


def compact_journal(output_dir: str | os.PathLike) -> None:
    """One record per existing output, after a run (best effort: appended lines stay valid)."""
    journal = Journal(Path(output_dir).expanduser().resolve())
    try:
        journal.compact()
    except (OSError, DenoiseError, TimeoutError) as exc:
        logger.warning("could not compact %s: %s", journal.path, exc)


def temp_abandoned(name: str, mtime: float, now: float) -> bool:
    """Whether a file is one of our temporary files whose writer is gone: its
    pid is not alive on this host, or it comes from another host and is older
    than FOREIGN_TEMP_AGE. Any other name is never ours to remove."""
    owner = temp_owner(name)
    if owner is None:
        return False
    host, pid = owner
    if host != host_tag():
        return now - mtime > FOREIGN_TEMP_AGE
    return not pid_alive(pid)


def remove_stale_parts(dst: Path) -> int:
    """Temporary files that killed runs left behind (they never got final names);
    a live run's, and every file that is not ours, are left alone."""
    removed = 0
    now = time.time()
    for dirpath, _, filenames in os.walk(dst):  # symlinked folders are not followed
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                if temp_abandoned(name, os.lstat(path).st_mtime, now):
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


def parse_journal(data: bytes) -> dict[str, OutputRecord]:
    """The last record of each output in a journal's bytes; lines that are not
    whole records (a torn last line, garbage) are ignored."""
    records: dict[str, OutputRecord] = {}
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            values = {name: obj[name] for name in _RECORD_TYPES}
        except (ValueError, TypeError, KeyError):
            continue
        if all(type(v) is _RECORD_TYPES[k] for k, v in values.items()):
            record = OutputRecord(**values)
            records[record.output] = record
    return records


def format_record(record: OutputRecord) -> bytes:
    return json.dumps(asdict(record)).encode("ascii") + b"\n"


class Journal:
    """The output folder's record of finished outputs (JOURNAL_NAME): one JSON
    line per output, appended as outputs are written, compacted at the end of
    a run. A lock file serialises appends and rewrites, so runs into the same
    output folder at the same time lose none of each other's lines."""

    def __init__(self, dst: Path):
        from filelock import FileLock

        self.root = dst
        self.path = dst / JOURNAL_NAME
        self._mutex = (
            threading.Lock()
        )  # the file lock is per process; this one orders the writer threads
        self._lock = FileLock(
            dst / JOURNAL_LOCK_NAME, timeout=JOURNAL_LOCK_TIMEOUT, thread_local=False
        )

    def read(self) -> dict[str, OutputRecord]:
        try:
            return parse_journal(self.path.read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            return {}

    def append(self, record: OutputRecord) -> None:
        line = format_record(record)
        with self._mutex, self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # a torn last line stays a line of its own
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)

    def compact(self) -> bool:
        """Rewrite the journal with one record per output that still exists;
        False when it was already so (then it is not touched)."""
        with self._mutex, self._lock:
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                return False
            kept = [
                r for r in parse_journal(data).values() if os.path.lexists(self.root / r.output)
            ]
            compacted = b"".join(format_record(r) for r in kept)
            if compacted == data:
                return False
            write_atomic(self.path, compacted)
            return True


def output_matches(target: Path, record: OutputRecord) -> bool:
    """Whether the output file still holds exactly the bytes recorded for it."""
    try:
        with open(target, "rb") as fh:
            if os.fstat(fh.fileno()).st_size != record.output_size:
                return False
            return hashlib.file_digest(fh, "sha256").hexdigest() == record.output_sha256
    except OSError:
        return False


class BatchPredictor:
    """Runs the model on fixed-size batches (padding the last), so the compiled
    predict function is traced once per tile shape."""

    def __init__(self, model, batch_size: int = 256, pixel_budget: int = 1 << 20):
        self.model = model
        self.batch_size = batch_size
        self.pixel_budget = pixel_budget

    def batch_for(self, shape: tuple[int, int]) -> int:
        return max(1, min(self.batch_size, self.pixel_budget // max(shape[0] * shape[1], 1)))

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        n = len(tiles)
        size = self.batch_for(tiles.shape[1:3])
        out = np.empty(tiles.shape, dtype=np.float32)
        for start in range(0, n, size):
            chunk = tiles[start : start + size]
            k = len(chunk)
            if k < size:
                chunk = np.concatenate([chunk, np.zeros((size - k, *chunk.shape[1:]), np.float32)])
            out[start : start + k] = np.asarray(
                self.model.predict_on_batch(chunk), dtype=np.float32
            )[:k]
        return out


def _load(job: Job, spec: TileSpec) -> Job:
    """Read the input once: hash it, decide whether its output is up to date,
    else decode it from memory and cut it into tiles."""
    job.started = time.perf_counter()
    data = read_bytes(job.source)
    job.input_size = len(data)
    job.input_sha256 = hashlib.sha256(data).hexdigest()
    record = job.record
    if record is not None:
        if (job.input_size, job.input_sha256) != (record.input_size, record.input_sha256):
            job.reason = WHY_INPUT_CHANGED
        elif output_matches(job.target, record):
            job.up_to_date = True
            return job
        else:
            job.reason = WHY_OUTPUT_CHANGED
    job.loaded = decode_image(data)
    del data
    job.tiled = split(job.loaded.luma, spec)
    job.blender = Blender(job.tiled)
    return job


def _save(job: Job, fmt: str, journal: Journal) -> FileResult:
    loaded = job.loaded
    img = rebuild_image(loaded, job.blender.result())
    data = encode_image(img, output_format(job.source, loaded.format, fmt))
    write_atomic(job.target, data)
    failpoint("folder.after_output")
    journal.append(
        OutputRecord(
            os.path.relpath(job.target, journal.root),
            job.rel,
            job.input_size,
            job.input_sha256,
            len(data),
            hashlib.sha256(data).hexdigest(),
        )
    )
    w, h = loaded.size
    result = FileResult(
        display_path(job.rel),
        "denoised",
        "",
        job.bytes,
        loaded.mode,
        w,
        h,
        round((time.perf_counter() - job.started) * 1000, 1),
        display_path(str(job.target)),
        job.reason,
    )
    job.loaded = job.tiled = job.blender = None  # free the pixels now
    return result


def denoise_tree(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    predict: BatchPredictor,
    spec: TileSpec,
    *,
    pattern: str = "*",
    fmt: str = "same",
    overwrite: bool = False,
    readers: int = 2,
    writers: int = 2,
    max_pending: int = 512,
    on_result: Callable[[FileResult, int, int], None] | None = None,
) -> list[FileResult]:
    """Denoise every image under ``input_dir`` into ``output_dir``.

    An image is skipped while its output exists and both still match the
    output's record in the journal (``overwrite`` redoes everything); each
    result's ``reason`` says why it was done or skipped.
    ``on_result(result, done, total)`` is called (from this thread) as files
    finish; raising from it stops the run cleanly (finished outputs stay,
    recorded).
    """
    if fmt not in ("same", "png"):
        raise ConfigError(f"format must be 'same' or 'png', not {fmt!r}")
    src, dst = check_folders(input_dir, output_dir)
    journal = Journal(dst)
    items = list(scan(src, dst, pattern, fmt, overwrite, journal.read()))
    jobs = [i for i in items if isinstance(i, Job)]
    results: list[FileResult] = [i for i in items if isinstance(i, FileResult)]
    total = len(items)
    dst.mkdir(parents=True, exist_ok=True)
    if stale := remove_stale_parts(dst):
        logger.info("removed %d temporary files left by an interrupted run", stale)
    try:
        return _run(
            jobs,
            results,
            total,
            journal,
            predict,
            spec,
            fmt,
            readers,
            writers,
            max_pending,
            on_result,
        )
    finally:
        try:
            journal.compact()
        except (
            OSError,
            DenoiseError,
            TimeoutError,
        ) as exc:  # the appended lines stay valid as they are
            logger.warning("could not compact %s: %s", journal.path, exc)


def _run(
    jobs: list[Job],
    results: list[FileResult],
    total: int,
    journal: Journal,
    predict: BatchPredictor,
    spec: TileSpec,
    fmt: str,
    readers: int,
    writers: int,
    max_pending: int,
    on_result: Callable[[FileResult, int, int], None] | None,
) -> list[FileResult]:
    for r in results:
        if on_result:
            on_result(r, len(results), total)

    done_count = len(results)
    groups: dict[tuple[int, int], deque] = {}
    writes: deque[Future] = deque()

    def report(result: FileResult) -> None:
        nonlocal done_count
        results.append(result)
        done_count += 1
        if on_result:
            on_result(result, done_count, total)

    def drain_writes(block: bool) -> None:
        while writes and (block or writes[0].done()):
            fut = writes.popleft()
            job = fut.job  # type: ignore[attr-defined]
            try:
                report(fut.result())
            except (DenoiseError, OSError, ValueError) as exc:
                report(
                    FileResult(
                        display_path(job.rel), "failed", f"cannot write output: {exc}", job.bytes
                    )
                )

    def run_group(shape: tuple[int, int], force: bool) -> None:
        queue = groups.get(shape)
        size = predict.batch_for(shape)
        while queue and (len(queue) >= size or force):
            take = [queue.popleft() for _ in range(min(size, len(queue)))]
            tiles = np.stack([job.tiled.tiles[i] for job, i in take])[..., None]
            outputs = predict(tiles)[..., 0]
            for (job, i), out in zip(take, outputs, strict=True):
                if job.blender.add(i, out):
                    fut = writer_pool.submit(_save, job, fmt, journal)
                    fut.job = job  # type: ignore[attr-defined]
                    writes.append(fut)
            drain_writes(block=False)

    with (
        ThreadPoolExecutor(readers, thread_name_prefix="read") as reader_pool,
        ThreadPoolExecutor(writers, thread_name_prefix="write") as writer_pool,
    ):
        reads: deque[tuple[Job, Future]] = deque()
        queue_iter = iter(jobs)
        pending_tiles = 0
        try:
            while True:
                while len(reads) < readers * 4 and pending_tiles < max_pending * 64:
                    job = next(queue_iter, None)
                    if job is None:
                        break
                    reads.append((job, reader_pool.submit(_load, job, spec)))
                if not reads:
                    break
                job, fut = reads.popleft()
                try:
                    fut.result()
                except ImageError as exc:
                    report(FileResult(display_path(job.rel), "failed", str(exc), job.bytes))
                    continue
                except (OSError, ValueError, MemoryError) as exc:
                    report(
                        FileResult(
                            display_path(job.rel), "failed", f"cannot read: {exc}", job.bytes
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
                shape = job.tiled.tile_shape
                groups.setdefault(shape, deque()).extend((job, i) for i in range(len(job.tiled)))
                pending_tiles = sum(len(q) for q in groups.values())
                run_group(shape, force=False)
                # keep memory bounded: too many part-done images -> flush the fullest group
                if sum(len(q) for q in groups.values()) > max_pending * 64 or len(groups) > 8:
                    biggest = max(groups, key=lambda s: len(groups[s]))
                    run_group(biggest, force=True)
                pending_tiles = sum(len(q) for q in groups.values())
            for shape in list(groups):
                run_group(shape, force=True)
            drain_writes(block=True)
        except BaseException:
            for _, fut in reads:
                fut.cancel()
            for fut in writes:
                fut.cancel()
            raise
    return results


REPORT_FIELDS = [f for f in FileResult.__dataclass_fields__]


def write_report(results: list[FileResult], path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_FIELDS)
    writer.writeheader()
    for r in results:
        writer.writerow(asdict(r))
    write_atomic(path, buf.getvalue().encode("utf-8"))
    return path


def count(results: list[FileResult]) -> dict[str, int]:
    out = {"denoised": 0, "skipped": 0, "failed": 0}
    for r in results:
        out[r.status] = out.get(r.status, 0) + 1
    out["total"] = len(results)
    return out
