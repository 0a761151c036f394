"""Task: train a denoiser on a shard set; a new model version each run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from artifacts.render import markdown_table, table_rows
from artifacts.store import Store, new_model_version
from denoiser.cards import CARD_FILE, ModelCard, load_card
from denoiser.checkpoints import CheckpointRun
from denoiser.config import TrainConfig, train_command
from denoiser.files import write_text_atomic
from denoiser.progress import SCORED_IMAGES, epoch_line
from denoiser.shards import split_rows
from denoiser.training import train_in_run
from tasks.publish import ProgressArtifact, Publisher


@task(name="train_autoencoder", cache_policy=NO_CACHE, retries=0)
def train_autoencoder(shards_dir: str, training: TrainConfig, store_root: str) -> dict:
    logger = get_run_logger()
    store = Store.at(store_root)
    publisher = Publisher(logger)
    progress = None
    scored = min(SCORED_IMAGES, split_rows(shards_dir, "validation"))
    started = time.monotonic()

    stages: list = []

    def on_start(run: CheckpointRun) -> None:
        nonlocal progress
        if run.resumed and stages and stages[0].syncs:
            # a resumed run may have saved (even pushed and registered) its model already:
            # stage it, so that it is reused as it is instead of saved again
            stages[0].pull(stages[0].model_dir(run.version))
        progress = ProgressArtifact(publisher, "training-progress", f"Training {run.version}")
        progress.update(0.0)

    def on_epoch_end(epoch: int, epochs: int, logs: dict) -> None:
        progress.update(100.0 * epoch / epochs)
        logger.info(epoch_line(epoch, epochs, logs, time.monotonic() - started, scored))

    # a remote store's model is made on a local stage, then pushed
    try:
        with store.stage() as stage:
            stages.append(stage)
            result = train_in_run(
                shards_dir,
                training,
                stage.models_root,
                store.checkpoints_root,
                lambda: new_model_version(training.architecture),
                flow_run_id=str(flow_run.id) if flow_run.id else None,
                on_start=on_start,
                on_epoch_end=on_epoch_end,
                log=logger.info,
                show_progress=sys.stderr.isatty(),  # a bar on a terminal; logs get the lines only
                objects=store,
                checkpoints_url=store.checkpoints_url,  # a remote store keeps the runs
            )
            card = load_card(result["dir"])
            if flow_run.parameters and card.training_command is None:  # how to train it again
                card = card.model_copy(
                    update={"training_command": train_command(flow_run.parameters)}
                )
                write_text_atomic(Path(result["dir"]) / CARD_FILE, card.to_json())
            stage.push(result["dir"])  # the card last: no card without its model
            result = stage.to_urls(result)
    except BaseException:
        publisher.close(timeout=1)  # its thread ends with the task, whatever ended it
        raise
    if progress is not None:
        progress.update(100.0)
    version = result["version"]
    logger.info(
        "trained %s on %s in %.1f s (%d epochs); model in %s",
        version,
        result["device"],
        result["seconds"],
        result["epochs_run"],
        result["dir"],
    )

    columns = ("epoch", "val_psnr", "val_ssim", "loss", "val_loss", "seconds")
    losses = [{k: h.get(k) for k in columns} for h in card.history]
    publisher.publish(
        create_table_artifact,
        key="training-losses",
        table=table_rows(losses),
        description=f"Validation PSNR (dB), SSIM and loss per epoch of {version} "
        f"(PSNR and SSIM on the first {scored} validation images)",
    )
    publisher.publish(
        create_markdown_artifact,
        key="model-card",
        markdown=render_model_card(card),
        description=f"Model card of {version}",
    )
    publisher.close()
    return result


def render_model_card(card: ModelCard) -> str:
    recipe, data, gate = card.recipe, card.data, card.quality_gate
    facts = [
        {"field": "version", "value": card.version},
        {"field": "architecture", "value": card.architecture},
        {"field": "parameters", "value": f"{card.params:,}"},
        {"field": "loss", "value": recipe.loss},
        {
            "field": "learning rate",
            "value": f"{recipe.learning_rate:g} ({recipe.lr_schedule})",
        },
        {"field": "reframed pairs", "value": f"{recipe.reframe:.0%}"},
        {"field": "device", "value": card.device["description"]},
        {"field": "precision", "value": card.precision or "float32"},
        {"field": "training time (s)", "value": card.seconds},
        {"field": "epochs run", "value": card.epochs_run},
        {"field": "best validation loss", "value": card.best_val_loss},
        {
            "field": "trained on",
            "value": f"{data.dataset} ({data.domain or 'digits'}, {data.shard_kind}, "
            f"{data.channels or 1} channel{'s' if (data.channels or 1) > 1 else ''})",
        },
        {
            "field": "test images",
            "value": data.test_dataset or "the dataset's own test split",
        },
        {"field": "patch size", "value": data.patch_size or "whole images"},
        {"field": "data manifest sha256", "value": data.manifest_sha256},
        {"field": "shards", "value": data.shards_dir},
        {"field": "model file sha256", "value": card.model_sha256 or "not recorded"},
        {
            "field": "TensorFlow / Keras",
            "value": f"{card.versions['tensorflow']} / {card.versions['keras']}",
        },
    ]
    if gate:
        facts.append({"field": "quality gate", "value": "PASSED" if gate.passed else "FAILED"})
    config = "\n".join(f"- `{k}`: {v}" for k, v in card.training.items())
    return (
        f"# Model card: {card.version}\n\n{markdown_table(facts)}\n\n"
        f"## Training config\n\n{config}\n\n## Noise\n\n`{json.dumps(data.noise)}`\n"
    )
