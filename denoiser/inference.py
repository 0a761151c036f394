"""Running a model over arrays of images of any size, in fixed-size batches."""

from __future__ import annotations

import numpy as np

from denoiser.folder import BatchPredictor
from denoiser.tiling import pad_bottom_right


def predict_array(model, images: np.ndarray, batch_size: int = 256, size_multiple: int = 1) -> np.ndarray:
    """float32 [0, 1] images (N, H, W, C) through the model, batch by batch.

    H and W are padded to multiples of ``size_multiple`` as ``denoiser.tiling``
    pads a whole image, and the batches are run by the folder flow's
    ``BatchPredictor`` (fixed-size batches, so one trace per image size).
    """
    x = np.asarray(images, dtype=np.float32)
    h, w = x.shape[1:3]
    m = max(size_multiple, 1)
    x = pad_bottom_right(x, (-h) % m, (-w) % m, axis=1)
    return BatchPredictor(model, batch_size)(x)[:, :h, :w]


def tile_spec_for_model(model, architecture: str | None = None):
    """Tiling for a loaded model: from its architecture's recipe when known,
    else from its input shape (fixed size -> tiles of that size)."""
    from denoiser.architectures import ARCHITECTURES
    from denoiser.tiling import tile_spec_for

    if architecture in ARCHITECTURES:
        return tile_spec_for(ARCHITECTURES[architecture].recipe)
    shape = tuple(model.input_shape[1:3])
    if None in shape:
        return tile_spec_for({"fully_convolutional": True, "size_multiple": 8})
    return tile_spec_for({"fully_convolutional": False, "input_shape": shape})
