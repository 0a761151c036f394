"""What a fresh install does with the models the package ships: `denoise
folder` on a folder of grey and colour photographs, with an empty store,
nothing trained and TensorFlow never imported (issue 25's "done when")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from artifacts.builtin import INDEX_FILE, PACKAGE_DIR
from tests.test_builtin import _denoised_summary, _folder_run
from tests.test_photo_pipeline import smooth_image

SIGMA = 25


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def _mixed_folder(folder: Path) -> dict[str, np.ndarray]:
    """Two grey and two colour 'photographs' with AWGN sigma 25; their clean images by name."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(25)
    clean = {}
    for i in range(2):
        clean[f"grey{i}.png"] = smooth_image(100 + i, 96, 128)
        clean[f"colour{i}.png"] = np.stack(
            [smooth_image(200 + 3 * i + c, 96, 128) for c in range(3)], -1
        )
    for name, image in clean.items():
        noisy = np.clip(np.rint(image + rng.normal(0, SIGMA, image.shape)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / name)
    return clean


def test_a_fresh_install_denoises_grey_and_colour_photos_with_the_shipped_model(
    prefect_api, tmp_path
):
    shipped = json.loads((PACKAGE_DIR / INDEX_FILE).read_text())["models"]
    assert "photos" in shipped, "the package ships no grey photo model"
    assert "colour" in shipped, "the package ships no colour photo model"
    version, colour = shipped["photos"]["version"], shipped["colour"]["version"]
    src, out, store = tmp_path / "photos", tmp_path / "clean", tmp_path / "empty-store"
    clean = _mixed_folder(src)
    proc = _folder_run(tmp_path, store, prefect_api, None, src, out)
    summary = _denoised_summary(proc)
    assert "with 2 models" in proc.stdout
    assert f"model {version} (built in): 2 grey" in proc.stdout
    assert f"model {colour} (built in): 2 colour" in proc.stdout
    assert summary["model"]["status"] == "built in"
    assert summary["by_model"] == {version: {"grey": 2}, colour: {"colour": 2}}
    for name, image in clean.items():
        noisy = np.asarray(Image.open(src / name))
        denoised = np.asarray(Image.open(out / name))
        assert denoised.shape == image.shape
        gain = _psnr(denoised, image) - _psnr(noisy, image)
        assert gain > 5.0, f"{name}: {gain:.2f} dB"
    assert not (store / "models").exists()


def test_the_shipped_models_denoise_cleaner_as_the_mean_of_eight_orientations(
    prefect_api, tmp_path
):
    # `--self-ensemble` on the same noisy photographs: every one comes out
    # closer to its clean image than from one pass, still without TensorFlow
    # (on real photographs the gain is larger: docs/natural.md)
    shipped = json.loads((PACKAGE_DIR / INDEX_FILE).read_text())["models"]
    src, store = tmp_path / "photos", tmp_path / "empty-store"
    clean = _mixed_folder(src)
    one = _folder_run(tmp_path, store, prefect_api, None, src, tmp_path / "one")
    eight = _folder_run(
        tmp_path, store, prefect_api, None, src, tmp_path / "eight", "--self-ensemble"
    )
    _denoised_summary(one)
    summary = _denoised_summary(eight)
    for domain, images in (("photos", "2 grey"), ("colour", "2 colour")):
        version = shipped[domain]["version"]
        assert f"model {version} (built in): {images}; the mean of eight orientations" in (
            eight.stdout
        )
        assert summary["model"]["routes"][domain]["self_ensemble"] is True
    gains = {}
    for name, image in clean.items():
        psnr_one = _psnr(np.asarray(Image.open(tmp_path / "one" / name)), image)
        psnr_eight = _psnr(np.asarray(Image.open(tmp_path / "eight" / name)), image)
        gains[name] = psnr_eight - psnr_one
    # measured: +0.02 / +0.06 (grey), +0.004 / +0.08 (colour) on these smooth images
    # (a CPU computing in another precision may move one by a few thousandths)
    assert min(gains.values()) > -0.01, gains
    assert np.mean(list(gains.values())) > 0.02, gains
