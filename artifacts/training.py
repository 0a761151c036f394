"""Training into the store: the model made in a local folder laid out like the
store (the store's own when it is local) and, for a remote store, pushed with
its card last, so that no reader sees a card without its model."""

from __future__ import annotations

import logging
from collections.abc import Callable

from artifacts.builtin import builtin_model
from artifacts.registry import production_model
from artifacts.resolution import resolve_model
from artifacts.store import Stage, Store, new_model_version
from denoiser.config import TrainConfig
from denoiser.core.cards import CARD_FILE, ModelCard, record_training_command
from denoiser.core.errors import ModelError
from denoiser.learning.checkpoints import CheckpointRun
from denoiser.learning.training import train_in_run
from denoiser.nets.models import grows_from

logger = logging.getLogger(__name__)


def train_into_store(
    store: Store,
    shards_dir: str,
    training: TrainConfig,
    training_command: str | None = None,
    flow_run_id: str | None = None,
    on_start: Callable[[CheckpointRun], None] | None = None,
    on_epoch_end: Callable[[int, int, dict], None] | None = None,
    log: Callable[..., None] = logger.info,
    show_progress: bool = False,
) -> tuple[dict, ModelCard]:
    """Train a new model version of ``store`` as one checkpoint run
    (:func:`denoiser.learning.training.train_in_run`: a remote store keeps the runs, so a
    rerun anywhere resumes them), record ``training_command`` in its card, and
    return the result (its locations in the store) and the card. A resumed
    run of a remote store may have saved (even pushed and registered) its model
    already: that folder is staged first, so it is reused as it is."""
    with store.stage() as stage:

        def start(run: CheckpointRun) -> None:
            if run.resumed and stage.syncs:
                stage.pull(store.model(run.version))
            if on_start is not None:
                on_start(run)

        result = train_in_run(
            shards_dir,
            with_warm_start(store, stage, training),
            stage.models_root,
            store.checkpoints_root,
            lambda: new_model_version(training.architecture),
            flow_run_id=flow_run_id,
            on_start=start,
            on_epoch_end=on_epoch_end,
            log=log,
            show_progress=show_progress,
            objects=store,
            checkpoints_url=store.checkpoints_url,
        )
        card = record_training_command(result["dir"], training_command)
        stage.push(result["dir"])  # the card last: no card without its model
        return stage.to_urls(result), card


def with_warm_start(store: Store, stage: Stage, training: TrainConfig) -> TrainConfig:
    """``training`` with its warm start made concrete (a local ``.keras``
    file): the model it names (a version of the store's or a built-in one, a
    folder or a file), else, for an architecture grown from another domain's
    model, the store's production model of that domain, else the package's
    built-in one."""
    domain = grows_from(training.architecture)
    if training.warm_start:
        seed = resolve_model(store, training.warm_start)
    elif domain:
        seed = production_model(store.url, domain) or builtin_model(domain)
        if seed is None:
            raise ModelError(
                f"{training.architecture} starts from a model of {domain}: there is none in "
                f"{store.url} and none built in"
            )
    else:
        return training
    path = seed.model_path
    if stage.syncs and str(seed.dir).startswith(store.url):
        # the model and its card (the new card's grown_from), nothing else of its folder
        path = (
            stage.pull(store.model(seed.version), files=(CARD_FILE, "model.keras")) / "model.keras"
        )
    return training.model_copy(update={"warm_start": str(path)})
