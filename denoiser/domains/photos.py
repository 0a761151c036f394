"""What grey and colour photographs share: patch shards with the noise added
in training (blind awgn), the photo recipe's checks and defaults, evaluation
of whole test images at each sigma (float protocol), and what makes an image
look like a photograph. Each photo domain is these parts made for its
number of channels."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from denoiser.config import EvalConfig, NoiseConfig, TrainConfig
from denoiser.core.cards import ModelCard
from denoiser.core.errors import ConfigError
from denoiser.data.image_datasets import DEFAULT_PATCH_SIZE
from denoiser.data.noise import PHOTO_SIGMA_RANGE
from denoiser.data.shards import load_split, read_manifest, write_patch_set
from denoiser.domains.base import Domain, Judged
from denoiser.imaging.images import LoadedImage
from denoiser.imaging.plots import grid_png
from denoiser.nets.models import architecture_recipe
from denoiser.runtimes.inference import EVAL_NOISE_SEED, centre_crop, evaluate_planes

PHOTO_MIN_SIDE = 64  # larger on both sides than this: not a 28x28-style digit image
SATURATED_SHARE = 0.5  # more of the pixels than this at black or white: line art, digits, text
CROP = 128  # side of the report's crops, shown at 1:1
CROP_SIGMA = 25.0  # the report's crops are at this sigma (or the nearest one evaluated)
CROP_IMAGES = 4


def blind_awgn() -> NoiseConfig:
    """The literature's blind training noise: awgn, sigma uniform in [0, 55]."""
    return NoiseConfig(kind="awgn", level=PHOTO_SIGMA_RANGE, level_density="uniform")


def looks_like_photo(image: LoadedImage) -> bool:
    """Larger than 64x64 and not mostly saturated (pure black or white), which
    28x28 digits on black, and other near-binary images, are."""
    plane = image.luma
    h, w = plane.shape[:2]
    saturated = float(np.mean((plane <= 0.02) | (plane >= 0.98)))
    return min(h, w) > PHOTO_MIN_SIDE and saturated < SATURATED_SHARE


def resolve_photo_request(
    noise: NoiseConfig, training: TrainConfig, channels: int, words: str
) -> tuple[NoiseConfig, TrainConfig]:
    """The photo recipe's checks (awgn, a fully convolutional architecture of
    ``channels`` channels, a patch size it takes), then what the user left
    unset from the architecture's recipe (patch size, batch size, epochs)."""
    if noise.kind != "awgn":
        raise ConfigError(
            f"invalid noise.kind: {words} train with awgn, added fresh to "
            f"every batch, not {noise.kind}",
            field="noise.kind",
        )
    recipe = architecture_recipe(training.architecture)
    if not recipe.fully_convolutional:
        raise ConfigError(
            f"invalid training.architecture: {training.architecture} takes "
            f"{tuple(recipe.input_shape[:2])} images only; {words} need a fully "
            "convolutional one",
            field="training.architecture",
        )
    taken = (recipe.input_shape or (None, None, 1))[-1]
    if taken != channels:
        raise ConfigError(
            f"invalid training.architecture: {training.architecture} takes "
            f"{taken}-channel images; {words} have {channels}",
            field="training.architecture",
        )
    size = noise.patch_size or recipe.patch_size or DEFAULT_PATCH_SIZE
    if size % recipe.size_multiple:
        raise ConfigError(
            f"invalid noise.patch_size: {size} is not a multiple of "
            f"{training.architecture}'s size multiple {recipe.size_multiple}",
            field="noise.patch_size",
        )
    if noise.patch_size is None and recipe.patch_size:
        noise = noise.model_copy(update={"patch_size": recipe.patch_size})
    unset = {
        k: getattr(recipe, k)
        for k in ("batch_size", "epochs")
        if getattr(recipe, k) is not None and k not in training.model_fields_set
    }
    if unset:
        training = TrainConfig.model_validate(
            {
                **training.model_dump(exclude_unset=True),
                **unset,
                "architecture": training.architecture,
            }
        )
    return noise, training


