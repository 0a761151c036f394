"""Colour photographs as the third domain (issues 25 and 28): the domain
objects, RGB patch shards, colour recognition, the precision plan, and
`denoise train --dataset cbsd432` through the real flow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from denoiser.config import DataConfig, NoiseConfig, TrainConfig
from denoiser.core.errors import ConfigError, ModelError, ModelNotFound
from tests.test_architectures_photo import assert_grows_as_its_seed

MIRROR = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def test_each_dataset_has_its_domain_with_its_own_parts():
    from denoiser.domains import DOMAINS, domain_for_dataset

    assert set(DOMAINS) == {"digits", "photos", "colour"}
    colour = domain_for_dataset("cbsd432")
    assert (colour.name, colour.channels, colour.default_architecture) == (
        "colour",
        3,
        "opponent_unet_wide",
    )
    assert domain_for_dataset("cset9") is colour
    assert domain_for_dataset("train400").channels == 1
    assert domain_for_dataset("mnist").shard_kind == "pairs"
    assert colour.default_noise() == NoiseConfig(
        kind="awgn", level=(0.0, 55.0), level_density="uniform"
    )


def test_a_colour_request_takes_its_recipe_and_refuses_a_grey_architecture():
    from denoiser.request import resolve_request

    def apply_recipe_defaults(data, noise, training):
        request = resolve_request(data, noise, training)
        return request.noise, request.training

    data = DataConfig(dataset="cbsd432")
    noise, training = apply_recipe_defaults(
        data, NoiseConfig(kind="awgn", level=(0.0, 55.0)), TrainConfig()
    )
    assert training.architecture == "opponent_unet_wide" and noise.patch_size == 64
    with pytest.raises(ConfigError, match="photo_unet takes 1-channel images"):
        apply_recipe_defaults(data, noise, TrainConfig(architecture="photo_unet"))


def test_colour_unet_is_rgb_in_rgb_out_within_the_parameter_budget():
    from denoiser.nets.models import build_model, count_params

    model = build_model("colour_unet")
    assert model.input_shape[-1] == 3 and model.output_shape[-1] == 3
    assert count_params(model) <= 700_000
    x = np.random.default_rng(0).random((1, 32, 48, 3), dtype=np.float32)
    assert model.predict(x, verbose=0).shape == (1, 32, 48, 3)


def test_the_colour_model_starts_as_the_builtin_grey_model_run_per_opponent_plane(
    tmp_path, monkeypatch
):
    from artifacts.builtin import PACKAGE_DIR, builtin_model
    from denoiser.core.opponent import opponent_to_rgb, rgb_to_opponent
    from denoiser.domains import domain_for_dataset
    from denoiser.nets.models import build_model, count_params, load_model, warm_start_model

    monkeypatch.setenv("DENOISE_BUILTIN_DIR", str(PACKAGE_DIR))
    grey_ref = builtin_model("photos")
    grey = load_model(grey_ref.model_path)
    architecture = domain_for_dataset("cbsd432").default_architecture  # opponent_unet_wide
    model = build_model(architecture)
    assert count_params(model) <= 700_000
    rng = np.random.default_rng(1)
    x = np.clip(rng.random((1, 32, 48, 3), dtype=np.float32), 0, 1)
    planes = rgb_to_opponent(x[0])
    per_plane = [grey.predict(planes[None, ..., c : c + 1], verbose=0)[0, ..., 0] for c in range(3)]
    expected = opponent_to_rgb(np.stack(per_plane, axis=-1))
    assert np.abs(model.predict(x, verbose=0)[0] - expected).max() > 0.01  # not before
    assert warm_start_model(model, architecture, grey_ref.model_path) == 16  # the trunk's layers
    assert np.abs(model.predict(x, verbose=0)[0] - expected).max() < 1e-4
    # saved and loaded (safe mode), it is the same model
    model.save(tmp_path / "m.keras")
    again = load_model(tmp_path / "m.keras")
    assert np.abs(again.predict(x, verbose=0) - model.predict(x, verbose=0)).max() < 1e-6


def test_opponent_unet_wider_grows_from_a_colour_model_as_its_function_then_learns(tmp_path):
    """48 channels at full resolution, started from a trained (here: perturbed)
    opponent_unet_wide: before any step it computes the colour model's output
    exactly, guide weights and all; a training step then moves it."""
    from denoiser.nets.models import build_model, count_params, grows_from, warm_start_model

    rng = np.random.default_rng(8)
    colour = build_model("opponent_unet_wide")
    trunk = colour.get_layer("trunk")
    trunk.set_weights(
        [w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in trunk.get_weights()]
    )
    colour.save(tmp_path / "colour.keras")
    wider = build_model("opponent_unet_wider")
    assert grows_from("opponent_unet_wider") == "photos"
    assert count_params(colour) < count_params(wider) == 620_030  # the issue: at most about 700,000
    x = rng.random((2, 32, 40, 3), dtype=np.float32)
    assert_grows_as_its_seed(
        colour, wider, "opponent_unet_wider", tmp_path / "colour.keras", x, 1e-4
    )
    # the wider colour model cannot go back into the narrower one: one line
    wider.save(tmp_path / "wider.keras")
    with pytest.raises(ModelError, match="cannot start opponent_unet_wide from it"):
        warm_start_model(
            build_model("opponent_unet_wide"), "opponent_unet_wide", tmp_path / "wider.keras"
        )


def test_opponent_unet_wide_starts_as_a_grey_model_run_per_opponent_plane(tmp_path):
    from denoiser.core.opponent import opponent_to_rgb, rgb_to_opponent
    from denoiser.nets.models import build_model, count_params, warm_start_model

    rng = np.random.default_rng(7)
    grey = build_model("photo_unet_wide")
    grey.set_weights(
        [w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in grey.get_weights()]
    )
    grey.save(tmp_path / "wide.keras")
    model = build_model("opponent_unet_wide")
    assert count_params(model) <= 700_000
    x = rng.random((1, 32, 48, 3), dtype=np.float32)
    planes = rgb_to_opponent(x[0])
    per_plane = [grey.predict(planes[None, ..., c : c + 1], verbose=0)[0, ..., 0] for c in range(3)]
    expected = opponent_to_rgb(np.stack(per_plane, axis=-1))
    warm_start_model(model, "opponent_unet_wide", tmp_path / "wide.keras")
    assert np.abs(model.predict(x, verbose=0)[0] - expected).max() < 1e-4
    # from a narrower grey model it grows, starting as that model per opponent plane
    narrow = build_model("photo_unet")
    narrow.set_weights(
        [w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in narrow.get_weights()]
    )
    narrow.save(tmp_path / "narrow.keras")
    per_plane = [
        narrow.predict(planes[None, ..., c : c + 1], verbose=0)[0, ..., 0] for c in range(3)
    ]
    warm_start_model(model, "opponent_unet_wide", tmp_path / "narrow.keras")
    assert (
        np.abs(model.predict(x, verbose=0)[0] - opponent_to_rgb(np.stack(per_plane, -1))).max()
        < 1e-4
    )
    # a narrow colour model cannot take a wider grey model: one line
    with pytest.raises(ModelError, match="cannot start opponent_unet from it"):
        warm_start_model(build_model("opponent_unet"), "opponent_unet", tmp_path / "wide.keras")


def test_a_colour_model_trains_on_from_a_colour_model_as_it_is(monkeypatch):
    """--warm-start <the built-in colour model>: an opponent_unet takes another
    opponent_unet's weights whole (fine-tuning it, e.g. on one's own colour
    photographs), not only a grey model's trunk."""
    from artifacts.builtin import PACKAGE_DIR, builtin_model
    from denoiser.nets.models import build_model, load_model, warm_start_model

    monkeypatch.setenv("DENOISE_BUILTIN_DIR", str(PACKAGE_DIR))
    colour_ref = builtin_model("colour")
    colour = load_model(colour_ref.model_path)
    layout = colour_ref.card.architecture  # opponent_unet_wide
    model = build_model(layout)
    x = np.random.default_rng(4).random((1, 24, 40, 3), dtype=np.float32)
    assert np.abs(model.predict(x, verbose=0) - colour.predict(x, verbose=0)).max() > 0.01
    warm_start_model(model, layout, colour_ref.model_path)
    assert np.abs(model.predict(x, verbose=0) - colour.predict(x, verbose=0)).max() < 1e-6


