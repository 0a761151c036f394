"""Metrics against known values and scikit-image; the evaluation task end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from denoiser.core.metrics import bce, evaluate_arrays, mse, psnr, ssim


def test_psnr_known_values():
    clean = np.random.default_rng(0).random((3, 28, 28, 1)) * 0.5
    assert np.allclose(psnr(clean, clean + 0.1), 20.0)
    assert np.allclose(psnr(clean, clean), 100.0)  # capped, not infinite
    assert np.allclose(mse(clean, clean + 0.1), 0.01)


def test_bce_known_values():
    y = np.array([[1.0, 0.0]]).reshape(1, 2)
    assert np.allclose(bce(y, np.array([[0.5, 0.5]])), np.log(2))
    assert bce(y, y)[0] < 1e-6


@pytest.mark.parametrize("shape", [(4, 28, 28), (2, 40, 33, 1), (2, 16, 16, 3)])
def test_ssim_equals_scikit_image(shape):
    rng = np.random.default_rng(1)
    a = rng.random(shape)
    b = np.clip(a + 0.3 * rng.standard_normal(shape), 0, 1)
    ours = ssim(a, b)
    for i in range(shape[0]):
        kwargs = {"channel_axis": -1} if len(shape) == 4 and shape[-1] > 1 else {}
        ref = structural_similarity(
            a[i].squeeze() if not kwargs else a[i],
            b[i].squeeze() if not kwargs else b[i],
            data_range=1.0,
            **kwargs,
        )
        assert abs(ours[i] - ref) < 1e-6


def test_ssim_on_real_digits(mnist_mirror):
    from denoiser.data.datasets import read_idx

    x = read_idx(mnist_mirror / "t10k-images-idx3-ubyte.gz")[:20] / 255.0
    y = np.clip(x + 0.5 * np.random.default_rng(12345).normal(size=x.shape), 0, 1)
    ref = [structural_similarity(x[i], y[i], data_range=1.0) for i in range(20)]
    np.testing.assert_allclose(ssim(x, y), ref, atol=1e-6)


def test_evaluate_arrays_groups_by_level_and_class():
    rng = np.random.default_rng(2)
    clean = rng.random((6, 8, 8, 1))
    noisy = np.clip(clean + 0.2, 0, 1)
    denoised = clean.copy()
    levels = np.array([0.3, 0.3, 0.5, 0.5, 0.5, 0.7], np.float32)
    labels = np.array([1, 2, 1, 2, 1, 2])
    result = evaluate_arrays(clean, noisy, denoised, levels, labels)
    assert result["overall"]["count"] == 6 and result["overall"]["psnr_denoised"] == 100.0
    assert [(r["level"], r["count"]) for r in result["per_level"]] == [
        ("0.3", 2),
        ("0.5", 3),
        ("0.7", 1),
    ]
    assert [(r["label"], r["count"]) for r in result["per_class"]] == [(1, 3), (2, 3)]
    ranged = evaluate_arrays(clean, noisy, denoised, np.linspace(0.1, 0.7, 6), level_bins=3)
    assert [r["count"] for r in ranged["per_level"]] == [2, 2, 2]


def test_evaluation_task_writes_metrics_card_and_artifacts(prefect_harness, tmp_path):
    import asyncio

    import keras
    from PIL import Image
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from denoiser.config import EvalConfig
    from denoiser.data.shards import SplitArrays, write_shard_set
    from tasks.evaluate import evaluate_denoiser

    rng = np.random.default_rng(0)
    blocks = (rng.random((30, 4, 4)) < 0.3).astype(
        np.uint8
    ) * 255  # smooth shapes: a mean filter helps
    images = np.kron(blocks, np.ones((7, 7), np.uint8))[..., None]
    arr = SplitArrays(images, np.arange(30) % 10, np.arange(30))
    shards = write_shard_set(
        tmp_path / "shards",
        {"train": arr, "validation": arr, "test": arr},
        {"kind": "gaussian", "level": 0.5},
        100,
        seed=0,
    )
    model_dir = tmp_path / "models" / "v1"
    model_dir.mkdir(parents=True)
    # a 3x3 mean filter: a real (if weak) denoiser with known behaviour
    inputs = keras.Input((None, None, 1))
    conv = keras.layers.Conv2D(1, 3, padding="same", use_bias=False, kernel_initializer="ones")
    model = keras.Model(inputs, keras.layers.Rescaling(1 / 9)(conv(inputs)))
    model.save(model_dir / "model.keras")
    (model_dir / "model.json").write_text(
        json.dumps({"version": "v1", "architecture": "unet", "params": model.count_params()})
    )

    @flow
    def judge(min_gain: float) -> dict:
        state = evaluate_denoiser(
            str(model_dir),
            str(shards),
            EvalConfig(min_psnr_gain=min_gain, sample_count=5),
            return_state=True,
        )
        return {**state.result(), "state": state.name, "message": state.message}

    result = judge(1.0)
    assert result["passed"] and result["psnr_denoised"] > result["psnr_noisy"] + 1.0
    card = json.loads((model_dir / "model.json").read_text())
    assert card["quality_gate"]["passed"] is True and card["metrics"]["count"] == 30
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert len(metrics["per_class"]) == 10 and metrics["per_level"][0]["level"] == "0.5"
    with Image.open(model_dir / "samples.png") as img:
        assert img.format == "PNG" and img.size[0] > 5 * 28 and img.size[1] > 3 * 28
    assert "Quality gate **PASSED**" in Path(result["report"]).read_text()

    assert result["state"] == "Completed"
    failed = judge(50.0)
    assert not failed["passed"]
    # the verdict is the task run's state in the UI, with the figures as its message
    assert failed["state"] == "Gate failed"
    assert failed["message"].startswith("model v1 failed its quality gate: PSNR gain ")
    assert "< 50.00 dB required" in failed["message"]
    assert json.loads((model_dir / "model.json").read_text())["quality_gate"]["passed"] is False

    async def keys():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=["evaluation-metrics", "evaluation-report"])
                )
            )
        return {a.key: a for a in found}

    artifacts = asyncio.run(keys())
    assert "data:image/png;base64," in artifacts["evaluation-report"].data


def test_the_quality_gate_compares_the_overall_gain_with_the_minimum():
    from denoiser.learning.quality import judge_quality

    rng = np.random.default_rng(3)
    clean = rng.random((4, 8, 8, 1))
    metrics = evaluate_arrays(clean, np.clip(clean + 0.2, 0, 1), clean * 0.99)
    gain = metrics["overall"]["psnr_gain"]
    gate = judge_quality(metrics, gain)  # exactly the minimum passes
    assert gate.passed and gate.psnr_gain == gain and gate.min_psnr_gain == gain
    assert gate.to_dict() == {"min_psnr_gain": gain, "psnr_gain": gain, "passed": True}
    assert not judge_quality(metrics, gain + 0.01).passed


def test_the_quality_gate_of_a_photo_set_says_it_is_a_mean_over_the_sigmas():
    from denoiser.core.metrics import evaluate_per_sigma
    from denoiser.learning.quality import judge_quality

    clean = [np.full((8, 8), 0.5), np.linspace(0, 1, 80).reshape(8, 10)]
    noisy = {s: [c + s / 255 for c in clean] for s in (15.0, 25.0)}
    metrics = evaluate_per_sigma(clean, noisy, {s: clean for s in noisy})
    gate = judge_quality(metrics, 5.0)
    assert gate.over == "mean over sigmas 15, 25"
    assert gate.psnr_gain == metrics["overall"]["psnr_gain"] and gate.passed
