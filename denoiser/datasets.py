"""Dataset registry, checksummed downloads into a cache, and IDX parsing.

A dataset is four IDX files (train/test images/labels). Adding Fashion-MNIST
or another IDX dataset is one more entry in :data:`DATASETS`. Folders of
images (registered photographs such as train400, or a user's own folder) live
in :mod:`denoiser.image_datasets`; :func:`fetch_dataset` serves both kinds.

Where files come from, in order: an explicit source, ``$DENOISE_DATA_SOURCE``,
the dataset's origin. A source is an http(s) URL, a ``file://`` URL or a folder
path, holding the dataset's files or a folder per dataset: when
``<source>/<name>/`` holds them it is used, so one mirror root serves every
registered dataset. Files are streamed to a temporary name inside the cache folder, checked
(checksums, IDX structure) and only then renamed, so the cache never holds a
file that looks finished but is not. A temporary name carries its writer's host
and pid, so the leftovers of a killed run can be told from a live concurrent
writer's and removed (:func:`remove_orphan_temps`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from denoiser.errors import ChecksumError, ConfigError, DownloadError, IDXFormatError
from denoiser.faults import failpoint
from denoiser.files import file_sha256, host_tag, pid_alive

logger = logging.getLogger(__name__)

SOURCE_ENV = "DENOISE_DATA_SOURCE"
ROLES = ("train_images", "train_labels", "test_images", "test_labels")
_CHUNK = 1 << 20
_TIMEOUT = 60


class TransientDownloadError(DownloadError):
    """A network failure worth retrying (refused, reset, timeout, HTTP 5xx/429)."""


@dataclass(frozen=True)
class FileSpec:
    filename: str
    md5: str | None = None  # of the origin's .gz file
    payload_sha256: str | None = None  # of the decompressed IDX bytes (canonical)
    payload_bytes: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    origin: str
    files: dict[str, FileSpec]
    image_shape: tuple[int, int, int] = (28, 28, 1)
    classes: tuple[str, ...] = field(default_factory=lambda: tuple(str(i) for i in range(10)))


_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        origin="https://storage.googleapis.com/cvdf-datasets/mnist/",
        files={
            "train_images": FileSpec(
                _IDX_NAMES["train_images"],
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                47040016,
            ),
            "train_labels": FileSpec(
                _IDX_NAMES["train_labels"],
                "d53e105ee54ea40749a09fcbcd1e9432",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                60008,
            ),
            "test_images": FileSpec(
                _IDX_NAMES["test_images"],
                "9fb629c4189551a2d022fa330f9573f3",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                7840016,
            ),
            "test_labels": FileSpec(
                _IDX_NAMES["test_labels"],
                "ec29112dd5afa0611ce80d1b7f02629c",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                10008,
            ),
        },
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        origin="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        files={
            "train_images": FileSpec(
                _IDX_NAMES["train_images"], "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
            ),
            "train_labels": FileSpec(
                _IDX_NAMES["train_labels"], "25c81989df183df01b3e8a0aad5dffbe"
            ),
            "test_images": FileSpec(_IDX_NAMES["test_images"], "bef4ecab320f06d8554ea6380940ec79"),
            "test_labels": FileSpec(_IDX_NAMES["test_labels"], "bb300cfdad3c16e7a12a480ee83cd310"),
        },
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
}


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}"
        ) from None


def is_image_dataset(name: str) -> bool:
    """Whether ``name`` is a folder of images (a registered one or a path/URL)
    rather than an IDX dataset: the two are prepared and trained differently."""
    from denoiser.image_datasets import IMAGE_DATASETS, is_location

    return name not in DATASETS and (name in IMAGE_DATASETS or is_location(name))


def check_dataset_name(name: str) -> str:
    """``name`` if it is a registered dataset or a folder path/URL; a one-line
    ValueError listing the registered names otherwise."""
    from denoiser.image_datasets import IMAGE_DATASETS, is_location

    if name in DATASETS or name in IMAGE_DATASETS or is_location(name):
        return name
    known = ", ".join(sorted([*DATASETS, *IMAGE_DATASETS]))
    raise ValueError(
        f"unknown dataset {name!r}; known: {known}; or a folder of images "
        "(a path, file:// or http(s):// URL)"
    )


# --------------------------------------------------------------------------- sources


def normalise_source(chosen: str) -> str:
    """An http(s) URL ending in ``/`` or an absolute folder path; ConfigError otherwise."""
    parsed = urllib.parse.urlparse(chosen)
    if parsed.scheme in ("http", "https"):
        return chosen if chosen.endswith("/") else chosen + "/"
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = Path(chosen).expanduser()
    else:
        raise ConfigError(
            f"data source {chosen!r}: use an http(s) URL, a file:// URL or a folder path"
        )
    path = path.resolve()
    if not path.is_dir():
        raise ConfigError(f"data source folder {path} does not exist")
    return str(path)


def _join(source: str, name: str) -> str:
    return (
        urllib.parse.urljoin(source, urllib.parse.quote(name) + "/")
        if _is_url(source)
        else str(Path(source) / name)
    )


def locate_source(
    name: str, origin: str, probe: str, source: str | None = None
) -> tuple[str, dict[str, str] | None]:
    """The folder or URL that holds dataset ``name`` (whose files include
    ``probe``) and its SHA256SUMS if it has one: the source itself when it holds
    the files, else ``<source>/<name>/`` when that does."""
    root = normalise_source(source or os.environ.get(SOURCE_ENV) or origin)
    if not _is_url(root):
        nested = Path(root) / name
        if not (Path(root) / probe).is_file() and nested.is_dir():
            return str(nested), read_sha256sums(str(nested))
        return root, read_sha256sums(root)
    sums = read_sha256sums(root)
    if sums is not None and probe in sums:
        return root, sums
    nested_url = _join(root, name)
    nested_sums = read_sha256sums(nested_url)
    if nested_sums is not None and probe in nested_sums:
        return nested_url, nested_sums
    return root, sums


def resolve_source(spec: DatasetSpec, source: str | None = None) -> str:
    """Normalise a source to an http(s) URL or an absolute folder path (the
    dataset's own folder when the source holds one per dataset)."""
    return locate_source(spec.name, spec.origin, spec.files["train_images"].filename, source)[0]


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _open(source: str, filename: str):
    """A readable binary stream for one file of the source."""
    if _is_url(source):
        url = urllib.parse.urljoin(source, filename)
        try:
            return urllib.request.urlopen(url, timeout=_TIMEOUT)  # noqa: S310 - http(s) only
        except urllib.error.HTTPError as exc:
            cls = TransientDownloadError if exc.code >= 500 or exc.code == 429 else DownloadError
            raise cls(f"{filename}: HTTP {exc.code} {exc.reason} from {url}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransientDownloadError(f"{filename}: cannot reach {url}: {reason}") from None
    path = Path(source) / filename
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DownloadError(f"{filename}: not found in mirror {source}") from None
    except OSError as exc:
        raise DownloadError(f"{filename}: cannot read {path}: {exc.strerror}") from None


def read_sha256sums(source: str) -> dict[str, str] | None:
    """The mirror's SHA256SUMS (``sha256sum`` format), or None if it has none."""
    try:
        stream = _open(source, "SHA256SUMS")
    except TransientDownloadError:
        raise
    except DownloadError:
        return None
    with stream:
        text = stream.read().decode("utf-8", "replace")
    return parse_sha256sums(text)


def parse_sha256sums(text: str) -> dict[str, str]:
    """``sha256sum`` output as {name: sha256}; names may hold spaces and folders."""
    sums = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1].strip().lstrip("*")] = parts[0].lower()
    return sums


