"""Noisy/clean image pairs as zstd Parquet shards, and fast readers for them.

Two kinds of shard set share the layout and the readers. ``pairs`` (IDX
datasets such as MNIST): every row a clean image and its noisy copy, all of one
shape. ``patches`` (folders of images, manifest ``"kind": "patches"``): clean
pixels only, since the training graph adds fresh noise to every batch;
training and validation rows are square patches, test rows whole images of
any size, so every row carries its ``height`` and ``width``.

A shard set is a folder ``<dataset>-<key>`` whose key hashes everything that
determines its bytes (source checksums, noise config, limits, format), so the
same request finds the finished folder again. Each shard gets its own seed,
spawned from the run seed with ``SeedSequence`` in a fixed plan order, so the
bytes do not depend on the order or parallelism of writing. ``manifest.json``
is written last: a folder without it is unfinished, and a shard only gets its
final name once complete, so a crash never leaves a truncated shard that looks
done. The manifest records each shard's size and sha256: a finished set is
verified before it is reused (:func:`verify_shard_set`), and a damaged shard is
rebuilt alone, its bytes being a function of the seed plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from denoiser.config import NoiseConfig
from denoiser.core.catalog import DEFAULT_PATCH_SIZE, DEFAULT_PATCHES_PER_IMAGE
from denoiser.core.errors import ShardError
from denoiser.core.faults import failpoint
from denoiser.core.files import (
    file_sha256,
    fsync_dir,
    is_url,
    join_location,
    location_size,
    open_read,
)
from denoiser.data.datasets import load_images
from denoiser.data.downloads import remove_orphan_temps, temp_path
from denoiser.data.noise import add_noise, draw_levels, quantize
from denoiser.data.splits import SplitArrays

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
IMAGE_COLUMNS = ("clean", "noisy")
SHAPE_KEY = b"denoise.image_shape"
WHOLE_IMAGE_SHARD_BYTES = 64 << 20  # of pixels per shard of whole images: bounds a writer's memory


@dataclass(frozen=True)
class _ShardPlan:
    split: str
    number: int
    start: int  # first row (rows are image-major: row r is image r // copies)
    stop: int

    @property
    def filename(self) -> str:
        return f"{self.split}-{self.number:05d}.parquet"


def shard_set_key(
    dataset: dict, noise: dict, train_limit: int | None, test_limit: int | None
) -> str:
    """16 hex digits over everything that decides the shards' bytes."""
    sources = {role: rec.get("payload_sha256") for role, rec in sorted(dataset["files"].items())}
    fields = {
        "format": FORMAT_VERSION,
        "dataset": dataset["dataset"],
        "sources": sources,
        "noise": noise,
        "train_limit": train_limit,
        "test_limit": test_limit,
    }
    if dataset.get("kind") == "images":  # only then, so that IDX sets keep their keys
        test = dataset.get("test") or {"files": {}}
        fields.update(
            kind="patches",
            held_out_test=dataset.get("held_out_test"),
            test_sources={n: r.get("payload_sha256") for n, r in sorted(test["files"].items())},
        )
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def split_train_validation(n: int, validation_fraction: float) -> int:
    """Where validation starts: Keras' ``validation_split`` holds out the last share."""
    split_at = int(n * (1.0 - validation_fraction))
    if split_at < 1 or split_at >= n:
        raise ShardError(
            f"{n} training images cannot be split with validation_fraction={validation_fraction}"
        )
    return split_at


