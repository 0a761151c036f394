"""Photographs through the whole pipeline (issue 14): training on a patch set
with fresh awgn per batch, evaluation of whole images of any size at each
sigma, `denoise train --dataset <folder> --quick` and `denoise folder` end to
end, the domain warning, and production kept per domain in the registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from denoiser.config import EvalConfig, NoiseConfig, TrainConfig

NOISE = {"kind": "awgn", "level": [0.0, 55.0], "density": "uniform", "applied": "in_training"}


def smooth_image(seed: int, h: int, w: int) -> np.ndarray:
    """A smooth grey 'photograph': waves and soft blobs, no saturation."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / 64.0
    img = 0.5 + 0.18 * np.sin(
        2 * np.pi * (rng.uniform(0.3, 1.0) * x + rng.uniform(0.3, 1.0) * y) + rng.uniform(0, 6)
    )
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h / 64), rng.uniform(0, w / 64), rng.uniform(0.2, 0.5)
        img += rng.uniform(-0.2, 0.2) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
    return np.clip(np.rint(img * 255), 20, 235).astype(np.uint8)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos") / "mine"
    folder.mkdir()
    for i in range(18):
        h, w = (96, 96) if i % 3 else (80, 112)
        Image.fromarray(smooth_image(i, h, w)).save(folder / f"photo_{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def patch_set(photo_folder, tmp_path_factory) -> Path:
    from denoiser.data.datasets import fetch_dataset
    from denoiser.data.image_datasets import build_image_splits
    from denoiser.data.shards import write_shard_set

    root = tmp_path_factory.mktemp("patchset")
    manifest = fetch_dataset(str(photo_folder), None, root / "cache")
    splits, meta = build_image_splits(manifest, 0.2, patch_size=24, patches_per_image=6)
    return write_shard_set(
        root / "set", splits, NOISE, shard_rows=40, seed=3, meta={**meta, "dataset": "mine"}
    )


# --------------------------------------------------------------------------- training on patches


def _residuals_by_patch(ds) -> dict[bytes, np.ndarray]:
    out = {}
    for noisy, clean in ds:
        for y, x in zip(np.asarray(noisy), np.asarray(clean), strict=True):
            out[x.tobytes()] = y - x
    return out


def test_patch_sets_train_on_fresh_awgn_per_batch_and_fixed_validation_noise(patch_set):
    from denoiser.learning.training import make_dataset

    train = make_dataset(
        patch_set, "train", batch_size=16, shuffle_buffer=32, seed=0, training=True
    )
    first, second = _residuals_by_patch(train), _residuals_by_patch(train)  # two epochs
    assert first.keys() == second.keys() and len(first) > 30
    assert all(
        not np.allclose(first[k], second[k]) for k in first
    )  # new noise on every patch, every epoch
    noise = np.concatenate([r.ravel() for r in first.values()])
    assert 0.05 < noise.std() < 55 / 255  # sigma drawn in [0, 55] per patch (0-255 units)
    noisy, clean = next(iter(train))
    assert noisy.dtype.name == "float32" and noisy.shape[1:] == (24, 24, 1)
    stds = np.asarray(noisy - clean).reshape(len(clean), -1).std(axis=1)
    assert stds.max() - stds.min() > 0.02  # one sigma per patch, not one per batch
    # unclipped: clean + noise even past [0, 1]; counted over a whole (seeded) epoch, where
    # the patches with the larger sigmas put hundreds of values out there
    outside = [int(np.sum((np.asarray(n) < 0.0) | (np.asarray(n) > 1.0))) for n, _ in train]
    print(f"noisy values outside [0, 1] in the third epoch: {sum(outside)} (per batch {outside})")
    assert sum(outside) > 50

    validation = make_dataset(patch_set, "validation", batch_size=16, training=False)
    a, b = _residuals_by_patch(validation), _residuals_by_patch(validation)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # val_loss compares


def test_training_on_a_patch_set_records_what_it_learned(patch_set, tmp_path):
    from denoiser.learning.training import train_model

    result = train_model(
        patch_set, TrainConfig(epochs=1, batch_size=16), tmp_path / "m", tmp_path / "b"
    )
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert (
        result["architecture"] == card["architecture"] == "photo_unet"
    )  # auto: the photo architecture
    data = card["data"]
    assert (
        data["domain"] == "photos" and data["shard_kind"] == "patches" and data["dataset"] == "mine"
    )
    assert (
        data["patch_size"] == 24
        and data["patches_per_image"] == 6
        and data["noise"]["kind"] == "awgn"
    )
    assert np.isfinite(result["best_val_loss"]) and card["image_shape"] == [24, 24, 1]


# --------------------------------------------------------------------------- evaluation of whole images


def _scaling_model(factor: float):
    import keras

    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(
        1, 1, use_bias=False, kernel_initializer=keras.initializers.Constant(factor)
    )
    return keras.Model(inputs, conv(inputs))


def test_tiling_has_no_seams_and_evaluation_scores_each_size_at_each_sigma():
    from denoiser.folder import BatchPredictor
    from denoiser.imaging.tiling import TileSpec
    from denoiser.runtimes.inference import denoise_planes, evaluate_planes

    identity = BatchPredictor(_scaling_model(1.0), batch_size=4)
    constant = [np.full((70, 50), 0.4, np.float32), np.full((33, 90), 0.7, np.float32)]
    for spec in (
        TileSpec(tile=32, overlap=8, multiple=4),
        TileSpec(tile=256, overlap=32, multiple=4, whole_max=512),
    ):
        for plane, out in zip(constant, denoise_planes(constant, spec, identity), strict=True):
            assert out.shape == plane.shape
            np.testing.assert_allclose(out, plane, atol=1e-6)  # a constant stays constant: no seams

    clean = [smooth_image(1, 64, 48) / 255.0, smooth_image(2, 40, 72) / 255.0]
    metrics, noisy, denoised = evaluate_planes(
        _scaling_model(3.0), None, clean, [15, 25, 50], names=["a", "b"]
    )
    assert [r["sigma"] for r in metrics["per_sigma"]] == [15, 25, 50]
    assert [(r["image"], r["sigma"], r["height"], r["width"]) for r in metrics["per_image"]][
        :2
    ] == [("a", 15, 64, 48), ("b", 15, 40, 72)]
    assert len(metrics["per_image"]) == 6 and metrics["overall"]["count"] == 2
    for s in (15, 25, 50):
        assert all(d.min() >= 0.0 and d.max() <= 1.0 for d in denoised[s])  # outputs clipped
    assert all(y.min() < 0.0 or y.max() > 1.0 for y in noisy[50])  # the noise is not clipped
    assert metrics["per_sigma"][0]["psnr_noisy"] > metrics["per_sigma"][2]["psnr_noisy"]
    gains = [r["psnr_gain"] for r in metrics["per_sigma"]]
    assert metrics["overall"]["psnr_gain"] == pytest.approx(np.mean(gains))
    again, _, _ = evaluate_planes(_scaling_model(3.0), None, clean, [15, 25, 50], names=["a", "b"])
    assert again == metrics  # the noisy test images are a fixed draw


def test_photo_evaluation_task_has_per_sigma_rows_and_crops(prefect_harness, patch_set, tmp_path):
    from prefect import flow

    from tasks.evaluate import evaluate_denoiser

    model_dir = tmp_path / "v1"
    model_dir.mkdir()
    _scaling_model(1.0).save(model_dir / "model.keras")
    (model_dir / "model.json").write_text(
        json.dumps({"version": "v1", "architecture": "photo_unet", "params": 1})
    )

    @flow
    def judge() -> dict:
        return evaluate_denoiser(
            str(model_dir),
            str(patch_set),
            EvalConfig(min_psnr_gain=-1, sigmas=[25, 50]),
            return_state=True,
        ).result()

    result = judge()
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert (
        [r["sigma"] for r in metrics["per_sigma"]]
        == [25, 50]
        == [r["sigma"] for r in result["per_sigma"]]
    )
    assert abs(result["psnr_gain"]) < 0.01 and result["passed"]  # the identity: no gain
    report = Path(result["report"]).read_text()
    assert (
        "mean PSNR gain over the sigmas" in report and "| 25 |" in report and "| mean |" in report
    )
    with Image.open(
        model_dir / "samples.png"
    ) as img:  # crops at 1:1: three rows of at most 128 pixels
        assert img.size[1] <= 3 * 128 + 8


# --------------------------------------------------------------------------- the CLI end to end


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(
        10 * np.log10(1.0 / np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2))
    )


