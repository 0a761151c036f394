"""The output store: one tree of files that keeps every task's output, on the
local disk or on object storage, and the one place that reads and writes it.

Layout under the root (``--store`` / ``$DENOISE_STORE``, default ``./store``)::

    downloads/<dataset>/        checksummed raw files (the download cache)
    shards/<dataset>-<key>/     noisy Parquet shards + manifest.json
    models/registry.json        versions and production (+ registry.json.lock locally)
    models/<version>/           model.keras, model.json (card), metrics.json,
                                samples.png, history.csv, tensorboard/
    checkpoints/<key>/<run>/    one training run's run.json, history.jsonl,
                                state/ and lease (deleted when the run ends);
                                in a bucket head.json and gen-*/ instead
    reports/<name>/             folder-denoising reports

The root is a local path, a ``file://`` URL or an fsspec URL such as
``s3://bucket/prefix`` (``pip install -e ".[s3]"``). Credentials and the
endpoint come from where the file system's library looks (for S3: the AWS
environment variables and config files, ``AWS_ENDPOINT_URL``, fsspec's
``FSSPEC_S3_*`` variables), never from a flag.

A task works on a :class:`Stage`: a local folder laid out like the store.
For a local store the stage *is* the store (files are written in place,
atomically, as before). For a remote store it is a temporary folder: the task
pulls what it needs, the library reads and writes plain files there, and the
task pushes what it made, one PUT per object and the manifest or card last, so
a reader of the store never sees half a shard set or a card without its model.
Shards are read straight from the store URL (pyarrow through fsspec), not
staged. The registry is a compare-and-swap on the object's ETag
(:meth:`Store.read_versioned` / :meth:`Store.write_if`).

Nothing here creates files or connections at import.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from denoiser.core.errors import ConfigError
from denoiser.core.files import (  # noqa: F401 - where the store is: resolved in the library
    DEFAULT_STORE,
    STORE_ENV,
    describe_remote_error,
    find_sizes,
    is_url,
    local_path,
    resolve_store_root,
    write_json_atomic,
)

SMALL_FILE = 4 << 20  # bytes; files up to this size are compared by content on push
READ_ATTEMPTS = 20  # reads of an object replaced while being read
S3_HINT = 'pip install -e ".[s3]"'


class StoreError(ConfigError):
    """The store cannot be used: an unknown scheme, a missing bucket, no access."""


def _remote_fs(url: str):
    """The fsspec file system of ``url`` (created in the calling process: s3fs
    is not fork-safe) and the path within it; a StoreError for an unknown scheme
    or a missing driver."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:  # pragma: no cover - fsspec comes with prefect
        raise StoreError(f"{url}: fsspec is not installed") from None
    try:
        return url_to_fs(url)
    except ImportError:
        scheme = url.split("://", 1)[0]
        hint = S3_HINT if scheme in ("s3", "s3a") else f"install the fsspec driver for {scheme}://"
        raise StoreError(f"store {url}: no driver for {scheme}:// ({hint})") from None
    except ValueError as exc:
        raise StoreError(f"store {url}: {exc}") from None


