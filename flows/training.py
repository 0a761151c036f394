"""The training flow: download, corrupt, train, evaluate. Wiring only; the
work lives in ``tasks`` and ``denoiser``."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from artifacts.store import resolve_store_root
from denoiser.config import DataConfig, EvalConfig, NoiseConfig, TrainConfig
from tasks.common import unless_output_missing
from tasks.corrupt import shards_marker, write_noisy_shards
from tasks.download import download_dataset, download_marker
from tasks.evaluate import evaluate_denoiser
from tasks.register import register_model_version
from tasks.train import train_autoencoder


@flow(name="train-denoiser", log_prints=True, validate_parameters=True)
def train_pipeline(
    data: DataConfig = DataConfig(),
    noise: NoiseConfig = NoiseConfig(),
    training: TrainConfig = TrainConfig(),
    evaluation: EvalConfig = EvalConfig(),
    store: str | None = None,
) -> dict[str, Any]:
    """Learn a denoiser from a dataset; every step leaves files in the store
    and an artifact in the UI. Returns a small summary for the caller."""
    logger = get_run_logger()
    store_root = str(resolve_store_root(store))
    # cached across runs, unless the files a cached result names were deleted
    dataset = unless_output_missing(download_dataset, download_marker(data, store_root))(data, store_root)
    limits = (data.train_limit, data.test_limit)
    write = unless_output_missing(write_noisy_shards, shards_marker(dataset, noise, store_root, *limits))
    shards_dir = write(dataset, noise, store_root, *limits)
    model = train_autoencoder(shards_dir, training, store_root)
    metrics = evaluate_denoiser(model["dir"], shards_dir, evaluation)
    if not metrics["passed"]:
        logger.warning(
            "Model %s FAILED the quality gate: PSNR gain %.2f dB < %.2f dB required",
            model["version"], metrics["psnr_gain"], evaluation.min_psnr_gain,
        )
    registry = register_model_version(model["dir"], metrics, store_root)
    return {"store": store_root, "shards": shards_dir, "model": model, "metrics": metrics,
            "registry": registry}