def test_a_seed_model_of_another_shape_is_refused_with_one_line(tmp_path):
    from denoiser.nets.models import build_model, warm_start_model

    build_model("unet-small").save(tmp_path / "small.keras")
    with pytest.raises(ModelError, match="cannot start opponent_unet from it"):
        warm_start_model(build_model("opponent_unet"), "opponent_unet", tmp_path / "small.keras")
    with pytest.raises(ModelError, match="cannot start colour_unet from it"):
        warm_start_model(build_model("colour_unet"), "colour_unet", tmp_path / "small.keras")


def test_a_model_trains_on_from_a_model_of_its_own_layout_named_by_version(tmp_path, monkeypatch):
    """--warm-start VERSION: the built-in grey model, named by its version, is
    made a local file and its weights start a photo_unet as they are."""
    from artifacts.builtin import PACKAGE_DIR, builtin_model
    from artifacts.store import Store
    from artifacts.training import with_warm_start
    from denoiser.nets.models import build_model, load_model, warm_start_model

    monkeypatch.setenv("DENOISE_BUILTIN_DIR", str(PACKAGE_DIR))
    grey_ref = builtin_model("photos")
    layout = grey_ref.card.architecture  # photo_unet_wide
    store = Store.at(tmp_path / "store")
    training = TrainConfig(architecture=layout, warm_start=grey_ref.version)
    with store.stage() as stage:
        concrete = with_warm_start(store, stage, training)
    assert concrete.warm_start == str(grey_ref.model_path)
    assert with_warm_start(store, None, TrainConfig(architecture="photo_unet")).warm_start == ""
    model = build_model(layout, (None, None, 1))
    x = np.random.default_rng(2).random((1, 24, 40, 1), dtype=np.float32)
    grey = load_model(grey_ref.model_path)
    assert np.abs(model.predict(x, verbose=0) - grey.predict(x, verbose=0)).max() > 0.01
    assert warm_start_model(model, layout, concrete.warm_start) == len(model.layers)
    assert np.abs(model.predict(x, verbose=0) - grey.predict(x, verbose=0)).max() < 1e-6
    # another layout is refused in one line that names the one to train
    with pytest.raises(
        ModelError, match=r"it is a photo_unet_wide \(--architecture photo_unet_wide\)"
    ):
        warm_start_model(build_model("photo_unet"), "photo_unet", concrete.warm_start)
    with pytest.raises(ModelNotFound):
        with store.stage() as stage:
            with_warm_start(store, stage, training.model_copy(update={"warm_start": "nope"}))


