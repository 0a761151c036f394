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

import contextlib
import csv
import errno
import fcntl
import fnmatch
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from denoiser.errors import ConfigError, DenoiseError, ImageError
from denoiser.faults import failpoint
from denoiser.files import host_tag, pid_alive
from denoiser.images import (
    IMAGE_SUFFIXES,
    LoadedImage,
    decode_image,
    encode_output,
    encode_rgb_output,
    image_pixels,
    output_format,
    read_error,
    temp_owner,
    write_atomic,
)
from denoiser.routing import RoutedTiles, Router, one_model
from denoiser.tiling import TileSpec
from denoiser.trees import RemoteTree, Tree, open_tree, same_or_inside

logger = logging.getLogger(__name__)

JOURNAL_NAME = ".denoise-journal.jsonl"
JOURNAL_PARTS = ".denoise-journal.d"  # in object storage: one object per batch of records
JOURNAL_BATCH = 256  # records written to the journal at once ...
JOURNAL_SECONDS = 0.25  # ... or after this long, whichever comes first
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
WHY_INTERRUPTED = "output written by an interrupted run before its record"
NOT_OURS = "its output exists and was not made by denoise: kept; --overwrite replaces it"
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
    model: str = ""  # the version of the model that made the output
    route: str = ""  # how the image went through it (denoiser.routing.ROUTES)


@dataclass(frozen=True)
class OutputRecord:
    """What one output was made from: the evidence a rerun needs to skip it."""

    output: str  # relative to the output folder
    input: str  # relative to the input folder
    input_size: int
    input_sha256: str
    output_size: int
    output_sha256: str
    model: str = ""  # the version of the model that made it (what it says, not a rerun rule)
    route: str = ""  # how the image went through it (denoiser.routing.ROUTES)


_RECORD_TYPES = {f.name: (int if f.type == "int" else str) for f in fields(OutputRecord)}
_OPTIONAL_FIELDS = {"model", "route"}  # lines written before they were recorded lack them


@dataclass
class Job:
    source: Path | str  # a path in the input tree
    rel: str
    target: Path | str  # a path in the output tree
    target_rel: str
    bytes: int
    reason: str = WHY_NEW
    record: OutputRecord | None = None  # set when only the contents can tell whether to skip
    up_to_date: bool = False
    input_size: int = 0
    input_sha256: str = ""
    started: float = 0.0
    loaded: LoadedImage | None = None
    work: RoutedTiles | None = None  # its tiles as its model takes them, and their blend
    pixels: int = 0  # held in the run's PixelBudget from its decode until its output is written


def check_folders(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    store: str | os.PathLike | None = None,
) -> tuple[Tree, Tree]:
    """The input and output trees (local folders or object-storage prefixes);
    a ConfigError when the input is missing, the output would hold it, or
    the ``store`` (where the run's report goes) is inside it."""
    src = open_tree(input_dir, "input", must_exist=True)
    dst = open_tree(output_dir, "output", must_exist=False)
    if store is not None and same_or_inside(open_tree(store, "store", must_exist=False), src):
        raise ConfigError(
            f"the store {display_path(str(store))} is inside the input folder "
            f"{display_path(str(src))}, which is never written; give a store outside it"
        )
    if same_or_inside(src, dst):
        if str(src.root) == str(dst.root):
            raise ConfigError(
                "the output folder is the input folder; give another one (the input is never written)"
            )
        raise ConfigError(
            f"the output folder {display_path(str(dst))} contains the input folder "
            f"{display_path(str(src))}; give one outside it (the input is never written)"
        )
    return src, dst


