"""`denoise folder` routes each image to the model of its domain (issue 25):
colour photographs through the colour model, grey ones through the grey
model, digits through the digits model, in one run; colour images through a
grey model channel by channel and grey images through a colour model when
their own domain has none; alpha and 16-bit depth kept; the journal and the
report say which model and route made each output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from denoiser.core.opponent import opponent_to_rgb, rgb_to_opponent
from denoiser.domains import by_domain
from denoiser.folder import JOURNAL_NAME, BatchPredictor, denoise_tree, parse_journal
from denoiser.folder.routing import (
    COLOUR,
    GREY,
    GREY_AS_COLOUR,
    PER_CHANNEL,
    Denoiser,
    Router,
    denoise_luminance,
    model_channels,
)
from denoiser.imaging.images import decode_image, rgb_pixels
from denoiser.runtimes.inference import denoise_planes, tile_spec_for_model

SIGMA = 25.0


def smooth(seed: int, h: int, w: int) -> np.ndarray:
    """A smooth float image in [40, 215]: a few low-frequency waves."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.zeros((h, w))
    for _ in range(4):
        fy, fx, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.3)
        out += np.sin(2 * np.pi * (fy * y + fx * x) + phase)
    return 40 + 175 * (out - out.min()) / (np.ptp(out) or 1)


def smooth_rgb(seed: int, h: int, w: int) -> np.ndarray:
    return np.stack([smooth(seed * 3 + c, h, w) for c in range(3)], axis=-1)


def with_noise(clean: np.ndarray, seed: int, top: int = 255) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noisy = clean + SIGMA * top / 255 * rng.standard_normal(clean.shape)
    return np.clip(np.rint(noisy), 0, top)


def psnr(clean: np.ndarray, out: np.ndarray, top: float = 255.0) -> float:
    mse = np.mean((np.asarray(clean, float) - np.asarray(out, float)) ** 2)
    return float(10 * np.log10(top * top / mse))


def build_mixed_folder(root: Path) -> dict[str, np.ndarray]:
    """Noisy colour photographs (one with alpha), grey ones (one 16-bit) and
    a digit-sized image; the clean image of each photograph by name."""
    root.mkdir(parents=True)
    clean = {}
    for i in range(2):
        x = smooth_rgb(10 + i, 96, 112)
        Image.fromarray(with_noise(x, i).astype(np.uint8)).save(root / f"colour{i}.png")
        clean[f"colour{i}.png"] = x
    x = smooth_rgb(20, 80, 80)
    alpha = np.tile(np.linspace(0, 255, 80).astype(np.uint8), (80, 1))
    rgba = np.dstack([with_noise(x, 7).astype(np.uint8), alpha])
    Image.fromarray(rgba).save(root / "alpha.png")
    clean["alpha.png"] = x
    for i in range(2):
        x = smooth(30 + i, 96, 96)
        Image.fromarray(with_noise(x, 40 + i).astype(np.uint8)).save(root / f"grey{i}.png")
        clean[f"grey{i}.png"] = x
    x = smooth(50, 72, 72) * 257
    Image.fromarray(with_noise(x, 50, 65535).astype(np.uint16)).save(root / "deep.png")
    clean["deep.png"] = x
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    Image.fromarray(digit).save(root / "digit.png")
    return clean


def train_tiny(channels: int, seed: int):
    """A tiny fully convolutional denoiser (one 5x5 convolution, started as a
    blur), trained for a few steps on smooth images with awgn."""
    import keras

    keras.utils.set_random_seed(seed)
    blur = np.outer(*[np.array([1, 4, 6, 4, 1], np.float32)] * 2)
    kernel = np.zeros((5, 5, channels, channels), np.float32)
    for c in range(channels):
        kernel[:, :, c, c] = blur / blur.sum()
    inputs = keras.Input((None, None, channels))
    conv = keras.layers.Conv2D(channels, 5, padding="same")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([kernel, np.zeros(channels, np.float32)])
    rng = np.random.default_rng(seed)
    clean = np.stack([smooth_rgb(100 + i, 32, 32)[..., :channels] for i in range(64)]).astype(
        np.float32
    )
    clean /= 255.0
    noisy = clean + SIGMA / 255 * rng.standard_normal(clean.shape).astype(np.float32)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.fit(noisy, clean, batch_size=16, epochs=2, verbose=0)
    return model