def test_a_warm_start_of_the_datasets_domain_gives_its_architecture(tmp_path, monkeypatch):
    """--warm-start with no --architecture trains on in the seed's own layout
    when the seed is of the dataset's domain (the built-in grey model is a
    photo_unet_wide, not the grey default); a seed of another domain is grown
    into the domain's default; a given architecture is kept."""
    from artifacts.builtin import PACKAGE_DIR, builtin_model
    from artifacts.resolution import with_seed_architecture
    from denoiser.request import resolve_request

    monkeypatch.setenv("DENOISE_BUILTIN_DIR", str(PACKAGE_DIR))
    store = str(tmp_path / "store")
    grey, colour = builtin_model("photos"), builtin_model("colour")

    def architecture(dataset, **training):
        data = {"dataset": dataset}
        adopted = with_seed_architecture(store, data, TrainConfig(**training))
        return resolve_request(data, None, adopted, store=store).training.architecture

    assert grey.card.architecture != "photo_unet"  # else this test shows nothing
    assert architecture("train400", warm_start=grey.version) == grey.card.architecture
    assert architecture("train400") == "photo_unet"
    assert architecture("bsd432", warm_start=grey.version) == grey.card.architecture
    assert architecture("train400", warm_start=grey.version, architecture="photo_unet_wide") == (
        "photo_unet_wide"
    )
    assert architecture("cbsd432", warm_start=colour.version) == colour.card.architecture
    assert architecture("cbsd432", warm_start=grey.version) == "opponent_unet_wide"
    with pytest.raises(ModelNotFound):
        architecture("train400", warm_start="no-such-model")


