"""Dataset registry, checksummed downloads into a cache, and IDX parsing.

A dataset is four IDX files (train/test images/labels). Adding Fashion-MNIST
or another IDX dataset is one more entry in :data:`DATASETS`. Folders of
images (registered photographs such as train400, or a user's own folder) live
in :mod:`denoiser.data.image_datasets`; :func:`fetch_dataset` serves both kinds.

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
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from denoiser.core.catalog import (  # noqa: F401 - the registry, read here too
    _IDX_NAMES,
    DATASETS,
    HELD_OUT_TEST_SHARE,
    DatasetSpec,
    FileSpec,
    check_dataset_name,
    get_dataset,
    is_image_dataset,
    test_dataset_of,
)
from denoiser.core.errors import ChecksumError, ConfigError, IDXFormatError
from denoiser.data.downloads import (  # noqa: F401 - shared with image datasets
    CHUNK,
    SOURCE_ENV,
    TIMEOUT,
    TransientDownloadError,
    cache_write_error,
    cached_file_problem,
    check_listed,
    download_to,
    is_http_url,
    join_source,
    locate_source,
    normalise_source,
    open_cache,
    open_source,
    orphan_writer,
    parse_sha256sums,
    read_sha256sums,
    recorded_files,
    remove_orphan_temps,
    rename_into_cache,
    stream_to,
    temp_path,
    write_cache_json,
)

logger = logging.getLogger(__name__)

ROLES = ("train_images", "train_labels", "test_images", "test_labels")


# --------------------------------------------------------------------------- sources


def resolve_source(spec: DatasetSpec, source: str | None = None) -> str:
    """Normalise a source to an http(s) URL or an absolute folder path (the
    dataset's own folder when the source holds one per dataset)."""
    return locate_source(spec.name, spec.origin, spec.files["train_images"].filename, source)[0]


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
            for chunk in iter(lambda: fh.read(CHUNK), b""):
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


def _fetch_one(source: str, fspec: FileSpec, cache_dir: Path, sums: dict[str, str] | None) -> dict:
    """Stream one file into the cache, verify it, then rename it into place."""
    name = fspec.filename
    final = cache_dir / name
    tmp = temp_path(final, "part")
    try:
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        size = download_to(source, name, tmp, name, cache_dir, [sha, md5])
        digest = sha.hexdigest()
        check_listed(name, digest, sums, source)
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
        rename_into_cache(tmp, final, name, cache_dir)
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
    :func:`denoiser.data.image_datasets.fetch_image_folder`, and so are its test
    images (:func:`test_dataset_of`): ``"test"`` holds their manifest, cached
    beside ``cache_dir`` under their own name; ``"held_out_test"`` is the share
    of the folder held out as the test split when there are none (else None).
    """
    if is_image_dataset(name):
        from denoiser.data.image_datasets import dataset_slug, fetch_image_folder

        manifest = fetch_image_folder(name, source, cache_dir, log)
        test_name = test_dataset_of(name, test_dataset)
        manifest["test"], manifest["held_out_test"] = None, HELD_OUT_TEST_SHARE
        if test_name is not None:
            test_cache = Path(cache_dir).parent / dataset_slug(test_name)
            manifest["test"] = fetch_image_folder(test_name, source, test_cache, log)
            manifest["held_out_test"] = None
        return manifest
    if test_dataset is not None:
        raise ConfigError(f"test_dataset applies to image-folder datasets; {name} brings its own")
    spec = get_dataset(name)
    cache = open_cache(name, cache_dir, log)
    files, missing = _cached_files(spec, cache, _read_cache_manifest(cache) or {}, log)
    if missing:
        _fetch_missing(spec, source, cache, files, missing, log)
    _check_counts(files)
    manifest = {
        "dataset": name,
        "dir": str(cache),
        "image_shape": list(spec.image_shape),
        "classes": list(spec.classes),
        "files": files,
    }
    if missing:
        write_cache_json(
            cache / "manifest.json",
            {**manifest, "complete": True, "files": recorded_files(files)},
        )
    return manifest


def _cached_files(
    spec: DatasetSpec, cache: Path, previous: dict, log: Any
) -> tuple[dict[str, dict], list[str]]:
    """The records of the files found in the cache as ``previous`` (its cache
    manifest) recorded them, and the roles to fetch: absent, or damaged (a
    warning on ``log`` naming it)."""
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
            problem = cached_file_problem(path, rec)
        if rec and problem is None:
            files[role] = {**rec, "path": str(path), "status": "cached"}
            continue
        if rec:
            log.warning("%s: %s; fetching it again", path, problem)
        missing.append(role)
    return files, missing


def _fetch_missing(
    spec: DatasetSpec,
    source: str | None,
    cache: Path,
    files: dict[str, dict],
    missing: list[str],
    log: Any,
) -> None:
    """Fetch the ``missing`` roles into the cache and ``files``, each recorded in
    the (incomplete) cache manifest at once: a retry after a later failure does
    not fetch it again."""
    resolved, sums = locate_source(
        spec.name, spec.origin, spec.files["train_images"].filename, source
    )
    for role in missing:
        log.info("fetching %s from %s", spec.files[role].filename, resolved)
        files[role] = {
            **_fetch_one(resolved, spec.files[role], cache, sums),
            "status": "fetched",
        }
        write_cache_json(
            cache / "manifest.json",
            {"dataset": spec.name, "complete": False, "files": recorded_files(files)},
        )


def _check_counts(files: dict[str, dict]) -> None:
    """Each split's images and labels agree in number (an IDXFormatError naming both files)."""
    for split in ("train", "test"):
        images, labels = files[f"{split}_images"], files[f"{split}_labels"]
        n_img, n_lab = images["shape"][0], labels["shape"][0]
        if n_img != n_lab:
            raise IDXFormatError(
                f"{images['name']} has {n_img} images but {labels['name']} has {n_lab} labels"
            )


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
