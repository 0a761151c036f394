"""Opponent colour planes: how a colour image is given to a model of grey
planes. Three planes from R, G and B (their mean and two colour differences),
each scaled and offset into [0, 1]. The rows of the transform are orthogonal,
so AWGN of one sigma in R, G and B stays independent across the planes, at
sigma/sqrt(3), sigma/sqrt(2) and sigma*sqrt(6)/4 (within the range a blind
grey model was trained on), and the colour-difference planes are smooth where
R, G and B are not.
"""

from __future__ import annotations

import numpy as np

#: rows: the planes as weights of R, G and B (mean, R - B, R - 2G + B, scaled)
TO_OPPONENT = np.array(
    [[1 / 3, 1 / 3, 1 / 3], [1 / 2, 0.0, -1 / 2], [1 / 4, -1 / 2, 1 / 4]], np.float32
)
#: what each plane is offset by, so a plane of an image in [0, 1] is in [0, 1]
OPPONENT_OFFSET = np.array([0.0, 0.5, 0.5], np.float32)
#: right-multiplies planes (offsets removed) back to RGB: the inverse of TO_OPPONENT, transposed
FROM_OPPONENT = np.linalg.inv(TO_OPPONENT.astype(np.float64)).T.astype(np.float32)


def rgb_to_opponent(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1] as the three opponent planes in [0, 1] (H, W, 3)."""
    return np.matmul(np.asarray(rgb, np.float32), TO_OPPONENT.T) + OPPONENT_OFFSET


def opponent_to_rgb(planes: np.ndarray) -> np.ndarray:
    """The inverse of :func:`rgb_to_opponent`: (H, W, 3) RGB, not clipped."""
    return np.matmul(np.asarray(planes, np.float32) - OPPONENT_OFFSET, FROM_OPPONENT)
