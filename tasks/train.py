"""Task: train a denoiser on a shard set; a new model version each run."""

from __future__ import annotations

import hashlib
import json
import shutil

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from artifacts.render import markdown_table, table_rows
from artifacts.store import Store, new_model_version
from denoiser.config import TrainConfig
from denoiser.training import train_model


def _backup_key(shards_dir: str, training: TrainConfig) -> str:
    """Same request, same backup folder: a restarted run resumes from it."""
    payload = json.dumps({"shards": shards_dir, "training": training.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@task(name="train_autoencoder", cache_policy=NO_CACHE, retries=0)
def train_autoencoder(shards_dir: str, training: TrainConfig, store_root: str) -> dict:
    logger = get_run_logger()
    training = TrainConfig.model_validate(training)
    store = Store.at(store_root)
    version = new_model_version(training.architecture)
    out_dir = store.model_dir(version)
    backup_dir = store.root / "checkpoints" / _backup_key(shards_dir, training)
    if (backup_dir / "history.jsonl").exists():
        logger.info("resuming an interrupted training from %s", backup_dir)
    progress = create_progress_artifact(progress=0.0, key="training-progress",
                                        description=f"Training {version}")

    def on_epoch_end(epoch: int, epochs: int, logs: dict) -> None:
        update_progress_artifact(progress, progress=100.0 * epoch / epochs)
        logger.info("epoch %d/%d: loss %.5f, val_loss %.5f (%.1f s)", epoch, epochs,
                    logs.get("loss", float("nan")), logs.get("val_loss", float("nan")),
                    logs.get("seconds", 0.0))

    result = train_model(shards_dir, training, out_dir, backup_dir, version=version,
                         on_epoch_end=on_epoch_end)
    update_progress_artifact(progress, progress=100.0)
    shutil.rmtree(backup_dir, ignore_errors=True)
    logger.info("trained %s on %s in %.1f s (%d epochs); model in %s", version, result["device"],
                result["seconds"], result["epochs_run"], result["dir"])

    card = json.loads((out_dir / "model.json").read_text())
    losses = [{k: h.get(k) for k in ("epoch", "loss", "val_loss", "seconds")} for h in card["history"]]
    create_table_artifact(key="training-losses", table=table_rows(losses),
                          description=f"Loss per epoch of {version}")
    create_markdown_artifact(key="model-card", markdown=render_model_card(card),
                             description=f"Model card of {version}")
    return result


def render_model_card(card: dict) -> str:
    gate = card.get("quality_gate")
    facts = [
        {"field": "version", "value": card["version"]},
        {"field": "architecture", "value": card["architecture"]},
        {"field": "parameters", "value": f"{card['params']:,}"},
        {"field": "loss", "value": card["recipe"]["loss"]},
        {"field": "learning rate", "value": f"{card['recipe']['learning_rate']:g} "
                                            f"({card['recipe']['lr_schedule']})"},
        {"field": "reframed pairs", "value": f"{card['recipe']['reframe']:.0%}"},
        {"field": "device", "value": card["device"]["description"]},
        {"field": "training time (s)", "value": card["seconds"]},
        {"field": "epochs run", "value": card["epochs_run"]},
        {"field": "best validation loss", "value": card["best_val_loss"]},
        {"field": "data manifest sha256", "value": card["data"]["manifest_sha256"]},
        {"field": "shards", "value": card["data"]["shards_dir"]},
        {"field": "TensorFlow / Keras", "value": f"{card['versions']['tensorflow']} / {card['versions']['keras']}"},
    ]
    if gate:
        facts.append({"field": "quality gate", "value": "PASSED" if gate["passed"] else "FAILED"})
    config = "\n".join(f"- `{k}`: {v}" for k, v in card["training"].items())
    return (f"# Model card: {card['version']}\n\n{markdown_table(facts)}\n\n"
            f"## Training config\n\n{config}\n\n## Noise\n\n`{json.dumps(card['data']['noise'])}`\n")
