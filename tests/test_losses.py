"""The default loss is the evaluation's own figures: check it against them."""

from __future__ import annotations

import numpy as np
import pytest

from denoiser.config import TrainConfig
from denoiser.core.metrics import psnr, ssim
from denoiser.learning.losses import PsnrSsimLoss, make_loss, ssim_per_image
from denoiser.learning.training import learning_rate


def _pairs():
    rng = np.random.default_rng(3)
    clean = (rng.random((6, 28, 28, 1)) < 0.25).astype(np.float32)
    clean[0] = 0.0  # an empty image: all background
    noisy = np.clip(clean + 0.5 * rng.normal(size=clean.shape), 0, 1).astype(np.float32)
    hazy = np.clip(clean + 0.02, 0, 1).astype(np.float32)  # a faint grey background, strokes exact
    return clean, noisy, hazy


def test_ssim_per_image_equals_the_metric():
    clean, noisy, hazy = _pairs()
    for other in (noisy, hazy, clean):
        np.testing.assert_allclose(
            np.asarray(ssim_per_image(clean, other)), ssim(clean, other), atol=2e-5
        )


def test_psnr_ssim_loss_is_minus_psnr_over_ten_plus_ssim_gap():
    clean, noisy, hazy = _pairs()
    loss = PsnrSsimLoss()
    for other in (noisy, hazy):
        # log10(mse) is -PSNR / 10; eps = 1e-5 moves it by less than 0.01 here
        mse = 10 ** (-psnr(clean, other) / 10)
        per_image = np.log10(mse + 1e-5) + (1 - ssim(clean, other))
        assert float(loss(clean, other)) == pytest.approx(per_image.mean(), abs=1e-4)
    # a perfect output is the floor: log10(eps), no SSIM gap
    assert float(loss(clean, clean)) == pytest.approx(-5.0, abs=1e-4)
    # the haze costs almost nothing in MSE but a lot in SSIM, and the loss sees it
    assert float(make_loss("mse")(clean, hazy)) < 1e-3
    assert float(loss(clean, hazy)) - float(PsnrSsimLoss(ssim_weight=0)(clean, hazy)) > 0.1


def test_psnr_loss_weighs_every_image_by_its_ratio_as_the_mean_psnr_does():
    """Blind training mixes sigma 0 and sigma 55 in one batch: plain MSE lets the
    heavy-noise patches' large errors drive the gradient, the per-image
    log10(mse) (``psnr``) halves every image's error alike per 3 dB."""
    import tensorflow as tf

    rng = np.random.default_rng(5)
    clean = rng.random((2, 16, 16, 1)).astype(np.float32)
    off = np.stack([np.full((16, 16, 1), 0.01), np.full((16, 16, 1), 0.2)]).astype(np.float32)
    loss = make_loss("psnr")
    mse = (off**2).mean(axis=(1, 2, 3))
    assert float(loss(clean, clean + off)) == pytest.approx(np.log10(mse + 1e-5).mean(), abs=1e-4)
    assert float(loss(clean, clean)) == pytest.approx(-5.0, abs=1e-4)  # no SSIM term
    x = tf.Variable(clean + off)
    for name, low_share in (("mse", lambda r: r < 0.1), ("psnr", lambda r: r > 0.5)):
        with tf.GradientTape() as tape:
            value = make_loss(name)(clean, x)
        grad = np.abs(tape.gradient(value, x).numpy()).sum(axis=(1, 2, 3))
        # the nearly clean image's share of the gradient: tiny under mse, its due under psnr
        assert low_share(grad[0] / grad.sum()), (name, grad)


def test_loss_gradients_are_finite_at_a_perfect_output():
    import tensorflow as tf

    clean, _, _ = _pairs()
    x = tf.Variable(clean)
    with tf.GradientTape() as tape:
        value = PsnrSsimLoss()(clean, x)
    grad = tape.gradient(value, x)
    assert np.isfinite(grad.numpy()).all()


def test_loss_round_trips_through_keras_config():
    import keras

    loss = PsnrSsimLoss(ssim_weight=0.5)
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, PsnrSsimLoss) and again.ssim_weight == 0.5


def test_unknown_loss_and_schedule_are_refused():
    with pytest.raises(ValueError, match="unknown loss 'huber'"):
        make_loss("huber")
    with pytest.raises(ValueError, match="schedule 'step'"):
        learning_rate(1e-3, "step", 100)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=0)
    assert TrainConfig().learning_rate is None  # the architecture's recipe decides


def test_cosine_schedule_decays_to_one_percent():
    schedule = learning_rate(2e-3, "cosine", 100)
    assert float(schedule(0)) == pytest.approx(2e-3)
    assert float(schedule(50)) == pytest.approx(2e-3 * (0.01 + 0.99 * 0.5), rel=1e-4)
    assert float(schedule(100)) == pytest.approx(2e-5, rel=1e-4)
    assert learning_rate(1e-3, "constant", 100) == 1e-3