def evaluate_photos(
    model, card: ModelCard, shards_dir: str, evaluation: EvalConfig, channels: int
) -> Judged:
    """A patch set's whole test images at every sigma of ``evaluation.sigmas``
    (unclipped awgn in every channel, one fixed draw), through the folder
    denoiser's tiling: metrics per image and per sigma (PSNR over all
    channels), 1:1 crops of a few images, the tables and the caption."""
    manifest = read_manifest(shards_dir)
    test = load_split(shards_dir, "test")
    clean = [
        np.asarray(x[..., 0] if channels == 1 else x, np.float32) / 255.0 for x in test["clean"]
    ]
    entries = manifest.get("images") or []
    names = [entries[int(i)]["name"] if int(i) < len(entries) else str(i) for i in test["index"]]
    metrics, noisy, denoised = evaluate_planes(
        model, card.architecture, clean, evaluation.sigmas, evaluation.batch_size, names
    )
    sigma = min(noisy, key=lambda s: abs(s - CROP_SIGMA))
    k = min(evaluation.sample_count, CROP_IMAGES, len(clean))
    side = min(CROP, *(min(c.shape[:2]) for c in clean[:k]))
    crops = [
        np.stack([centre_crop(np.clip(p, 0.0, 1.0), side) for p in planes[:k]])
        for planes in (clean, noisy[sigma], denoised[sigma])
    ]
    samples = grid_png(crops, scale=1)
    rows = [
        {"group": f"sigma {r['sigma']:g}", **{c: v for c, v in r.items() if c != "sigma"}}
        for r in metrics["per_sigma"]
    ]
    rows.append(
        {
            "group": "mean over sigmas",
            **{c: v for c, v in metrics["overall"].items() if c != "sigmas"},
        }
    )
    rows += [
        {
            "group": f"{r['image']} sigma {r['sigma']:g}",
            "count": 1,
            **{c: v for c, v in r.items() if c not in ("image", "sigma", "height", "width")},
        }
        for r in metrics["per_image"]
    ]
    o = metrics["overall"]
    table = [
        {
            "sigma": f"{r['sigma']:g}" if "sigma" in r else "mean",
            "PSNR noisy (dB)": r["psnr_noisy"],
            "PSNR denoised (dB)": r["psnr_denoised"],
            "gain (dB)": r["psnr_gain"],
            "SSIM noisy": r["ssim_noisy"],
            "SSIM denoised": r["ssim_denoised"],
        }
        for r in [*metrics["per_sigma"], {k2: v for k2, v in o.items() if k2 != "sigmas"}]
    ]
    where = "in each of R, G and B, PSNR over the RGB image" if channels == 3 else ""
    caption = (
        f"Noise: awgn at each sigma (0-255 units){' ' + where if where else ''}, unclipped, one "
        f"fixed draw (seed {EVAL_NOISE_SEED}); whole images through the folder denoiser's tiling. "
        f"Rows: clean, noisy, denoised; central {side}x{side} crops at 1:1 of {k} test image(s) "
        f"at sigma {sigma:g}."
    )
    return Judged(metrics, samples, rows, table, caption)


def photo_domain(
    name: str,
    words: str,
    channels: int,
    architecture: str,
    train_hint: str,
    recognises: Callable[[LoadedImage], bool],
    fallbacks: tuple[str, ...],
) -> Domain:
    """A photo domain of ``channels`` channels: patch shards with blind awgn
    drawn in training, the photo recipe's checks, the photo evaluation, its
    own model for the folder pipeline."""
    return Domain(
        name=name,
        words=words,
        channels=channels,
        shard_kind="patches",
        default_architecture=architecture,
        train_hint=train_hint,
        default_noise=blind_awgn,
        write_shards=partial(write_patch_set, channels=channels, domain=name),
        evaluate=partial(evaluate_photos, channels=channels),
        resolve_request=partial(resolve_photo_request, channels=channels, words=words),
        recognises=recognises,
        folder_domain=name,
        fallbacks=fallbacks,
        orientation_free=True,
    )