# --------------------------------------------------------------------------- IDX

_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_header(head: bytes, name: str) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise IDXFormatError(f"{name}: not an IDX file (wrong magic number)")
    if head[2] not in _IDX_TYPES:
        raise IDXFormatError(f"{name}: unknown IDX data type 0x{head[2]:02x}")
    ndim = head[3]
    if ndim < 1:
        raise IDXFormatError(f"{name}: IDX file with no dimensions")
    offset = 4 + 4 * ndim
    if len(head) < offset:
        raise IDXFormatError(f"{name}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(head[4:offset], dtype=">u4"))
    return np.dtype(_IDX_TYPES[head[2]]), dims, offset


def parse_idx(payload: bytes, name: str = "IDX data") -> np.ndarray:
    dtype, dims, offset = _idx_header(payload[: 4 + 4 * 255], name)
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(payload) - offset
    if actual != expected:
        raise IDXFormatError(
            f"{name}: dimensions {'x'.join(map(str, dims))} need {expected} data bytes, file has {actual}"
        )
    arr = np.frombuffer(payload, dtype=dtype, offset=offset).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def _read_payload(path: Path) -> bytes:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    try:
        if magic == b"\x1f\x8b":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise IDXFormatError(f"{path.name}: corrupt gzip data ({exc})") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzip-compressed or raw) as a numpy array."""
    path = Path(path)
    return parse_idx(_read_payload(path), path.name)


# --------------------------------------------------------------------------- temporary files

_TEMP_NAME = re.compile(
    r"^\.(?P<final>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]+\.(?P<suffix>\w+)$"
)


def temp_path(final: Path, suffix: str, pid: int | None = None) -> Path:
    """A unique temporary name beside ``final`` that says which process writes it
    (this one unless ``pid`` is given), for :func:`remove_orphan_temps`."""
    pid = os.getpid() if pid is None else pid
    return final.with_name(f".{final.name}.{host_tag()}-{pid}-{secrets.token_hex(3)}.{suffix}")


def orphan_writer(path: Path, suffix: str) -> int | None:
    """The pid of the dead process on this host that left ``path``, a temporary
    file named by :func:`temp_path`; None if it is not one or its writer may be alive."""
    match = _TEMP_NAME.match(path.name)
    if not match or match["suffix"] != suffix or match["host"] != host_tag():
        return None
    pid = int(match["pid"])
    return None if pid == os.getpid() or pid_alive(pid) else pid


def remove_orphan_temps(folder: Path, suffix: str, log: Any = logger) -> list[Path]:
    """Delete the ``.*.<suffix>`` files in ``folder`` left by killed runs on this
    host (never a live writer's); returns what was removed."""
    removed = []
    try:
        candidates = [
            p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(f".{suffix}")
        ]
    except FileNotFoundError:
        return removed
    for path in sorted(candidates):
        pid = orphan_writer(path, suffix)
        if pid is None:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        log.info("removed %s, left by a killed run (pid %d)", path, pid)
        removed.append(path)
    return removed


# --------------------------------------------------------------------------- fetch


def _opener(path: Path):
    with open(path, "rb") as fh:
        return gzip.open if fh.read(2) == b"\x1f\x8b" else open


def _payload_digest(path: Path) -> tuple[str, int]:
    """sha256 and size of the decompressed payload, streamed."""
    h, size = hashlib.sha256(), 0
    opener = _opener(path)
    try:
        with opener(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
                size += len(chunk)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise IDXFormatError(f"{path.name}: corrupt gzip data ({exc})") from None
    return h.hexdigest(), size


def _validate_idx_header(path: Path, payload_bytes: int) -> tuple[int, ...]:
    with _opener(path)(path, "rb") as fh:
        head = fh.read(4 + 4 * 255)
    dtype, dims, offset = _idx_header(head, path.name)
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if payload_bytes - offset != expected:
        raise IDXFormatError(
            f"{path.name}: dimensions {'x'.join(map(str, dims))} need {expected} data bytes, "
            f"file has {payload_bytes - offset}"
        )
    return dims


def _cache_write_error(name: str, cache_dir: Path, exc: OSError) -> DownloadError:
    """A full disk or a size limit is not a network error: not worth retrying."""
    return DownloadError(f"{name}: cannot write to the cache {cache_dir}: {exc.strerror or exc}")


def _stream_to(stream, out, name: str, cache_dir: Path, hashes: list) -> int:
    """Copy the download into the temporary file; returns its size. Read errors
    are transient (the network), write errors permanent (the disk)."""
    size = 0
    while True:
        try:
            chunk = stream.read(_CHUNK)
        except (OSError, TimeoutError) as exc:
            raise TransientDownloadError(f"{name}: download interrupted: {exc}") from None
        if not chunk:
            return size
        try:
            out.write(chunk)
            if not size:
                failpoint("download.mid_file")
        except OSError as exc:
            raise _cache_write_error(name, cache_dir, exc) from None
        for h in hashes:
            h.update(chunk)
        size += len(chunk)


def _fetch_one(source: str, fspec: FileSpec, cache_dir: Path, sums: dict[str, str] | None) -> dict:
    """Stream one file into the cache, verify it, then rename it into place."""
    name = fspec.filename
    final = cache_dir / name
    tmp = temp_path(final, "part")
    try:
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        with _open(source, name) as stream:
            try:
                out = open(tmp, "xb")  # noqa: SIM115 - closed below, where its errors are disk errors
            except OSError as exc:
                raise _cache_write_error(name, cache_dir, exc) from None
            try:
                size = _stream_to(stream, out, name, cache_dir, [sha, md5])
            finally:
                try:
                    out.close()
                except OSError as exc:
                    raise _cache_write_error(name, cache_dir, exc) from None
        digest = sha.hexdigest()
        if sums is not None:
            if name not in sums:
                raise ChecksumError(f"{name}: not listed in the mirror's SHA256SUMS ({source})")
            if sums[name] != digest:
                raise ChecksumError(
                    f"{name}: sha256 {digest} does not match SHA256SUMS ({sums[name]})"
                )
        payload_sha, payload_bytes = _payload_digest(tmp)
        if (
            sums is None
            and fspec.md5
            and md5.hexdigest() != fspec.md5
            and payload_sha != fspec.payload_sha256
        ):
            raise ChecksumError(
                f"{name}: md5 {md5.hexdigest()} does not match the origin's {fspec.md5}"
            )
        if fspec.payload_sha256 and payload_sha != fspec.payload_sha256:
            raise ChecksumError(
                f"{name}: decompressed sha256 {payload_sha} does not match the expected {fspec.payload_sha256}"
            )
        dims = _validate_idx_header(tmp, payload_bytes)
        try:
            os.replace(tmp, final)
        except OSError as exc:
            raise _cache_write_error(name, cache_dir, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {
        "name": name,
        "path": str(final),
        "bytes": size,
        "sha256": digest,
        "payload_sha256": payload_sha,
        "payload_bytes": payload_bytes,
        "shape": list(dims),
        "source": source,
    }


def _write_json(path: Path, data: Any) -> None:
    tmp = temp_path(path, "part")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _cache_write_error(path.name, path.parent, exc) from None


def _read_cache_manifest(cache: Path) -> dict | None:
    """The cache manifest's ``files`` by role, or None if it is missing or not of that shape."""
    try:
        files = json.loads((cache / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("sha256"), str)
        for r in files.values()
    ):
        return None
    return files


def _cached_file_problem(path: Path, rec: dict) -> str | None:
    """Why the cached file cannot be used as recorded (None if it can): size first, it is free."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing from the cache"
    if rec.get("bytes") is not None and size != rec["bytes"]:
        return "sha256 mismatch with the cache manifest"
    if file_sha256(path) != rec["sha256"]:
        return "sha256 mismatch with the cache manifest"
    return None


def fetch_dataset(
    name: str,
    source: str | None,
    cache_dir: str | os.PathLike,
    log: Any = logger,
    test_dataset: str | None = None,
) -> dict:
    """Make the dataset's files present and verified in ``cache_dir``.

    Returns the dataset manifest (see docs/design.md). Cached files whose sha256
    still matches the cache manifest are used without touching the network; a
    damaged one is fetched again, with a warning on ``log`` naming it. A folder
    of images (see :func:`is_image_dataset`) is fetched by
    :func:`denoiser.image_datasets.fetch_image_dataset`, with ``test_dataset``.
    """
    if is_image_dataset(name):
        from denoiser.image_datasets import fetch_image_dataset

        return fetch_image_dataset(name, source, cache_dir, log, test_dataset)
    if test_dataset is not None:
        raise ConfigError(f"test_dataset applies to image-folder datasets; {name} brings its own")
    spec = get_dataset(name)
    cache = Path(cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cache_write_error(name, cache, exc) from None
    remove_orphan_temps(cache, "part", log)
    manifest_path = cache / "manifest.json"
    previous = _read_cache_manifest(cache) or {}

    files: dict[str, dict] = {}
    missing = []
    for role in ROLES:
        fspec = spec.files[role]
        rec = previous.get(role)
        path = cache / fspec.filename
        problem = None
        if rec and fspec.payload_sha256 and rec.get("payload_sha256") != fspec.payload_sha256:
            problem = "recorded for other contents"
        elif rec:
            problem = _cached_file_problem(path, rec)
        if rec and problem is None:
            files[role] = {**rec, "path": str(path), "status": "cached"}
            continue
        if rec:
            log.warning("%s: %s; fetching it again", path, problem)
        missing.append(role)

    if missing:
        resolved, sums = locate_source(
            spec.name, spec.origin, spec.files["train_images"].filename, source
        )
        for role in missing:
            log.info("fetching %s from %s", spec.files[role].filename, resolved)
            files[role] = {
                **_fetch_one(resolved, spec.files[role], cache, sums),
                "status": "fetched",
            }
            # recorded at once: a retry after a later failure does not fetch this file again
            _write_json(
                manifest_path,
                {
                    "dataset": name,
                    "complete": False,
                    "files": {
                        r: {k: v for k, v in f.items() if k != "status"} for r, f in files.items()
                    },
                },
            )

    counts = {
        split: (files[f"{split}_images"]["shape"][0], files[f"{split}_labels"]["shape"][0])
        for split in ("train", "test")
    }
    for split, (n_img, n_lab) in counts.items():
        if n_img != n_lab:
            raise IDXFormatError(
                f"{files[f'{split}_images']['name']} has {n_img} images but "
                f"{files[f'{split}_labels']['name']} has {n_lab} labels"
            )
    manifest = {
        "dataset": name,
        "dir": str(cache),
        "image_shape": list(spec.image_shape),
        "classes": list(spec.classes),
        "files": files,
    }
    if missing:
        _write_json(
            manifest_path,
            {
                **manifest,
                "complete": True,
                "files": {
                    r: {k: v for k, v in f.items() if k != "status"} for r, f in files.items()
                },
            },
        )
    return manifest


def load_images(
    manifest: dict, split: str, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 1) uint8 and labels (N,) uint8 of the ``train`` or ``test`` split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    img_rec, lab_rec = manifest["files"][f"{split}_images"], manifest["files"][f"{split}_labels"]
    images = read_idx(img_rec["path"])
    labels = read_idx(lab_rec["path"])
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{img_rec['name']} has {images.shape[0]} images but {lab_rec['name']} has {labels.shape[0]} labels"
        )
    if images.ndim != 3:
        raise IDXFormatError(
            f"{img_rec['name']}: expected 3 dimensions (N, H, W), got {images.ndim}"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.astype(np.uint8, copy=False)[..., None], labels.astype(np.uint8, copy=False)
