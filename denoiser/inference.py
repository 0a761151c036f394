"""Running a model over arrays of images of any size, in fixed-size batches."""

from __future__ import annotations

import numpy as np


def pad_to_multiple(images: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Reflect-pad (N, H, W, C) so H and W are multiples of ``multiple``."""
    h, w = images.shape[1:3]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return images, (h, w)
    mode = "reflect" if h > ph and w > pw else "edge"
    return np.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode), (h, w)


def predict_array(model, images: np.ndarray, batch_size: int = 256, size_multiple: int = 1) -> np.ndarray:
    """float32 [0, 1] images (N, H, W, C) through the model, batch by batch.

    ``model(x, training=False)`` on fixed-size batches avoids ``predict``'s
    per-call overhead and its retracing on a short last batch.
    """
    x, (h, w) = pad_to_multiple(np.asarray(images, dtype=np.float32), max(size_multiple, 1))
    out = np.empty_like(x)
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        n = len(chunk)
        if n < batch_size and len(x) > batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
        out[start:start + n] = np.asarray(model(chunk, training=False))[:n]
    return out[:, :h, :w]


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
