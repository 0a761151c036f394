"""The training flow: download, corrupt, train, evaluate. Wiring only; the
work lives in ``tasks`` and ``denoiser``."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from artifacts.registry import open_store
from artifacts.resolution import with_seed_architecture
from denoiser.config import DataConfig, EvalConfig, NoiseConfig, TrainConfig
from denoiser.request import resolve_request
from flows.ledger import STATE_HOOKS
from flows.limits import hold_limit, limit_name
from tasks.corrupt import write_noisy_shards
from tasks.download import download_dataset
from tasks.evaluate import evaluate_denoiser
from tasks.register import register_model_version
from tasks.train import train_autoencoder


@flow(name="train-denoiser", log_prints=True, validate_parameters=True, **STATE_HOOKS)
def train_pipeline(
    data: DataConfig = DataConfig(),
    noise: NoiseConfig | None = None,
    training: TrainConfig = TrainConfig(),
    evaluation: EvalConfig = EvalConfig(),
    store: str | None = None,
) -> dict[str, Any]:
    """Learn a denoiser from a dataset; every step leaves files in the store
    and an artifact in the UI. Returns a small summary for the caller.
    Without ``noise`` the dataset's domain's own is used (photographs, grey
    or colour: the blind awgn model, sigma 0-55, scored at ``evaluation.sigmas``)."""
    logger = get_run_logger()
    # every check before any work, the command line's own call: the domain's defaults and
    # checks, the recipe made concrete, the store reachable with a registry that reads
    training = with_seed_architecture(store, data, training)  # a warm start's own layout
    request = resolve_request(data, noise, training, evaluation, store)
    store = open_store(request.store)
    store_root = store.url
    # each reuses its output found verified in the store (state Cached), else makes or repairs it;
    # such a task returns a State, so its value is taken from the run's state
    # one training at a time per store: a second one waits here (queued), it does not fail
    with hold_limit(limit_name("train", store_root), "the training of this store"):
        data = request.data
        dataset = download_dataset(data, store, return_state=True).result()
        limits = (data.train_limit, data.test_limit)
        shards = write_noisy_shards(dataset, request.noise, store, *limits, return_state=True)
        shards_dir = shards.result()
        model = train_autoencoder(shards_dir, request.training, store)
        # a failed gate comes in a state named "Gate failed", with its figures as the message
        metrics = evaluate_denoiser(
            model["dir"], shards_dir, request.evaluation, store, return_state=True
        ).result()
        if not metrics["passed"]:
            logger.warning(
                "Model %s FAILED the quality gate: PSNR gain %.2f dB < %.2f dB required",
                model["version"],
                metrics["psnr_gain"],
                request.evaluation.min_psnr_gain,
            )
        registry = register_model_version(
            model["dir"], metrics, store_root, model.get("checkpoint")
        )
    return {
        "store": store_root,
        "shards": shards_dir,
        "model": model,
        "metrics": metrics,
        "registry": registry,
    }