@pytest.fixture(scope="module")
def trained(prefect_harness, photo_folder, tmp_path_factory):
    from flows.cli import main

    store = tmp_path_factory.mktemp("store")
    code = main(
        [
            "--store",
            str(store),
            "train",
            "--dataset",
            str(photo_folder),
            "--quick",
            "--patch-size",
            "32",
            "--patches-per-image",
            "48",
            "--batch-size",
            "32",
            "--min-psnr-gain",
            "1",
        ]
    )
    return store, code


def test_train_on_a_folder_quick_end_to_end(trained, capsys):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from artifacts.registry import list_models

    store, code = trained
    assert code == 0
    [model] = list_models(store)
    assert model.status == "production" and model.domain == "photos"
    assert model.card.architecture == "photo_unet" and model.card.data.noise["kind"] == "awgn"
    assert model.card.data.noise["level"] == [0.0, 55.0]  # no noise flags: the blind model
    metrics = json.loads((model.dir / "metrics.json").read_text())
    assert [r["sigma"] for r in metrics["per_sigma"]] == [15, 25, 50]
    assert all(r["psnr_gain"] > 0 for r in metrics["per_sigma"])

    async def keys():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(
                        any_=[
                            "evaluation-metrics",
                            "evaluation-report",
                            "model-card",
                            "training-losses",
                        ]
                    )
                )
            )
        return {a.key for a in found}

    assert asyncio.run(keys()) == {
        "evaluation-metrics",
        "evaluation-report",
        "model-card",
        "training-losses",
    }
    from flows.cli import main

    assert main(["--store", str(store), "models"]) == 0
    assert re.search(r"production[\s│]+photos[\s│]+photo_unet", capsys.readouterr().out)