def identity(channels: int = 1):
    import keras

    inputs = keras.Input((None, None, channels))
    conv = keras.layers.Conv2D(channels, 1, kernel_initializer="ones", bias_initializer="zeros")
    return keras.Model(inputs, conv(inputs))


def add_version(store: Path, version: str, model, domain: str, dataset: str) -> Path:
    """The model as a store version of ``domain``, registered (the first of
    its domain becomes its production model)."""
    from artifacts.registry import register_model

    folder = store / "models" / version
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    card = {
        "version": version,
        "architecture": "custom",
        "params": model.count_params(),
        "data": {"dataset": dataset, "domain": domain},
        "metrics": {"psnr_denoised": 30.0},
        "quality_gate": {"passed": True},
    }
    (folder / "model.json").write_text(json.dumps(card))
    register_model(store, folder)
    return folder


@pytest.fixture(scope="module")
def models():
    return {"grey": train_tiny(1, 0), "colour": train_tiny(3, 1), "digits": identity(1)}


VERSIONS = {"grey": "grey-v1", "colour": "colour-v1", "digits": "digits-v1"}
DOMAIN_OF = {
    "grey": ("photos", "train400"),
    "colour": ("colour", "cbsd432"),
    "digits": ("digits", "mnist"),
}


def make_store(root: Path, models: dict, kinds=("grey", "colour", "digits")) -> Path:
    """A store holding the given kinds of model, each its domain's production model."""
    for kind in kinds:
        add_version(root, VERSIONS[kind], models[kind], *DOMAIN_OF[kind])
    return root


def denoiser_of(model, name: str) -> Denoiser:
    return Denoiser(
        name, BatchPredictor(model, 32), tile_spec_for_model(model), model_channels(model)
    )


def router_of(models: dict, kinds: dict[str, str]) -> Router:
    """Each domain ("colour", "photos", "digits") to the model of ``kinds[domain]``."""
    made = {k: denoiser_of(models[k], VERSIONS[k]) for k in set(kinds.values())}
    return by_domain(lambda domain: made[kinds[domain]])


ALL_OWN = {"colour": "colour", "photos": "grey", "digits": "digits"}