@dataclass(frozen=True)
class Store:
    """Where every file of the pipeline lives (see the module docstring)."""

    url: str

    @classmethod
    def at(cls, root: Store | str | os.PathLike | None = None) -> Store:
        """The store at ``root`` (a path or URL, by default ``$DENOISE_STORE`` or
        ``./store``); a Store is itself."""
        return root if isinstance(root, Store) else cls(resolve_store_root(root))

    @property
    def remote(self) -> bool:
        return is_url(self.url)

    @property
    def root(self) -> Path:
        """The local root; a remote store has none (work on a :meth:`stage`)."""
        if self.remote:
            raise StoreError(f"{self.url} is not a local folder; work on a stage of it")
        return Path(self.url)

    # ------------------------------------------------------------------ layout
    def downloads(self, dataset: str) -> Path:
        return self.root / "downloads" / dataset

    @property
    def shards_root(self) -> Path:
        return self.root / "shards"

    @property
    def models_root(self) -> Path:
        return self.root / "models"

    def model_dir(self, version: str) -> Path:
        return self.models_root / version

    @property
    def reports_root(self) -> Path:
        return self.root / "reports"

    @property
    def checkpoints_root(self) -> Path:
        """Training checkpoints: in the store when it is local; for a remote
        store the training machine's working copies of the runs kept in
        :attr:`checkpoints_url` (``$DENOISE_CHECKPOINTS``, default
        ``~/.cache/denoise-flow/checkpoints/<store hash>``)."""
        if not self.remote:
            return self.root / "checkpoints"
        base = (
            os.environ.get("DENOISE_CHECKPOINTS")
            or Path.home() / ".cache" / "denoise-flow" / "checkpoints"
        )
        return Path(base).expanduser() / hashlib.sha256(self.url.encode()).hexdigest()[:12]

    @property
    def checkpoints_url(self) -> str | None:
        """Where a remote store keeps training runs (None for a local store:
        its runs live in :attr:`checkpoints_root`)."""
        return self.join("checkpoints") if self.remote else None

    def join(self, *parts: str) -> str:
        """The location of a key: a local path or a URL."""
        key = "/".join(p.strip("/") for p in parts if p)
        return f"{self.url}/{key}" if key else self.url

    # ------------------------------------------------------------------ the catalog: named locations
    def download(self, dataset: str) -> str:
        """Where a dataset's checksummed raw files are cached (``dataset``: its slug)."""
        return self.join("downloads", dataset)

    def shards(self, key: str) -> str:
        """Where a shard set lives (``key``: ``<dataset>-<hash of what decides its bytes>``)."""
        return self.join("shards", key)

    def model(self, version: str) -> str:
        """Where a model version's folder lives."""
        return self.join("models", version)

    def report(self, run: str) -> str:
        """Where a folder run's report lives."""
        return self.join("reports", run)

    @contextmanager
    def staged(
        self,
        location: str,
        files: Iterable[str] | None = None,
        last: Iterable[str] = ("manifest.json", "model.json"),
    ) -> Iterator[Path]:
        """One store folder as a local folder for a task's work: pulled (only
        ``files`` of it, when given), handed to the body, and what the body made
        pushed when it returns, the ``last`` names after the others. For a
        local store the folder is the store's own (nothing copied)."""
        with self.stage() as stage, stage.staged(location, files, last) as folder:
            yield folder

    # ------------------------------------------------------------------ object storage
    @cached_property
    def _fs_and_root(self) -> tuple[Any, str]:
        return _remote_fs(self.url)

    @property
    def fs(self):
        return self._fs_and_root[0]

    def _path(self, location: str) -> str:
        """The file system's path (``bucket/key``) of a store location."""
        return self.fs._strip_protocol(location)

    def check(self) -> None:
        """Fail with one line (StoreError) if the store cannot be reached, its
        bucket does not exist or the credentials are refused; nothing is written."""
        if not self.remote:
            return
        fs, root = self._fs_and_root
        bucket = root.split("/", 1)[0]
        try:
            fs.invalidate_cache()
            fs.ls(bucket, detail=False)
        except Exception as exc:  # noqa: BLE001 - whatever the driver raises becomes one line
            raise StoreError(describe_remote_error(f"{self.url}", exc)) from None

    def exists(self, location: str | os.PathLike) -> bool:
        if not self.remote:
            return Path(location).exists()
        return self.fs.exists(self._path(str(location)))

    def read_bytes(self, location: str | os.PathLike) -> bytes:
        """A file's bytes; FileNotFoundError if there is none."""
        if not self.remote:
            return Path(location).read_bytes()
        return self.fs.cat_file(self._path(str(location)))

    def write_bytes(self, location: str, data: bytes) -> None:
        """Replace a remote object with one PUT (readers see old or new)."""
        self.fs.pipe_file(self._path(location), data)

    def list_names(self, location: str | os.PathLike) -> list[str]:
        """Names directly under a folder (empty if there is none)."""
        if not self.remote:
            folder = Path(location)
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        try:
            self.fs.invalidate_cache(self._path(str(location)))
            return sorted(
                p.rstrip("/").rsplit("/", 1)[-1]
                for p in self.fs.ls(self._path(str(location)), detail=False)
            )
        except FileNotFoundError:
            return []

    def sizes(self, location: str) -> dict[str, int]:
        """Every file under a remote folder, by path relative to it, with its size."""
        return find_sizes(self.fs, self._path(location))

    def read_versioned(self, location: str) -> tuple[bytes | None, str | None]:
        """A remote object's bytes and the ETag they belong to; (None, None) if
        there is none. Read through one handle, so bytes and ETag agree."""
        path = self._path(location)
        for _ in range(READ_ATTEMPTS):
            self.fs.invalidate_cache(path)
            try:
                with self.fs.open(path, "rb") as fh:
                    data = fh.read()
                    return data, fh.details.get("ETag")
            except FileNotFoundError:
                return None, None
            except OSError as exc:  # replaced between the HEAD and the GET: read the new one
                if exc.errno != errno.EBUSY:
                    raise
        raise OSError(errno.EBUSY, f"{location} kept changing while being read")

    def write_if(self, location: str, data: bytes, etag: str | None) -> str | None:
        """A conditional PUT: replace the object only if it still has ``etag``
        (create it only if there is none, for ``etag`` None). Returns the new
        object's ETag; None when another writer got there first (HTTP 412 or
        409), so the caller retries on the fresh state."""
        path = self._path(location)
        try:
            if etag is None:
                response = self.fs.pipe_file(path, data, mode="create")
            else:
                response = self.fs.pipe_file(path, data, IfMatch=etag)
        except FileExistsError:
            return None
        except OSError as exc:
            code = _error_code(exc)
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return None
            raise
        finally:
            self.fs.invalidate_cache(path)
        new = response.get("ETag") if isinstance(response, dict) else None
        return new or self.read_versioned(location)[1] or ""

    def put_file(self, path: str | os.PathLike, location: str) -> None:
        """Upload one local file as one object (one PUT: readers see old or new)."""
        self.fs.put_file(str(path), self._path(location))

    def remove(self, location: str) -> None:
        """Delete a remote object or everything under a remote folder; nothing if absent."""
        path = self._path(location)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache(path)

    def fetch(self, location: str, dest: Path) -> Path:
        """Copy one remote file to ``dest`` (a unique temporary name, renamed)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
        try:
            self.fs.get_file(self._path(location), str(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    # ------------------------------------------------------------------ stages
    @contextmanager
    def stage(self) -> Iterator[Stage]:
        """A local folder laid out like the store, for one task's work: the store
        itself when it is local, else a temporary folder removed afterwards."""
        if not self.remote:
            yield Stage(self.url, self)
            return
        base = os.environ.get("DENOISE_STAGE_DIR") or None
        folder = tempfile.mkdtemp(prefix="denoise-stage-", dir=base)
        try:
            yield Stage(folder, self)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


# writers' temporary files (.tmp.tflite: a LiteRT export's, left by a crash before LiteRT was
# retired)
TEMPORARY_ENDINGS = (".part", ".tmp", ".tmp.keras", ".tmp.tflite", ".tmp.xml", ".tmp.bin")


def is_temporary_name(name: str) -> bool:
    """A writer's temporary file (``.<name>.<owner>.part``/``.tmp``): never pushed.
    A user's own hidden file (``.thumbs/a.png``) is an ordinary file."""
    return name.startswith(".") and name.endswith(TEMPORARY_ENDINGS)


