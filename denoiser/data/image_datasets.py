"""Image-folder datasets: registered photographs (train400, set12) and a user's
own folder of images, fetched into the download cache and cut into patches.

A registered dataset is a list of file names with canonical sha256s (those of
the DnCNN repository's files, as mirrored in ``../shared/datasets``), fetched
from its origin or a mirror exactly as an IDX dataset's files are. A user's
folder is a path, ``file://`` or ``http(s)://`` URL; a ``SHA256SUMS`` beside
the images (``sha256sum`` format, paths relative to the folder) names the files
and their checksums, and over HTTP it is required, since HTTP cannot list a
folder. Every image is decoded with :mod:`denoiser.imaging.images` (the folder
denoiser's reader: same formats, modes, EXIF, limits) and kept as grey uint8
(its luma); a file that does not decode is reported (logged, and listed under
``skipped`` in the dataset manifest with its reason) and left out, which is
fatal only when no image is left.

Splits are decided by each file's content (its sha256), never by its name or
position, so adding a file to a folder moves no other file between train,
validation and test. Training and validation rows are random square patches
with one of the eight flips/rotations, drawn from the shard's seed; test rows
are whole images of any size. Noise is not stored: the training graph adds it
to every batch (the shard manifest says so with ``"applied": "in_training"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from denoiser.core.catalog import (  # noqa: F401 - the registry, read here too
    DEFAULT_PATCH_SIZE,
    DEFAULT_PATCHES_PER_IMAGE,
    HELD_OUT_TEST_SHARE,
    IMAGE_DATASETS,
    SUMS_NAME,
    ImageDatasetSpec,
    is_location,
)
from denoiser.core.errors import ChecksumError, ConfigError, DownloadError, ImageError
from denoiser.core.files import file_sha256
from denoiser.data.downloads import (
    cache_write_error,
    cached_file_problem,
    check_listed,
    download_to,
    is_http_url,
    locate_source,
    normalise_source,
    open_cache,
    read_sha256sums,
    recorded_files,
    rename_into_cache,
    temp_path,
    write_cache_json,
)
from denoiser.data.splits import SplitArrays
from denoiser.imaging.images import IMAGE_SUFFIXES, decode_image

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- names and locations


def dataset_slug(name: str) -> str:
    """The dataset's name in the store (download cache, shard folders): a
    registered name as is; for a folder, its base name and a hash of where it is."""
    if name in IMAGE_DATASETS or not is_location(name):
        return name
    where = normalise_location(name, must_exist=False)
    base = where.rstrip("/").rsplit("/", 1)[-1]
    base = "".join(
        c if c.isalnum() or c in "-_." else "-" for c in urllib.parse.unquote(base).lower()
    )
    digest = hashlib.sha256(where.encode()).hexdigest()[:8]
    return f"folder-{base.strip('-.')[:40] or 'images'}-{digest}"


def normalise_location(name: str, must_exist: bool = True) -> str:
    """A user's folder as an http(s) URL ending in ``/`` or an absolute path."""
    if must_exist:
        return normalise_source(name)
    parsed = urllib.parse.urlparse(name)
    if parsed.scheme in ("http", "https"):
        return name if name.endswith("/") else name + "/"
    if parsed.scheme == "file":
        return str(Path(urllib.request.url2pathname(parsed.path)).resolve())
    return str(Path(name).expanduser().resolve())


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def list_local_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (nested folders included, symlinked folders
    not followed), as sorted relative POSIX paths."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            if _is_image_name(name):
                found.append(Path(dirpath, name).relative_to(folder).as_posix())
    return sorted(found)


def list_location(location: str, sums: dict[str, str] | None) -> dict[str, str | None]:
    """{relative path: expected sha256 or None} of a user's folder: what its
    SHA256SUMS lists, else (local folders only) the image files under it."""
    if sums is not None:
        return {name: sha for name, sha in sorted(sums.items()) if _is_image_name(name)}
    if is_http_url(location):
        raise ConfigError(
            f"{location}: a folder of images served over HTTP needs a {SUMS_NAME} beside "
            "the images listing them (sha256sum format); none found"
        )
    return dict.fromkeys(list_local_images(Path(location)))


# --------------------------------------------------------------------------- fetch


def _grey(data: bytes) -> np.ndarray:
    """The image's luma as (H, W) uint8, as the folder denoiser reads it."""
    loaded = decode_image(data)
    return np.clip(np.rint(loaded.luma * 255.0), 0, 255).astype(np.uint8)