def test_colour_images_are_told_from_grey_ones_saved_as_rgb():
    from denoiser.domains import image_domain
    from denoiser.imaging.images import decode_image
    from denoiser.imaging.plots import png_bytes

    rng = np.random.default_rng(1)
    grey = (rng.random((96, 96)) * 180 + 40).astype(np.uint8)
    colour = np.stack([grey, np.roll(grey, 9, 0), 255 - grey], -1)
    assert image_domain(decode_image(png_bytes(colour))) == "colour"
    assert image_domain(decode_image(png_bytes(np.repeat(grey[..., None], 3, -1)))) == "photos"
    assert image_domain(decode_image(png_bytes(np.zeros((28, 28), np.uint8)))) == "digits"


def test_rgb_patch_shards_and_their_typed_noise_config(tmp_path):
    from PIL import Image

    from denoiser.data.datasets import fetch_dataset
    from denoiser.data.shards import load_split, noise_config, read_manifest
    from denoiser.domains import domain_of_manifest
    from denoiser.learning.training import ColourCasts, make_dataset

    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(12):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    dataset = fetch_dataset(str(folder), None, tmp_path / "cache")
    noise = NoiseConfig(
        kind="awgn", level=(0.0, 55.0), level_density="uniform", patch_size=16, patches_per_image=4
    )
    from denoiser.data.shards import ShardRequest
    from denoiser.domains import DOMAINS

    out = DOMAINS["colour"].write_shards(tmp_path / "set-abc", ShardRequest(dataset, noise))
    manifest = read_manifest(out)
    assert domain_of_manifest(manifest).name == "colour" and manifest["image_shape"] == [16, 16, 3]
    assert noise_config(manifest) == noise  # the manifest's config round-trips, typed
    test = load_split(out, "test")
    assert all(x.shape == (40, 48, 3) for x in test["clean"])
    noisy, clean = next(iter(make_dataset(out, "train", 8, seed=0)))
    residual = np.asarray(noisy) - np.asarray(clean)
    assert residual.shape == (8, 16, 16, 3)
    # the noise is drawn independently in each channel
    assert abs(np.corrcoef(residual[..., 0].ravel(), residual[..., 1].ravel())[0, 1]) < 0.1
    # a colour cast scales each training patch's R, G and B by its own gains in [0.6, 1]
    _, cast = next(iter(make_dataset(out, "train", 8, seed=0, casts=ColourCasts(1.0))))
    gains = np.asarray(cast).reshape(8, -1, 3) / np.asarray(clean).reshape(8, -1, 3).clip(1e-6)
    lit = np.asarray(clean).reshape(8, -1, 3) > 0.05
    per_patch = np.array(
        [[np.median(g[m[:, c], c]) for c in range(3)] for g, m in zip(gains, lit, strict=True)]
    )
    assert ((per_patch >= 0.6 - 1e-3) & (per_patch <= 1.0 + 1e-3)).all()
    assert np.ptp(per_patch, axis=1).min() > 0.01  # the gains differ between channels
    for g, m, k in zip(gains, lit, per_patch, strict=True):
        for c in range(3):
            assert np.allclose(g[m[:, c], c], k[c], atol=1e-3)  # one gain a channel a patch
    # validation pairs are never cast: the scores compare across runs
    plain_val = next(iter(make_dataset(out, "validation", 8, training=False)))[1]
    cast_val = next(
        iter(make_dataset(out, "validation", 8, training=False, casts=ColourCasts(1.0)))
    )[1]
    assert np.array_equal(np.asarray(plain_val), np.asarray(cast_val))


