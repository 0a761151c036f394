"""The model side of a folder run: :class:`BatchPredictor` runs one model on
fixed-size batches of tiles; :class:`SelfEnsemble` runs it on the eight
flips and rotations of each batch; :func:`as_router` makes a router of it.

Imports nothing of this package.
"""

from __future__ import annotations

import numpy as np

from denoiser.core.errors import ConfigError
from denoiser.folder.routing import Router, one_model
from denoiser.imaging.tiling import TileSpec


class BatchPredictor:
    """Runs the model on fixed-size batches (padding the last), so the compiled
    predict function is traced once per tile shape (a model whose
    ``pads_batches`` is False, such as an OpenVINO one, gets the last batch as it is).
    A batch holds at most ``pixel_budget`` pixels: the model's own
    ``pixel_budget`` where it has one (OpenVINO's), else 1 MP."""

    def __init__(self, model, batch_size: int = 256, pixel_budget: int | None = None):
        self.model = model
        self.batch_size = batch_size
        self.pixel_budget = pixel_budget or getattr(model, "pixel_budget", None) or 1 << 20
        self.pads = getattr(model, "pads_batches", True)

    def at_most(self, batch_size: int) -> BatchPredictor:
        """The same model in batches of at most ``batch_size``."""
        if batch_size >= self.batch_size:
            return self
        return BatchPredictor(self.model, batch_size, self.pixel_budget)

    def batch_for(self, shape: tuple[int, int]) -> int:
        return max(1, min(self.batch_size, self.pixel_budget // max(shape[0] * shape[1], 1)))

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        n = len(tiles)
        size = self.batch_for(tiles.shape[1:3])
        out = np.empty(tiles.shape, dtype=np.float32)
        for start in range(0, n, size):
            chunk = tiles[start : start + size]
            k = len(chunk)
            if k < size and self.pads:
                chunk = np.concatenate([chunk, np.zeros((size - k, *chunk.shape[1:]), np.float32)])
            out[start : start + k] = np.asarray(
                self.model.predict_on_batch(chunk), dtype=np.float32
            )[:k]
        return out


TURNS = 8  # four 90-degree rotations, each also mirrored


def turn_batch(x: np.ndarray, t: int) -> np.ndarray:
    """Batch ``x`` (N, H, W, C) in the ``t``-th of the eight orientations
    (``t`` in 0..7: ``t % 4`` quarter turns, mirrored left to right when ``t >= 4``)."""
    y = np.rot90(x, t % 4, axes=(1, 2))
    return y[:, :, ::-1] if t >= 4 else y


def unturn_batch(y: np.ndarray, t: int) -> np.ndarray:
    """The inverse of :func:`turn_batch`: a batch in orientation ``t`` made upright."""
    y = y[:, :, ::-1] if t >= 4 else y
    return np.rot90(y, -(t % 4), axes=(1, 2))


class SelfEnsemble:
    """A model whose output is the mean of its outputs for the eight flips and
    90-degree rotations of its input, each turned back (test-time
    self-ensemble), for a model that learned its images in all eight
    orientations (photographs; not digits, which have an up): a little
    cleaner for eight times the inference (docs/natural.md has the figures).
    Wraps anything with ``predict_on_batch``, as :class:`BatchPredictor`
    takes it, and shows its ``input_shape`` (the channels it takes) and
    ``pixel_budget``; a tile that is not square goes through the model in
    both of its shapes."""

    def __init__(self, model):
        self.model = model
        self.pads_batches = getattr(model, "pads_batches", True)
        self.pixel_budget = getattr(model, "pixel_budget", None)
        self.input_shape = getattr(model, "input_shape", None)

    def predict_on_batch(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        total = np.zeros(x.shape, dtype=np.float32)
        for t in range(TURNS):
            out = self.model.predict_on_batch(np.ascontiguousarray(turn_batch(x, t)))
            total += unturn_batch(np.asarray(out, dtype=np.float32), t)
        return total / TURNS


def as_router(predict: BatchPredictor | Router, spec: TileSpec | None) -> Router:
    """``predict`` as a Router: itself, or every image through its one model."""
    if isinstance(predict, Router):
        return predict
    if spec is None:
        raise ConfigError("one model needs its tiling (a TileSpec)")
    return one_model(predict, spec)