def load_grey(path: str | os.PathLike) -> np.ndarray:
    """One cached image as (H, W) uint8 grey; an ImageError naming what is wrong."""
    from denoiser.imaging.images import read_bytes

    return _grey(read_bytes(path))


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """One cached image as (H, W, 3) uint8 RGB; an ImageError naming what is wrong."""
    from denoiser.imaging.images import read_bytes, rgb_pixels

    rgb = rgb_pixels(decode_image(read_bytes(path)))
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _describe(data: bytes) -> dict:
    loaded = decode_image(data)
    return {"width": loaded.size[0], "height": loaded.size[1], "mode": loaded.mode}


def _source_name(location: str, name: str) -> str:
    return urllib.parse.quote(name) if is_http_url(location) else name


def _fetch_image(
    location: str, name: str, final: Path, expected: str | None, sums: dict[str, str] | None
) -> tuple[dict, bytes | None]:
    """Stream one file to a temporary name beside ``final``, check it; returns
    its record and its bytes, renamed into place only if they decode."""
    cache_dir = final.parent
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cache_write_error(name, cache_dir, exc) from None
    tmp = temp_path(final, "part")
    try:
        sha = hashlib.sha256()
        size = download_to(location, _source_name(location, name), tmp, name, cache_dir, [sha])
        digest = sha.hexdigest()
        check_listed(name, digest, sums, location)
        if expected is not None and expected != digest:
            raise ChecksumError(f"{name}: sha256 {digest} does not match the expected {expected}")
        data = tmp.read_bytes()
        rec = {
            "name": name,
            "path": str(final),
            "bytes": size,
            "sha256": digest,
            "payload_sha256": digest,
            "source": location,
        }
        try:
            rec.update(_describe(data))
        except ImageError as exc:
            tmp.unlink(missing_ok=True)
            return {**rec, "reason": str(exc)}, None
        rename_into_cache(tmp, final, name, cache_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rec, data


def _read_folder_manifest(cache: Path) -> dict:
    try:
        recorded = json.loads((cache / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict) or recorded.get("kind") != "images":
        return {}
    return recorded


def _reusable(cache: Path, rec: dict | None, sha: str | None) -> bool:
    """Whether a recorded file is still in the cache as recorded (and, when the
    expected sha256 is known, is that file)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str):
        return False
    if sha is not None and rec["sha256"] != sha:
        return False
    return cached_file_problem(cache / rec["name"], rec) is None


def _local_sha(location: str, name: str) -> str:
    try:
        return file_sha256(Path(location) / name)
    except OSError as exc:
        raise DownloadError(
            f"{name}: cannot read {Path(location) / name}: {exc.strerror or exc}"
        ) from None


def fetch_image_folder(
    name: str, source: str | None, cache_dir: str | os.PathLike, log: Any = logger
) -> dict:
    """Make one folder of images present, verified and decodable in ``cache_dir``.

    Returns its manifest: ``{"dataset", "kind": "images", "name", "location",
    "dir", "files": {relative path: {"name", "path", "bytes", "sha256",
    "payload_sha256", "source", "status", "width", "height", "mode"}},
    "skipped": [{"name", "reason", "sha256", "bytes"}]}``. A file already in
    the cache as recorded (and, when known, with the expected sha256) is used
    without fetching; a damaged one is fetched again with a warning on ``log``.
    A local folder without SHA256SUMS is hashed on every call, so a changed
    file is noticed.
    """
    cache = open_cache(name, cache_dir, log)
    previous = _read_folder_manifest(cache)
    origin = _ImageOrigin(name, source)
    files, skipped = _gather_images(origin, _previous_records(previous), cache, log)
    if not files:
        first = f" (first: {skipped[0]['name']}: {skipped[0]['reason']})" if skipped else ""
        raise ImageError(f"{name}: no readable image{first}; {len(skipped)} skipped")
    manifest = {
        "dataset": dataset_slug(name),
        "kind": "images",
        "name": name,
        "location": origin.location or previous.get("location"),
        "dir": str(cache),
        "files": files,
        "skipped": skipped,
    }
    stored = {**manifest, "complete": True, "files": recorded_files(files)}
    if stored != previous:
        write_cache_json(cache / "manifest.json", stored)
    return manifest


SKIPPED_FIELDS = ("name", "reason", "sha256", "bytes")


class _ImageOrigin:
    """Where a folder's images come from and which it holds (name -> expected
    sha256, None when a local folder without SHA256SUMS does not say): a
    registered dataset's source is located only when a file must be fetched."""

    def __init__(self, name: str, source: str | None):
        spec = IMAGE_DATASETS.get(name)
        self.location: str | None = None
        self.sums: dict[str, str] | None = None
        self._spec, self._source = spec, source
        if spec is not None:
            self.expected: dict[str, str | None] = dict(spec.files())
        else:
            self.location = normalise_location(name)
            self.sums = read_sha256sums(self.location)
            self.expected = list_location(self.location, self.sums)

    def locate(self) -> tuple[str, dict[str, str] | None]:
        """The location to fetch from and its checksums, looked up once."""
        if self.location is None:
            spec = self._spec
            self.location, self.sums = locate_source(
                spec.files_name, spec.origin, next(iter(self.expected)), self._source
            )
        return self.location, self.sums


def _previous_records(previous: dict) -> dict[str, dict]:
    """A cache manifest's records by file name: its skipped files and its files."""
    return {
        **{
            s["name"]: s for s in previous.get("skipped", []) if isinstance(s, dict) and "name" in s
        },
        **{n: r for n, r in (previous.get("files") or {}).items() if isinstance(r, dict)},
    }


def _gather_images(
    origin: _ImageOrigin, before: dict[str, dict], cache: Path, log: Any
) -> tuple[dict[str, dict], list[dict]]:
    """Every expected file's record, cached or fetched, and the files skipped
    (known to fail again with the same content, or failing to decode now)."""
    files: dict[str, dict] = {}
    skipped: list[dict] = []
    for rel, want in origin.expected.items():
        if want is None:  # a local folder without SHA256SUMS: its content decides
            want = _local_sha(origin.location, rel)
        rec = before.get(rel)
        if isinstance(rec, dict) and "reason" in rec and rec.get("sha256") == want:
            skipped.append({k: rec[k] for k in SKIPPED_FIELDS if k in rec})
            log.warning("%s: %s; skipped", rel, rec["reason"])
            continue
        if isinstance(rec, dict) and "reason" not in rec and _reusable(cache, rec, want):
            files[rel] = {**rec, "path": str(cache / rel), "status": "cached"}
            continue
        if isinstance(rec, dict) and "reason" not in rec and rec.get("sha256") == want:
            log.warning(
                "%s: %s; fetching it again",
                cache / rel,
                cached_file_problem(cache / rel, rec) or "changed",
            )
        location, sums = origin.locate()
        log.info("fetching %s from %s", rel, location)
        fetched, data = _fetch_image(location, rel, cache / rel, want, sums)
        if data is None:
            log.warning("%s: %s; skipped", rel, fetched["reason"])
            skipped.append({k: fetched[k] for k in SKIPPED_FIELDS})
            continue
        files[rel] = {**fetched, "status": "fetched"}
    return files, skipped


# --------------------------------------------------------------------------- splits and patches


def content_share(sha256: str) -> float:
    """Where a file falls in [0, 1), from its content alone."""
    return int(sha256[:16], 16) / float(1 << 64)


def split_by_content(
    shas: dict[str, str], validation_fraction: float, test_fraction: float | None = None
) -> dict[str, str]:
    """{name: "train" | "validation" | "test"} by each file's content hash: the
    lowest ``test_fraction`` of hashes is test, the next ``validation_fraction``
    validation. A small folder whose hashes leave a held-out split empty gives
    it the training image of lowest hash, so every split has an image."""
    from denoiser.core.errors import ShardError

    test_cut = test_fraction or 0.0
    share = {name: content_share(sha) for name, sha in shas.items()}
    split = {
        name: "test"
        if u < test_cut
        else "validation"
        if u < test_cut + validation_fraction
        else "train"
        for name, u in share.items()
    }
    for wanted in (("test",) if test_fraction else ()) + ("validation",):
        if wanted in split.values():
            continue
        train = sorted((share[n], n) for n, s in split.items() if s == "train")
        if len(train) < 2:
            raise ShardError(
                f"{len(shas)} usable images cannot be split into train, validation"
                f"{' and test' if test_fraction else ''}; add images"
            )
        split[train[0][1]] = wanted
    return split


class CachedImages(Sequence):
    """Cached image files read as (H, W) uint8 grey (``channels`` 1) or
    (H, W, 3) uint8 RGB (``channels`` 3) only when indexed, so a shard writer
    holds the images of one shard, not of the whole dataset."""

    def __init__(self, paths: Sequence[str], channels: int = 1):
        self.paths = list(paths)
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return CachedImages(self.paths[i], self.channels)
        return load_rgb(self.paths[i]) if self.channels == 3 else load_grey(self.paths[i])


def _entries(manifest: dict, source: str) -> list[dict]:
    return [
        {
            "name": name,
            "source": source,
            "sha256": rec["sha256"],
            "path": rec["path"],
            "height": rec["height"],
            "width": rec["width"],
        }
        for name, rec in sorted(manifest["files"].items())
    ]


def build_image_splits(
    dataset: dict,
    validation_fraction: float,
    patch_size: int | None = None,
    patches_per_image: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    log: Any = logger,
    channels: int = 1,
) -> tuple[dict, dict]:
    """The splits of an image dataset manifest (:func:`fetch_image_dataset`) for
    :func:`denoiser.data.shards.write_shard_set`, and what the shard manifest records.

    Returns ``(splits, meta)``: ``splits`` maps train and validation to patch
    rows (``patches_per_image`` random ``patch_size`` squares per image) and test
    to whole images; ``meta`` holds ``images`` (one entry per image: name,
    source ``dataset`` or ``test``, sha256, height, width, split; a row's
    ``index`` is its image's position in this list), ``skipped`` (files that
    did not decode, with reasons), ``too_small`` (images smaller than a patch,
    kept out of train and validation), ``patch_size``, ``patches_per_image``,
    ``test_dataset``, ``held_out_test`` and ``channels``. ``train_limit`` keeps the first
    images of the dataset by name, ``test_limit`` the first test images.
    ``channels``: 1 cuts grey rows (the images' luma), 3 RGB rows.
    """
    size = patch_size or DEFAULT_PATCH_SIZE
    per_image = patches_per_image or DEFAULT_PATCHES_PER_IMAGE
    test_manifest = dataset.get("test")
    held_out = None if test_manifest else dataset.get("held_out_test") or HELD_OUT_TEST_SHARE
    images = _assign_splits(dataset, validation_fraction, held_out, train_limit)
    test_rows = [i for i, e in enumerate(images) if e["split"] == "test"][:test_limit]
    too_small = _too_small(images, size, log)
    splits = {}
    for split in ("train", "validation", "test"):
        picked = test_rows if split == "test" else _rows_of(images, split, too_small)
        if not picked:
            from denoiser.core.errors import ShardError

            raise ShardError(f"{dataset['dataset']}: no image left for the {split} split")
        patch = None if split == "test" else size
        splits[split] = SplitArrays(
            CachedImages([images[i]["path"] for i in picked], channels),
            np.zeros(len(picked), np.uint8),
            np.array(picked, dtype=np.int64),
            copies=1 if split == "test" else per_image,
            patch_size=patch,
            shapes=[(images[i]["height"], images[i]["width"]) for i in picked],
            channels=channels,
        )
    skipped = [{**s, "source": "dataset"} for s in dataset.get("skipped", [])]
    skipped += [{**s, "source": "test"} for s in (test_manifest or {}).get("skipped", [])]
    meta = {
        "images": [
            {k: e[k] for k in ("name", "source", "sha256", "height", "width", "split")}
            for e in images
        ],
        "skipped": skipped,
        "too_small": too_small,
        "patch_size": size,
        "patches_per_image": per_image,
        "test_dataset": test_manifest["name"] if test_manifest else None,
        "held_out_test": held_out,
    }
    if channels != 1:  # grey sets' manifests stay as they were
        meta["channels"] = channels
    return splits, meta


def _assign_splits(
    dataset: dict, validation_fraction: float, held_out: float | None, train_limit: int | None
) -> list[dict]:
    """The images of a split (its first ``train_limit`` by name, then its test
    folder's), each entry with its ``split``: the dataset's own by content
    hash (``held_out`` of them as test when there is no test folder), the
    test folder's all test."""
    own = _entries(dataset, "dataset")[:train_limit]
    assigned = split_by_content(
        {e["name"]: e["sha256"] for e in own}, validation_fraction, held_out
    )
    for entry in own:
        entry["split"] = assigned[entry["name"]]
    tests = _entries(dataset["test"], "test") if dataset.get("test") else []
    for entry in tests:
        entry["split"] = "test"
    return own + tests


def _too_small(images: list[dict], size: int, log: Any) -> list[str]:
    """The dataset's own training and validation images smaller than a patch
    (a warning on ``log`` for each): kept out of those splits."""
    too_small = []
    for e in images:
        if e["split"] != "test" and (e["height"] < size or e["width"] < size):
            too_small.append(e["name"])
            log.warning(
                "%s: %dx%d is smaller than a %dx%d patch; not used for training",
                e["name"],
                e["width"],
                e["height"],
                size,
                size,
            )
    return too_small


def _rows_of(images: list[dict], split: str, too_small: list[str]) -> list[int]:
    """The positions of a split's images, without those too small for a patch."""
    return [i for i, e in enumerate(images) if e["split"] == split and e["name"] not in too_small]
