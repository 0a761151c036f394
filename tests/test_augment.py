"""Reframing: recut pairs must stay pairs, and be windows of the batch's mosaic."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from denoiser.data.augment import reframe


def _batch(n=8, h=12, w=12, c=1):
    return np.arange(n * h * w * c, dtype=np.float32).reshape(n, h, w, c)


def _mosaic(x, i):
    """The 2x2 mosaic image i is recut from: itself, then the next three (wrapping)."""
    n = len(x)
    a, b, c, d = (x[(i + k) % n] for k in range(4))
    return np.concatenate([np.concatenate([a, b], 1), np.concatenate([c, d], 1)], 0)


def test_share_zero_changes_nothing():
    x = _batch()
    assert np.array_equal(reframe(tf.constant(x), 0.0).numpy(), x)


def test_every_recut_image_is_a_window_of_its_mosaic():
    tf.random.set_seed(1)
    x = _batch(n=16)
    y = reframe(tf.constant(x), 1.0).numpy()
    assert y.shape == x.shape
    offsets = set()
    for i in range(len(x)):
        m = _mosaic(x, i)
        # pixel values are unique, so the top-left value gives the offset
        oy, ox = (int(v[0]) for v in np.nonzero(m[..., 0] == y[i, 0, 0, 0]))
        assert np.array_equal(m[oy : oy + 12, ox : ox + 12], y[i])
        offsets.add((oy, ox))
    assert len(offsets) > 8  # random offsets, not one shared cut


def test_about_the_asked_share_is_recut():
    tf.random.set_seed(2)
    x = _batch(n=2000, h=4, w=4)
    y = reframe(tf.constant(x), 0.3).numpy()
    moved = (x != y).reshape(len(x), -1).any(axis=1).mean()
    # an image drawn to move still stays put at offset (0, 0): 1/25 of the moves
    assert 0.3 * (1 - 1 / 25) - 0.04 < moved < 0.3 + 0.04


def test_stacked_channels_are_cut_together():
    tf.random.set_seed(3)
    clean = _batch(n=8, c=1)
    noisy = clean + 0.5
    y = reframe(tf.constant(np.concatenate([noisy, clean], -1)), 1.0).numpy()
    assert np.array_equal(y[..., 0], y[..., 1] + 0.5)


def test_same_seed_same_cuts():
    x = tf.constant(_batch())
    tf.random.set_seed(4)
    a = reframe(x, 0.5, seed=7).numpy()
    tf.random.set_seed(4)
    b = reframe(x, 0.5, seed=7).numpy()
    assert np.array_equal(a, b)


def test_share_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="share"):
        reframe(tf.constant(_batch()), 1.5)