def _target_rel(rel: str, fmt: str) -> str:
    """The output's path in the output tree: the input's, or with ``.png`` for ``fmt`` png."""
    return posixpath.splitext(rel)[0] + ".png" if fmt == "png" else rel


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def scan(
    src: Tree,
    dst: Tree,
    pattern: str = "*",
    fmt: str = "same",
    overwrite: bool = False,
    records: dict[str, OutputRecord] | None = None,
    claims: set[str] | frozenset[str] = frozenset(),
    settle: float = 0.0,
) -> Iterator[Job | FileResult]:
    """Walk the input tree; yield work or verdicts.

    ``records`` (from the output folder's journal) say what each existing
    output was made from; whether it is still up to date is decided by the
    reader, which hashes the input anyway. ``claims``: outputs an earlier run
    claimed (made by denoise even without a record). ``settle``: a local file
    modified less than that many seconds ago may still be being written; it is
    left (skipped, with that reason) for a later run (an inbox's, see flows/watch.py).
    """
    if isinstance(src, RemoteTree) or isinstance(dst, RemoteTree):
        yield from _scan_listing(src, dst, pattern, fmt, overwrite, records or {}, claims)
    else:
        yield from _scan_local(
            src.root, dst.root, pattern, fmt, overwrite, records or {}, claims, settle
        )


def _scan_local(
    src: Path,
    dst: Path,
    pattern: str,
    fmt: str,
    overwrite: bool,
    records: dict[str, OutputRecord],
    claims: set[str] | frozenset[str],
    settle: float = 0.0,
) -> Iterator[Job | FileResult]:
    """A local input into a local output: symlinked folders are never
    followed, symlinks out of the input and outputs through symlinked folders
    out of the output are refused."""
    now = time.time()
    claimed: dict[str, str] = {}  # output -> the input it is made from (x.jpg and x.png -> x.png)
    matches = re.compile(fnmatch.translate(pattern)).match  # fnmatch's test, compiled once
    stack = [("", str(src))]  # (its path relative to the input, with a slash; the folder)
    while stack:
        prefix, folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            shown = display_path(prefix[:-1] or ".")
            yield FileResult(shown, "failed", f"cannot list folder: {exc.strerror}")
            continue
        out_folder = os.path.join(str(dst), prefix)  # where this folder's outputs go
        writable = None  # whether that is inside the output folder, resolved when needed
        subdirs = []
        for entry in entries:
            name = entry.name
            rel = prefix + name
            shown = display_path(rel)
            try:
                if entry.is_dir(follow_symlinks=False):
                    path = Path(entry.path)
                    if path.resolve() == dst:
                        logger.warning("skipping %s: it is the output folder", path)
                        continue
                    subdirs.append((rel + "/", entry.path))
                    continue
                if not matches(name):
                    continue
                if entry.is_symlink():
                    target = Path(os.path.realpath(entry.path))
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
                st = os.stat(entry.path)
                if not stat.S_ISREG(st.st_mode):
                    yield FileResult(shown, "failed", "not a regular file")
                    continue
                if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                    yield FileResult(shown, "skipped", "not an image file type", bytes=st.st_size)
                    continue
                if settle and now - st.st_mtime < settle:
                    yield FileResult(
                        shown,
                        "skipped",
                        f"modified in the last {settle:g} s, maybe still being written; "
                        "left for a later run",
                        bytes=st.st_size,
                    )
                    continue
                if writable is None:
                    writable = _inside(Path(out_folder).resolve(), dst)
                if not writable:
                    yield FileResult(
                        shown,
                        "failed",
                        "its output folder is a symlink leading out of the output "
                        "folder; not written",
                        st.st_size,
                    )
                    continue
                target_name = _target_rel(name, fmt)
                target_rel = prefix + target_name
                if clash := _claim(claimed, target_rel, shown, st.st_size):
                    yield clash
                    continue
                target = out_folder + target_name
                yield _job(
                    entry.path,
                    rel,
                    target,
                    target_rel,
                    st.st_size,
                    _exists(target),
                    overwrite,
                    records,
                    claims,
                )
            except OSError as exc:
                yield FileResult(shown, "failed", f"cannot stat: {exc.strerror or exc}")
        stack.extend(reversed(subdirs))


