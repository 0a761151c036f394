"""Tasks of a folder run on Dask: the models loaded on every worker before
the chunks are sent (imported only on that path: it needs distributed)."""

from __future__ import annotations

import hashlib
import time

from distributed.diagnostics.plugin import WorkerPlugin
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger

from tasks.denoise import _predictor, needed_models, one_line

try:
    from prefect_dask import DaskTaskRunner
except ImportError:  # pragma: no cover - checked by flows.denoising.dask_task_runner
    DaskTaskRunner = object


class QuietDaskTaskRunner(DaskTaskRunner):
    """Prefect's DaskTaskRunner whose local cluster's processes ignore the
    terminal's Ctrl-C (the command stops them) and keep failed runs'
    tracebacks off the terminal, as the command does."""

    @property
    def client(self):
        """The client; the cluster (created on first use) starts its worker
        processes with SIGINT ignored."""
        if self._client:  # made: SIGINT stays the command's (a Ctrl-C here is not lost)
            return self._client
        from tasks.terminal import sigint_ignored_by_children

        with sigint_ignored_by_children():
            return super().client


class ModelOnWorkers(WorkerPlugin):
    """Loads the models the folder's images were seen to need
    (:func:`tasks.denoise.needed_models`) when a worker starts (or joins
    later, such as one restarted after a crash), so that chunks find them
    loaded (a model needed by an image the survey missed is loaded by the
    first chunk that reaches one)."""

    def __init__(self, model: dict):
        self.model = model
        key = ";".join(
            f"{m['model_path']}:{m.get('model_sha256')}:{m.get('runtime')}:{m.get('self_ensemble')}"
            for m in needed_models(model)
        )
        self.name = f"denoise-model-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def setup(self, worker) -> None:
        from tasks.terminal import quiet_run_failures

        quiet_run_failures()  # the worker's failed task runs: one line from the command
        # loads the run's runtime; TensorFlow's C++ start-up lines only with --debug
        for model in needed_models(self.model):
            _predictor(model)


@task(name="load_denoiser_on_workers", cache_policy=NO_CACHE)
def load_denoiser_on_workers(model: dict) -> dict:
    """Load the model on every Dask worker of this run's task runner before
    the chunks are sent, all at once (a worker that fails to load it is
    warned about; its chunks then try again and report why). The plugin's
    name, to take it off the cluster at the end, and how many workers there are."""
    logger = get_run_logger()
    client = FlowRunContext.get().task_runner.client
    plugin = ModelOnWorkers(model)
    started = time.perf_counter()
    try:
        client.register_plugin(plugin)
    except Exception as exc:  # noqa: BLE001 - the chunks report it per file
        logger.warning("the model did not load on every worker: %s", one_line(exc))
        return {"plugin": plugin.name, "workers": count_workers(client)}
    workers = count_workers(client)
    logger.info("model loaded on %d workers in %.1f s", workers, time.perf_counter() - started)
    return {"plugin": plugin.name, "workers": workers}


def count_workers(client) -> int:
    try:
        return max(1, len(client.scheduler_info().get("workers", {})))
    except Exception:  # noqa: BLE001 - only sizes the chunks
        return 1


def unload_denoiser_from_workers(loaded: dict) -> None:
    """Take the plugin off the cluster (workers that join later need not load the model)."""
    try:
        FlowRunContext.get().task_runner.client.unregister_worker_plugin(loaded["plugin"])
    except Exception:  # noqa: BLE001, S110 - the cluster may be closing already
        pass