def test_each_image_goes_to_its_domains_model_in_one_run(models, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    clean = build_mixed_folder(src)
    results = {r.path: r for r in denoise_tree(src, out, router_of(models, ALL_OWN))}
    made = {p: (r.status, r.model, r.route) for p, r in results.items()}
    assert made == {
        "colour0.png": ("denoised", "colour-v1", COLOUR),
        "colour1.png": ("denoised", "colour-v1", COLOUR),
        "alpha.png": ("denoised", "colour-v1", COLOUR),
        "grey0.png": ("denoised", "grey-v1", GREY),
        "grey1.png": ("denoised", "grey-v1", GREY),
        "deep.png": ("denoised", "grey-v1", GREY),
        "digit.png": ("denoised", "digits-v1", GREY),
    }
    # the journal records the same, line by line
    records = parse_journal((out / JOURNAL_NAME).read_bytes())
    assert {k: (r.model, r.route) for k, r in records.items()} == {
        p: (m, route) for p, (_, m, route) in made.items()
    }
    # a colour output is the colour model's RGB output for that image, in colour
    noisy = decode_image((src / "colour0.png").read_bytes())
    colour = models["colour"]
    [expected] = denoise_planes(
        [rgb_pixels(noisy)], tile_spec_for_model(colour), BatchPredictor(colour, 32)
    )
    got = np.asarray(Image.open(out / "colour0.png"), float)
    assert np.abs(got - np.clip(expected, 0, 1) * 255).max() <= 0.51
    assert np.abs(got[..., 0] - got[..., 1]).mean() > 10  # channels differ
    for name in ("colour0.png", "colour1.png", "grey0.png", "grey1.png"):
        before = psnr(clean[name], np.asarray(Image.open(src / name)))
        after = psnr(clean[name], np.asarray(Image.open(out / name)))
        assert after > before + 4, (name, before, after)
    # alpha untouched; 16 bits stay 16 bits (and denoised in them)
    rgba = np.asarray(Image.open(out / "alpha.png"))
    assert rgba.shape == (80, 80, 4)
    assert np.array_equal(rgba[..., 3], np.asarray(Image.open(src / "alpha.png"))[..., 3])
    assert (
        psnr(clean["alpha.png"], rgba[..., :3])
        > psnr(clean["alpha.png"], np.asarray(Image.open(src / "alpha.png"))[..., :3]) + 4
    )
    deep = Image.open(out / "deep.png")
    assert deep.mode.startswith("I") and np.asarray(deep).max() > 255
    assert (
        psnr(clean["deep.png"], np.asarray(deep), 65535)
        > psnr(clean["deep.png"], np.asarray(Image.open(src / "deep.png")), 65535) + 4
    )


def test_opponent_planes_invert_and_keep_the_noise_independent():
    rng = np.random.default_rng(3)
    rgb = rng.uniform(0, 1, (64, 64, 3)).astype(np.float32)
    planes = rgb_to_opponent(rgb)
    assert planes.min() >= 0.0 and planes.max() <= 1.0
    assert np.abs(opponent_to_rgb(planes) - rgb).max() < 1e-5
    # AWGN of one sigma in R, G and B: independent across the planes, at
    # sigma/sqrt(3), sigma/sqrt(2) and sigma*sqrt(6)/4
    noise = rng.standard_normal((200_000, 3)).astype(np.float32)
    moved = rgb_to_opponent(noise) - rgb_to_opponent(np.zeros((1, 3)))
    cov = np.cov(moved.T)
    assert np.allclose(np.sqrt(np.diag(cov)), [3**-0.5, 2**-0.5, 6**0.5 / 4], atol=0.01)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 0.01


def test_colour_images_through_a_grey_model_go_channel_by_channel(models, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    clean = build_mixed_folder(src)
    grey_only = {"colour": "grey", "photos": "grey", "digits": "grey"}
    results = {r.path: r for r in denoise_tree(src, out, router_of(models, grey_only))}
    assert {p for p, r in results.items() if r.route == PER_CHANNEL} == {
        "colour0.png",
        "colour1.png",
        "alpha.png",
    }
    grey = models["grey"]
    spec, predict = tile_spec_for_model(grey), BatchPredictor(grey, 32)
    for name in ("colour0.png", "colour1.png"):
        noisy = decode_image((src / name).read_bytes())
        luminance = np.clip(denoise_luminance(noisy, spec, predict), 0, 1) * 255
        per_channel = np.asarray(Image.open(out / name))
        # the chroma noise the luminance path leaves is gone
        assert psnr(clean[name], per_channel) > psnr(clean[name], luminance) + 3
        # and the image is what the grey model gives for each opponent plane
        planes = rgb_to_opponent(rgb_pixels(noisy))
        outputs = denoise_planes([planes[..., c] for c in range(3)], spec, predict)
        expected = np.clip(opponent_to_rgb(np.stack(outputs, axis=-1)), 0, 1) * 255
        assert np.abs(per_channel - expected).max() <= 0.51
    rgba = np.asarray(Image.open(out / "alpha.png"))
    assert np.array_equal(rgba[..., 3], np.asarray(Image.open(src / "alpha.png"))[..., 3])


def test_grey_images_through_a_colour_model_come_back_grey_in_their_depth(models, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    clean = build_mixed_folder(src)
    colour_only = {"colour": "colour", "photos": "colour", "digits": "colour"}
    results = {r.path: r for r in denoise_tree(src, out, router_of(models, colour_only))}
    assert results["grey0.png"].route == results["deep.png"].route == GREY_AS_COLOUR
    assert results["colour0.png"].route == COLOUR
    grey = Image.open(out / "grey0.png")
    assert grey.mode == "L"
    assert (
        psnr(clean["grey0.png"], np.asarray(grey))
        > psnr(clean["grey0.png"], np.asarray(Image.open(src / "grey0.png"))) + 4
    )
    deep = Image.open(out / "deep.png")
    assert deep.mode.startswith("I") and np.asarray(deep).max() > 255


def test_the_flow_routes_by_the_store_and_reports_each_model(prefect_harness, models, tmp_path):
    from flows.cli import main

    src = tmp_path / "in"
    build_mixed_folder(src)
    store = make_store(tmp_path / "store", models)
    assert main(["--store", str(store), "folder", str(src), str(tmp_path / "out")]) == 0
    summary_path = next((store / "reports").glob("*/summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["by_model"] == {
        "colour-v1": {COLOUR: 3},
        "grey-v1": {GREY: 3},
        "digits-v1": {GREY: 1},
    }
    assert summary["warning"] is None
    with open(summary_path.parent / "report.csv", newline="") as fh:
        rows = {r["path"]: (r["model"], r["route"]) for r in csv.DictReader(fh)}
    assert rows["colour0.png"] == ("colour-v1", COLOUR)
    assert rows["deep.png"] == ("grey-v1", GREY)
    assert rows["digit.png"] == ("digits-v1", GREY)
    # a rerun skips every file by the journal, whatever model made it
    assert main(["--store", str(store), "folder", str(src), str(tmp_path / "out")]) == 0
    newest = max((store / "reports").glob("*/summary.json"), key=lambda p: p.stat().st_mtime_ns)
    assert json.loads(newest.read_text())["counts"]["skipped"] == 7


def test_a_grey_only_store_denoises_colour_images_per_channel(prefect_harness, models, tmp_path):
    from flows.cli import main

    src = tmp_path / "in"
    build_mixed_folder(src)
    store = make_store(tmp_path / "store", models, kinds=("grey",))
    assert main(["--store", str(store), "folder", str(src), str(tmp_path / "out")]) == 0
    summary = json.loads(next((store / "reports").glob("*/summary.json")).read_text())
    # digits have no model of their own: the grey photo model, warned about
    assert summary["by_model"] == {"grey-v1": {PER_CHANNEL: 3, GREY: 4}}
    assert "28x28 digits" in summary["warning"]


def test_a_forced_model_takes_every_image_with_its_channel_adaptations(
    prefect_harness, models, tmp_path
):
    from flows.cli import main

    src = tmp_path / "in"
    build_mixed_folder(src)
    store = make_store(tmp_path / "store", models)
    args = ["--store", str(store), "folder", str(src), str(tmp_path / "out"), "--model", "grey-v1"]
    assert main(args) == 0
    summary = json.loads(next((store / "reports").glob("*/summary.json")).read_text())
    assert summary["by_model"] == {"grey-v1": {PER_CHANNEL: 3, GREY: 4}}


def test_the_summarys_thumbnails_show_colour_images_in_colour(models, tmp_path):
    import base64
    import io
    import re

    from tasks.denoise import _thumbnails

    src, out = tmp_path / "in", tmp_path / "out"
    build_mixed_folder(src)
    results = sorted(denoise_tree(src, out, router_of(models, ALL_OWN)), key=lambda r: r.path)
    markdown = _thumbnails(results, str(src), str(out))
    data = re.search(r"base64,([A-Za-z0-9+/=]+)\)", markdown).group(1)
    grid = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))), float)
    assert grid.ndim == 3 and grid.shape[-1] == 3
    # alpha.png and colour0.png are among the first four: their channels differ
    assert np.abs(grid[..., 0] - grid[..., 2]).max() > 50
