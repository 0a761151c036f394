"""Running a model over arrays of images of any size, in fixed-size batches."""

from __future__ import annotations

import numpy as np

from denoiser.core.errors import ModelMismatch
from denoiser.folder import BatchPredictor
from denoiser.imaging.tiling import pad_bottom_right


def predict_array(
    model, images: np.ndarray, batch_size: int = 256, size_multiple: int = 1
) -> np.ndarray:
    """float32 [0, 1] images (N, H, W, C) through the model, batch by batch.

    H and W are padded to multiples of ``size_multiple`` as ``denoiser.imaging.tiling``
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
    from denoiser.core.cards import Recipe
    from denoiser.imaging.tiling import tile_spec_for
    from denoiser.nets.architectures import ARCHITECTURES

    if architecture in ARCHITECTURES:
        return tile_spec_for(ARCHITECTURES[architecture].recipe)
    shape = tuple(model.input_shape[1:3])
    if None in shape:
        return tile_spec_for(Recipe(fully_convolutional=True, size_multiple=8))
    return tile_spec_for(Recipe(fully_convolutional=False, input_shape=shape))


def check_fits(model, spec, name: str, channels: int = 1) -> None:
    """Refuse, before any image is read, a model that cannot denoise the
    folder's tiles: ``channels``-channel images in, the same shape out (its
    declared input, then one probe tile through it). A ModelMismatch naming
    the model and what it takes."""
    shape = tuple(getattr(model, "input_shape", ()) or ())
    if len(shape) != 4:
        raise ModelMismatch(
            f"model {name} takes inputs of shape {shape}; a denoiser takes images "
            "(batch, height, width, channels)"
        )
    if shape[-1] is not None and shape[-1] != channels:
        words = "grey (1-channel)" if channels == 1 else f"{channels}-channel"
        raise ModelMismatch(
            f"model {name} takes {shape[-1]}-channel images; this folder's are given to it "
            f"as {words} tiles"
        )
    side = spec.tile if not spec.whole_max else max(spec.multiple, 1) * 4
    h, w = (shape[1] or side), (shape[2] or side)
    probe = np.zeros((1, h, w, channels), np.float32)
    try:
        out = np.asarray(model.predict_on_batch(probe))
    except Exception as exc:  # noqa: BLE001 - any failure on a probe: the model does not fit
        raise ModelMismatch(f"model {name} fails on a {h}x{w} tile: {exc}") from None
    if out.shape == probe.shape:
        return
    if out.ndim == 4 and out.shape[:3] == probe.shape[:3]:
        raise ModelMismatch(
            f"model {name} gives {out.shape[-1]} channels for {channels}; a denoiser gives "
            "back an image of its input's shape"
        )
    raise ModelMismatch(
        f"model {name} gives an output of shape {out.shape} for a {probe.shape} input; "
        "a denoiser gives back an image of its input's shape"
    )


def denoise_planes(planes: list[np.ndarray], spec, predict) -> list[np.ndarray]:
    """Whole (H, W) float32 planes (or (H, W, C) images) of any sizes through the folder denoiser's
    tiling (:mod:`denoiser.imaging.tiling`: the same tiles, padding and blend, so no
    seams), the tiles of every plane grouped by shape so that ``predict``
    (a :class:`~denoiser.folder.BatchPredictor`) fills its fixed-size batches.
    Outputs are as the model gives them, not clipped."""
    from denoiser.imaging.tiling import Blender, split

    tiled = [split(p, spec) for p in planes]
    blenders = [Blender(t) for t in tiled]
    by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, t in enumerate(tiled):
        by_shape.setdefault(t.tile_shape, []).extend((i, k) for k in range(len(t)))
    for members in by_shape.values():
        tiles = np.stack([tiled[i].tiles[k] for i, k in members])
        grey = tiles.ndim == 3  # (H, W) planes; (H, W, C) images go as they are
        outputs = np.asarray(predict(tiles[..., None] if grey else tiles))
        outputs = outputs[..., 0] if grey else outputs
        for (i, k), out in zip(members, outputs, strict=True):
            blenders[i].add(k, out)
    return [b.result() for b in blenders]


EVAL_NOISE_SEED = (
    0  # the noisy test images: one fixed draw per sigma, so every model sees the same ones
)


def noisy_planes(
    clean: list[np.ndarray], sigma: float, seed: int = EVAL_NOISE_SEED
) -> list[np.ndarray]:
    """The literature's unclipped awgn at ``sigma`` on each plane, from a
    generator seeded by ``seed`` and the sigma (each sigma's draw is its own)."""
    from denoiser.data.noise import add_awgn

    rng = np.random.default_rng([seed, round(float(sigma) * 1000)])
    return [add_awgn(c, sigma, rng) for c in clean]


def evaluate_planes(
    model,
    architecture: str | None,
    clean: list[np.ndarray],
    sigmas: list[float],
    batch_size: int = 256,
    names: list[str] | None = None,
    seed: int = EVAL_NOISE_SEED,
):
    """A model on whole [0, 1] test planes of any sizes at each awgn sigma,
    through the folder denoiser's tiling. Returns ``(metrics, noisy,
    denoised)``: :func:`denoiser.core.metrics.evaluate_per_sigma`'s result and the
    images per sigma (the model's outputs clipped to [0, 1])."""
    from denoiser.core.metrics import evaluate_per_sigma

    spec = tile_spec_for_model(model, architecture)
    predict = BatchPredictor(model, batch_size)
    noisy = {float(s): noisy_planes(clean, s, seed) for s in sigmas}
    flat = [y for s in noisy for y in noisy[s]]
    outputs = iter(np.clip(d, 0.0, 1.0) for d in denoise_planes(flat, spec, predict))
    denoised = {s: [next(outputs) for _ in clean] for s in noisy}
    return evaluate_per_sigma(clean, noisy, denoised, names), noisy, denoised


def centre_crop(plane: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` square (smaller sides kept whole)."""
    h, w = plane.shape[:2]
    y, x = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return plane[y : y + size, x : x + size]
