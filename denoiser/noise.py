"""Noise models that turn clean images into training inputs.

Images are floats in [0, 1]; every function takes an explicit numpy Generator
so that a shard's noise depends only on its seed. ``level`` is one value per
image, which is how blind training (a range of levels) is expressed.
"""

from __future__ import annotations

import numpy as np

KINDS = ("gaussian", "salt_and_pepper", "speckle", "poisson")


def draw_levels(level: float | tuple[float, float] | list[float], n: int,
                rng: np.random.Generator) -> np.ndarray:
    """One level per image: the value itself, or uniform in [lo, hi]."""
    if isinstance(level, (tuple, list)):
        lo, hi = float(level[0]), float(level[1])
        if lo == hi:
            return np.full(n, lo, dtype=np.float32)
        return rng.uniform(lo, hi, size=n).astype(np.float32)
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
