"""Finding the work: the input and output folders checked, the input tree
walked (a local folder, or one listing of each tree when object storage is
involved), and for each file either a :class:`Job` (with why it is done, or
the record the reader checks to skip it) or its verdict (not an image, a
refused symlink, an output clash, an output that is the user's).

Imports :mod:`~denoiser.folder.results` and :mod:`~denoiser.folder.journal`
of this package.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import posixpath
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from denoiser.core.errors import ConfigError
from denoiser.folder.journal import OutputRecord
from denoiser.folder.results import (
    NOT_OURS,
    WHY_INPUT_CHANGED,
    WHY_INTERRUPTED,
    WHY_NEW,
    WHY_NO_RECORD,
    WHY_OVERWRITE,
    FileResult,
    display_path,
)
from denoiser.folder.routing import RoutedTiles
from denoiser.folder.trees import RemoteTree, Tree, open_tree, same_or_inside
from denoiser.imaging.images import IMAGE_SUFFIXES, LoadedImage

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One input to denoise: where it is and where its output goes, why it
    is done, and what the reader and the pipeline learn of it on the way."""

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


def name_target(rel: str, fmt: str) -> str:
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
        yield from _LocalScan(
            src.root, dst.root, pattern, fmt, overwrite, records or {}, claims, settle
        ).walk()


class _OutputFolder:
    """Where one input folder's outputs go, and whether that is inside the
    output folder (resolved when first asked, once)."""

    def __init__(self, path: str, root: Path):
        self.path = path
        self.root = root
        self._writable: bool | None = None

    def writable(self) -> bool:
        if self._writable is None:
            self._writable = _inside(Path(self.path).resolve(), self.root)
        return self._writable


@dataclass
class _LocalScan:
    """One walk of a local input tree into a local output tree: symlinked
    folders are never followed, symlinks out of the input and outputs through
    symlinked folders out of the output are refused. Holds the rules each
    entry goes through and the outputs claimed so far."""

    src: Path
    dst: Path
    pattern: str
    fmt: str
    overwrite: bool
    records: dict[str, OutputRecord]
    claims: set[str] | frozenset[str]
    settle: float
    now: float = field(init=False, default_factory=time.time)
    # output -> the input it is made from (x.jpg and x.png -> x.png)
    claimed: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.matches = re.compile(fnmatch.translate(self.pattern)).match  # fnmatch's test, once

    def walk(self) -> Iterator[Job | FileResult]:
        """Every folder under the input, depth first in name order."""
        stack = [("", str(self.src))]  # (its path relative to the input, with a slash; the folder)
        while stack:
            prefix, folder = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                shown = display_path(prefix[:-1] or ".")
                yield FileResult(shown, "failed", f"cannot list folder: {exc.strerror}")
                continue
            subdirs: list[tuple[str, str]] = []
            yield from self._scan_folder(prefix, entries, subdirs)
            stack.extend(reversed(subdirs))

    def _scan_folder(
        self, prefix: str, entries: list[os.DirEntry], subdirs: list[tuple[str, str]]
    ) -> Iterator[Job | FileResult]:
        """The jobs and verdicts of one folder's entries; its subfolders to
        walk are appended to ``subdirs``."""
        out = _OutputFolder(os.path.join(str(self.dst), prefix), self.dst)  # its outputs go there
        for entry in entries:
            shown = display_path(prefix + entry.name)
            try:
                item = self._scan_entry(entry, prefix, shown, out, subdirs)
            except OSError as exc:
                item = FileResult(shown, "failed", f"cannot stat: {exc.strerror or exc}")
            if item is not None:
                yield item

    def _scan_entry(
        self,
        entry: os.DirEntry,
        prefix: str,
        shown: str,
        out: _OutputFolder,
        subdirs: list[tuple[str, str]],
    ) -> Job | FileResult | None:
        """One entry's job or verdict; None for a folder (appended to
        ``subdirs`` unless it is the output folder) or a name the pattern leaves out."""
        name = entry.name
        if entry.is_dir(follow_symlinks=False):
            path = Path(entry.path)
            if path.resolve() == self.dst:
                logger.warning("skipping %s: it is the output folder", path)
            else:
                subdirs.append((prefix + name + "/", entry.path))
            return None
        if not self.matches(name):
            return None
        if entry.is_symlink() and (refused := self._check_symlink(entry, shown)):
            return refused
        st = os.stat(entry.path)
        if verdict := self._check_file(name, shown, st):
            return verdict
        if not out.writable():
            return FileResult(
                shown,
                "failed",
                "its output folder is a symlink leading out of the output folder; not written",
                st.st_size,
            )
        return self._make_job(entry, prefix, shown, out, st.st_size)

    def _check_symlink(self, entry: os.DirEntry, shown: str) -> FileResult | None:
        """The verdict on a symlink that is not followed (broken, leading out
        of the input, or to a folder); None for one to a file in the input."""
        target = Path(os.path.realpath(entry.path))
        if not target.exists():
            return FileResult(shown, "failed", "broken symlink")
        if target != self.src and self.src not in target.parents:
            return FileResult(
                shown, "failed", "symlink points outside the input folder; not followed"
            )
        if target.is_dir():
            return FileResult(shown, "skipped", "symlinked folder; not followed")
        return None

    def _check_file(self, name: str, shown: str, st: os.stat_result) -> FileResult | None:
        """The verdict on a file that is not denoised (not a regular file, not
        an image, maybe still being written); None for one to denoise."""
        if not stat.S_ISREG(st.st_mode):
            return FileResult(shown, "failed", "not a regular file")
        if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
            return FileResult(shown, "skipped", "not an image file type", bytes=st.st_size)
        if self.settle and self.now - st.st_mtime < self.settle:
            return FileResult(
                shown,
                "skipped",
                f"modified in the last {self.settle:g} s, maybe still being written; "
                "left for a later run",
                bytes=st.st_size,
            )
        return None

    def _make_job(
        self, entry: os.DirEntry, prefix: str, shown: str, out: _OutputFolder, size: int
    ) -> Job | FileResult:
        """The job of an image (:func:`make_job`), once its output is claimed
        for it alone (another input with the same output is refused)."""
        target_name = name_target(entry.name, self.fmt)
        target_rel = prefix + target_name
        if clash := _claim_target(self.claimed, target_rel, shown, size):
            return clash
        target = out.path + target_name
        return make_job(
            entry.path,
            prefix + entry.name,
            target,
            target_rel,
            size,
            _exists(target),
            self.overwrite,
            self.records,
            self.claims,
        )


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


def _claim_target(
    claimed: dict[str, str], target_rel: str, shown: str, size: int
) -> FileResult | None:
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
        target_rel = name_target(rel, fmt)
        if clash := _claim_target(claimed, target_rel, shown, size):
            yield clash
            continue
        yield make_job(
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


def make_job(
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
