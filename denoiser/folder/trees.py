"""The input and output folders of a folder run: a local folder or a prefix
in object storage (``s3://bucket/noisy``), behind one small interface.

A tree reads and writes whole files by their path inside it. Writes are
atomic on both: locally a unique temporary name renamed into place (made
durable in batches by :meth:`LocalTree.flush`, not one fsync per file), in
object storage one PUT per object. Object-storage calls block on fsspec's IO
loop without holding the GIL, so reader and writer threads overlap their
requests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import posixpath
import threading
from pathlib import Path

from denoiser.core.errors import ConfigError, first_line
from denoiser.core.files import describe_remote_error, find_sizes, is_url, local_path


class LocalTree:
    """A folder on a local or shared file system."""

    remote = False
    threads = 2  # readers and writers each: decoding and encoding hold the GIL
    task_files = 16  # files per task of a reader or writer thread: small files go in numbers

    def __init__(self, root: Path):
        self.root = root

    def __str__(self) -> str:
        return str(self.root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def rel(self, path: Path) -> str:
        return os.path.relpath(path, self.root)

    def show(self, path: Path) -> str:
        return str(path)

    def rel_of_shown(self, shown: str) -> str:
        """The relative path of a file from what :meth:`show` said of it."""
        return os.path.relpath(shown, self.root)

    def read(self, path: Path) -> bytes:
        """A file's bytes (OSError if it cannot be read)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            chunks = []
            while True:  # until end of file: it may have grown since the fstat
                block = os.read(fd, max(size, 1 << 16))
                if not block:
                    return b"".join(chunks)
                chunks.append(block)
        finally:
            os.close(fd)

    def write(self, path: Path, data: bytes) -> None:
        from denoiser.imaging.images import write_atomic

        write_atomic(path, data, sync=False)

    def exists(self, path: Path) -> bool:
        return os.path.lexists(path)

    def matches(self, path: Path, size: int, sha256: str) -> bool:
        """Whether the file holds exactly these bytes."""
        try:
            with open(path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size != size:
                    return False
                return hashlib.file_digest(fh, "sha256").hexdigest() == sha256
        except OSError:
            return False

    def flush(self) -> None:
        """Make every file written so far durable: one ``syncfs`` of the
        folder's file system (``sync`` where there is none) instead of an
        fsync per file, as git's batch mode does."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            if _syncfs is None or _syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)


def _load_syncfs():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()


class S3Objects:
    """GET and PUT of whole S3 objects through obstore (Rust; about a fifth
    of the client CPU per request of s3fs/botocore, and no HEAD before a GET),
    with the endpoint, region and credentials the s3fs file system ``fs``
    resolved, so both clients talk to the same place as the same user. Errors
    come out as the OSErrors fsspec raises."""

    def __init__(self, fs):
        from obstore.store import S3Store

        meta = fs.s3.meta  # s3fs's botocore client: what it resolved
        self._credentials = _credential_source(fs)
        self._stores: dict[str, S3Store] = {}
        self._config = {
            "endpoint": meta.endpoint_url,
            "region": meta.region_name or "us-east-1",
            "allow_http": meta.endpoint_url.startswith("http://"),
        }

    def _store(self, bucket: str):
        store = self._stores.get(bucket)
        if store is None:
            from obstore.store import S3Store

            store = S3Store(bucket, credential_provider=self._credentials, **self._config)
            self._stores[bucket] = store
        return store

    def get(self, path: str) -> bytes:
        bucket, key = path.split("/", 1)
        try:
            return bytes(self._store(bucket).get(key).bytes())
        except Exception as exc:  # noqa: BLE001 - obstore's own errors become OSErrors
            raise _as_oserror(path, exc) from None

    def put(self, path: str, data: bytes) -> None:
        bucket, key = path.split("/", 1)
        try:
            self._store(bucket).put(key, data)
        except Exception as exc:  # noqa: BLE001
            raise _as_oserror(path, exc) from None


def _has_obstore() -> bool:
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


def _credential_source(fs):
    """A credential provider for obstore giving what s3fs uses: its explicit
    key and secret if it was given some, else botocore's chain (environment,
    shared config and profiles, container and instance roles)."""
    import datetime

    if getattr(fs, "key", None) and getattr(fs, "secret", None):
        frozen = {"access_key_id": fs.key, "secret_access_key": fs.secret, "token": fs.token}
        return lambda: {**frozen, "expires_at": None}
    import botocore.session

    session = botocore.session.Session(profile=getattr(fs, "profile", None) or None)
    credentials = session.get_credentials()
    if credentials is None:
        raise OSError("Unable to locate credentials")

    def provide() -> dict:
        got = credentials.get_frozen_credentials()  # refreshed by botocore when due
        return {
            "access_key_id": got.access_key,
            "secret_access_key": got.secret_key,
            "token": got.token,
            "expires_at": datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5),
        }

    return provide


def _as_oserror(path: str, exc: Exception) -> OSError:
    if isinstance(exc, OSError):  # obstore raises FileNotFoundError, PermissionError
        return exc
    name = type(exc).__name__
    text = first_line(exc)
    if name == "NotFoundError":
        return FileNotFoundError(2, "no such object", path)
    if name in ("PermissionDeniedError", "UnauthenticatedError"):
        return PermissionError(13, f"AccessDenied: {text}", path)
    return OSError(5, text, path)


class RemoteTree:
    """A prefix in object storage (any fsspec file system), read and written
    by whole objects; credentials and endpoint come from the environment.
    S3 objects go through :class:`S3Objects` when obstore is installed."""

    remote = True
    threads = 16  # requests in flight per direction; each thread mostly waits
    task_files = 1  # one request per task: as many in flight as there are threads

    def __init__(self, url: str):
        from fsspec.core import url_to_fs

        self.url = url.rstrip("/")
        try:
            self.fs, root = url_to_fs(self.url)
        except ImportError:
            scheme = url.split("://", 1)[0]
            raise ConfigError(
                f'{url}: no driver for {scheme}:// (pip install -e ".[s3]" for s3://)'
            ) from None
        self.root = root.rstrip("/")
        self.protocol = self.url.split("://", 1)[0]
        self._objects: S3Objects | None = None
        self._objects_lock = threading.Lock()
        self._objects_known = self.protocol not in ("s3", "s3a")

    @property
    def objects(self) -> S3Objects | None:
        """The fast S3 client, made on first use; None where there is none
        (obstore not installed, another protocol, anonymous access)."""
        if not self._objects_known:
            with self._objects_lock:
                if not self._objects_known:
                    if _has_obstore() and not getattr(self.fs, "anon", False):
                        self._objects = S3Objects(self.fs)
                    self._objects_known = True
        return self._objects

    def __str__(self) -> str:
        return self.url

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def rel(self, path: str) -> str:
        return posixpath.relpath(path, self.root)

    def show(self, path: str) -> str:
        return f"{self.protocol}://{path}"

    def rel_of_shown(self, shown: str) -> str:
        return shown.split("://", 1)[-1][len(self.root) + 1 :]

    def read(self, path: str) -> bytes:
        objects = self.objects
        return objects.get(path) if objects else self.fs.cat_file(path)

    def write(self, path: str, data: bytes) -> None:
        objects = self.objects
        if objects:
            objects.put(path, data)
        else:
            self.fs.pipe_file(path, data)

    def matches(self, path: str, size: int, sha256: str) -> bool:
        try:
            data = self.read(path)
        except (OSError, ValueError):
            return False
        return len(data) == size and hashlib.sha256(data).hexdigest() == sha256

    def flush(self) -> None:
        """Nothing to do: an object is durable once its PUT returns."""

    def listing(self, prefix: str | None = None) -> dict[str, int]:
        """Every object under the tree (or ``prefix`` in it): path relative to
        the tree -> size."""
        if prefix is None:
            return find_sizes(self.fs, self.root)
        return {f"{prefix}/{rel}": n for rel, n in find_sizes(self.fs, self.path(prefix)).items()}

    def read_many(self, paths: list[str]) -> dict[str, bytes | Exception]:
        """Several objects in concurrent requests."""
        if not paths:
            return {}
        return self.fs.cat(paths, on_error="return")

    def remove(self, paths: list[str]) -> None:
        if paths:
            self.fs.rm(paths)


Tree = LocalTree | RemoteTree


def resolve_location(location: str | os.PathLike) -> str:
    """A folder location as every process can use it: a local path made
    absolute (``file://`` URLs as their path), an object-storage URL without
    its trailing slash."""
    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://") :] or "/"
    if is_url(text):
        return text.rstrip("/")
    return str(local_path(text))


def open_tree(location: str | os.PathLike, role: str, must_exist: bool) -> Tree:
    """The tree at a local path, ``file://`` URL or object-storage URL; a
    ConfigError naming ``role`` (input/output) when it cannot be used."""
    text = str(location)
    if not text.strip():
        raise ConfigError(
            f"the {role} folder is an empty string; give a path ('.' for the current folder)"
        )
    if text.startswith("file://"):
        text = text[len("file://") :] or "/"
    if not is_url(text):
        root = local_path(text)
        if must_exist and not root.is_dir():
            raise ConfigError(f"{role} folder {root} does not exist or is not a folder")
        if root.exists() and not root.is_dir():
            raise ConfigError(f"{role} {root} exists and is not a folder")
        above = next((p for p in root.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise ConfigError(f"{role} folder {root} cannot be made: {above} is a file")
        return LocalTree(root.resolve())
    tree = RemoteTree(text)
    try:
        tree.fs.invalidate_cache()
        tree.fs.ls(tree.root.split("/", 1)[0], detail=False)  # the bucket exists and can be listed
        if tree.fs.isfile(tree.root):
            raise ConfigError(f"{role} {text} is an object, not a folder (a prefix)")
        if must_exist and not tree.fs.isdir(tree.root):
            raise ConfigError(f"{role} folder {text} does not exist (no object under it)")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any client error becomes one line
        raise ConfigError(describe_remote_error(text, exc)) from None
    return tree


def same_or_inside(inner: Tree, outer: Tree) -> bool:
    """Whether ``inner`` is ``outer`` or a folder inside it (same file system)."""
    if inner.remote != outer.remote:
        return False
    if inner.remote and inner.protocol != outer.protocol:
        return False
    a, b = str(inner.root), str(outer.root)
    return a == b or a.startswith(b.rstrip("/") + "/")
