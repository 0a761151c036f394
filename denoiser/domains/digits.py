"""Digits: 28x28 IDX images (MNIST and its kin), noisy/clean pairs written
once, scored per noise level and per label."""

from __future__ import annotations

from denoiser.config import EvalConfig, NoiseConfig, TrainConfig
from denoiser.core.cards import ModelCard
from denoiser.core.metrics import SCORES, evaluate_arrays
from denoiser.data.shards import load_split, write_pair_set
from denoiser.domains.base import Domain, Judged
from denoiser.imaging.images import LoadedImage
from denoiser.imaging.plots import grid_png
from denoiser.nets.models import DEFAULT_ARCHITECTURE, architecture_recipe
from denoiser.runtimes.inference import predict_array

TABLE_COLUMNS = ("group", "count", *SCORES, "bce_noisy", "bce_denoised")


def evaluate_pairs(model, card: ModelCard, shards_dir: str, evaluation: EvalConfig) -> Judged:
    """The test pairs as stored, scored overall, per noise level and per label."""
    recipe = architecture_recipe(card.architecture)
    test = load_split(shards_dir, "test")
    clean, noisy = test["clean"] / 255.0, test["noisy"] / 255.0
    denoised = predict_array(
        model,
        noisy,
        evaluation.batch_size,
        recipe.size_multiple if recipe.fully_convolutional else 1,
    )
    metrics = evaluate_arrays(clean, noisy, denoised, test.get("noise_level"), test.get("label"))
    overall = metrics["overall"]
    k = evaluation.sample_count
    samples = grid_png([clean[:k], noisy[:k], denoised[:k]], scale=3)
    rows = [{"group": "overall", **overall}]
    rows += [
        {"group": f"noise level {r['level']}", **{c: v for c, v in r.items() if c != "level"}}
        for r in metrics["per_level"]
    ]
    rows += [
        {"group": f"class {r['label']}", **{c: v for c, v in r.items() if c != "label"}}
        for r in metrics["per_class"]
    ]
    table = [
        {"": "noisy input", "PSNR (dB)": overall["psnr_noisy"], "SSIM": overall["ssim_noisy"]},
        {"": "denoised", "PSNR (dB)": overall["psnr_denoised"], "SSIM": overall["ssim_denoised"]},
    ]
    return Judged(
        metrics,
        samples,
        [{c: r.get(c) for c in TABLE_COLUMNS} for r in rows],
        table,
        "Rows: clean, noisy, denoised.",
    )


def resolve_digits_request(
    noise: NoiseConfig, training: TrainConfig
) -> tuple[NoiseConfig, TrainConfig]:
    """Digits take the request as it is."""
    return noise, training


def recognise_digits(image: LoadedImage) -> bool:
    """Any image: the domain a folder falls back to."""
    return True


DIGITS = Domain(
    name="digits",
    words="28x28 digits",
    channels=1,
    shard_kind="pairs",
    default_architecture=DEFAULT_ARCHITECTURE,
    train_hint="train one with `denoise train --dataset mnist`",
    default_noise=NoiseConfig,
    write_shards=write_pair_set,
    evaluate=evaluate_pairs,
    resolve_request=resolve_digits_request,
    recognises=recognise_digits,
    folder_domain="digits",
)
