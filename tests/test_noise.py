"""The literature's additive white Gaussian noise (awgn), in numpy and in TensorFlow,
and the noise defaults that follow the dataset's kind."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from denoiser.config import DataConfig, NoiseConfig
from denoiser.data.noise import add_awgn, add_awgn_tf, add_noise
from denoiser.request import default_noise_for


def test_awgn_numpy_matches_sigma_and_is_neither_clipped_nor_quantised():
    x = np.full((4, 64, 64, 1), 0.98, dtype=np.float32)
    x[:, :32] = 0.02  # near both ends, so clipping would show
    for sigma in (15.0, 25.0, 50.0):
        y = add_awgn(x, sigma, np.random.default_rng(1))
        d = y.astype(np.float64) - x
        assert y.dtype == np.float32 and y.shape == x.shape
        assert abs(d.mean()) < 0.002
        assert abs(d.std() - sigma / 255) < 0.02 * sigma / 255
        assert y.min() < 0 and y.max() > 1  # kept outside [0, 1]
        assert not np.allclose(y * 255, np.rint(y * 255))  # not quantised
    np.testing.assert_array_equal(
        add_awgn(x, 25, np.random.default_rng(7)), add_awgn(x, 25, np.random.default_rng(7))
    )
    np.testing.assert_array_equal(add_awgn(x, 0, np.random.default_rng(7)), x)


def test_awgn_numpy_takes_one_sigma_per_image_and_is_the_add_noise_kind():
    x = np.full((2, 128, 128, 1), 0.5, dtype=np.float32)
    y = add_awgn(x, np.array([10.0, 40.0]), np.random.default_rng(2))
    stds = (y - x).reshape(2, -1).std(axis=1) * 255
    assert abs(stds[0] - 10) < 0.3 and abs(stds[1] - 40) < 1.2
    same = add_noise(x, "awgn", np.array([10.0, 40.0]), np.random.default_rng(2))
    np.testing.assert_array_equal(same, y)  # add_noise's awgn is unclipped too
    with pytest.raises(ValueError, match="sigma"):
        add_awgn(x, 300, np.random.default_rng(0))


def test_awgn_tensorflow_draws_sigma_per_image_in_the_range():
    import tensorflow as tf

    x = np.full((64, 40, 40, 1), 0.5, dtype=np.float32)
    x[:, :, :20] = 0.01
    y = add_awgn_tf(tf.constant(x), (25.0, 25.0), seed=3).numpy()
    d = y - x
    assert y.dtype == np.float32 and y.shape == x.shape
    assert abs(d.mean()) < 0.002 and abs(d.std() - 25 / 255) < 0.003
    assert y.min() < 0  # not clipped

    blind = add_awgn_tf(tf.constant(x), (0.0, 55.0), seed=4).numpy()
    per_image = (blind - x).reshape(64, -1).std(axis=1) * 255
    assert per_image.min() >= 0 and per_image.max() <= 57
    assert per_image.std() > 8  # sigma drawn per image, uniform on [0, 55]: std about 15.9
    assert abs(per_image.mean() - 27.5) < 6


def test_awgn_config_bounds_and_defaults_by_dataset():
    assert NoiseConfig(kind="awgn", level=(0, 55)).level == (0.0, 55.0)
    with pytest.raises(ValidationError, match="sigma"):
        NoiseConfig(kind="awgn", level=(0, 300))
    mnist = default_noise_for("mnist")
    assert mnist == NoiseConfig()
    for dataset in ("train400", DataConfig(dataset="train400"), "/some/folder/of/photos"):
        photo = default_noise_for(dataset)
        assert (photo.kind, photo.level, photo.level_density) == ("awgn", (0.0, 55.0), "uniform")
    assert default_noise_for(DataConfig()) == NoiseConfig()
