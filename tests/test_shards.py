"""Noise models and Parquet shard sets, on tiny synthetic images."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from denoiser.core.errors import ShardError
from denoiser.data.datasets import temp_path
from denoiser.data.noise import (
    DENSITIES,
    KINDS,
    add_noise,
    draw_levels,
    level_from_uniform,
    quantize,
)
from denoiser.data.shards import (
    ShardRequest,
    SplitArrays,
    check_shard_set,
    iter_batches,
    load_split,
    read_manifest,
    shard_set_key,
    split_rows,
    split_train_validation,
    verify_shard_set,
    write_shard_set,
)

RNG = np.random.default_rng(42)
IMAGES = RNG.integers(0, 256, (50, 8, 8, 1), dtype=np.uint8)
LABELS = RNG.integers(0, 10, 50).astype(np.uint8)


def splits(copies: int = 1) -> dict[str, SplitArrays]:
    cut = split_train_validation(40, 0.1)
    idx = np.arange(50)
    return {
        "train": SplitArrays(IMAGES[:cut], LABELS[:cut], idx[:cut], copies),
        "validation": SplitArrays(IMAGES[cut:40], LABELS[cut:40], idx[cut:40]),
        "test": SplitArrays(IMAGES[40:], LABELS[40:], idx[40:]),
    }


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))
    }


def test_gaussian_is_the_reference_formula():
    x = np.full((4, 16, 16, 1), 0.5)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    noisy = add_noise(x, "gaussian", 0.2, rng_a)
    expected = np.clip(x + 0.2 * rng_b.standard_normal(x.shape), 0, 1)
    np.testing.assert_allclose(noisy, expected, atol=1e-6)
    assert 0.18 < (noisy - x).std() < 0.22


def test_other_noise_models_behave():
    rng = np.random.default_rng(0)
    grey = np.full((8, 32, 32, 1), 0.5)
    sp = add_noise(grey, "salt_and_pepper", 0.3, rng)
    changed = sp != 0.5
    assert 0.27 < changed.mean() < 0.33 and set(np.unique(sp[changed])) == {0.0, 1.0}
    assert not add_noise(np.zeros_like(grey), "speckle", 0.5, rng).any()  # multiplicative
    np.testing.assert_array_equal(add_noise(grey, "poisson", 0.0, rng), grey.astype(np.float32))
    assert add_noise(grey, "poisson", 0.1, rng).std() > 0.05
    with pytest.raises(ValueError, match="unknown noise kind"):
        add_noise(grey, "pink", 0.1, rng)


def test_every_configurable_kind_and_density_is_implemented():
    # KINDS and DENSITIES are read from the config's literals, so a value the
    # config (and the CLI, and the Prefect form) accepts must work here too
    assert "gaussian" in KINDS and "rising" in DENSITIES
    rng = np.random.default_rng(5)
    grey = np.full((2, 8, 8, 1), 0.5)
    for kind in KINDS:
        assert add_noise(grey, kind, 0.3, rng).shape == grey.shape
    for density in DENSITIES:
        levels = draw_levels((0.1, 0.7), 50, rng, density=density)
        assert levels.min() >= 0.1 and levels.max() <= 0.7


def test_level_ranges_are_drawn_per_image():
    levels = draw_levels((0.1, 0.7), 1000, np.random.default_rng(1))
    assert levels.min() >= 0.1 and levels.max() <= 0.7 and levels.std() > 0.1
    assert set(draw_levels(0.5, 5, np.random.default_rng(1))) == {0.5}


def test_rising_density_draws_more_heavy_noise():
    rng = np.random.default_rng(2)
    rising = draw_levels((0.1, 0.7), 20_000, rng)
    uniform = draw_levels((0.1, 0.7), 20_000, rng, density="uniform")
    # linear density on [0.1, 0.7]: mean at 2/3 of the range (0.5), 3/4 of draws above 0.4
    assert abs(rising.mean() - 0.5) < 0.01 and abs((rising > 0.4).mean() - 0.75) < 0.02
    assert abs(uniform.mean() - 0.4) < 0.01
    # the same function works on TensorFlow tensors (the bench draws inside the graph)
    import tensorflow as tf

    u = np.array([0.0, 0.25, 1.0], dtype=np.float32)
    np.testing.assert_allclose(
        level_from_uniform(tf.constant(u), 0.1, 0.7).numpy(),
        level_from_uniform(u, 0.1, 0.7),
        rtol=1e-6,
    )
    np.testing.assert_allclose(level_from_uniform(u, 0.1, 0.7), [0.1, 0.4, 0.7], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown level density"):
        draw_levels((0.1, 0.7), 3, rng, density="falling")
    assert quantize(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]


def test_validation_is_the_last_tenth():
    assert split_train_validation(60000, 0.1) == 54000
    assert split_train_validation(40, 0.1) == 36
    with pytest.raises(ShardError):
        split_train_validation(1, 0.1)


def test_shards_are_byte_identical_whatever_the_parallelism(tmp_path):
    noise = {"kind": "gaussian", "level": [0.1, 0.7]}
    a = write_shard_set(tmp_path / "a", splits(copies=2), noise, shard_rows=16, seed=5, workers=1)
    b = write_shard_set(tmp_path / "b", splits(copies=2), noise, shard_rows=16, seed=5, workers=4)
    c = write_shard_set(tmp_path / "c", splits(copies=2), noise, shard_rows=16, seed=6, workers=2)
    assert digests(a) == digests(b)
    assert digests(a) != digests(c)
    manifest = read_manifest(a)
    assert manifest["splits"]["train"] == {"images": 36, "copies": 2, "rows": 72}
    assert [r["file"] for r in manifest["shards"] if r["split"] == "train"] == [
        "train-00000.parquet",
        "train-00001.parquet",
        "train-00002.parquet",
        "train-00003.parquet",
        "train-00004.parquet",
    ]
    assert all(r["sha256"] == digests(a)[r["file"]] for r in manifest["shards"])


def test_readers_return_pixels_and_columns(tmp_path):
    out = write_shard_set(tmp_path / "s", splits(), {"kind": "gaussian", "level": 0.5}, 7, seed=1)
    test = load_split(out, "test")
    np.testing.assert_array_equal(test["clean"], IMAGES[40:])
    np.testing.assert_array_equal(test["label"], LABELS[40:])
    assert test["noisy"].shape == (10, 8, 8, 1) and (test["noisy"] != test["clean"]).mean() > 0.5
    assert np.allclose(test["noise_level"], 0.5)
    rows = sum(len(b["noisy"]) for b in iter_batches(out, "train", batch_rows=5))
    assert rows == split_rows(out, "train") == 36
    assert load_split(out, "validation", limit=2)["index"].tolist() == [36, 37]


def test_readable_without_this_project(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.parquet as pq

    out = write_shard_set(tmp_path / "s", splits(), {"kind": "speckle", "level": 0.3}, 100, seed=1)
    path = out / "train-00000.parquet"
    frame = pd.read_parquet(path)
    assert len(frame) == 36 and len(frame["clean"][0]) == 64
    assert pl.read_parquet(path)["noise_kind"].unique().to_list() == ["speckle"]
    assert duckdb.sql(
        f"select count(*), min(octet_length(noisy)) from '{out}/*.parquet'"
    ).fetchall() == [(50, 64)]
    meta = pq.read_schema(path).metadata
    assert json.loads(meta[b"denoise.image_shape"]) == [8, 8, 1]
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"


def test_an_interrupted_set_is_finished_by_a_rerun(tmp_path):
    noise = {"kind": "gaussian", "level": 0.5}
    full = write_shard_set(tmp_path / "full", splits(), noise, 10, seed=2)
    part = write_shard_set(tmp_path / "part", splits(), noise, 10, seed=2)
    (part / "manifest.json").unlink()  # as if the run died before finishing
    (part / "train-00002.parquet").unlink()
    (part / ".train-00003.parquet.123.tmp").write_bytes(b"half a shard")  # a crashed write
    with pytest.raises(ShardError, match="no manifest.json"):
        read_manifest(part)
    write_shard_set(part, splits(), noise, 10, seed=2)
    assert digests(part) == digests(full)
    assert [r["file"] for r in read_manifest(part)["shards"]] == [
        r["file"] for r in read_manifest(full)["shards"]
    ]


def test_the_folder_key_follows_every_input():
    dataset = {"dataset": "mnist", "files": {"train_images": {"payload_sha256": "ab"}}}
    base = shard_set_key(dataset, {"kind": "gaussian", "level": 0.5, "seed": 0}, None, None)
    assert base == shard_set_key(dataset, {"level": 0.5, "kind": "gaussian", "seed": 0}, None, None)
    assert base != shard_set_key(dataset, {"kind": "gaussian", "level": 0.5, "seed": 1}, None, None)
    assert base != shard_set_key(dataset, {"kind": "gaussian", "level": 0.5, "seed": 0}, 100, None)
    other = {"dataset": "mnist", "files": {"train_images": {"payload_sha256": "cd"}}}
    assert base != shard_set_key(other, {"kind": "gaussian", "level": 0.5, "seed": 0}, None, None)


def test_corrupt_task_on_real_mnist(prefect_harness, mnist_mirror, tmp_path):
    from prefect import flow

    from denoiser.config import NoiseConfig
    from denoiser.data.datasets import fetch_dataset
    from tasks.corrupt import write_noisy_shards

    dataset = fetch_dataset("mnist", str(mnist_mirror), tmp_path / "downloads" / "mnist")

    @flow
    def corrupt() -> str:
        return write_noisy_shards(
            dataset,
            NoiseConfig(kind="salt_and_pepper", level=0.2, shard_rows=100),
            str(tmp_path),
            300,
            50,
        )

    out = Path(corrupt())
    manifest = read_manifest(out)
    assert out.parent == tmp_path / "shards" and out.name.startswith("mnist-")
    assert (
        manifest["splits"]["train"]["rows"] == 270
        and manifest["splits"]["validation"]["rows"] == 30
    )
    assert manifest["sources"]["train_images"].startswith("ba891046")
    test = load_split(out, "test")
    assert test["clean"].shape == (50, 28, 28, 1)
    flipped = (test["noisy"] != test["clean"]).mean()
    assert 0.05 < flipped < 0.2  # about 20% of pixels set to 0/255, many already were


# --------------------------------------------------------------------------- verification and repair

NOISE = {"kind": "gaussian", "level": 0.5}


def flip_byte(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0xFF
    path.write_bytes(bytes(blob))


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.parquet"))}


def dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(child.stdout)


def test_verify_names_truncated_flipped_and_missing_shards(tmp_path):
    out = write_shard_set(tmp_path / "s", splits(), NOISE, 10, seed=3)
    assert verify_shard_set(out) == []
    manifest = read_manifest(out)
    assert all(r["bytes"] == (out / r["file"]).stat().st_size for r in manifest["shards"])

    truncate(out / "train-00001.parquet", 100)
    flip_byte(out / "test-00000.parquet", 200)  # same size, other bytes
    (out / "validation-00000.parquet").unlink()
    assert verify_shard_set(out) == [
        "train-00001.parquet",
        "validation-00000.parquet",
        "test-00000.parquet",
    ]

    # a manifest written before sizes were recorded is still checked (by sha256)
    old = json.loads((out / "manifest.json").read_text())
    for rec in old["shards"]:
        del rec["bytes"]
    (out / "manifest.json").write_text(json.dumps(old))
    assert verify_shard_set(out) == [
        "train-00001.parquet",
        "validation-00000.parquet",
        "test-00000.parquet",
    ]

    (out / "manifest.json").write_text("{not json")
    assert verify_shard_set(out) == ["manifest.json"]
    (out / "manifest.json").unlink()
    assert verify_shard_set(out) == ["manifest.json"]
    assert verify_shard_set(tmp_path / "nowhere") == ["manifest.json"]


def test_readers_name_a_corrupt_shard(tmp_path):
    out = write_shard_set(tmp_path / "s", splits(), NOISE, 10, seed=3)
    truncate(out / "test-00000.parquet", 100)
    with pytest.raises(ShardError, match=r"test-00000.parquet: corrupt shard \(") as err:
        load_split(out, "test")
    assert str(out) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ShardError, match=r"test-00000.parquet: corrupt shard \("):
        list(iter_batches(out, "test"))

    # flipped bytes that still decode are caught by the checksum before use
    flip_byte(out / "train-00002.parquet", 300)
    with pytest.raises(ShardError, match=r"train-00002.parquet: corrupt shard \(sha256"):
        check_shard_set(out)
    garbage = out / "train-00001.parquet"
    garbage.write_bytes(b"PAR1" + b"\x00" * 64 + b"PAR1")
    with pytest.raises(ShardError, match=r"train-00001.parquet: corrupt shard \("):
        list(iter_batches(out, "train"))


def test_a_finished_set_with_a_bad_shard_is_repaired(tmp_path, caplog):
    out = write_shard_set(tmp_path / "s", splits(), NOISE, 10, seed=3)
    before = digests(out)
    recorded = {r["file"]: r["sha256"] for r in read_manifest(out)["shards"]}
    flip_byte(out / "train-00003.parquet", 150)
    times = mtimes(out)

    with caplog.at_level("WARNING", logger="denoiser.data.shards"):
        write_shard_set(out, splits(), NOISE, 10, seed=3)
    assert digests(out) == before
    assert {r["file"]: r["sha256"] for r in read_manifest(out)["shards"]} == recorded
    assert verify_shard_set(out) == []
    after = mtimes(out)
    assert [n for n in after if after[n] != times[n]] == ["train-00003.parquet"]
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines == [
        f"{out / 'train-00003.parquet'}: sha256 mismatch with the manifest; rebuilding it"
    ]


def test_a_shard_that_cannot_be_rebuilt_identically_rebuilds_the_set(tmp_path, caplog):
    out = write_shard_set(tmp_path / "s", splits(), NOISE, 10, seed=3)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64  # as if written by another pyarrow
    (out / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="denoiser.data.shards"):
        write_shard_set(out, splits(), NOISE, 10, seed=3)
    assert verify_shard_set(out) == []
    assert any("rebuilding the whole set" in r.getMessage() for r in caplog.records)


def test_orphan_temporaries_of_dead_writers_are_removed(tmp_path, caplog):
    out = tmp_path / "s"
    out.mkdir()
    live = temp_path(out / "train-00000.parquet", "tmp")  # this (live) process
    live.write_bytes(b"in progress")
    dead = temp_path(out / "train-00001.parquet", "tmp", pid=dead_pid())
    dead.write_bytes(b"left by a killed run")
    with caplog.at_level("INFO", logger="denoiser"):
        write_shard_set(out, splits(), NOISE, 10, seed=3)
    assert live.exists() and not dead.exists()
    assert any(dead.name in r.getMessage() and "removed" in r.getMessage() for r in caplog.records)


def _write_script(out: Path) -> str:
    return (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from tests.test_shards import splits, NOISE\n"
        "from denoiser.data.shards import write_shard_set\n"
        f"write_shard_set({str(out)!r}, splits(), NOISE, 10, seed=3, workers=2)\n"
    )


def test_killed_after_the_second_shard_the_rerun_finishes_without_rewriting(tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "s"
    env = {**os.environ, "DENOISE_FAILPOINTS": "shards.after_shard=kill@2"}
    child = subprocess.Popen(
        [sys.executable, "-c", _write_script(out)], env=env, stderr=subprocess.PIPE, text=True
    )
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, stderr
    assert not (out / "manifest.json").exists()
    finished = mtimes(out)
    assert len(finished) >= 2
    # the other writer thread may have died mid-shard: plant its leftover for certain
    orphan = temp_path(out / "train-00004.parquet", "tmp", pid=child.pid)
    orphan.write_bytes(b"half a shard")

    write_shard_set(out, splits(), NOISE, 10, seed=3)
    assert verify_shard_set(out) == []
    after = mtimes(out)
    assert {n: after[n] for n in finished} == finished
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert digests(out) == digests(write_shard_set(tmp_path / "ref", splits(), NOISE, 10, seed=3))


def test_a_write_error_is_one_line_naming_the_folder(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "s"
    script = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))\n"
        "from denoiser.core.errors import DenoiseError\n"
        "try:\n"
        + "".join("    " + line + "\n" for line in _write_script(out).splitlines())
        + "except DenoiseError as exc:\n"
        "    print(type(exc).__name__, exc, sep='|')\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    name, _, message = child.stdout.strip().partition("|")
    assert name == "ShardError", child.stdout + child.stderr
    assert message.startswith(f"{out}: cannot write ") and "File too large" in message


def test_a_truncated_shard_with_its_manifest_gone_is_rewritten_not_recorded(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (60, 28, 28, 1), dtype=np.uint8)
    labels, idx = np.zeros(60, np.uint8), np.arange(60)
    splits = {
        "train": SplitArrays(images[:40], labels[:40], idx[:40]),
        "validation": SplitArrays(images[40:50], labels[40:50], idx[40:50]),
        "test": SplitArrays(images[50:], labels[50:], idx[50:]),
    }
    noise = {"kind": "gaussian", "level": 0.5}
    out = write_shard_set(tmp_path / "set", splits, noise, shard_rows=20, seed=0)
    reference = json.loads((out / "manifest.json").read_text())
    shard = out / "train-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])  # torn, as a crash can leave it
    (out / "manifest.json").unlink()  # and no manifest to compare it with
    write_shard_set(out, splits, noise, shard_rows=20, seed=0)
    assert json.loads((out / "manifest.json").read_text())["shards"] == reference["shards"]
    assert verify_shard_set(out) == []


# --------------------------------------------------------------------------- a dataset's shard set


def test_pair_splits_hold_out_the_last_share_and_keep_the_test_set_whole():
    from denoiser.data.shards import split_pairs

    test_images, test_labels = IMAGES[40:], LABELS[40:]
    out = split_pairs(IMAGES[:40], LABELS[:40], test_images, test_labels, 0.1, copies=3)
    assert [len(out[s].images) for s in ("train", "validation", "test")] == [36, 4, 10]
    assert out["train"].copies == 3 and out["validation"].copies == 1
    assert list(out["validation"].index) == [36, 37, 38, 39]
    assert list(out["test"].index) == list(range(10))
    assert np.array_equal(out["validation"].images, IMAGES[36:40])
    with pytest.raises(ShardError):
        split_pairs(IMAGES[:1], LABELS[:1], test_images, test_labels, 0.5)


def test_noise_fields_leave_patch_fields_out_of_idx_sets_and_fill_them_for_images():
    from denoiser.config import NoiseConfig
    from denoiser.data.image_datasets import DEFAULT_PATCH_SIZE, DEFAULT_PATCHES_PER_IMAGE
    from denoiser.data.shards import is_image_set, noise_fields

    noise = NoiseConfig(patch_size=16)
    idx = {"dataset": "mnist"}
    assert not is_image_set(idx) and "patch_size" not in noise_fields(idx, noise)
    assert noise_fields(idx, noise)["kind"] == "gaussian"
    images = {"dataset": "mine", "kind": "images"}
    fields = noise_fields(images, noise)
    assert is_image_set(images) and fields["patch_size"] == 16
    assert noise_fields(images, NoiseConfig())["patch_size"] == DEFAULT_PATCH_SIZE
    assert fields["patches_per_image"] == DEFAULT_PATCHES_PER_IMAGE


def test_a_dataset_of_idx_files_becomes_a_pair_set(tmp_path):
    from denoiser.config import NoiseConfig
    from denoiser.domains import domain_of_manifest
    from tests.test_datasets import idx_bytes

    files = {}
    for role, arr in {
        "train_images": IMAGES[:40, ..., 0],
        "train_labels": LABELS[:40],
        "test_images": IMAGES[40:, ..., 0],
        "test_labels": LABELS[40:],
    }.items():
        path = tmp_path / f"{role}.idx"
        path.write_bytes(idx_bytes(arr))
        files[role] = {"name": path.name, "path": str(path), "payload_sha256": role}
    dataset = {"dataset": "tiny", "files": files}
    out = domain_of_manifest(dataset).write_shards(
        tmp_path / "shards" / "tiny-0123", ShardRequest(dataset, NoiseConfig(shard_rows=16), 30, 5)
    )
    manifest = read_manifest(out)
    assert [manifest["splits"][s]["rows"] for s in ("train", "validation", "test")] == [27, 3, 5]
    assert manifest["key"] == "0123" and manifest["train_limit"] == 30
    assert manifest["sources"]["test_labels"] == "test_labels"
    assert "patch_size" not in manifest["config"] and manifest.get("kind") != "patches"
    assert np.array_equal(load_split(out, "test")["clean"], IMAGES[40:45])


def test_a_patch_sets_test_hash_is_its_test_images_alone():
    from denoiser.data.shards import tested_images_sha256

    def manifest(train="a", rows=2, **extra):
        images = [{"sha256": train, "split": "train"}, {"sha256": "v", "split": "validation"}]
        images += [{"sha256": t, "split": "test"} for t in ("t1", "t2", "t3")]
        return {"kind": "patches", "splits": {"test": {"rows": rows}}, "images": images, **extra}

    first = tested_images_sha256(manifest())
    # trained on other data: the same; another test_limit or the files in colour: not
    assert first == tested_images_sha256(manifest(train="b", patch_size=40))
    assert first != tested_images_sha256(manifest(rows=3))
    assert first != tested_images_sha256(manifest(channels=3))
    assert tested_images_sha256({"kind": "pairs"}) is None  # its test pairs hold their noise