def _rows_per_shard(arrays: SplitArrays, shard_rows: int) -> int:
    """Whole images of varying size: as many as fit the byte budget of a shard."""
    if arrays.patch_size is not None or not arrays.shapes:
        return shard_rows
    largest = max(h * w for h, w in arrays.shapes) * arrays.channels
    return max(1, min(shard_rows, WHOLE_IMAGE_SHARD_BYTES // max(largest, 1)))


def _plan(splits: dict[str, SplitArrays], shard_rows: int) -> list[_ShardPlan]:
    plans = []
    for split in SPLITS:
        if split not in splits:
            continue
        rows = len(splits[split].images) * splits[split].copies
        per_shard = _rows_per_shard(splits[split], shard_rows)
        for number, start in enumerate(range(0, rows, per_shard)):
            plans.append(_ShardPlan(split, number, start, min(start + per_shard, rows)))
    return plans


def _binary_column(pixels: np.ndarray):
    import pyarrow as pa

    flat = np.ascontiguousarray(pixels.reshape(len(pixels), -1))
    size = flat.shape[1]
    offsets = np.arange(0, (len(flat) + 1) * size, size, dtype=np.int32)
    return pa.Array.from_buffers(
        pa.binary(), len(flat), [None, pa.py_buffer(offsets), pa.py_buffer(flat)]
    )


def _blob_column(pixels: Sequence[np.ndarray]):
    """Binary column of blobs of any sizes (whole images of a test split)."""
    import pyarrow as pa

    flat = [np.ascontiguousarray(p).reshape(-1) for p in pixels]
    offsets = np.zeros(len(flat) + 1, dtype=np.int64)
    np.cumsum([len(f) for f in flat], out=offsets[1:])
    if offsets[-1] >= 2**31:
        return pa.array([f.tobytes() for f in flat], type=pa.large_binary())
    data = np.concatenate(flat) if flat else np.zeros(0, np.uint8)
    return pa.Array.from_buffers(
        pa.binary(), len(flat), [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    )


def _plane(image: np.ndarray, channels: int = 1) -> np.ndarray:
    """(H, W) uint8 for one channel, (H, W, C) for several."""
    arr = np.asarray(image, dtype=np.uint8)
    if channels == 1:
        return arr[..., 0] if arr.ndim == 3 else arr
    if arr.ndim != 3 or arr.shape[-1] != channels:
        raise ShardError(f"an image of shape {arr.shape} in a set of {channels}-channel images")
    return arr


def _orient(patch: np.ndarray, t: int) -> np.ndarray:
    """One of the eight flips/rotations of a square patch (t in 0..7)."""
    turned = np.rot90(patch, t % 4)
    return turned[:, ::-1] if t >= 4 else turned


def _cut_patches(arrays: SplitArrays, img_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(rows, P, P) patches ((rows, P, P, C) for several channels): for each
    image in row order, its rows' offsets then orientations, all drawn from the
    shard's generator."""
    p = arrays.patch_size
    extra = (arrays.channels,) if arrays.channels > 1 else ()
    out = np.empty((len(img_idx), p, p, *extra), dtype=np.uint8)
    for i in dict.fromkeys(img_idx.tolist()):
        rows = np.flatnonzero(img_idx == i)
        img = _plane(arrays.images[i], arrays.channels)
        h, w = img.shape[:2]
        ys = rng.integers(0, h - p + 1, len(rows))
        xs = rng.integers(0, w - p + 1, len(rows))
        ts = rng.integers(0, 8, len(rows))
        for r, y, x, t in zip(rows, ys, xs, ts, strict=True):
            out[r] = _orient(img[y : y + p, x : x + p], int(t))
    return out


def _clean_table(plan: _ShardPlan, arrays: SplitArrays, rng: np.random.Generator):
    """A patch set's rows: clean pixels with their height and width, no noise."""
    import pyarrow as pa

    img_idx = np.arange(plan.start, plan.stop) // arrays.copies
    if arrays.patch_size is not None:
        pixels = _cut_patches(arrays, img_idx, rng)
        heights = widths = np.full(len(img_idx), arrays.patch_size, dtype=np.int32)
        column = _binary_column(pixels)
        shape = [arrays.patch_size, arrays.patch_size, arrays.channels]
    else:
        planes = [_plane(arrays.images[i], arrays.channels) for i in img_idx]
        heights = np.array([p.shape[0] for p in planes], dtype=np.int32)
        widths = np.array([p.shape[1] for p in planes], dtype=np.int32)
        column, shape = _blob_column(planes), None
    return pa.table(
        {
            "clean": column,
            "height": pa.array(heights, type=pa.int32()),
            "width": pa.array(widths, type=pa.int32()),
            "index": pa.array(np.asarray(arrays.index)[img_idx].astype(np.int64)),
            "label": pa.array(np.asarray(arrays.labels)[img_idx].astype(np.uint8)),
        }
    ).replace_schema_metadata({SHAPE_KEY: json.dumps(shape).encode()})


def _reason(exc: BaseException) -> str:
    """One line for an I/O or Arrow error."""
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _pair_table(plan: _ShardPlan, arrays: SplitArrays, noise: dict, seed: np.random.SeedSequence):
    """A pairs set's rows: clean images and their noisy copies, with the levels drawn."""
    import pyarrow as pa

    rows = plan.stop - plan.start
    rng = np.random.default_rng(seed)
    img_idx = np.arange(plan.start, plan.stop) // arrays.copies
    clean = arrays.images[img_idx]
    levels = draw_levels(noise["level"], rows, rng, noise.get("density", "rising"))
    noisy = quantize(add_noise(clean.astype(np.float32) / 255.0, noise["kind"], levels, rng))
    shape = list(clean.shape[1:])
    return pa.table(
        {
            "clean": _binary_column(clean),
            "noisy": _binary_column(noisy),
            "label": pa.array(arrays.labels[img_idx].astype(np.uint8)),
            "index": pa.array(arrays.index[img_idx].astype(np.int64)),
            "noise_kind": pa.array([noise["kind"]] * rows, type=pa.string()),
            "noise_level": pa.array(levels.astype(np.float32)),
        }
    ).replace_schema_metadata({SHAPE_KEY: json.dumps(shape).encode()})


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _whole_shard(path: Path, rows: int) -> bool:
    """Whether a shard found in a folder whose manifest is gone (or not yet
    written) is whole: it opens and holds the rows its plan gives it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows == rows
    except (OSError, pa.ArrowException):
        return False


def _write_shard(
    out_dir: Path, plan: _ShardPlan, arrays: SplitArrays, noise: dict, seed: np.random.SeedSequence
) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    final = out_dir / plan.filename
    rows = plan.stop - plan.start
    if final.exists() and not _whole_shard(final, rows):
        logger.warning(
            "%s: an unfinished or damaged shard without a manifest to check it; rewriting it", final
        )
        final.unlink()
    if not final.exists():
        table = (
            _clean_table(plan, arrays, np.random.default_rng(seed))
            if noise.get("applied") == "in_training"
            else _pair_table(plan, arrays, noise, seed)
        )
        tmp = temp_path(final, "tmp")
        try:
            pq.write_table(table, tmp, compression="zstd", row_group_size=2048)
            _fsync_file(tmp)
            os.replace(tmp, final)
        except (OSError, pa.ArrowException) as exc:
            tmp.unlink(missing_ok=True)
            raise ShardError(
                f"{out_dir}: cannot write shard {plan.filename}: {_reason(exc)}"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        failpoint("shards.after_shard")
    return {
        "file": plan.filename,
        "split": plan.split,
        "rows": rows,
        "bytes": final.stat().st_size,
        "sha256": file_sha256(final),
    }


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = temp_path(out / "manifest.json", "tmp")
    try:
        failpoint("shards.before_manifest")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _fsync_file(tmp)
        os.replace(tmp, out / "manifest.json")
        fsync_dir(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ShardError(f"{out}: cannot write manifest.json: {_reason(exc)}") from None


def _write_shards(
    out: Path,
    plans: list[_ShardPlan],
    seeds: list,
    splits: dict[str, SplitArrays],
    noise: dict,
    workers: int,
) -> list[dict]:
    if workers > 1 and len(plans) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(
                pool.map(
                    lambda ps: _write_shard(out, ps[0], splits[ps[0].split], noise, ps[1]),
                    zip(plans, seeds, strict=True),
                )
            )
    return [
        _write_shard(out, p, splits[p.split], noise, s) for p, s in zip(plans, seeds, strict=True)
    ]


def _unlink_damaged(out: Path, log: Any) -> dict[str, str]:
    """Delete the shards of a finished set that fail verification, and its
    manifest; returns the sha256 the old manifest recorded for each deleted shard."""
    problems = _problems(out)
    if not problems:
        return {}
    try:
        recorded = {r["file"]: r["sha256"] for r in _load_manifest(out)["shards"]}
    except ShardError:
        recorded = {}
    for name, reason in problems.items():
        log.warning("%s: %s; rebuilding it", out / name, reason)
        if name != "manifest.json":
            (out / name).unlink(missing_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    return {name: recorded[name] for name in problems if name in recorded}


def _image_shape(splits: dict[str, SplitArrays]) -> list[int] | None:
    """The rows' shape: a pairs set's images, a patch set's patches."""
    for arrays in splits.values():
        if arrays.patch_size is not None:
            return [arrays.patch_size, arrays.patch_size, arrays.channels]
        if isinstance(arrays.images, np.ndarray):
            return list(arrays.images.shape[1:])
    return None


def _split_record(arrays: SplitArrays) -> dict:
    record = {
        "images": len(arrays.images),
        "copies": arrays.copies,
        "rows": len(arrays.images) * arrays.copies,
    }
    if arrays.patch_size is not None:
        size = arrays.patch_size
        record.update(patches_per_image=arrays.copies, image_shape=[size, size, arrays.channels])
    elif not isinstance(arrays.images, np.ndarray):
        record["image_shape"] = None  # whole images of any size: read their height and width
    return record


def write_shard_set(
    out_dir: str | os.PathLike,
    splits: dict[str, SplitArrays],
    noise: dict,
    shard_rows: int,
    seed: int,
    meta: dict[str, Any] | None = None,
    workers: int = 2,
    log: Any = logger,
) -> Path:
    """Write, finish or repair a shard set and its manifest; returns the folder.

    ``noise`` is ``{"kind", "level"}`` (level a float or [lo, hi]), and
    optionally ``"density"`` for a range (default ``rising``). With
    ``"applied": "in_training"`` the set is a patch set (manifest ``kind:
    patches``): no noise is drawn, rows hold clean pixels with ``height`` and
    ``width`` (see :class:`SplitArrays`), and ``noise`` is only recorded for
    the training graph and evaluation to apply. A finished set
    whose shards all match the manifest is returned as is; damaged shards are
    deleted and rewritten (a warning on ``log`` names each one), and if a
    rewritten shard's bytes differ from those recorded the whole set is rebuilt,
    so a set never mixes shards of two writers.
    """
    out = Path(out_dir)
    rebuilt = _unlink_damaged(out, log) if (out / "manifest.json").exists() else {}
    if (out / "manifest.json").is_file():
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShardError(f"{out}: cannot create the shard folder: {_reason(exc)}") from None
    remove_orphan_temps(out, "tmp", log)
    plans = _plan(splits, shard_rows)
    seeds = np.random.SeedSequence(seed).spawn(len(plans))
    records = _write_shards(out, plans, seeds, splits, noise, workers)
    differ = [
        r["file"] for r in records if r["file"] in rebuilt and r["sha256"] != rebuilt[r["file"]]
    ]
    if differ:
        log.warning(
            "%s: rewritten %s differs from the sha256 the manifest recorded (another pyarrow or "
            "numpy?); rebuilding the whole set",
            out,
            differ[0],
        )
        for rec in records:
            (out / rec["file"]).unlink(missing_ok=True)
        records = _write_shards(out, plans, seeds, splits, noise, workers)
    manifest = {
        **(meta or {}),
        "format": FORMAT_VERSION,
        "noise": noise,
        "seed": seed,
        "shard_rows": shard_rows,
        "image_shape": _image_shape(splits),
        "splits": {s: _split_record(a) for s, a in splits.items()},
        "shards": records,
    }
    if noise_in_training(noise):
        manifest["kind"] = "patches"
    _write_manifest(out, manifest)
    log.info("wrote %d shards to %s", len(records), out)
    return out


# --------------------------------------------------------------------------- a dataset's shard set

PATCH_FIELDS = {"patch_size", "patches_per_image"}


def is_image_set(dataset: dict) -> bool:
    """True for a dataset manifest of a folder of images (its shards are a
    patch set), False for an IDX dataset (noisy/clean pairs)."""
    return dataset.get("kind") == "images"


def noise_fields(dataset: dict, noise: NoiseConfig) -> dict:
    """The config as it decides the shards: IDX sets without the patch fields
    (their keys and manifests stay as before patches existed), image sets with
    the patch defaults filled in."""
    if not is_image_set(dataset):
        return noise.model_dump(mode="json", exclude=PATCH_FIELDS)
    return {
        **noise.model_dump(mode="json"),
        "patch_size": noise.patch_size or DEFAULT_PATCH_SIZE,
        "patches_per_image": noise.patches_per_image or DEFAULT_PATCHES_PER_IMAGE,
    }


def split_pairs(
    images: np.ndarray,
    labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    validation_fraction: float,
    copies: int = 1,
) -> dict[str, SplitArrays]:
    """An IDX dataset's splits: the last ``validation_fraction`` of the
    training images held out for validation (as Keras' ``validation_split``),
    ``copies`` noisy draws of each training image, the test images as they are."""
    cut = split_train_validation(len(images), validation_fraction)
    index = np.arange(len(images))
    return {
        "train": SplitArrays(images[:cut], labels[:cut], index[:cut], copies=copies),
        "validation": SplitArrays(images[cut:], labels[cut:], index[cut:]),
        "test": SplitArrays(test_images, test_labels, np.arange(len(test_images))),
    }


def request_meta(
    out: Path, dataset: dict, config: dict, limits: tuple[int | None, int | None], sources: dict
) -> dict:
    """What a shard set's manifest records of the request it was written for:
    the dataset, its key (the end of the folder's name), the config as it
    decides the shards, the train and test limits, the sources' identities."""
    train_limit, test_limit = limits
    return {
        "dataset": dataset["dataset"],
        "key": out.name.rsplit("-", 1)[1],
        "config": config,
        "train_limit": train_limit,
        "test_limit": test_limit,
        "sources": sources,
    }


class ShardRequest(NamedTuple):
    """What a domain's shard writer makes a set from: the dataset's manifest
    (its files local), the noise, and the first ``train_limit`` / ``test_limit``
    images only (None: all)."""

    dataset: dict
    noise: NoiseConfig
    train_limit: int | None = None
    test_limit: int | None = None


def write_pair_set(out: Path, request: ShardRequest, log: Any = logger) -> Path:
    """An IDX dataset's shard set: noisy/clean pairs, the noise drawn once."""
    dataset, noise, train_limit, test_limit = request
    images, labels = load_images(dataset, "train", train_limit)
    test_images, test_labels = load_images(dataset, "test", test_limit)
    splits = split_pairs(
        images, labels, test_images, test_labels, noise.validation_fraction, noise.copies
    )
    sources = {r: f["payload_sha256"] for r, f in dataset["files"].items()}
    meta = request_meta(
        out, dataset, noise_fields(dataset, noise), (train_limit, test_limit), sources
    )
    return write_shard_set(
        out,
        splits,
        {"kind": noise.kind, "level": noise.level, "density": noise.level_density},
        noise.shard_rows,
        noise.seed,
        meta=meta,
        log=log,
    )


def write_patch_set(
    out: Path,
    request: ShardRequest,
    log: Any = logger,
    channels: int = 1,
    domain: str | None = None,
) -> Path:
    """A folder of images' shard set: clean patches of ``channels`` channels
    (1: luma, 3: RGB) and whole test images, the noise added in training; the
    manifest records ``domain`` when it is not the grey photographs'."""
    from denoiser.data.image_datasets import build_image_splits

    dataset, noise, train_limit, test_limit = request
    fields = noise_fields(dataset, noise)
    splits, meta = build_image_splits(
        dataset,
        noise.validation_fraction,
        fields["patch_size"],
        fields["patches_per_image"],
        train_limit,
        test_limit,
        log=log,
        channels=channels,
    )
    if domain is not None and channels != 1:  # grey sets' manifests stay as they were
        meta["domain"] = domain
    test = dataset.get("test")
    sources = {"dataset": dataset.get("location"), "test": test and test.get("location")}
    meta.update(request_meta(out, dataset, fields, (train_limit, test_limit), sources))
    applied = {
        "kind": noise.kind,
        "level": noise.level,
        "density": noise.level_density,
        "applied": "in_training",
    }
    return write_shard_set(out, splits, applied, noise.shard_rows, noise.seed, meta=meta, log=log)


# --------------------------------------------------------------------------- verification


def _load_manifest(shards_dir: str | os.PathLike) -> dict:
    """The manifest, checked for the fields verification needs; ShardError otherwise.
    ``shards_dir`` may be a local folder or a URL (``s3://...``)."""
    path = join_location(shards_dir, "manifest.json")
    try:
        with open_read(path) as fh:
            manifest = json.loads(fh.read())
    except FileNotFoundError:
        raise ShardError(f"{shards_dir}: not a finished shard set (no manifest.json)") from None
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: unreadable manifest ({_reason(exc)})") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if not isinstance(shards, list) or not all(
        isinstance(r, dict)
        and isinstance(r.get("file"), str)
        and isinstance(r.get("sha256"), str)
        and "/" not in r["file"]
        for r in shards
    ):
        raise ShardError(f"{path}: unreadable manifest (no list of shards with file and sha256)")
    return manifest


def _shard_problem(path: str | os.PathLike, rec: dict) -> str | None:
    """Why a shard does not match its manifest record, or None; the size first, it is free."""
    try:
        size = location_size(path)
    except FileNotFoundError:
        return "missing"
    if isinstance(rec.get("bytes"), int) and size != rec["bytes"]:
        return f"{size} bytes, the manifest says {rec['bytes']}"
    if file_sha256(path) != rec["sha256"]:
        return "sha256 mismatch with the manifest"
    return None


def _problems(shards_dir: str | os.PathLike) -> dict[str, str]:
    folder = shards_dir if is_url(shards_dir) else Path(shards_dir)
    try:
        manifest = _load_manifest(folder)
    except ShardError as exc:
        return {"manifest.json": str(exc).rsplit("(", 1)[-1].rstrip(")")}
    found = {}
    for rec in manifest["shards"]:
        reason = _shard_problem(join_location(folder, rec["file"]), rec)
        if reason:
            found[rec["file"]] = reason
    return found


def verify_shard_set(shards_dir: str | os.PathLike) -> list[str]:
    """The shards of a finished set that are missing or whose size or sha256 differ
    from the manifest; ``["manifest.json"]`` if there is no readable manifest (an
    unfinished set). Empty means every shard is as written. Streams each file
    once, so it is cheap enough to run on every reuse."""
    return list(_problems(shards_dir))


def check_shard_set(shards_dir: str | os.PathLike) -> dict:
    """The manifest, after checking every shard against it: for readers about to
    use the whole set (training), so a damaged shard fails with one line naming it."""
    manifest = _load_manifest(shards_dir)
    problems = _problems(shards_dir)
    if problems:
        name, reason = next(iter(problems.items()))
        more = f"; {len(problems) - 1} more damaged" if len(problems) > 1 else ""
        raise ShardError(
            f"{join_location(shards_dir, name)}: corrupt shard ({reason}){more}; rerun the pipeline to rebuild it"
        )
    return manifest


# --------------------------------------------------------------------------- readers


def tested_images_sha256(manifest: dict) -> str | None:
    """What a patch set's models are scored on, as one sha256: its test
    images' own sha256s in order (the ``test_limit`` first) and their channels.
    Models trained on any data and tested on the same images compare; None
    for a set of pairs, whose test pairs hold their noise (the whole manifest
    tells those apart)."""
    if manifest.get("kind") != "patches":
        return None
    rows = manifest["splits"]["test"]["rows"]
    tested = [e["sha256"] for e in manifest["images"] if e["split"] == "test"][:rows]
    facts = {"images": tested, "channels": manifest.get("channels", 1)}
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()


def read_manifest(shards_dir: str | os.PathLike) -> dict:
    manifest = _load_manifest(shards_dir)
    if is_url(shards_dir):  # one listing instead of a request per shard
        from fsspec.core import url_to_fs

        fs, base = url_to_fs(str(shards_dir))
        fs.invalidate_cache(base)
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)}
    for rec in manifest["shards"]:
        there = (
            rec["file"] in present
            if is_url(shards_dir)
            else (Path(shards_dir) / rec["file"]).is_file()
        )
        if not there:
            raise ShardError(f"{shards_dir}: shard {rec['file']} listed in the manifest is missing")
    return manifest


def shard_paths(shards_dir: str | os.PathLike, split: str) -> list[Path | str]:
    """The split's shard files: Paths in a local folder, URLs in a remote one."""
    manifest = read_manifest(shards_dir)
    if split not in manifest["splits"]:
        raise ShardError(f"{shards_dir}: no {split!r} split (has {', '.join(manifest['splits'])})")
    return [join_location(shards_dir, r["file"]) for r in manifest["shards"] if r["split"] == split]


def split_rows(shards_dir: str | os.PathLike, split: str) -> int:
    manifest = read_manifest(shards_dir)
    return sum(r["rows"] for r in manifest["shards"] if r["split"] == split)


def _decode_images(column, shape: Sequence[int]) -> np.ndarray:
    """Binary column of fixed-size pixel blobs to (N, *shape) uint8 without a Python loop."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    size = int(np.prod(shape))
    parts = []
    for chunk in chunks:
        n = len(chunk)
        _, off_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(off_buf, dtype=np.int32)[chunk.offset : chunk.offset + n + 1]
        if n and (offsets[-1] - offsets[0] != n * size or chunk.null_count):
            raise ShardError(
                f"image column holds blobs of the wrong size (expected {size} bytes each)"
            )
        data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[0] + n * size]
        parts.append(data.reshape((n, *shape)))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _decode_varying(column, heights: np.ndarray, widths: np.ndarray) -> list[np.ndarray]:
    """Binary column of whole images to a list of (H, W, C) uint8 arrays (C
    is 1 for grey images, 3 for RGB: what each blob's size says)."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray] = []
    for chunk in chunks:
        for blob in chunk.to_pylist():
            h, w = int(heights[len(out)]), int(widths[len(out)])
            if blob is None or len(blob) not in (h * w, 3 * h * w):
                raise ShardError(
                    f"image column holds a blob of the wrong size (expected {h}x{w} bytes, "
                    "or 3 per pixel)"
                )
            out.append(np.frombuffer(blob, dtype=np.uint8).reshape(h, w, -1))
    return out


def _batch_to_arrays(
    batch, shape: Sequence[int] | None
) -> dict[str, np.ndarray | list[np.ndarray]]:
    out: dict[str, Any] = {}
    names = batch.schema.names
    for name in names:
        if name not in IMAGE_COLUMNS:
            out[name] = batch.column(name).to_numpy(zero_copy_only=False)
    for name in names:
        if name in IMAGE_COLUMNS:
            out[name] = (
                _decode_images(batch.column(name), shape)
                if shape is not None
                else _decode_varying(batch.column(name), out["height"], out["width"])
            )
    return {name: out[name] for name in names}


def noise_config(manifest: dict) -> NoiseConfig:
    """The noise config a shard set was made with, typed (the manifest's
    ``config`` is its pydantic dump, with the patch defaults filled in; a set
    written without one gives what its ``noise`` record says)."""
    noise = manifest.get("noise") or {}
    config = manifest.get("config") or {
        "kind": noise.get("kind"),
        "level": noise.get("level"),
        "level_density": noise.get("density", "uniform"),
    }
    try:
        return NoiseConfig.model_validate(config)
    except ValueError as exc:
        reason = str(exc).splitlines()[0]
        raise ShardError(f"the shard manifest holds no valid noise config ({reason})") from None


def split_image_shape(manifest: dict, split: str) -> list[int] | None:
    """The shape of every row of ``split``, or None when its rows are whole
    images of varying sizes (the test split of a patch set)."""
    record = manifest.get("splits", {}).get(split, {})
    return record["image_shape"] if "image_shape" in record else manifest["image_shape"]


def noise_in_training(noise: dict) -> bool:
    """Whether a shard set's recorded noise is drawn in training (a patch
    set: its rows hold clean pixels only) rather than once, when written."""
    return noise.get("applied") == "in_training"


def image_columns(manifest: dict) -> tuple[str, ...]:
    """The pixel columns a set holds: ``clean`` alone when the noise is drawn
    in training (patches), else ``noisy`` and ``clean`` (pairs)."""
    return ("clean",) if noise_in_training(manifest.get("noise") or {}) else ("noisy", "clean")


def _corrupt(path: str | os.PathLike, exc: BaseException) -> ShardError:
    return ShardError(f"{path}: corrupt shard ({_reason(exc)})")


def _file_batches(
    path: str | os.PathLike, shape: Sequence[int] | None, batch_rows: int, columns: Sequence[str]
) -> Iterator[dict[str, np.ndarray]]:
    """One shard's record batches; any failure to open or decode names the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if shape is None and any(c in IMAGE_COLUMNS for c in columns):
        columns = [*columns, *(c for c in ("height", "width") if c not in columns)]

    errors = (OSError, ValueError, pa.ArrowException, ShardError)
    try:
        handle = open_read(path) if is_url(path) else None  # streamed from the store, not copied
        pf = pq.ParquetFile(handle or path)
    except errors as exc:
        raise _corrupt(path, exc) from None
    with pf, handle or nullcontext():
        batches = pf.iter_batches(batch_size=batch_rows, columns=list(columns))
        while True:
            try:
                batch = next(batches, None)
                if batch is None:
                    return
                arrays = _batch_to_arrays(batch, shape)
            except errors as exc:
                raise _corrupt(path, exc) from None
            yield arrays


def iter_batches(
    shards_dir: str | os.PathLike,
    split: str,
    batch_rows: int = 1024,
    columns: Sequence[str] | None = None,
    file_order_seed: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Stream a split a record batch at a time: memory stays bounded by the batch.
    A shard that fails to open or decode raises ShardError naming it (checksums
    are :func:`check_shard_set`'s job, once before a whole pass).

    ``columns`` default to the set's pixel columns (:func:`image_columns`).
    Pixel columns come as (rows, H, W, C) uint8 arrays, except in a split of
    whole images of varying sizes (:func:`split_image_shape` is None), where
    each is a list of (H, W, 1) uint8 arrays and the batch also holds the
    ``height`` and ``width`` columns (int32 arrays)."""
    manifest = read_manifest(shards_dir)
    shape = split_image_shape(manifest, split)
    columns = image_columns(manifest) if columns is None else columns
    paths = shard_paths(shards_dir, split)
    if file_order_seed is not None:
        paths = [paths[i] for i in np.random.default_rng(file_order_seed).permutation(len(paths))]
    for path in paths:
        yield from _file_batches(path, shape, batch_rows, columns)


def load_split(
    shards_dir: str | os.PathLike, split: str, limit: int | None = None
) -> dict[str, np.ndarray | list[np.ndarray]]:
    """A whole split in memory (fine for validation and test). Each shard read is
    checked against the manifest first; a damaged one raises ShardError naming it.

    Every column of the shards by name, as numpy arrays; pixel columns as
    (N, H, W, C) uint8, or, for whole images of varying sizes (a patch set's
    test split), as a list of N (H, W, 1) uint8 arrays beside ``height`` and
    ``width`` (int32 arrays)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = read_manifest(shards_dir)
    shape = split_image_shape(manifest, split)
    records = {r["file"]: r for r in manifest["shards"]}
    parts: list[dict[str, np.ndarray]] = []
    have = 0
    for path in shard_paths(shards_dir, split):
        reason = _shard_problem(path, records[str(path).rsplit("/", 1)[-1]])
        if reason:
            raise ShardError(f"{path}: corrupt shard ({reason})")
        try:
            if is_url(path):
                with open_read(path) as fh:
                    table = pq.read_table(fh)
            else:
                table = pq.read_table(path)
            parts.append(_batch_to_arrays(table, shape))
        except (OSError, ValueError, pa.ArrowException, ShardError) as exc:
            raise _corrupt(path, exc) from None
        have += table.num_rows
        if limit is not None and have >= limit:
            break
    if not parts:
        raise ShardError(f"{shards_dir}: the {split!r} split is empty")
    merged = {
        k: [x for p in parts for x in p[k]]
        if isinstance(parts[0][k], list)
        else np.concatenate([p[k] for p in parts])
        for k in parts[0]
    }
    return {k: v[:limit] for k, v in merged.items()} if limit is not None else merged
