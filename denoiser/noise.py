"""Noise models that turn clean images into training inputs.

Images are floats in [0, 1]; every function takes an explicit numpy Generator
so that a shard's noise depends only on its seed. ``level`` is one value per
image, which is how blind training (a range of levels) is expressed.
"""

from __future__ import annotations

from typing import get_args

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
    teaches little that heavy noise does not. Against a uniform draw it gave
    +0.36 dB at f = 0.7, +0.25 at 0.5 and +0.02 at 0.3 after two epochs on
    [0.1, 0.7] (docs/quality.md). Plain arithmetic, so ``u`` may be a numpy
    array or a TensorFlow tensor (bench/quality.py draws inside the graph).
    """
    if density == "rising":
        u = u ** 0.5
    elif density != "uniform":
        raise ValueError(f"unknown level density {density!r}; known: {', '.join(DENSITIES)}")
    return lo + (hi - lo) * u


def draw_levels(level: float | tuple[float, float] | list[float], n: int,
                rng: np.random.Generator, density: str = "rising") -> np.ndarray:
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


def add_noise(clean: np.ndarray, kind: str, levels: np.ndarray | float,
              rng: np.random.Generator) -> np.ndarray:
    """Noisy float32 images in [0, 1].

    gaussian: the reference's ``clip(x + f * N(0, 1), 0, 1)``; salt_and_pepper:
    a fraction ``level`` of pixels set to 0 or 1 with equal odds; speckle:
    ``clip(x + x * level * N(0, 1))`` (multiplicative, nothing on black);
    poisson: photon counts with peak ``1 / level`` (level 0: no noise).
    """
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
