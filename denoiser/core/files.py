"""What every writer of the store shares: which process owns a temporary
file, and making a rename durable."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from denoiser.core.errors import ConfigError, first_line


def is_url(location: str | os.PathLike) -> bool:
    """Whether a location is a URL an fsspec file system serves (``s3://...``),
    as opposed to a local path (``file://`` URLs are local paths)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


HOME_ENV = "DENOISE_HOME"


def local_path(text: str | os.PathLike) -> Path:
    """A local path made absolute: a relative one against ``$DENOISE_HOME``
    when it is set (a deployment's project folder, so that a worker started
    in any folder, whose flow runs may work in a temporary one, finds the
    store and the inbox), else against the current folder."""
    if not str(text).strip():
        raise ConfigError("an empty path; give a folder ('.' for the current one)")
    path = Path(text).expanduser()
    home = os.environ.get(HOME_ENV)
    if not path.is_absolute() and home:
        if not Path(home).is_dir():
            raise ConfigError(
                f"{path}: a relative location, and ${HOME_ENV} ({home}) is not a folder on "
                "this machine; give an absolute path or a URL (s3://bucket/prefix)"
            )
        path = Path(home) / path
    return path.resolve()


DEFAULT_STORE = "store"
STORE_ENV = "DENOISE_STORE"


def resolve_store_root(root: str | os.PathLike | None = None) -> str:
    """Where the store is: an explicit root wins, then $DENOISE_STORE, then
    ./store. A local root comes back absolute (paths passed between tasks and
    worker processes stay valid), ``file://`` URLs as their path, other URLs
    without a trailing slash."""
    if root is not None and not str(root).strip():
        raise ConfigError(
            "the store is an empty string; give a folder or a URL (s3://bucket/prefix)"
        )
    chosen = str(root or os.environ.get(STORE_ENV) or DEFAULT_STORE)
    if chosen.startswith("file://"):
        chosen = chosen[len("file://") :] or "/"
    if is_url(chosen):
        return chosen.rstrip("/")
    return str(local_path(chosen))


def find_sizes(fs, base: str) -> dict[str, int]:
    """Every file under ``base`` in an fsspec file system, by path relative
    to it, with its size: one listing (no request per file); empty if there
    is nothing there."""
    base = base.rstrip("/")
    fs.invalidate_cache(base)
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    return {
        p[len(base) + 1 :]: int(info.get("size") or 0)
        for p, info in found.items()
        if info.get("type") != "directory" and p.startswith(base + "/")
    }


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


def describe_remote_error(url: str, exc: BaseException) -> str:
    """One line for an object-storage failure: what is wrong and with which URL."""
    name = type(exc).__name__
    text = first_line(exc)
    if isinstance(exc, FileNotFoundError) and "bucket" in text.lower():
        return f"{url}: the bucket does not exist ({text})"
    if (
        isinstance(exc, PermissionError)
        or "AccessDenied" in text
        or "InvalidAccessKeyId" in text
        or "SignatureDoesNotMatch" in text
        or "Forbidden" in text
    ):
        return f"{url}: access denied; check the AWS credentials ({text})"
    if "NoCredentials" in name or "Unable to locate credentials" in text:
        return f"{url}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a profile)"
    if (
        "EndpointConnectionError" in name
        or "Could not connect" in text
        or "Connect" in name
        or isinstance(exc, ConnectionError | TimeoutError)
    ):
        return f"{url}: cannot reach the object-storage endpoint ({text})"
    return f"{url}: {text}"


@functools.cache
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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, ending: str) -> Iterator[Path]:
    """A unique temporary name beside ``path`` (ending in ``ending``, so that
    it reads as a writer's temporary file) for the body to write; when the
    body returns, the file is fsynced and renamed over ``path``, so ``path`` is
    the old file or the whole new one; on an exception it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}{ending}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """``data`` as the file ``path``, atomically (see :func:`atomic_file`)."""
    with atomic_file(path, ".tmp") as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """``text`` as the file ``path`` (UTF-8), atomically (see :func:`atomic_file`)."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, data: Any, **dumps: Any) -> None:
    """``data`` as JSON in the file ``path`` (``dumps``: json.dumps' options), atomically."""
    write_text_atomic(path, json.dumps(data, **dumps))


def read_checked(path: str | os.PathLike, expected_sha256: str | None, what: str) -> bytes:
    """The bytes of a model file, checked against the card's sha256 when it
    has one; a one-line ModelError naming ``what`` (LiteRT, OpenVINO) otherwise."""
    from denoiser.core.errors import ModelError

    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {what} model {path}: {exc.strerror or exc}") from None
    if expected_sha256 and hashlib.sha256(content).hexdigest() != expected_sha256:
        raise ModelError(f"{path}: corrupt {what} model (sha256 does not match the card's)")
    return content