def _exists(path: str) -> bool:
    """Whether ``path`` exists (following symlinks), as ``Path.exists`` says:
    errors other than a missing file or folder are raised."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            return False
        raise
    return True


def _claim(claimed: dict[str, str], target_rel: str, shown: str, size: int) -> FileResult | None:
    """None when the output is free (it is now this input's), else the verdict."""
    if target_rel in claimed:
        return FileResult(
            shown,
            "failed",
            f"its output {display_path(target_rel)} is already the output of "
            f"{claimed[target_rel]}; not written",
            size,
        )
    claimed[target_rel] = shown
    return None


def _scan_listing(
    src: Tree,
    dst: Tree,
    pattern: str,
    fmt: str,
    overwrite: bool,
    records: dict[str, OutputRecord],
    claims: set[str] | frozenset[str],
) -> Iterator[Job | FileResult]:
    """Any pair with an object-storage side: one listing of each tree (no
    request per file). In object storage there are no symlinks; the output
    prefix is skipped when it lies inside the input."""
    inputs = list_files(src)
    outputs = list_files(dst)
    skip = None
    if same_or_inside(dst, src):
        skip = posixpath.relpath(str(dst.root), str(src.root)) + "/"
    claimed: dict[str, str] = {}
    for rel in sorted(inputs):
        size = inputs[rel]
        if skip and rel.startswith(skip):
            continue
        name = posixpath.basename(rel)
        if not fnmatch.fnmatch(name, pattern):
            continue
        shown = display_path(rel)
        if size == NOT_REGULAR:
            yield FileResult(shown, "failed", "not a regular file (symlinks are not followed here)")
            continue
        if posixpath.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
            yield FileResult(shown, "skipped", "not an image file type", bytes=size)
            continue
        target_rel = _target_rel(rel, fmt)
        if clash := _claim(claimed, target_rel, shown, size):
            yield clash
            continue
        yield _job(
            src.path(rel),
            rel,
            dst.path(target_rel),
            target_rel,
            size,
            target_rel in outputs,
            overwrite,
            records,
            claims,
        )


NOT_REGULAR = -1


def list_files(tree: Tree) -> dict[str, int]:
    """Every file under a tree, relative path -> size (for a local tree,
    NOT_REGULAR for symlinks and other non-regular files: not followed)."""
    if isinstance(tree, RemoteTree):
        return tree.listing()
    found: dict[str, int] = {}
    if not tree.root.is_dir():
        return found
    for dirpath, _, names in os.walk(tree.root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, tree.root).replace(os.sep, "/")
            found[rel] = st.st_size if stat.S_ISREG(st.st_mode) else NOT_REGULAR
    return found


def _job(
    source: Path | str,
    rel: str,
    target: Path | str,
    target_rel: str,
    size: int | None,
    exists: bool | None,
    overwrite: bool,
    records: dict[str, OutputRecord],
    claims: set[str] | frozenset[str] = frozenset(),
) -> Job | FileResult:
    """The work for one input, with why it is done (or the record that the
    reader, which hashes the input anyway, compares to decide skipping), or
    the verdict that its output is a file denoise did not make (no record of
    it in the journal): that one is the user's and stays, unless ``overwrite``.
    ``size`` and ``exists`` None: not known before reading (object storage
    asked nothing per file); a record then decides, checked by the reader."""
    job = Job(source, rel, target, target_rel, size)
    record = records.get(target_rel)
    if overwrite:
        job.reason = WHY_OVERWRITE
    elif exists is False:
        pass  # WHY_NEW
    elif record is None:
        if exists and target_rel in claims:
            job.reason = WHY_INTERRUPTED
        elif exists:
            return FileResult(
                display_path(rel), "skipped", NOT_OURS, size, output=display_path(target_rel)
            )
    elif record.input != rel:
        if exists:
            job.reason = WHY_NO_RECORD
    elif size is not None and record.input_size != size:
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
        target_rel = _target_rel(rel, fmt)
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
        work = _job(
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
    return _run(jobs, results, len(rels), src, dst, journal, router, fmt, on_result)


MIN_CHUNK_BATCH = 32


def as_router(predict: BatchPredictor | Router, spec: TileSpec | None) -> Router:
    """``predict`` as a Router: itself, or every image through its one model."""
    if isinstance(predict, Router):
        return predict
    if spec is None:
        raise ConfigError("one model needs its tiling (a TileSpec)")
    return one_model(predict, spec)


def compact_journal(output_dir: str | os.PathLike) -> None:
    """One record per existing output, after a run (best effort: appended lines stay valid)."""
    journal = journal_for(open_tree(output_dir, "output", must_exist=False))
    try:
        journal.compact()
    except (OSError, DenoiseError, TimeoutError) as exc:
        logger.warning("could not compact the journal of %s: %s", output_dir, exc)


def prepare_output(dst: Tree) -> int:
    """Make the output folder (local) and remove the temporary files killed
    writers left in it; how many. Objects have no temporary names."""
    if isinstance(dst, RemoteTree):
        return 0
    dst.root.mkdir(parents=True, exist_ok=True)
    return remove_stale_parts(dst.root)


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


def parse_journal(data: bytes, claims: set[str] | None = None) -> dict[str, OutputRecord]:
    """The last record of each output in a journal's bytes; lines that are not
    whole records (a torn last line, garbage) are ignored. ``claims``, when
    given, gets the outputs a run claimed (:func:`format_claim`)."""
    records: dict[str, OutputRecord] = {}
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if claims is not None and isinstance(obj.get("claim"), str):
                claims.add(obj["claim"])
                continue
            values = {
                name: obj[name] if name in obj or name not in _OPTIONAL_FIELDS else ""
                for name in _RECORD_TYPES
            }
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
        if all(type(v) is _RECORD_TYPES[k] for k, v in values.items()):
            record = OutputRecord(**values)
            records[record.output] = record
    return records


_json_str = json.encoder.encode_basestring_ascii  # a string as json.dumps writes it


def format_record(record: OutputRecord) -> bytes:
    """One journal line: the record as ``json.dumps`` of its fields writes it."""
    return (
        f'{{"output": {_json_str(record.output)}, "input": {_json_str(record.input)}, '
        f'"input_size": {record.input_size:d}, "input_sha256": {_json_str(record.input_sha256)}, '
        f'"output_size": {record.output_size:d}, '
        f'"output_sha256": {_json_str(record.output_sha256)}, '
        f'"model": {_json_str(record.model)}, "route": {_json_str(record.route)}}}\n'
    ).encode("ascii")


def open_private(path: str, flags: int, what: str, keep: bool = True) -> int:
    """Open a file of the output folder's own (the journal, its lock) so that
    nothing is written through a link into another folder: a symlink in its
    place is removed (it is a name in the output folder, ours by its name),
    a file hard-linked elsewhere is first replaced by a copy of its own (the
    other name keeps its bytes; without ``keep``, an empty file), and anything
    but a regular file is refused. ``flags`` must open it for reading."""
    for _ in range(3):
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            logger.warning("%s %s was a symlink; replaced by a file of its own", what, path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            continue
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ConfigError(f"{path} is not a regular file; move it aside")
        if st.st_nlink == 1:
            return fd
        try:
            data = os.pread(fd, st.st_size, 0) if keep and st.st_size else b""
        finally:
            os.close(fd)
        logger.warning("%s %s was hard-linked elsewhere; replaced by a copy of its own", what, path)
        write_atomic(path, data)
    raise ConfigError(f"{path} keeps being replaced by a link; move it aside")


class FolderLock:
    """An exclusive lock on a file of the output folder (``flock``), opened
    with :func:`open_private` and never truncated: a link planted in its
    place can neither be written through nor shared with another folder."""

    def __init__(self, path: str, timeout: float):
        self.path = path
        self.timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT, "lock file", keep=False)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise TimeoutError(
                        f"{self.path}: held by another run for over {self.timeout:.0f} s"
                    ) from None
                time.sleep(0.01)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def format_claim(output: str) -> bytes:
    """One journal line saying a run is about to write ``output``: written
    before the output's rename, so that an output whose record a killed run
    never wrote is still known as denoise's (redone), not taken for a user's
    file (kept)."""
    return f'{{"claim": {_json_str(output)}}}\n'.encode("ascii")


class Journal:
    """The output folder's record of finished outputs (JOURNAL_NAME): one JSON
    line per output, appended in batches as outputs are written, compacted at
    the end of a run. A lock file serialises appends and rewrites, so runs
    into the same output folder at the same time lose none of each other's
    lines. Both files are the folder's own (:func:`open_private`)."""

    def __init__(self, dst: Path):
        self.root = dst
        self.path = dst / JOURNAL_NAME
        # the file lock orders processes; this one orders the writer threads
        self._mutex = threading.Lock()
        self._lock = FolderLock(str(dst / JOURNAL_LOCK_NAME), JOURNAL_LOCK_TIMEOUT)

    def read(self) -> dict[str, OutputRecord]:
        return self.read_all()[0]

    def read_all(self) -> tuple[dict[str, OutputRecord], set[str]]:
        """The journal's records and claims; a symlink in its place counts as
        no journal (it is replaced at the first append)."""
        claims: set[str] = set()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return {}, claims
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return {}, claims
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{self.path} is not a regular file; move it aside")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                return parse_journal(fh.read(), claims), claims
        finally:
            os.close(fd)

    def claim(self, outputs: list[str]) -> None:
        """Claim the outputs a run is about to write (:func:`format_claim`)."""
        if outputs:
            self._write(b"".join(format_claim(o) for o in outputs))

    def append(self, records: list[OutputRecord]) -> None:
        self._write(b"".join(format_record(r) for r in records))

    def _write(self, lines: bytes) -> None:
        with self._mutex, self._lock:
            fd = open_private(str(self.path), os.O_RDWR | os.O_APPEND | os.O_CREAT, "journal")
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    lines = b"\n" + lines  # a torn last line stays a line of its own
                view = memoryview(lines)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)

    def compact(self) -> bool:
        """Rewrite the journal with one record per output that still exists;
        False when it was already so (then it is not touched)."""
        with self._mutex, self._lock:
            try:
                fd = open_private(str(self.path), os.O_RDONLY, "journal")
            except FileNotFoundError:
                return False
            try:
                data = os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
            root = str(self.root)
            claims: set[str] = set()
            records = parse_journal(data, claims)
            kept = [r for r in records.values() if os.path.lexists(os.path.join(root, r.output))]
            orphans = sorted(
                c for c in claims - records.keys() if os.path.lexists(os.path.join(root, c))
            )
            compacted = b"".join(format_record(r) for r in kept)
            compacted += b"".join(format_claim(c) for c in orphans)
            if compacted == data:
                return False
            write_atomic(self.path, compacted)
            return True


class RemoteJournal:
    """The journal of an output prefix in object storage, where nothing can be
    appended to: each batch of records is an object of its own under
    JOURNAL_PARTS (named by time, so later records win), and compaction merges
    them into JOURNAL_NAME and deletes the parts it merged. Concurrent runs
    write different parts; a record lost to a race between two compactions
    only means its output is made again."""

    def __init__(self, tree: RemoteTree):
        self.tree = tree
        self.path = tree.path(JOURNAL_NAME)

    def _read_all(self) -> tuple[dict[str, OutputRecord], set[str], list[str], bytes]:
        parts = sorted(
            self.tree.path(rel)
            for rel in self.tree.listing(JOURNAL_PARTS)
            if rel.endswith(".jsonl")
        )
        got = self.tree.read_many([self.path, *parts])
        main = got.get(self.path)
        main = main if isinstance(main, bytes) else b""
        chunks = [main] + [got[p] for p in parts if isinstance(got.get(p), bytes)]
        data = b"\n".join(chunks)
        claims: set[str] = set()
        records = parse_journal(data, claims)
        return records, claims, [p for p in parts if isinstance(got.get(p), bytes)], main

    def read(self) -> dict[str, OutputRecord]:
        return self._read_all()[0]

    def read_all(self) -> tuple[dict[str, OutputRecord], set[str]]:
        records, claims, _, _ = self._read_all()
        return records, claims

    def claim(self, outputs: list[str]) -> None:
        if outputs:
            self._write(b"".join(format_claim(o) for o in outputs))

    def append(self, records: list[OutputRecord]) -> None:
        self._write(b"".join(map(format_record, records)))

    def _write(self, lines: bytes) -> None:
        name = f"{time.time_ns():020d}-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self.tree.write(self.tree.path(f"{JOURNAL_PARTS}/{name}"), lines)

    def compact(self) -> bool:
        records, claims, parts, main = self._read_all()
        existing = self.tree.listing()
        compacted = b"".join(format_record(r) for r in records.values() if r.output in existing)
        compacted += b"".join(
            format_claim(c) for c in sorted(claims - records.keys()) if c in existing
        )
        if compacted == main and not parts:
            return False
        if compacted != main:
            self.tree.write(self.path, compacted)
        self.tree.remove(parts)
        return True


def journal_for(dst: Tree) -> Journal | RemoteJournal:
    return RemoteJournal(dst) if isinstance(dst, RemoteTree) else Journal(dst.root)


class JournalWriter:
    """Records of finished outputs, written to the journal in batches
    (JOURNAL_BATCH records or JOURNAL_SECONDS, whichever first), each batch
    only after the outputs it names are durable. A crash loses at most the
    records of the last batch: those outputs are made again by the next run."""

    def __init__(self, dst: Tree, journal: Journal | RemoteJournal):
        self.dst = dst
        self.journal = journal
        self.pending: list[OutputRecord] = []
        self.lock = threading.Lock()
        self.flushing = threading.Lock()
        self.since = time.monotonic()

    def add(self, record: OutputRecord) -> None:
        with self.lock:
            self.pending.append(record)
            due = (
                len(self.pending) >= JOURNAL_BATCH
                or time.monotonic() - self.since > JOURNAL_SECONDS
            )
        if due:
            self.flush()

    def flush(self) -> None:
        with self.flushing:
            with self.lock:
                batch, self.pending = self.pending, []
                self.since = time.monotonic()
            if batch:
                self.dst.flush()
                self.journal.append(batch)


class BatchPredictor:
    """Runs the model on fixed-size batches (padding the last), so the compiled
    predict function is traced once per tile shape (a model whose
    ``pads_batches`` is False, such as a LiteRT one, gets the last batch as it is)."""

    def __init__(self, model, batch_size: int = 256, pixel_budget: int = 1 << 20):
        self.model = model
        self.batch_size = batch_size
        self.pixel_budget = pixel_budget
        self.pads = getattr(model, "pads_batches", True)

    def at_most(self, batch_size: int) -> BatchPredictor:
        """The same model in batches of at most ``batch_size``."""
        if batch_size >= self.batch_size:
            return self
        return BatchPredictor(self.model, batch_size, self.pixel_budget)

    def batch_for(self, shape: tuple[int, int]) -> int:
        return max(1, min(self.batch_size, self.pixel_budget // max(shape[0] * shape[1], 1)))

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        n = len(tiles)
        size = self.batch_for(tiles.shape[1:3])
        out = np.empty(tiles.shape, dtype=np.float32)
        for start in range(0, n, size):
            chunk = tiles[start : start + size]
            k = len(chunk)
            if k < size and self.pads:
                chunk = np.concatenate([chunk, np.zeros((size - k, *chunk.shape[1:]), np.float32)])
            out[start : start + k] = np.asarray(
                self.model.predict_on_batch(chunk), dtype=np.float32
            )[:k]
        return out


def _read(tree: Tree, path) -> bytes:
    """An input's bytes; an ImageError saying why they cannot be read."""
    try:
        return tree.read(path)
    except FileNotFoundError:
        raise ImageError("cannot read: no such file (gone since the scan)") from None
    except OSError as exc:
        raise read_error(exc) from None


class PixelBudget:
    """Decoded pixels in flight, from an image's decode until its output is
    written: a reader waits before decoding while the images in flight and
    its own would pass ``limit`` (one image is always let through, however
    large). What bounds a run's memory whatever the number and size of its
    images; the encoded bytes read ahead are bounded apart."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.waiting = 0
        self._cond = threading.Condition()

    def acquire(self, pixels: int, own: int = 0) -> None:
        """Wait for room for ``pixels``; ``own``: pixels the caller already
        holds (a reader's task, handed over only when the whole task is
        read): they never make it wait for itself."""
        with self._cond:
            self.waiting += 1
            try:
                while self.used > own and self.used + pixels > self.limit:
                    self._cond.wait()
            finally:
                self.waiting -= 1
            self.used += pixels
            self.peak = max(self.peak, self.used)

    def release(self, pixels: int) -> None:
        if pixels:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


def _load(job: Job, router: Router, src: Tree, dst: Tree, budget: PixelBudget, own: int = 0) -> Job:
    """Read the input once: hash it, decide whether its output is up to date,
    else decode it from memory (within the pixel budget) and cut it into tiles
    for the model ``router`` picks for it."""
    job.started = time.perf_counter()
    data = _read(src, job.source)
    job.bytes = job.input_size = len(data)
    job.input_sha256 = hashlib.sha256(data).hexdigest()
    record = job.record
    if record is not None:
        if (job.input_size, job.input_sha256) != (record.input_size, record.input_sha256):
            job.reason = WHY_INPUT_CHANGED
        elif dst.matches(job.target, record.output_size, record.output_sha256):
            job.up_to_date = True
            return job
        else:
            job.reason = WHY_OUTPUT_CHANGED
    pixels = image_pixels(data)
    budget.acquire(pixels, own)
    job.pixels = pixels
    try:
        job.loaded = decode_image(data)
        del data
        job.work = router.tiles(job.loaded)
    except BaseException:
        job.loaded = job.work = None
        budget.release(job.pixels)
        job.pixels = 0
        raise
    return job


def _save(job: Job, fmt: str, dst: Tree, writer: JournalWriter) -> FileResult:
    loaded, work = job.loaded, job.work
    data = _encode(loaded, work.result(), output_format(job.rel, loaded.format, fmt))
    dst.write(job.target, data)
    failpoint("folder.after_output")
    writer.add(
        OutputRecord(
            job.target_rel,
            job.rel,
            job.input_size,
            job.input_sha256,
            len(data),
            hashlib.sha256(data).hexdigest(),
            work.denoiser.name,
            work.route,
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
        display_path(dst.show(job.target)),
        job.reason,
        work.denoiser.name,
        work.route,
    )
    job.loaded = job.work = None  # free the pixels now
    return result


def _encode(loaded: LoadedImage, denoised: np.ndarray, fmt: str) -> bytes:
    """The output's bytes from a denoised luminance (H, W) or RGB (H, W, 3)."""
    if denoised.ndim == 3:
        return encode_rgb_output(loaded, denoised, fmt)
    return encode_output(loaded, denoised, fmt)


def _load_all(
    jobs: list[Job], router: Router, src: Tree, dst: Tree, budget: PixelBudget
) -> list[Exception | None]:
    """:func:`_load` each job in turn; what each raised (None: it was read)."""
    errors: list[Exception | None] = []
    for job in jobs:
        try:
            _load(job, router, src, dst, budget, sum(j.pixels for j in jobs))
        except (DenoiseError, OSError, ValueError, MemoryError) as exc:
            errors.append(exc)
        else:
            errors.append(None)
    return errors


def _save_all(
    jobs: list[Job], fmt: str, dst: Tree, writer: JournalWriter, budget: PixelBudget
) -> list[FileResult]:
    """:func:`_save` each job in turn, giving its pixels back to the budget;
    the result of each, failed or not."""
    results = []
    for job in jobs:
        try:
            results.append(_save(job, fmt, dst, writer))
        except (DenoiseError, OSError, ValueError) as exc:
            results.append(
                FileResult(
                    display_path(job.rel), "failed", f"cannot write output: {exc}", job.bytes
                )
            )
        finally:
            job.loaded = job.work = None
            budget.release(job.pixels)
            job.pixels = 0
    return results


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
    ``predict`` picks for it (a :class:`~denoiser.routing.Router`), or all
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
        return _run(jobs, results, len(items), src, dst, journal, router, fmt, on_result)
    finally:
        try:
            journal.compact()
        except (OSError, DenoiseError, TimeoutError) as exc:  # appended lines stay valid
            logger.warning("could not compact the journal of %s: %s", dst, exc)


MAX_PENDING_TILES = 512 * 64  # tiles read ahead and waiting for a batch: bounds memory
# decoded pixels in flight (decode to write), whatever the images' number and size;
# a 36-megapixel photograph is one at a time (see README, "memory")
PIXELS_IN_FLIGHT = 64 << 20
READ_AHEAD_BYTES = 16 << 20  # encoded input bytes being read and decoded at once ...
READ_AHEAD_FILES = 1024  # ... in at most this many files
UNKNOWN_SIZE = 1 << 20  # what an input of unknown size counts for in that budget
TASK_BYTES = 1 << 20  # a task of a reader or writer thread ends after this much input


def _run(
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
            writes.append(writer_pool.submit(_save_all, task, fmt, dst, writer, budget))
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
                        (task, reader_pool.submit(_load_all, task, router, src, dst, budget), size)
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
