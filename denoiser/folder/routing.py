"""Which model denoises each image of a folder, and how the image's planes go
through it.

Each image goes to the model of its domain
(:func:`denoiser.domains.by_domain`), or to one
model for all (:func:`one_model`), and is given to that model as it takes
images: a grey model denoises a grey image's luminance (``grey``) and a
colour image as three grey planes, its opponent colour planes
(:mod:`denoiser.core.opponent`: the mean of R, G and B and
two colour differences, whose noise stays independent; ``grey per opponent
channel``); a
colour model denoises a colour image's RGB (``colour``) and a grey image
repeated in three channels, the mean of its output kept (``grey as
colour``). :class:`RoutedTiles` holds one image's tiles as its model takes
them and blends the outputs back; the folder pipeline batches the tiles of
many images per model and tile shape.

Imports no domain (the domains import the folder pipeline, which imports
this): :func:`denoiser.domains.by_domain` builds the router that recognises
images by domain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from denoiser.core.opponent import opponent_to_rgb, rgb_to_opponent
from denoiser.imaging.images import LoadedImage, is_colour, rgb_pixels
from denoiser.imaging.tiling import Blender, TileSpec, split

GREY = "grey"
COLOUR = "colour"
PER_CHANNEL = "grey per opponent channel"
GREY_AS_COLOUR = "grey as colour"
ROUTES = (GREY, COLOUR, PER_CHANNEL, GREY_AS_COLOUR)


def model_channels(model) -> int:
    """The channels a loaded model takes (1 when its input shape does not say)."""
    shape = tuple(getattr(model, "input_shape", ()) or ())
    return int(shape[-1]) if len(shape) == 4 and shape[-1] else 1


@dataclass(frozen=True)
class Denoiser:
    """A loaded model as the folder pipeline runs it: its name (the model's
    version, what the journal and report record), its batch predictor
    (:class:`denoiser.folder.BatchPredictor`), tiling and channels (1 or 3)."""

    name: str
    predict: object
    spec: TileSpec
    channels: int

    def at_most(self, batch_size: int) -> Denoiser:
        """The same model in batches of at most ``batch_size``."""
        return replace(self, predict=self.predict.at_most(batch_size))


def route_for(image: LoadedImage, channels: int) -> str:
    """How ``image`` goes through a model of ``channels`` channels (see the module)."""
    colour = is_colour(image)
    if channels == 3:
        return COLOUR if colour else GREY_AS_COLOUR
    return PER_CHANNEL if colour else GREY


class RoutedTiles:
    """One image's tiles as its model takes them ((th, tw, channels) each),
    and the blend of the model's outputs back into the image: an (H, W)
    luminance for the ``grey`` and ``grey as colour`` routes, (H, W, 3) RGB
    for the others."""

    def __init__(self, image: LoadedImage, denoiser: Denoiser):
        self.denoiser = denoiser
        self.route = route_for(image, denoiser.channels)
        if self.route == COLOUR:
            planes = [rgb_pixels(image)]
        elif self.route == PER_CHANNEL:
            opponent = rgb_to_opponent(rgb_pixels(image))
            planes = [np.ascontiguousarray(opponent[..., c]) for c in range(3)]
        else:
            planes = [image.luma]
        self.tiled = [split(p, denoiser.spec) for p in planes]
        self.blenders = [Blender(t) for t in self.tiled]
        self.per_plane = len(self.tiled[0])
        self.remaining = len(self)

    def __len__(self) -> int:
        return self.per_plane * len(self.tiled)

    @property
    def predict(self):
        """The model's batch predictor."""
        return self.denoiser.predict

    @property
    def batch_size(self) -> int:
        """Tiles per batch of this image's model and tile shape."""
        return self.denoiser.predict.batch_for(self.tiled[0].tile_shape)

    @property
    def key(self) -> tuple:
        """What tiles batched together share: the model and the tile shape."""
        return (self.denoiser.name, self.denoiser.channels, self.tiled[0].tile_shape)

    def input(self, k: int) -> np.ndarray:
        """Model input ``k`` (plane ``k // per_plane``'s tile ``k % per_plane``)."""
        tile = self.tiled[k // self.per_plane].tiles[k % self.per_plane]
        if self.route == COLOUR:
            return tile
        if self.route == GREY_AS_COLOUR:
            return np.repeat(tile[..., None], 3, axis=-1)
        return tile[..., None]

    def add(self, k: int, output: np.ndarray) -> bool:
        """Blend the model's output for input ``k``; True when the image is complete."""
        if self.route == GREY_AS_COLOUR:
            output = output.mean(axis=-1)
        elif self.route != COLOUR:
            output = output[..., 0]
        self.blenders[k // self.per_plane].add(k % self.per_plane, output)
        self.remaining -= 1
        return self.remaining == 0

    def result(self) -> np.ndarray:
        """The denoised image: (H, W) luminance or (H, W, 3) RGB (see the class)."""
        if self.route == PER_CHANNEL:
            return opponent_to_rgb(np.stack([b.result() for b in self.blenders], axis=-1))
        return self.blenders[0].result()


class Router:
    """Picks each image's :class:`Denoiser` (``pick(image)``), in batches of
    at most ``limit`` when given; ``tiles`` cuts the image for it."""

    def __init__(self, pick: Callable[[LoadedImage], Denoiser], limit: int | None = None):
        self.pick = pick
        self.limit = limit

    def at_most(self, batch_size: int) -> Router:
        """The same routes, each model in batches of at most ``batch_size``."""
        return Router(self.pick, batch_size if self.limit is None else min(self.limit, batch_size))

    def tiles(self, image: LoadedImage) -> RoutedTiles:
        denoiser = self.pick(image)
        if self.limit is not None:
            denoiser = denoiser.at_most(self.limit)
        return RoutedTiles(image, denoiser)


def one_model(predict, spec: TileSpec, name: str = "") -> Router:
    """Every image through one model (a :class:`~denoiser.folder.BatchPredictor`),
    with the channel adaptations of :func:`route_for`."""
    denoiser = Denoiser(name, predict, spec, model_channels(predict.model))
    return Router(lambda image: denoiser)


def denoise_luminance(image: LoadedImage, spec: TileSpec, predict) -> np.ndarray:
    """A colour image's luminance alone through a grey model, its chroma kept:
    (H, W, 3) RGB. The path ``denoise folder`` took for colour images before
    routing, kept for comparison (bench/colour.py's luminance row)."""
    from denoiser.imaging.images import _ycc_to_rgb
    from denoiser.imaging.tiling import denoise_plane

    luma = denoise_plane(image.luma, spec, predict)
    if image.chroma is None:
        return np.repeat(luma[..., None], 3, axis=-1)
    return _ycc_to_rgb(luma, image.chroma)


def count_by_model(results) -> dict[str, dict[str, int]]:
    """How many outputs each model made, by route: ``{version: {route: n}}``
    (the denoised files of a run's results that name their model)."""
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        if r.status == "denoised" and r.model:
            by_route = counts.setdefault(r.model, {})
            by_route[r.route] = by_route.get(r.route, 0) + 1
    return counts
