"""The run ledger (``$PREFECT_HOME/denoise-runs/``): every flow run of these
flows records its process when it starts running and forgets it when it
ends. A run whose process died without reporting (killed, or the API was
gone) is marked Crashed by the next run that starts, instead of staying
RUNNING forever. :data:`STATE_HOOKS` are the flows' hooks that keep it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from denoiser.core.files import pid_alive, write_json_atomic

logger = logging.getLogger("denoise.session")

# ----------------------------------------------------------------- the run ledger


def _ledger_dir() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()).expanduser() / "denoise-runs"


def process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def run_alive(entry: dict) -> bool:
    pid = entry.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    return entry.get("started") is None or process_start(pid) == entry.get("started")


def record_running(flow, flow_run, state) -> None:
    """Flow hook (on_running): note this process, then mark dead ones Crashed."""
    folder = _ledger_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        entry = {
            "flow_run_id": str(flow_run.id),
            "flow": flow.name,
            "name": flow_run.name,
            "pid": os.getpid(),
            "started": process_start(os.getpid()),
            "host": socket.gethostname(),
        }
        write_json_atomic(folder / f"{flow_run.id}.json", entry)
    except OSError as exc:
        logger.debug("cannot write the run ledger: %s", exc)
    try:
        mark_crashed_runs()
    except Exception as exc:  # noqa: BLE001 - book-keeping must never fail a run
        logger.warning(
            "cannot mark the runs of dead processes Crashed: %s: %s", type(exc).__name__, exc
        )


def forget_run(flow, flow_run, state) -> None:
    """Flow hook (on_completion, on_failure, on_cancellation, on_crashed)."""
    (_ledger_dir() / f"{flow_run.id}.json").unlink(missing_ok=True)


def release_training_runs(flow, flow_run, state) -> None:
    """Flow hook (on_failure, on_cancellation, on_crashed): a run that trained
    but failed later (evaluation, registration) lets go of its checkpoint, so a
    rerun resumes it even while this process lives on (a served deployment)."""
    from denoiser.learning.checkpoints import release_open_runs

    for run_dir in release_open_runs(str(flow_run.id)):
        logger.info("released training run %s: a rerun resumes it", run_dir)


STATE_HOOKS = {
    "on_running": [record_running],
    "on_completion": [forget_run],
    "on_failure": [forget_run, release_training_runs],
    "on_cancellation": [forget_run, release_training_runs],
    "on_crashed": [forget_run, release_training_runs],
}


def mark_crashed_runs() -> list[str]:
    """Runs recorded by processes of this host that died while the run was
    not final: set them (and their unfinished task runs) Crashed. Returns
    their ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    folder = _ledger_dir()
    if not folder.is_dir():
        return []
    host = socket.gethostname()
    marked = []
    with get_client(sync_client=True) as client:
        for path in folder.glob("*.json"):
            try:
                entry = json.loads(path.read_text())
                run_id = entry["flow_run_id"]
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)  # not an entry of ours
                continue
            if entry.get("host") != host or run_alive(entry):
                continue
            try:
                run = client.read_flow_run(run_id)
            except ObjectNotFound:  # another server's run, or deleted: nothing to mark
                path.unlink(missing_ok=True)
                continue
            except Exception:  # noqa: BLE001 - the API is not answering now: the next run tries again
                continue
            if run.state is not None and not run.state.is_final():
                message = (
                    f"the denoise process (pid {entry.get('pid')}) ended without reporting this run; "
                    "marked Crashed by a later run"
                )
                unfinished = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                    task_run_filter=TaskRunFilter(
                        state=TaskRunFilterState(
                            type=TaskRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING])
                        )
                    ),
                )
                for task_run in unfinished:
                    client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                logger.warning(
                    "flow run %s (%s) was left %s by a dead process; marked Crashed",
                    entry.get("name"),
                    run_id,
                    run.state.name,
                )
                marked.append(run_id)
            path.unlink(missing_ok=True)
    return marked
