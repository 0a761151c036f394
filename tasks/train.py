"""Task: train a denoiser on a shard set; a new model version each run.
The work is :func:`artifacts.training.train_into_store`; here: the progress
and epoch lines while it trains, and the losses and the model card in the UI."""

from __future__ import annotations

import sys
import time

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from artifacts.render import loss_rows, render_model_card, table_rows
from artifacts.store import Store
from artifacts.training import train_into_store
from denoiser.config import TrainConfig, train_command
from denoiser.core.cards import ModelCard
from denoiser.data.shards import split_rows
from denoiser.learning.checkpoints import CheckpointRun
from denoiser.learning.progress import SCORED_IMAGES, epoch_line
from tasks.publish import ProgressArtifact, Publisher


@task(name="train_autoencoder", cache_policy=NO_CACHE, retries=0)
def train_autoencoder(shards_dir: str, training: TrainConfig, store: Store | str) -> dict:
    logger = get_run_logger()
    publisher = Publisher(logger)
    watch = _TrainingWatch(
        publisher, logger, min(SCORED_IMAGES, split_rows(shards_dir, "validation"))
    )
    try:
        result, card = train_into_store(
            Store.at(store),
            shards_dir,
            training,
            training_command=train_command(flow_run.parameters) if flow_run.parameters else None,
            flow_run_id=str(flow_run.id) if flow_run.id else None,
            on_start=watch.start,
            on_epoch_end=watch.epoch_end,
            log=logger.info,
            show_progress=sys.stderr.isatty(),  # a bar on a terminal; logs get the lines only
        )
    except BaseException:
        publisher.close(timeout=1)  # its thread ends with the task, whatever ended it
        raise
    watch.finish(result)
    _publish(publisher, card, watch.scored)
    publisher.close()
    return result


class _TrainingWatch:
    """The training as it goes: a progress artifact and one log line per epoch."""

    def __init__(self, publisher: Publisher, logger, scored: int):
        self.publisher, self.logger, self.scored = publisher, logger, scored
        self.progress: ProgressArtifact | None = None
        self.started = time.monotonic()

    def start(self, run: CheckpointRun) -> None:
        self.progress = ProgressArtifact(
            self.publisher, "training-progress", f"Training {run.version}"
        )
        self.progress.update(0.0)

    def epoch_end(self, epoch: int, epochs: int, logs: dict) -> None:
        self.progress.update(100.0 * epoch / epochs)
        elapsed = time.monotonic() - self.started
        self.logger.info(epoch_line(epoch, epochs, logs, elapsed, self.scored))

    def finish(self, result: dict) -> None:
        if self.progress is not None:
            self.progress.update(100.0)
        self.logger.info(
            "trained %s on %s in %.1f s (%d epochs); model in %s",
            result["version"],
            result["device"],
            result["seconds"],
            result["epochs_run"],
            result["dir"],
        )


def _publish(publisher: Publisher, card: ModelCard, scored: int) -> None:
    """The losses per epoch and the model card in the UI."""
    publisher.publish(
        create_table_artifact,
        key="training-losses",
        table=table_rows(loss_rows(card)),
        description=f"Validation PSNR (dB), SSIM and loss per epoch of {card.version} "
        f"(PSNR and SSIM on the first {scored} validation images)",
    )
    publisher.publish(
        create_markdown_artifact,
        key="model-card",
        markdown=render_model_card(card),
        description=f"Model card of {card.version}",
    )
