"""Noise models that turn clean images into training inputs.

Images are floats in [0, 1]; every function takes an explicit numpy Generator
so that a shard's noise depends only on its seed. ``level`` is one value per
image, which is how blind training (a range of levels) is expressed.

``awgn`` is the denoising literature's noise (Zhang et al., DnCNN):
``y = x + (sigma / 255) N(0, 1)`` in floating point, neither clipped nor
quantised, sigma in 0-255 units; published tables are only comparable under
exactly that definition. For photo datasets it is added fresh to every batch
inside the training graph (:func:`add_awgn_tf`) and from a seed at evaluation
(:func:`add_awgn`).
"""

from __future__ import annotations

from typing import Any, get_args

import numpy as np

from denoiser.config import LevelDensity, NoiseKind

# the config's literals are the one list (the CLI's choices, the Prefect form's enum);
# tests/test_shards.py runs each of them through the code below
KINDS = get_args(NoiseKind)
DENSITIES = get_args(LevelDensity)


def level_from_uniform(u, lo: float, hi: float, density: str = "rising"):
    """Map uniform draws ``u`` in [0, 1) to levels in [lo, hi).

    ``rising``: a density growing linearly from lo to hi (``sqrt(u)``), so a
    blind model sees more of the heavy noise it finds hardest; light noise
    teaches little that heavy noise does not; it beat a uniform draw at every
    level measured (docs/measurements.md). Plain arithmetic, so ``u`` may be a numpy
    array or a TensorFlow tensor (bench/quality.py draws inside the graph).
    """
    if density == "rising":
        u = u**0.5
    elif density != "uniform":
        raise ValueError(f"unknown level density {density!r}; known: {', '.join(DENSITIES)}")
    return lo + (hi - lo) * u


def draw_levels(
    level: float | tuple[float, float] | list[float],
    n: int,
    rng: np.random.Generator,
    density: str = "rising",
) -> np.ndarray:
    """One level per image: the value itself, or drawn from [lo, hi] with
    ``density`` (see :func:`level_from_uniform`)."""
    if isinstance(level, (tuple, list)):
        lo, hi = float(level[0]), float(level[1])
        if lo == hi:
            return np.full(n, lo, dtype=np.float32)
        return level_from_uniform(rng.random(n), lo, hi, density).astype(np.float32)
    return np.full(n, float(level), dtype=np.float32)


def _per_image(levels: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(levels, dtype=np.float64).reshape((-1,) + (1,) * (x.ndim - 1))


def add_noise(
    clean: np.ndarray, kind: str, levels: np.ndarray | float, rng: np.random.Generator
) -> np.ndarray:
    """Noisy float32 images, in [0, 1] except for awgn (see :func:`add_awgn`).

    gaussian: the reference's ``clip(x + f * N(0, 1), 0, 1)``; salt_and_pepper:
    a fraction ``level`` of pixels set to 0 or 1 with equal odds; speckle:
    ``clip(x + x * level * N(0, 1))`` (multiplicative, nothing on black);
    poisson: photon counts with peak ``1 / level`` (level 0: no noise).
    """
    if kind == "awgn":
        return add_awgn(clean, levels, rng)
    x = np.asarray(clean, dtype=np.float64)
    lv = _per_image(np.broadcast_to(np.asarray(levels, dtype=np.float64), (x.shape[0],)), x)
    if kind == "gaussian":
        out = x + lv * rng.standard_normal(x.shape)
    elif kind == "salt_and_pepper":
        u = rng.random(x.shape)
        out = np.where(u < lv, (u < lv / 2).astype(np.float64), x)
    elif kind == "speckle":
        out = x + x * lv * rng.standard_normal(x.shape)
    elif kind == "poisson":
        peak = np.where(lv > 0, 1.0 / np.maximum(lv, 1e-12), 0.0)
        counts = rng.poisson(x * peak)
        out = np.where(lv > 0, counts / np.where(peak > 0, peak, 1.0), x)
    else:
        raise ValueError(f"unknown noise kind {kind!r}; known: {', '.join(KINDS)}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def quantize(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8 pixels (round to nearest)."""
    return np.clip(np.rint(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)


SIGMA_MAX = 255.0  # awgn's sigma is in 0-255 units: beyond it the image is gone
PHOTO_SIGMA_RANGE = (0.0, 55.0)  # DnCNN-B's blind range


def _check_sigma(sigma: np.ndarray) -> None:
    if sigma.size and (
        np.nanmin(sigma) < 0 or np.nanmax(sigma) > SIGMA_MAX or np.isnan(sigma).any()
    ):
        raise ValueError(f"awgn sigma must be in [0, {SIGMA_MAX:g}] (0-255 units)")


def add_awgn(clean: np.ndarray, sigma: float | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The literature's ``x + (sigma / 255) N(0, 1)``, float32, unclipped and
    unquantised, for evaluation on the same noisy images every time (the seed
    is the caller's). ``sigma`` is one value or one per image (first axis)."""
    x = np.asarray(clean, dtype=np.float32)
    sigma = np.asarray(sigma, dtype=np.float64)
    _check_sigma(sigma)
    if sigma.ndim:
        sigma = _per_image(np.broadcast_to(sigma, (x.shape[0],)), x)
    noise = rng.standard_normal(x.shape) * (sigma / 255.0)
    return (x + noise).astype(np.float32)


def add_awgn_tf(
    clean_batch: Any,
    sigma_range: tuple[float, float] | list[float],
    seed: int | None = None,
    density: str = "uniform",
) -> Any:
    """Noisy copy of a (batch, H, W, C) float tensor for the training graph:
    one sigma per image drawn from ``sigma_range`` (0-255 units) with
    ``density`` (see :func:`level_from_uniform`), then unclipped awgn. Fresh
    noise on every call, so each epoch sees new noise on the same patches;
    ``seed`` makes the op-level streams repeatable as in ``augment.reframe``."""
    import tensorflow as tf

    lo, hi = float(sigma_range[0]), float(sigma_range[1])
    _check_sigma(np.array([lo, hi]))
    if lo > hi:
        raise ValueError(f"awgn sigma range must be [lo, hi] with lo <= hi, not {sigma_range!r}")
    x = tf.convert_to_tensor(clean_batch)
    dtype = x.dtype if x.dtype.is_floating else tf.float32
    x = tf.cast(x, dtype)
    seeds = (
        (None, None) if seed is None else (seed, seed + 1)
    )  # one seed for two ops repeats a stream
    u = tf.random.uniform(tf.shape(x)[:1], dtype=tf.float32, seed=seeds[0])
    sigma = tf.cast(level_from_uniform(u, lo, hi, density), dtype) / 255.0
    noise = tf.random.normal(tf.shape(x), dtype=dtype, seed=seeds[1])
    return x + noise * tf.reshape(
        sigma, tf.concat([tf.shape(x)[:1], tf.ones(tf.rank(x) - 1, tf.int32)], 0)
    )
