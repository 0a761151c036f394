"""Cutting images into overlapping tiles and blending the results back.

Tiles are weighted by a squared-sine window that is positive everywhere and
falls smoothly to the tile edges; dividing by the summed weights makes the
blend exact for any overlap, so a constant image stays constant and no seams
appear. A fixed-size model (the 28x28 ``seed``) sees every image as tiles; a
fully convolutional one sees small images whole (padded to its size
multiple) and large ones as big tiles, which bounds memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from denoiser.core.cards import Recipe


@dataclass(frozen=True)
class TileSpec:
    """How a model wants its input: ``tile`` x ``tile`` pieces overlapping by
    ``overlap``, or (``whole_max`` > 0) whole images up to that side, padded
    to a multiple of ``multiple``. With ``fit`` (models of any input size)
    each side of an image is cut into the fewest equal tiles of at most
    ``tile`` that overlap by at least ``overlap``, so little is computed twice."""

    tile: int
    overlap: int
    multiple: int = 1
    whole_max: int = 0
    fit: bool = False  # tiles sized to the image, at most ``tile``: as few pixels as can be

    def __post_init__(self):
        if self.tile < 1 or not 0 <= self.overlap < self.tile:
            raise ValueError(f"bad tiling: tile {self.tile}, overlap {self.overlap}")


def tile_spec_for(recipe: Recipe | dict) -> TileSpec:
    """The tiling an architecture's recipe asks for (a dict is read as a recipe)."""
    recipe = Recipe.model_validate(recipe)
    if recipe.fully_convolutional:
        return TileSpec(
            tile=768, overlap=32, multiple=recipe.size_multiple, whole_max=512, fit=True
        )
    h = int(recipe.input_shape[0])
    return TileSpec(tile=h, overlap=h // 2)


def window(size: int) -> np.ndarray:
    i = np.arange(size, dtype=np.float64)
    return (np.sin(np.pi * (i + 0.5) / size) ** 2).astype(np.float32)


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, length); the last tile is flush with the end."""
    if length <= tile:
        return [0]
    step = tile - overlap
    out = list(range(0, length - tile, step))
    out.append(length - tile)
    return out


def pad_bottom_right(x: np.ndarray, ph: int, pw: int, axis: int = 0) -> np.ndarray:
    """``ph`` more rows at the bottom and ``pw`` more columns at the right of
    the height and width axes ``axis`` and ``axis + 1`` (0 for a plane, 1 for
    an (N, H, W, C) batch): mirrored where the image is large enough, else
    its edge repeated."""
    if ph == 0 and pw == 0:
        return x
    h, w = x.shape[axis : axis + 2]
    mode = "reflect" if ph < h and pw < w else "symmetric" if ph <= h and pw <= w else "edge"
    widths = [(0, 0)] * x.ndim
    widths[axis], widths[axis + 1] = (0, ph), (0, pw)
    return np.pad(x, widths, mode=mode)


@dataclass
class TiledImage:
    """The tiles of one plane (or one (H, W, C) image) and what is needed to
    put their outputs back."""

    shape: tuple[int, int]  # the original plane
    padded: tuple[int, int]
    tile_shape: tuple[int, int]
    positions: list[tuple[int, int]]
    tiles: np.ndarray  # (n, th, tw) float32, or (n, th, tw, C)

    def __len__(self) -> int:
        return len(self.positions)


def _fit_axis(length: int, spec: TileSpec) -> tuple[int, list[int]]:
    """The tile length (a multiple of ``spec.multiple``) and origins that
    cover ``length`` with the fewest tiles of at most ``spec.tile``."""
    m, tile, overlap = spec.multiple, spec.tile, spec.overlap
    if length <= tile:
        return -(-length // m) * m, [0]
    n = -(-(length - overlap) // (tile - overlap))
    t = -(-(length + (n - 1) * overlap) // n)
    t = -(-t // m) * m
    return t, starts(length, t, overlap)


def split(plane: np.ndarray, spec: TileSpec) -> TiledImage:
    plane = np.asarray(plane, dtype=np.float32)
    h, w = plane.shape[:2]
    m = spec.multiple
    if spec.whole_max and h <= spec.whole_max and w <= spec.whole_max:
        ph, pw = (-h) % m, (-w) % m
        padded = pad_bottom_right(plane, ph, pw)
        return TiledImage((h, w), padded.shape[:2], padded.shape[:2], [(0, 0)], padded[None])
    if spec.fit:
        (th, ys), (tw, xs) = _fit_axis(h, spec), _fit_axis(w, spec)
        padded = pad_bottom_right(plane, max(th - h, 0), max(tw - w, 0))
        positions = [(y, x) for y in ys for x in xs]
        tiles = np.stack([padded[y : y + th, x : x + tw] for y, x in positions])
        return TiledImage((h, w), padded.shape[:2], (th, tw), positions, tiles)
    th = tw = spec.tile
    ph, pw = max(th - h, 0), max(tw - w, 0)
    padded = pad_bottom_right(plane, ph, pw)
    H, W = padded.shape[:2]
    positions = [(y, x) for y in starts(H, th, spec.overlap) for x in starts(W, tw, spec.overlap)]
    tiles = np.stack([padded[y : y + th, x : x + tw] for y, x in positions])
    return TiledImage((h, w), (H, W), (th, tw), positions, tiles)


class Blender:
    """Accumulates weighted tile outputs of one image (an image that is one
    tile is its output: nothing to blend)."""

    def __init__(self, tiled: TiledImage):
        self.tiled = tiled
        self.remaining = len(tiled)
        self.single: np.ndarray | None = None
        if len(tiled) > 1:
            th, tw = tiled.tile_shape
            extra = np.shape(tiled.tiles)[3:]  # the channels of (H, W, C) images
            self.acc = np.zeros((*tiled.padded, *extra), dtype=np.float32)
            self.weight = np.zeros((*tiled.padded, *extra), dtype=np.float32)
            self.win = np.outer(window(th), window(tw)).reshape((th, tw) + (1,) * len(extra))

    def add(self, index: int, output: np.ndarray) -> bool:
        """Blend tile ``index``'s output; True when the image is complete."""
        if len(self.tiled) == 1:
            self.single = np.asarray(output, dtype=np.float32)
        else:
            y, x = self.tiled.positions[index]
            th, tw = self.tiled.tile_shape
            self.acc[y : y + th, x : x + tw] += output * self.win
            self.weight[y : y + th, x : x + tw] += self.win
        self.remaining -= 1
        return self.remaining == 0

    def result(self) -> np.ndarray:
        h, w = self.tiled.shape
        if self.single is not None:
            return self.single[:h, :w]
        return (self.acc / self.weight)[:h, :w]


def denoise_plane(plane: np.ndarray, spec: TileSpec, predict) -> np.ndarray:
    """One plane through ``predict`` ((n, th, tw, 1) -> same), for small jobs and tests."""
    tiled = split(plane, spec)
    outputs = np.asarray(predict(tiled.tiles[..., None]))[..., 0]
    blender = Blender(tiled)
    for i, out in enumerate(outputs):
        blender.add(i, out)
    return blender.result()
