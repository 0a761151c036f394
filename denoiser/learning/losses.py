"""Training losses, by name: ``make_loss("psnr_ssim")``, ``make_loss("psnr")``.

The project is judged by per-image mean PSNR and by SSIM with scikit-image's
defaults (``denoiser.core.metrics``), so the default loss is those two figures
themselves, made differentiable:

- ``log10(mse)`` per image is ``-PSNR / 10``: averaging it over a batch
  weighs every image's error by ratio, as the per-image mean PSNR does,
  where a plain MSE lets a few hard images drown the rest;
- ``1 - SSIM`` with the metric's own 7x7 uniform window and constants. MSE
  cannot see a faint grey haze left on a black background (0.01 costs 1e-4),
  but SSIM's luminance term halves for it, so without this term the outputs
  score badly on the very pixels that are easiest to get right.

Keras is imported here at module level: import this module only where a model
is trained.
"""

from __future__ import annotations

import keras
from keras import ops

SSIM_WINDOW = 7
_LOG10 = 2.302585092994046


def ssim_per_image(y_true, y_pred, data_range: float = 1.0):
    """SSIM of each image of a (N, H, W, C) batch, as ``denoiser.core.metrics.ssim``
    computes it (uniform 7x7 window, sample covariance, valid windows only)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = SSIM_WINDOW * SSIM_WINDOW
    cov = n / (n - 1)

    def box(t):
        return ops.average_pool(t, SSIM_WINDOW, strides=1, padding="valid")

    ux, uy = box(y_true), box(y_pred)
    vx = cov * (box(y_true * y_true) - ux * ux)
    vy = cov * (box(y_pred * y_pred) - uy * uy)
    vxy = cov * (box(y_true * y_pred) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return ops.mean(s, axis=(1, 2, 3))


@keras.saving.register_keras_serializable(package="denoiser")
class PsnrSsimLoss(keras.losses.Loss):
    """``log10(mse + eps) + ssim_weight * (1 - SSIM)`` per image.

    One dB of PSNR moves the first term by 0.1; with ``ssim_weight`` 1 an SSIM
    gain of 0.1 counts as much. ``eps`` (1e-5, i.e. 50 dB) keeps a perfect
    image from dominating the batch with an unbounded reward.
    """

    def __init__(
        self, ssim_weight: float = 1.0, eps: float = 1e-5, name: str = "psnr_ssim", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.ssim_weight = float(ssim_weight)
        self.eps = float(eps)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        err = ops.mean(ops.square(y_true - y_pred), axis=(1, 2, 3))
        value = ops.log(err + self.eps) / _LOG10
        if self.ssim_weight:
            value = value + self.ssim_weight * (1.0 - ssim_per_image(y_true, y_pred))
        return value

    def get_config(self):
        return {**super().get_config(), "ssim_weight": self.ssim_weight, "eps": self.eps}


def psnr_loss() -> PsnrSsimLoss:
    """``log10(mse + eps)`` per image, no SSIM term: ``-PSNR / 10`` averaged as
    the evaluation averages PSNR. For blind photo noise, where one batch holds
    sigma 0 and sigma 55, it gives a nearly clean patch's error as much say
    as a heavy one's, which a plain MSE (dominated by the large errors of
    heavy noise) does not."""
    return PsnrSsimLoss(ssim_weight=0.0, name="psnr")


LOSSES = {
    "bce": keras.losses.BinaryCrossentropy,
    "mse": keras.losses.MeanSquaredError,
    "l1": keras.losses.MeanAbsoluteError,
    "psnr_ssim": PsnrSsimLoss,
    "psnr": psnr_loss,
}


def make_loss(name: str) -> keras.losses.Loss:
    try:
        return LOSSES[name]()
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}") from None