def test_grey_patches_are_never_cast(tmp_path):
    from PIL import Image

    from denoiser.data.datasets import fetch_dataset
    from denoiser.data.shards import ShardRequest
    from denoiser.domains import DOMAINS
    from denoiser.learning.training import ColourCasts, make_dataset

    folder = tmp_path / "grey"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):
        Image.fromarray((rng.random((40, 48)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    dataset = fetch_dataset(str(folder), None, tmp_path / "cache")
    noise = NoiseConfig(
        kind="awgn", level=(0.0, 55.0), level_density="uniform", patch_size=16, patches_per_image=4
    )
    out = DOMAINS["photos"].write_shards(tmp_path / "set-g", ShardRequest(dataset, noise))
    plain = next(iter(make_dataset(out, "train", 8, seed=0)))
    asked = next(iter(make_dataset(out, "train", 8, seed=0, casts=ColourCasts(1.0))))
    assert np.asarray(plain[1]).shape[-1] == 1
    for a, b in zip(plain, asked, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_colour_cast_takes_its_share_of_patches_and_repeats_from_its_seed():
    import tensorflow as tf

    from denoiser.learning.training import ColourCasts, colour_cast

    ones = tf.ones((400, 2, 2, 3))
    seed = tf.constant(7, tf.int64)
    cast = np.asarray(colour_cast(ones, ColourCasts(0.5), seed))
    touched = ~np.isclose(cast, 1.0).all(axis=(1, 2, 3))
    assert 150 < touched.sum() < 250  # about half of the patches
    assert cast.min() >= 0.6 and cast.max() <= 1.0
    again = np.asarray(colour_cast(ones, ColourCasts(0.5), seed))
    assert np.array_equal(cast, again)  # from its seed
    assert not np.array_equal(cast, np.asarray(colour_cast(ones, ColourCasts(0.5), seed + 1)))
    assert np.array_equal(np.asarray(colour_cast(ones, ColourCasts(0.0), seed)), np.asarray(ones))


def test_a_balanced_colour_cast_keeps_a_grey_as_bright_and_the_patch_in_range():
    import tensorflow as tf

    from denoiser.learning.training import ColourCasts, colour_cast

    seed = tf.constant(5, tf.int64)
    grey = tf.fill((300, 2, 2, 3), 0.5)
    cast = np.asarray(colour_cast(grey, ColourCasts(1.0, 0.3, True), seed))
    assert np.allclose(cast.mean(axis=-1), 0.5, atol=1e-6)  # the grey keeps its brightness
    spread = np.ptp(cast[:, 0, 0], axis=-1)
    assert spread.max() > 0.3  # gains from [0.3, 1] split the channels far apart
    assert cast.max() > 0.5 * 1.2  # a balanced gain may exceed 1
    dimmed = np.asarray(colour_cast(grey, ColourCasts(1.0, 0.3), seed))
    assert dimmed.mean() < 0.45 and dimmed.max() <= 0.5  # unbalanced gains darken
    bright = np.asarray(
        colour_cast(tf.fill((300, 2, 2, 3), 0.95), ColourCasts(1.0, 0.3, True), seed)
    )
    assert bright.min() >= 0 and bright.max() == 1.0  # clipped where a gain overshoots


def test_cpu_precision_is_bfloat16_only_where_the_cpu_has_it():
    from denoiser.learning.training import plan_device

    assert plan_device([], precision="auto", flags=frozenset({"avx2"}))["precision"] == "float32"
    assert plan_device([], flags=frozenset({"amx_bf16"}))["precision"] == "mixed_bfloat16"
    assert plan_device([], flags=frozenset({"avx512_bf16"}))["precision"] == "mixed_bfloat16"
    assert plan_device([], precision="float32", flags=frozenset({"amx_bf16"}))["precision"] == (
        "float32"
    )
    assert plan_device([], precision="bfloat16", flags=frozenset())["precision"] == (
        "mixed_bfloat16"
    )
    assert plan_device(["/physical_device:GPU:0"])["precision"] == "mixed_float16"


@pytest.mark.slow
def test_train_cbsd432_quick_end_to_end_gains_in_rgb(
    prefect_harness, tmp_path, capsys, monkeypatch
):
    from artifacts.builtin import PACKAGE_DIR, builtin_model
    from artifacts.registry import list_models
    from flows.cli import main

    if not (MIRROR / "cbsd432" / "SHA256SUMS").exists():
        pytest.fail(f"colour mirror not found at {MIRROR} (CI puts ../shared beside the clone)")
    store = tmp_path / "store"
    monkeypatch.setenv("DENOISE_BUILTIN_DIR", str(PACKAGE_DIR))  # the grey model it grows from
    code = main(
        [
            "--store",
            str(store),
            "train",
            "--dataset",
            "cbsd432",
            "--source",
            str(MIRROR),
            "--quick",
            "--train-limit",
            "12",
            "--test-limit",
            "1",
            "--patch-size",
            "32",
            "--patches-per-image",
            "32",
            "--min-psnr-gain",
            "0.5",
            "--colour-gains",
            "0.5",
            "--colour-gains-low",
            "0.4",
            "--colour-gains-balanced",
        ]
    )
    assert code == 0
    [model] = list_models(store)
    card = model.card
    assert model.domain == "colour" and model.status == "production"
    # the casts are part of the recipe the card records, and of the command that repeats it
    assert card.training["colour_gains"] == 0.5 and "--colour-gains 0.5" in card.training_command
    assert card.training["colour_gains_balanced"]
    assert "--colour-gains-low 0.4 --colour-gains-balanced" in card.training_command
    assert card.data.channels == 3 and card.image_shape == [32, 32, 3]
    assert card.architecture == "opponent_unet_wide" and card.precision in (
        "float32",
        "mixed_bfloat16",
    )
    # grown from the package's grey model: it starts where that model per opponent plane is
    builtin = builtin_model("photos")
    assert card.grown_from == {
        "version": builtin.version,
        "sha256": builtin.card.model_sha256,
    }
    metrics = json.loads((Path(model.dir) / "metrics.json").read_text())
    assert [r["sigma"] for r in metrics["per_sigma"]] == [15, 25, 50]
    # a few dozen steps from the grey model: far better than its input on CSet9's first image
    # (the baboon, whose fur is the hardest to tell from light noise), as the grey model is
    assert metrics["overall"]["psnr_gain"] > 3.0 and metrics["quality_gate"]["passed"]
    assert all(r["psnr_gain"] > 4.0 for r in metrics["per_sigma"] if r["sigma"] >= 25)
    assert metrics["overall"]["count"] == 1


def test_the_casts_come_from_the_training_config_and_apply_to_colour_patches_only():
    from denoiser.config import TrainConfig
    from denoiser.learning.training import NO_CASTS, ColourCasts

    casts = ColourCasts.of(
        TrainConfig(colour_gains=0.5, colour_gains_low=0.3, colour_gains_balanced=True)
    )
    assert casts == ColourCasts(0.5, 0.3, True)
    assert casts.apply_to(3) and not casts.apply_to(1)
    assert not NO_CASTS.apply_to(3)  # no share asked: no casts
    assert ColourCasts.of(TrainConfig()) == NO_CASTS
    assert casts.describe() == (
        "50% of the training patches get a colour cast, gains from [0.3, 1], "
        "balanced to a mean of 1"
    )