def _error_code(exc: BaseException) -> str | None:
    cause = exc.__cause__ or exc.__context__
    response = getattr(cause, "response", None) or getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error") or {}
        return str(err.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return None


@dataclass(frozen=True)
class Stage(Store):
    """A local folder laid out like ``store`` (see :meth:`Store.stage`)."""

    store: Store = field(default=None)  # type: ignore[assignment]
    _pulled: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def remote(self) -> bool:
        return False

    @property
    def syncs(self) -> bool:
        """Whether files go to and from a remote store (else the stage is the store)."""
        return self.store.remote

    def _key(self, path: str | os.PathLike) -> str:
        rel = Path(path).resolve().relative_to(Path(self.url).resolve())
        return rel.as_posix()

    def url_of(self, path: str | os.PathLike) -> str:
        """Where a staged file or folder lives in the store."""
        return str(path) if not self.syncs else self.store.join(self._key(path))

    def local(self, location: str | os.PathLike) -> Path:
        """The staged path of a store location (a URL of the store, or a path)."""
        text = str(location)
        if not self.syncs:
            return Path(text)
        if not text.startswith(self.store.url + "/"):
            raise StoreError(f"{text} is not in the store {self.store.url}")
        return Path(self.url) / text[len(self.store.url) + 1 :]

    @staticmethod
    def _signature(path: Path) -> tuple[int, int, str | None]:
        """Size, mtime and, for small files (manifests, cards), the sha256: a
        small file rewritten with the same bytes is not uploaded again."""
        from denoiser.core.files import file_sha256

        st = path.stat()
        return st.st_size, st.st_mtime_ns, file_sha256(path) if st.st_size <= SMALL_FILE else None

    def _unchanged(self, path: Path) -> bool:
        pulled = self._pulled.get(str(path))
        if pulled is None:
            return False
        now = self._signature(path)
        return now[:2] == pulled[:2] or (pulled[2] is not None and now[2] == pulled[2])

    def store_json_urls(self, path: str | os.PathLike) -> None:
        """Rewrite a staged JSON file (a cache manifest) with store locations
        instead of staged paths, so what is stored means something on any machine."""
        if not self.syncs:
            return
        import json

        file = Path(path)
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            return
        stored = self.to_urls(data)
        if stored != data:
            write_json_atomic(file, stored, indent=2, sort_keys=True)

    def to_urls(self, value: Any) -> Any:
        """``value`` (a manifest: dicts, lists, strings) with every staged path
        replaced by its store location, so it is valid on any machine."""
        if not self.syncs:
            return value
        root = self.url.rstrip("/")
        if isinstance(value, dict):
            return {k: self.to_urls(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.to_urls(v) for v in value]
        if isinstance(value, str) and (value == root or value.startswith(root + "/")):
            return self.store.join(value[len(root) + 1 :])
        return value

    def to_local(self, value: Any) -> Any:
        """The reverse of :meth:`to_urls`: store locations become staged paths
        (the caller pulls the folders it reads)."""
        if not self.syncs:
            return value
        if isinstance(value, dict):
            return {k: self.to_local(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.to_local(v) for v in value]
        if isinstance(value, str) and value.startswith(self.store.url + "/"):
            return str(self.local(value))
        return value

    @contextmanager
    def staged(
        self,
        location: str | os.PathLike,
        files: Iterable[str] | None = None,
        last: Iterable[str] = ("manifest.json", "model.json"),
        retract: bool = False,
        store_urls: Iterable[str] = (),
    ) -> Iterator[Path]:
        """:meth:`Store.staged` on this stage: the folder pulled, handed to the
        body, and pushed when it returns (``last`` and ``retract`` as in
        :meth:`push`); ``store_urls``: the folder's JSON files (cache
        manifests) whose staged paths become store locations before the push."""
        with self.staged_folders([location], files, last, retract, store_urls) as (folder,):
            yield folder

    @contextmanager
    def staged_folders(
        self,
        locations: Iterable[str | os.PathLike],
        files: Iterable[str] | None = None,
        last: Iterable[str] = ("manifest.json", "model.json"),
        retract: bool = False,
        store_urls: Iterable[str] = (),
    ) -> Iterator[list[Path]]:
        """Several folders staged as by :meth:`staged`: pulled in order, pushed
        in the same order when the body returns (nothing pushed if it raises). A
        local store's folders are its own, left for the body to make."""
        folders = [self.pull(loc, files) if self.syncs else Path(loc) for loc in locations]
        yield folders
        for folder in folders:
            for name in store_urls:
                self.store_json_urls(folder / name)
            self.push(folder, last=last, retract=retract)

    def pull_dataset(self, dataset: dict) -> dict:
        """A dataset manifest's raw files (its folder's, its test folder's)
        pulled, and the manifest with their staged paths, for a body that reads
        them as local files."""
        if not self.syncs:
            return dataset
        dataset = self.to_local(dataset)
        for folder in {dataset["dir"], (dataset.get("test") or {}).get("dir")} - {None}:
            self.pull(folder)
        return dataset

    def pull(self, path: str | os.PathLike, files: Iterable[str] | None = None) -> Path:
        """Bring a store folder (or only ``files`` of it) into the stage; returns
        the staged folder. A folder the store lacks is simply created empty."""
        local = self.local(path) if is_url(str(path)) else Path(path)
        local.mkdir(parents=True, exist_ok=True)
        if not self.syncs:
            return local
        where = self.url_of(local)
        wanted = None if files is None else set(files)
        for rel in self.store.sizes(where):
            if wanted is not None and rel not in wanted:
                continue
            dest = local / rel
            self.store.fetch(f"{where}/{rel}", dest)
            self._pulled[str(dest)] = self._signature(dest)
        return local

    def push(
        self,
        path: str | os.PathLike,
        last: Iterable[str] = ("manifest.json", "model.json"),
        retract: bool = False,
    ) -> str:
        """Upload what the task made in a staged folder (files that are new or
        changed since the pull; writers' temporary files never), one PUT per
        object, the ``last`` names (relative to the folder) after all others;
        returns the folder's store location. ``retract``: when other files
        change, delete the store's ``last`` files first, so that while objects
        are replaced the folder reads as unfinished (a shard set being rebuilt),
        never as an old manifest over new shards."""
        local = Path(path)
        if not self.syncs:
            return str(local)
        last = list(last)

        def rel(p: Path) -> str:
            return p.relative_to(local).as_posix()

        files = [
            p for p in sorted(local.rglob("*")) if p.is_file() and not is_temporary_name(p.name)
        ]
        files.sort(key=lambda p: (rel(p) in last, last.index(rel(p)) if rel(p) in last else 0))
        changed = [p for p in files if not self._unchanged(p)]
        where = self.url_of(local)
        fs = self.store.fs
        if retract and any(rel(p) not in last for p in changed):
            for name in last:
                target = self.store._path(f"{where}/{name}")
                if fs.exists(target):
                    fs.rm_file(target)
        for p in changed:
            fs.put_file(str(p), self.store._path(f"{where}/{rel(p)}"))
        fs.invalidate_cache(self.store._path(where))
        return where


def local_copy(location: str | os.PathLike, sha256: str | None = None) -> Path:
    """A local file for ``location``: the path itself, or for a URL a copy in
    the local cache (``$DENOISE_CACHE``, default ``~/.cache/denoise-flow``),
    fetched once and reused while its sha256 matches (Keras loads local files)."""
    if not is_url(location):
        return Path(location)
    from denoiser.core.files import file_sha256

    base = Path(
        os.environ.get("DENOISE_CACHE") or Path.home() / ".cache" / "denoise-flow"
    ).expanduser()
    name = sha256 or hashlib.sha256(str(location).encode()).hexdigest()
    dest = base / "files" / name[:32] / str(location).rsplit("/", 1)[-1]
    if dest.is_file() and (sha256 is None or file_sha256(dest) == sha256):
        return dest
    store_url = str(location).rsplit("/", 1)[0]
    return Store(store_url).fetch(str(location), dest)


def new_model_version(architecture: str, now: datetime | None = None) -> str:
    """Sortable by time, unique without a lock, readable in a listing."""
    now = now or datetime.now(UTC)
    arch = re.sub(r"[^a-z0-9]+", "-", architecture.lower()).strip("-")
    return f"{now:%Y%m%d-%H%M%S}-{arch}-{secrets.token_hex(2)}"
