"""What a dataset's split is before it becomes shards: the images, their
labels and source indices (:class:`SplitArrays`). Built by the dataset
modules, written by :mod:`denoiser.data.shards`; a leaf (numpy only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitArrays:
    """Clean images (N, H, W, C) uint8, labels (N,), source indices (N,).

    For a patch set (noise applied in training) ``images`` may be any sequence
    of (H, W) or (H, W, 1) uint8 arrays (``channels`` 1) or (H, W, 3) ones
    (``channels`` 3, RGB) of varying sizes, read only when a shard needs them;
    with ``patch_size`` each row is a random square patch (``copies`` per
    image), without it each row is the whole image, and ``shapes`` ((H, W)
    per image) sizes the shards of whole images.
    """

    images: np.ndarray | Sequence[np.ndarray]
    labels: np.ndarray
    index: np.ndarray
    copies: int = 1
    patch_size: int | None = None
    shapes: Sequence[tuple[int, int]] | None = None
    channels: int = 1
