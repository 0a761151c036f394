"""The output folder's journal: the record of what each output was made
from (:class:`OutputRecord`), the claims a run writes before its outputs,
the lock that serialises runs into the same folder, the journal of a local
folder (:class:`Journal`) and of an object-storage prefix
(:class:`RemoteJournal`), and :class:`JournalWriter`, which records finished
outputs in batches once they are durable.

Imports :mod:`denoiser.folder.results` of this package.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from denoiser.core.errors import ConfigError, DenoiseError
from denoiser.core.files import host_tag
from denoiser.folder.trees import RemoteTree, Tree, open_tree
from denoiser.imaging.images import write_atomic

logger = logging.getLogger(__name__)


JOURNAL_NAME = ".denoise-journal.jsonl"
JOURNAL_PARTS = ".denoise-journal.d"  # in object storage: one object per batch of records
JOURNAL_BATCH = 256  # records written to the journal at once ...
JOURNAL_SECONDS = 0.25  # ... or after this long, whichever comes first
JOURNAL_LOCK_NAME = ".denoise-journal.lock"
JOURNAL_LOCK_TIMEOUT = (
    120.0  # seconds; the lock is only held to append a line or rewrite the journal
)


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
    route: str = ""  # how the image went through it (denoiser.folder.routing.ROUTES)


_RECORD_TYPES = {f.name: (int if f.type == "int" else str) for f in fields(OutputRecord)}
_OPTIONAL_FIELDS = {"model", "route"}  # lines written before they were recorded lack them


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


def compact_journal(output_dir: str | os.PathLike) -> None:
    """One record per existing output, after a run (best effort: appended lines stay valid)."""
    journal = journal_for(open_tree(output_dir, "output", must_exist=False))
    try:
        journal.compact()
    except (OSError, DenoiseError, TimeoutError) as exc:
        logger.warning("could not compact the journal of %s: %s", output_dir, exc)
