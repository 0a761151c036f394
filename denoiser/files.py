"""What every writer of the store shares: which process owns a temporary
file, and making a rename durable."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path


def is_url(location: str | os.PathLike) -> bool:
    """Whether a location is a URL an fsspec file system serves (``s3://...``),
    as opposed to a local path (``file://`` URLs are local paths)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def open_read(location: str | os.PathLike):
    """A binary file handle on a local path or a URL (through fsspec)."""
    if is_url(location):
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(str(location))
        fs.invalidate_cache(path)  # another process may have replaced it since it was listed
        return fs.open(path, "rb")
    return open(location, "rb")


def join_location(base: str | os.PathLike, name: str) -> str | Path:
    """``base/name`` for a local folder (a Path) or a URL (a string)."""
    return f"{str(base).rstrip('/')}/{name}" if is_url(base) else Path(base) / name


def location_size(location: str | os.PathLike) -> int:
    """A file's size in bytes; FileNotFoundError if there is none."""
    if is_url(location):
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(str(location))
        fs.invalidate_cache(path)
        return int(fs.info(path)["size"])
    return Path(location).stat().st_size


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file (a local path or a URL), streamed (memory stays
    flat whatever its size)."""
    digest = hashlib.sha256()
    with open_read(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def host_tag() -> str:
    """Six hex digits naming this host, so a temporary file's pid is only
    judged on the host it belongs to (folders may be shared between hosts)."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:6]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie counts as gone:
    a killed but unreaped child writes nothing any more)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except OverflowError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames and creations in ``folder`` durable."""
    fd = os.open(Path(folder), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
