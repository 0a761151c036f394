"""Denoising a whole folder tree, in batch, without ever touching the input.

Files are decoded by reader threads, cut into tiles, and tiles from many files
are batched together for the model; finished images are encoded and written
by writer threads while the model works on the next batch. Every output is
written to a temporary name and renamed, outputs newer than their input are
skipped (so a rerun finishes an interrupted one), and every file gets a row
in the report, whatever went wrong with it.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from denoiser.errors import ConfigError, DenoiseError, ImageError
from denoiser.images import (
    IMAGE_SUFFIXES,
    LoadedImage,
    encode_image,
    output_format,
    read_image,
    rebuild_image,
    write_atomic,
)
from denoiser.tiling import Blender, TiledImage, TileSpec, split

logger = logging.getLogger(__name__)

PART_SUFFIX = ".part"


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


@dataclass
class Job:
    source: Path
    rel: str
    target: Path
    bytes: int
    started: float = 0.0
    loaded: LoadedImage | None = None
    tiled: TiledImage | None = None
    blender: Blender | None = None


def check_folders(input_dir: str | os.PathLike, output_dir: str | os.PathLike) -> tuple[Path, Path]:
    src = Path(input_dir).expanduser()
    if not src.is_dir():
        raise ConfigError(f"input folder {src} does not exist or is not a folder")
    src = src.resolve()
    dst = Path(output_dir).expanduser().resolve()
    if dst == src:
        raise ConfigError("the output folder is the input folder; give another one (the input is never written)")
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"output {dst} exists and is not a folder")
    return src, dst


def _target(dst_root: Path, rel: str, fmt: str) -> Path:
    target = dst_root / rel
    return target.with_suffix(".png") if fmt == "png" else target


def scan(src: Path, dst: Path, pattern: str = "*", fmt: str = "same",
         overwrite: bool = False) -> Iterator[Job | FileResult]:
    """Walk ``src`` (never following symlinked folders); yield work or verdicts."""
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
                        yield FileResult(shown, "failed", "symlink points outside the input folder; not followed")
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
                if not overwrite and target_path.exists() and target_path.stat().st_mtime >= st.st_mtime:
                    yield FileResult(shown, "skipped", "output is up to date", bytes=st.st_size,
                                     output=display_path(str(target_path)))
                    continue
                yield Job(path, rel, target_path, st.st_size)
            except OSError as exc:
                yield FileResult(shown, "failed", f"cannot stat: {exc.strerror or exc}")
        stack.extend(reversed(subdirs))


def remove_stale_parts(dst: Path) -> int:
    """Temporary files a killed run left behind (they never had final names)."""
    removed = 0
    if dst.is_dir():
        for path in dst.rglob(f".*{PART_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


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
            chunk = tiles[start:start + size]
            k = len(chunk)
            if k < size:
                chunk = np.concatenate([chunk, np.zeros((size - k, *chunk.shape[1:]), np.float32)])
            out[start:start + k] = np.asarray(self.model.predict_on_batch(chunk), dtype=np.float32)[:k]
        return out


def _load(job: Job, spec: TileSpec) -> Job:
    job.started = time.perf_counter()
    job.loaded = read_image(job.source)
    job.tiled = split(job.loaded.luma, spec)
    job.blender = Blender(job.tiled)
    return job


def _save(job: Job, fmt: str) -> FileResult:
    loaded = job.loaded
    img = rebuild_image(loaded, job.blender.result())
    data = encode_image(img, output_format(job.source, loaded.format, fmt))
    write_atomic(job.target, data, PART_SUFFIX)
    w, h = loaded.size
    result = FileResult(display_path(job.rel), "denoised", "", job.bytes, loaded.mode, w, h,
                        round((time.perf_counter() - job.started) * 1000, 1), display_path(str(job.target)))
    job.loaded = job.tiled = job.blender = None  # free the pixels now
    return result


def denoise_tree(input_dir: str | os.PathLike, output_dir: str | os.PathLike, predict: BatchPredictor,
                 spec: TileSpec, *, pattern: str = "*", fmt: str = "same", overwrite: bool = False,
                 readers: int = 2, writers: int = 2, max_pending: int = 512,
                 on_result: Callable[[FileResult, int, int], None] | None = None) -> list[FileResult]:
    """Denoise every image under ``input_dir`` into ``output_dir``.

    ``on_result(result, done, total)`` is called (from this thread) as files
    finish; raising from it stops the run cleanly (finished outputs stay).
    """
    if fmt not in ("same", "png"):
        raise ConfigError(f"format must be 'same' or 'png', not {fmt!r}")
    src, dst = check_folders(input_dir, output_dir)
    items = list(scan(src, dst, pattern, fmt, overwrite))
    jobs = [i for i in items if isinstance(i, Job)]
    results: list[FileResult] = [i for i in items if isinstance(i, FileResult)]
    total = len(items)
    dst.mkdir(parents=True, exist_ok=True)
    if stale := remove_stale_parts(dst):
        logger.info("removed %d temporary files left by an interrupted run", stale)
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
                report(FileResult(display_path(job.rel), "failed", f"cannot write output: {exc}", job.bytes))

    def run_group(shape: tuple[int, int], force: bool) -> None:
        queue = groups.get(shape)
        size = predict.batch_for(shape)
        while queue and (len(queue) >= size or force):
            take = [queue.popleft() for _ in range(min(size, len(queue)))]
            tiles = np.stack([job.tiled.tiles[i] for job, i in take])[..., None]
            outputs = predict(tiles)[..., 0]
            for (job, i), out in zip(take, outputs, strict=True):
                if job.blender.add(i, out):
                    fut = writer_pool.submit(_save, job, fmt)
                    fut.job = job  # type: ignore[attr-defined]
                    writes.append(fut)
            drain_writes(block=False)

    with ThreadPoolExecutor(readers, thread_name_prefix="read") as reader_pool, \
            ThreadPoolExecutor(writers, thread_name_prefix="write") as writer_pool:
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
                    report(FileResult(display_path(job.rel), "failed", f"cannot read: {exc}", job.bytes))
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
