"""The photographs' architecture (issue 14): within DnCNN's parameter count,
fully convolutional, the output the input's shape at any size."""

from __future__ import annotations

import numpy as np
import pytest

from denoiser.nets.architectures import ARCHITECTURES, build_photo_unet
from denoiser.nets.models import architecture_recipe, available_architectures, build_model
from denoiser.runtimes.inference import predict_array

DNCNN_PARAMS = 556_000


@pytest.fixture(scope="module")
def model():
    return build_model("photo_unet")


def test_photo_unet_is_registered_with_a_recipe():
    assert "photo_unet" in available_architectures()
    recipe = architecture_recipe("photo_unet")
    assert recipe.fully_convolutional and tuple(recipe.input_shape) == (None, None, 1)
    assert recipe.loss in ("mse", "l1", "psnr_ssim") and recipe.learning_rate > 0
    assert recipe.patch_size % recipe.size_multiple == 0


def test_photo_unet_has_at_most_dncnns_parameters(model):
    assert model.count_params() <= DNCNN_PARAMS


def test_builder_variants_build_and_bad_options_are_refused():
    for kw in (
        {"batch_norm": True},
        {"skip": "concat"},
        {"filters": (8, 16, 32, 48), "convs": (1, 1, 1), "middle": 1, "block": "res"},
    ):
        m = build_photo_unet((None, None, 1), **kw)
        assert m(np.zeros((1, 16, 24, 1), np.float32)).shape == (1, 16, 24, 1)
    with pytest.raises(ValueError):
        build_photo_unet((None, None, 1), filters=(8, 16), convs=(1, 1))
    with pytest.raises(ValueError):
        build_photo_unet((None, None, 1), block="dense")


def test_any_multiple_of_the_size_multiple_keeps_its_shape(model):
    m = architecture_recipe("photo_unet").size_multiple
    rng = np.random.default_rng(0)
    for h, w in [(m, m), (40, 40), (10 * m, 3 * m), (64, 96), (7 * m, 13 * m)]:
        if h % m or w % m:
            continue
        out = model(rng.random((2, h, w, 1)).astype(np.float32))
        assert out.shape == (2, h, w, 1)
        assert np.all(np.isfinite(out))


def test_odd_sizes_keep_their_shape_after_padding(model):
    m = architecture_recipe("photo_unet").size_multiple
    rng = np.random.default_rng(1)
    for h, w in [(37, 53), (1, 1), (255, 3)]:
        x = rng.random((1, h, w, 1)).astype(np.float32)
        out = predict_array(model, x, batch_size=1, size_multiple=m)
        assert out.shape == (1, h, w, 1) and np.all(np.isfinite(out))


def test_output_is_the_input_minus_the_estimated_noise():
    """Residual learning: with the noise branch's last convolution zeroed, the
    model is the identity (not clipped: values outside [0, 1] pass)."""
    m = build_model("photo_unet")
    last = m.get_layer("noise")
    last.set_weights([np.zeros_like(w) for w in last.get_weights()])
    x = np.random.default_rng(2).normal(0.5, 0.4, (1, 40, 40, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(m(x)), x, atol=1e-6)


def test_the_existing_architectures_are_unchanged():
    assert build_model("seed").count_params() == 440_865
    assert build_model("unet").count_params() == 411_297
    assert set(ARCHITECTURES) >= {"seed", "unet", "unet-small", "photo_unet"}


def test_photo_unet_trains_a_step():
    import keras

    m = build_model("photo_unet")
    m.compile(keras.optimizers.Adam(1e-3), loss="mse")
    x = np.random.default_rng(3).random((4, 40, 40, 1)).astype(np.float32)
    before = [w.copy() for w in m.get_weights()]
    assert np.isfinite(m.train_on_batch(x + 0.1, x))
    assert any(not np.array_equal(a, b) for a, b in zip(before, m.get_weights(), strict=True))


def test_photo_unet_wide_grows_from_a_photo_unet_as_its_function_then_learns(tmp_path):
    """More channels and convolutions at full resolution, started from a
    trained photo_unet: before any step it computes the seed's output exactly;
    a training step then moves it (the new weights get gradients)."""

    from denoiser.nets.models import count_params, grows_from, load_model

    seed = build_photo_unet((None, None, 1))
    rng = np.random.default_rng(6)
    # a seed whose biases are not zero, as a trained model's are not
    seed.set_weights(
        [w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in seed.get_weights()]
    )
    seed.save(tmp_path / "seed.keras")
    wide = build_model("photo_unet_wide")
    assert grows_from("photo_unet_wide") == "photos"
    assert count_params(seed) < count_params(wide) <= 700_000
    x = rng.random((2, 32, 40, 1), dtype=np.float32)
    assert_grows_as_its_seed(seed, wide, "photo_unet_wide", tmp_path / "seed.keras", x, 1e-5)
    new = wide.get_layer("enc0_1_conv").get_weights()[0]
    assert (
        np.abs(new - np.eye(32)[None, None] * (np.arange(3)[:, None] == 1)[:, :, None, None]).max()
        > 0
    )
    # saved and loaded, it is a plain Keras model
    wide.save(tmp_path / "wide.keras")
    assert (
        np.abs(
            load_model(tmp_path / "wide.keras").predict(x, verbose=0) - wide.predict(x, verbose=0)
        ).max()
        < 1e-6
    )


def assert_grows_as_its_seed(seed, grown, architecture, seed_file, x, tolerance) -> None:
    """``grown`` (an ``architecture``) is another function than ``seed`` until
    warm-started from ``seed_file``, then ``seed``'s within ``tolerance`` on
    ``x``, and one training step moves it on from there."""
    import keras

    from denoiser.nets.models import warm_start_model

    want = seed.predict(x, verbose=0)
    assert np.abs(grown.predict(x, verbose=0) - want).max() > 0.01
    warm_start_model(grown, architecture, seed_file)
    assert np.abs(grown.predict(x, verbose=0) - want).max() < tolerance
    grown.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    grown.train_on_batch(x, np.clip(x - 0.05, 0, 1))
    assert np.abs(grown.predict(x, verbose=0) - want).max() > 1e-4


def test_photo_unet_wide_refuses_a_seed_that_does_not_fit(tmp_path):
    from denoiser.core.errors import ModelError
    from denoiser.nets.models import warm_start_model

    build_photo_unet((None, None, 1), filters=(64, 64, 128)).save(tmp_path / "wider.keras")
    with pytest.raises(ModelError, match="cannot start photo_unet_wide from it"):
        warm_start_model(
            build_model("photo_unet_wide"), "photo_unet_wide", tmp_path / "wider.keras"
        )
    build_model("unet-small").save(tmp_path / "small.keras")
    with pytest.raises(ModelError, match="cannot start photo_unet_wide from it"):
        warm_start_model(
            build_model("photo_unet_wide"), "photo_unet_wide", tmp_path / "small.keras"
        )
