"""Architectures, device choice and resumable training on tiny shard sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from denoiser.config import TrainConfig
from denoiser.core.errors import ModelError
from denoiser.learning.training import make_dataset, plan_device, train_model
from denoiser.nets.models import (
    architecture_recipe,
    available_architectures,
    build_model,
    file_sha256,
    load_model,
)


def test_seed_is_the_reference_architecture():
    model = build_model("seed")
    assert model.count_params() == 440_865
    assert model(np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 28, 28, 1)
    assert architecture_recipe("seed").loss == "bce"
    names = [layer.__class__.__name__ for layer in model.layers]
    assert names.count("Conv2DTranspose") == 3 and names.count("Dense") == 2
    assert names.count("MaxPooling2D") == 2 and names.count("UpSampling2D") == 2


@pytest.mark.parametrize("name", [n for n in available_architectures() if n != "seed"])
def test_fully_convolutional_models_keep_the_input_shape(name):
    recipe = architecture_recipe(name)
    assert recipe.fully_convolutional
    model = build_model(name)
    # photographs' models (awgn recipes) get issue 25's budget (about CDnCNN-B's 668k) and a
    # linear residual output, clipped outside
    photo = recipe.noise == "awgn"
    expected = {"unet": 411_297, "unet-small": 118_945}
    assert (
        model.count_params() <= 700_000
        if photo
        else model.count_params() == expected[name] <= 440_865
    )
    m, c = recipe.size_multiple, recipe.input_shape[-1]  # c: 1 grey, 3 for colour_unet
    for h, w in [(28, 28), (8 * m, 3 * m), (64, 96)]:
        out = model(np.random.default_rng(0).random((1, h, w, c)).astype(np.float32))
        assert out.shape == (1, h, w, c)
        assert photo or (float(np.min(out)) >= 0.0 and float(np.max(out)) <= 1.0)


@pytest.mark.parametrize("name", available_architectures())
def test_every_architecture_trains_a_step(name):
    import keras

    model = build_model(name)
    model.compile(keras.optimizers.Adam(1e-3), loss="mse")
    channels = architecture_recipe(name).input_shape[-1]
    x = np.random.default_rng(0).random((4, 28, 28, channels)).astype(np.float32)
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(x, x)
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_default_output_is_clipped_so_background_can_be_exactly_black():
    x = np.random.default_rng(2).random((2, 28, 28, 1)).astype(np.float32)
    for output, black in (("clip", True), ("sigmoid", False)):
        model = build_model("unet", output=output)
        bias = model.get_layer("out_conv").bias
        bias.assign(np.full(bias.shape, -50.0, np.float32))  # a very dark prediction everywhere
        out = np.asarray(model(x))
        assert bool(np.all(out == 0.0)) is black and out.min() >= 0.0
    with pytest.raises(ValueError, match="clip, sigmoid or residual"):
        build_model("unet", output="tanh")


def test_builder_options_reach_the_architecture():
    assert architecture_recipe("unet").loss == "psnr_ssim"
    assert architecture_recipe("unet").lr_schedule == "cosine"
    wide = build_model("unet", filters=(32, 48, 88), full_convs=2)
    assert wide.count_params() == 406_865 and wide.get_layer("full1_conv") is not None


def test_ablation_options_remove_what_they_name():
    plain = build_model("unet", skips=False, batch_norm=False)
    names = [layer.name for layer in plain.layers]
    assert not any(n.startswith("cat") or n.endswith("_bn") for n in names)
    assert plain.count_params() < build_model("unet").count_params()
    # residual: the network predicts the noise; with a zero prediction the input comes back
    residual = build_model("unet", output="residual")
    out_conv = residual.get_layer("out_conv")
    out_conv.set_weights([np.zeros_like(w) for w in out_conv.get_weights()])
    x = np.random.default_rng(3).random((2, 12, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(residual(x)), x, atol=1e-6)


def test_unknown_architecture_is_a_model_error():
    with pytest.raises(ModelError, match="unknown architecture 'resnet'"):
        build_model("resnet")


def test_models_round_trip_with_safe_mode(tmp_path):
    for name in available_architectures():
        model = build_model(name)
        model.save(tmp_path / f"{name}.keras")
        loaded = load_model(tmp_path / f"{name}.keras")
        channels = model.input_shape[-1]  # 3 for colour_unet
        x = np.random.default_rng(1).random((1, 28, 28, channels)).astype(np.float32)
        np.testing.assert_allclose(model(x), loaded(x), atol=1e-6)
    (tmp_path / "junk.keras").write_text("not a model")
    with pytest.raises(ModelError, match="junk.keras"):
        load_model(tmp_path / "junk.keras")
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "missing.keras")


def test_a_truncated_or_replaced_model_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "model.keras"
    build_model("unet-small").save(path)
    card_sha = file_sha256(path)
    assert load_model(path, expected_sha256=card_sha).count_params() == 118_945
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    for name, damaged in (
        ("truncated", data[: len(data) // 2]),
        ("flipped", bytes(flipped)),
        ("empty", b""),
        ("garbage", b"\x00garbage" * 100),
    ):
        bad = tmp_path / f"{name}.keras"
        bad.write_bytes(damaged)
        with pytest.raises(ModelError) as caught:
            load_model(bad)
        assert str(caught.value) == f"{bad}: not a valid .keras file (truncated or corrupt)"
        with pytest.raises(ModelError, match="not a valid .keras file"):
            load_model(bad, expected_sha256=card_sha)
    build_model("unet-small").save(path)  # a whole model, but not the one the card describes
    with pytest.raises(ModelError) as caught:
        load_model(path, expected_sha256=card_sha)
    message = str(caught.value)
    assert message.startswith(f"{path}: corrupt model file (sha256 ") and "\n" not in message
    assert f"does not match the card's {card_sha[:16]}" in message


def test_device_plan_for_zero_one_and_many_gpus():
    cpu = plan_device([], "auto")
    assert cpu["kind"] == "cpu" and not cpu["mixed_precision"] and cpu["strategy_name"] == "default"
    assert not plan_device([], "on")["mixed_precision"]  # float16 only where it pays: GPUs
    one = plan_device(["/physical_device:GPU:0"], "auto")
    assert one["kind"] == "gpu" and one["mixed_precision"] and one["strategy_name"] == "one_device"
    assert not plan_device(["/physical_device:GPU:0"], "off")["mixed_precision"]
    many = plan_device(["/physical_device:GPU:0", "/physical_device:GPU:1"], "auto")
    assert many["replicas"] == 2 and many["strategy_name"] == "mirrored"
    with pytest.raises(ValueError):
        plan_device([], "maybe")


def test_dataset_streams_float_pairs(tiny_shards):
    ds = make_dataset(tiny_shards, "train", batch_size=16, shuffle_buffer=32, seed=0, training=True)
    batches = list(ds)
    assert len(batches) == ds.cardinality().numpy() == 4
    noisy, clean = batches[0]
    assert noisy.dtype.name == "float32" and noisy.shape == (16, 28, 28, 1)
    assert 0.0 <= float(np.min(noisy)) and float(np.max(clean)) <= 1.0
    assert sum(len(b[0]) for b in batches) == 56


def test_datasets_run_without_the_autotuning_thread(tiny_shards):
    """The thread whose sleep a dropped iterator waited for (a pause at each
    epoch boundary and after the last epoch) is not started."""
    for split, training in (("train", True), ("validation", False)):
        ds = make_dataset(tiny_shards, split, batch_size=8, training=training)
        assert ds.options().autotune.enabled is False


class Interrupt(Exception):
    pass


def test_training_resumes_after_an_interruption(tiny_shards, tmp_path):
    # float32 on every CPU: "auto" trains in mixed bfloat16 where the CPU has it
    config = TrainConfig(
        architecture="unet", epochs=3, batch_size=16, patience=10, precision="float32"
    )
    seen: list[int] = []

    def die_after_first(epoch, epochs, logs):
        seen.append(epoch)
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_model(
            tiny_shards, config, tmp_path / "m1", tmp_path / "backup", on_epoch_end=die_after_first
        )
    assert not (tmp_path / "m1" / "model.keras").exists()

    result = train_model(
        tiny_shards,
        config,
        tmp_path / "m1",
        tmp_path / "backup",
        on_epoch_end=lambda e, n, logs: seen.append(e),
    )
    assert seen == [1, 2, 3]  # the rerun started at epoch 2
    card = json.loads((tmp_path / "m1" / "model.json").read_text())
    assert [h["epoch"] for h in card["history"]] == [1, 2, 3]
    assert result["epochs_run"] == 3 and result["device"] == "CPU"
    assert card["recipe"]["loss"] == "psnr_ssim" and card["recipe"]["lr_schedule"] == "cosine"
    assert (
        card["recipe"]["learning_rate"] == architecture_recipe("unet").learning_rate
    )  # config left it None
    assert (tmp_path / "m1" / "history.csv").read_text().startswith("epoch,")
    assert card["data"]["manifest_sha256"] and card["versions"]["tensorflow"]
    assert any((tmp_path / "m1" / "tensorboard").rglob("*tfevents*"))


def test_seed_trains_with_bce(tiny_shards, tmp_path):
    result = train_model(
        tiny_shards,
        TrainConfig(architecture="seed", epochs=1, batch_size=16),
        tmp_path / "seed",
        tmp_path / "b2",
    )
    card = json.loads((tmp_path / "seed" / "model.json").read_text())
    assert card["recipe"]["loss"] == "bce" and result["params"] == 440_865
    assert card["recipe"]["lr_schedule"] == "constant"  # the reference's recipe, untouched
    assert card["recipe"]["learning_rate"] == 1e-3  # Keras' Adam default, as in the blog
    assert load_model(result["model_path"]).count_params() == 440_865
    model_file = tmp_path / "seed" / "model.keras"
    assert (
        card["model_sha256"] == file_sha256(model_file)
        and card["model_bytes"] == model_file.stat().st_size
    )
    assert load_model(model_file, expected_sha256=card["model_sha256"]).count_params() == 440_865
    assert not [
        p.name for p in (tmp_path / "seed").iterdir() if p.name.startswith(".")
    ]  # no temporary left


def test_dataset_reframes_training_pairs_only(tiny_shards):
    plain = next(iter(make_dataset(tiny_shards, "train", 56, seed=0, training=True)))
    recut = next(iter(make_dataset(tiny_shards, "train", 56, seed=0, training=True, reframe=1.0)))
    noisy0, clean0 = (np.asarray(t)[..., 0] for t in plain)  # the same shuffle: the same seed
    noisy1, clean1 = (np.asarray(t)[..., 0] for t in recut)
    assert noisy1.shape == noisy0.shape and not np.array_equal(clean0, clean1)
    n, h, w = clean0.shape
    for i in range(n):
        # a recut pair is one window of the 2x2 mosaic of images i..i+3, noisy and clean at one offset
        idx = [(i + k) % n for k in range(4)]
        mc, mn = (
            np.block([[a[idx[0]], a[idx[1]]], [a[idx[2]], a[idx[3]]]]) for a in (clean0, noisy0)
        )
        assert any(
            np.array_equal(mc[y : y + h, x : x + w], clean1[i])
            and np.array_equal(mn[y : y + h, x : x + w], noisy1[i])
            for y in range(h + 1)
            for x in range(w + 1)
        ), i
    validation = next(iter(make_dataset(tiny_shards, "validation", 8, training=False, reframe=1.0)))
    as_stored = next(iter(make_dataset(tiny_shards, "validation", 8, training=False)))
    assert np.array_equal(validation[1], as_stored[1])  # never on validation


def test_reframing_a_fixed_frame_model_is_refused_by_its_config():
    # refused before any download or training: the config itself is invalid
    with pytest.raises(ValidationError, match="fully convolutional"):
        TrainConfig(architecture="seed", epochs=1, reframe=0.5)
    assert TrainConfig(architecture="seed", reframe=0).reframe == 0