@pytest.fixture()
def noisy_photos(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    folder, clean = tmp_path / "noisy", {}
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(3):
        x = smooth_image(100 + i, 128, 128)
        y = np.clip(np.rint(x + 25.0 * rng.standard_normal(x.shape)), 0, 255).astype(np.uint8)
        Image.fromarray(y).save(folder / f"n{i}.png")
        clean[f"n{i}.png"] = x
    return folder, clean


def test_denoise_folder_with_the_photo_model_raises_psnr(trained, noisy_photos, tmp_path, capsys):
    from flows.cli import main

    store, _ = trained
    noisy, clean = noisy_photos
    assert main(["--store", str(store), "folder", str(noisy), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out
    for name, x in clean.items():
        before = _psnr(x, np.asarray(Image.open(noisy / name)))
        after = _psnr(x, np.asarray(Image.open(tmp_path / "out" / name)))
        assert after > before + 1.0, (name, before, after)


def test_a_digit_model_on_photographs_is_warned_about_naming_the_photo_model(
    trained, noisy_photos, tmp_path, capsys
):
    from artifacts.registry import production_model
    from denoiser.nets.models import build_model
    from flows.cli import main

    store, _ = trained
    digits = tmp_path / "digits-v1"
    digits.mkdir()
    build_model("unet").save(digits / "model.keras")
    (digits / "model.json").write_text(
        json.dumps(
            {
                "version": "digits-v1",
                "architecture": "unet",
                "data": {"dataset": "mnist", "domain": "digits"},
            }
        )
    )
    noisy, _ = noisy_photos
    assert (
        main(
            [
                "--store",
                str(store),
                "folder",
                str(noisy),
                str(tmp_path / "out"),
                "--model",
                str(digits),
            ]
        )
        == 0
    )
    out = " ".join(capsys.readouterr().out.split())
    photo = production_model(store, "photos").version
    assert (
        f"warning: model digits-v1 was trained on 28x28 digits but these images look like photographs; "
        f"use {photo}, the production model for photos (--model {photo})"
    ) in out
    newest = max((store / "reports").rglob("summary.json"), key=lambda p: p.stat().st_mtime_ns)
    assert "trained on 28x28 digits" in json.loads(newest.read_text())["warning"]


def test_photo_options_are_checked_before_any_work_with_the_flag_named(
    capsys, tmp_path, photo_folder
):
    from flows.cli import _train_configs, build_parser, main

    for argv, message in [
        (["--patch-size", "4"], "invalid --patch-size"),
        (["--patch-size", "42"], "invalid noise.patch_size (--patch-size): 42 is not a multiple"),
        (["--patches-per-image", "0"], "invalid --patches-per-image"),
        (["--sigmas", "15,300"], "invalid --sigmas"),
        (["--noise-kind", "gaussian"], "invalid noise.kind (--noise-kind)"),
        (["--architecture", "seed"], "invalid training.architecture (--architecture)"),
    ]:
        code = main(["--store", str(tmp_path), "train", "--dataset", str(photo_folder), *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "downloads").exists()

    configs = _train_configs(
        build_parser().parse_args(["train", "--dataset", "train400", "--quick"])
    )
    assert configs["noise"].kind == "awgn" and configs["noise"].level == (0.0, 55.0)
    assert configs["noise"].patches_per_image == 8 and configs["training"].epochs == 3
    assert configs["data"].test_limit == 6 and configs["data"].train_limit is None
    fixed = _train_configs(
        build_parser().parse_args(
            [
                "train",
                "--dataset",
                "train400",
                "--noise-level",
                "25",
                "--test-dataset",
                str(photo_folder),
            ]
        )
    )
    assert fixed["noise"].kind == "awgn" and fixed["noise"].level == 25
    assert fixed["data"].test_dataset == str(photo_folder)


def test_the_flow_defaults_noise_to_the_datasets_own():
    import inspect

    from flows.training import train_pipeline

    assert inspect.signature(train_pipeline.fn).parameters["noise"].default is None
    from denoiser.config import DataConfig
    from denoiser.request import default_noise_for, resolve_request

    photos = DataConfig(dataset="train400")

    assert (
        resolve_request(photos, default_noise_for(photos), TrainConfig()).training.architecture
        == "photo_unet"
    )
    assert (
        resolve_request(DataConfig(), NoiseConfig(), TrainConfig()).training.architecture == "unet"
    )


# --------------------------------------------------------------------------- registry: a production per domain


def _version(store: Path, version: str, psnr: float, domain: str | None, data: str = "d1") -> Path:
    folder = store / "models" / version
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"weights")
    card = {
        "version": version,
        "architecture": "unet",
        "params": 1,
        "created": version,
        "data": {
            "manifest_sha256": f"{data}-{domain or 'digits'}",
            **({"domain": domain} if domain else {}),
        },
        "metrics": {"psnr_denoised": psnr, "ssim_denoised": 0.9},
        "quality_gate": {"passed": True, "psnr_gain": 6.0, "min_psnr_gain": 5.0},
    }
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def test_the_registry_keeps_a_production_model_per_domain(tmp_path, capsys):
    from artifacts.registry import (
        list_models,
        promote,
        read_registry,
        register_model,
    )
    from artifacts.resolution import resolve_model
    from flows.cli import main

    assert (
        register_model(tmp_path, _version(tmp_path, "v1-digits", 20.0, None))["status"]
        == "production"
    )
    photo = register_model(tmp_path, _version(tmp_path, "v2-photos", 28.0, "photos"))
    assert photo["promoted"] and "no production model yet" in photo["reason"]
    better_digits = register_model(tmp_path, _version(tmp_path, "v3-digits", 21.0, "digits"))
    assert better_digits["promoted"] and "beats production v1-digits" in better_digits["reason"]
    worse_photos = register_model(tmp_path, _version(tmp_path, "v4-photos", 27.0, "photos"))
    assert not worse_photos["promoted"] and "v2-photos" in worse_photos["reason"]

    state = read_registry(tmp_path)
    assert state["production_by_domain"] == {"digits": "v3-digits", "photos": "v2-photos"}
    assert {m.version: m.status for m in list_models(tmp_path)} == {
        "v4-photos": "candidate",
        "v3-digits": "production",
        "v2-photos": "production",
        "v1-digits": "candidate",
    }
    assert resolve_model(tmp_path, None, "photos").version == "v2-photos"
    assert resolve_model(tmp_path, None, "digits").version == "v3-digits"
    assert resolve_model(tmp_path).version == "v3-digits"  # domain unknown: the latest promoted

    promote(tmp_path, "v4-photos")  # by hand, within its domain
    assert read_registry(tmp_path)["production_by_domain"] == {
        "digits": "v3-digits",
        "photos": "v4-photos",
    }
    assert main(["--store", str(tmp_path), "models"]) == 0
    out = capsys.readouterr().out
    assert "domain" in out and re.search(r"v4-photos[\s│]+production[\s│]+photos", out)


def test_an_old_registry_without_domains_still_reads(tmp_path):
    from artifacts.registry import list_models, read_registry, register_model
    from artifacts.resolution import resolve_model

    _version(tmp_path, "v1", 20.0, None)
    (tmp_path / "models" / "registry.json").write_text(
        json.dumps(
            {"production": "v1", "versions": {"v1": {"registered": "2026-01-01"}}, "history": []}
        )
    )
    assert read_registry(tmp_path)["production"] == "v1"
    assert [m.status for m in list_models(tmp_path)] == ["production"]
    assert resolve_model(tmp_path, None, "digits").version == "v1"
    photo = register_model(tmp_path, _version(tmp_path, "v2", 25.0, "photos"))
    assert photo["promoted"]  # it does not compete with the digit model
    assert read_registry(tmp_path)["production_by_domain"] == {"digits": "v1", "photos": "v2"}
    assert {m.version: m.status for m in list_models(tmp_path)} == {
        "v1": "production",
        "v2": "production",
    }


def test_a_photo_request_takes_what_it_leaves_unset_from_its_recipe():
    from denoiser.config import DataConfig, NoiseConfig, TrainConfig
    from denoiser.nets.architectures import ARCHITECTURES
    from denoiser.request import default_noise_for, resolve_request

    def apply_recipe_defaults(data, noise, training):
        request = resolve_request(data, noise, training)
        return request.noise, request.training

    photos = DataConfig(dataset="train400")
    recipe = ARCHITECTURES["photo_unet"].recipe
    noise, training = apply_recipe_defaults(photos, default_noise_for(photos), TrainConfig())
    assert (noise.patch_size, training.batch_size, training.epochs) == (
        recipe.patch_size,
        recipe.batch_size,
        recipe.epochs,
    )
    noise, training = apply_recipe_defaults(
        photos,
        default_noise_for(photos).model_copy(update={"patch_size": 48}),
        TrainConfig(batch_size=16),
    )
    assert (noise.patch_size, training.batch_size, training.epochs) == (48, 16, recipe.epochs)
    digits_noise, digits = apply_recipe_defaults(DataConfig(), NoiseConfig(), TrainConfig())
    assert (digits.architecture, digits.batch_size, digits.epochs) == ("unet", 64, 35)
    assert digits_noise == NoiseConfig()
