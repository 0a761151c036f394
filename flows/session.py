"""What a ``denoise`` command owes the Prefect API around its flow runs.

- :func:`ensure_api`: without ``PREFECT_API_URL`` a command uses the server
  ``denoise server start`` keeps for this PREFECT_HOME (:func:`kept_server_url`),
  else starts a temporary local server; a guard process kills that server
  when the command dies, however it dies (SIGKILL included), so no server is
  left behind.
- A run ledger (``$PREFECT_HOME/denoise-runs/``): every flow run of these
  flows records its process when it starts running and forgets it when it
  ends. A run whose process died without reporting (killed, or the API was
  gone) is marked Crashed by the next run that starts, instead of staying
  RUNNING forever.
- :func:`finished_despite_api`: when the API goes away during a command, the
  data work still finishes (tasks publish best-effort, see
  :mod:`tasks.publish`); the command then reports the finished work instead
  of Prefect's connection error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from denoiser.files import pid_alive, write_json_atomic, write_text_atomic

logger = logging.getLogger("denoise.session")

# ----------------------------------------------------------------- temporary server

_GUARD = """
import os, signal, sys, time
pid = int(sys.argv[1])
sys.stdin.buffer.read()          # returns when the command exits or is killed
try:
    os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        os.kill(pid, 0)
    os.kill(pid, signal.SIGKILL)
except ProcessLookupError:
    pass
"""

_guards: list[subprocess.Popen] = []  # kept open: their pipes close when this process ends
# whether this command started a temporary server: one that dies with the command, and
# with it what the server keeps in memory (the leases of concurrency slots, flows/limits.py)
TEMPORARY_SERVER = False


def _guard(pid: int) -> None:
    _guards.append(
        subprocess.Popen(
            [sys.executable, "-c", _GUARD, str(pid)],
            stdin=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
    )


def ensure_api(on_spawn: Callable[[], None] | None = None) -> str:
    """The API URL this command talks to; starts a guarded temporary server
    when none is configured (Prefect's own code then reuses it). The guard
    starts with the server's process, before its start-up wait, so a command
    killed while the server boots leaves nothing behind either. ``on_spawn``
    is called once the server's process exists."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return url
    from prefect.server.api.server import SubprocessASGIServer

    global TEMPORARY_SERVER
    TEMPORARY_SERVER = True
    server = SubprocessASGIServer()  # the instance Prefect's clients look up
    if not server.running:
        spawn = server._run_uvicorn_command  # called again if the first port was taken

        def spawn_guarded():
            proc = spawn()
            _guard(proc.pid)
            if on_spawn:
                on_spawn()
            return proc

        server._run_uvicorn_command = spawn_guarded
    server.start()
    return server.api_url


def start_api() -> Callable[[], str]:
    """:func:`ensure_api` begun in a thread, so that a temporary server boots
    in its own process while this one imports TensorFlow and loads the model
    (two cores at work instead of one after the other). Returns once the
    server's process exists (before TensorFlow's import silences file
    descriptor 2, which the server inherits); the function it returns waits
    for the server and gives its URL, or raises what ensure_api raised."""
    spawned = threading.Event()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["url"] = ensure_api(on_spawn=spawned.set)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by wait()
            outcome["error"] = exc
        finally:
            spawned.set()

    thread = threading.Thread(target=run, name="start-prefect-server", daemon=True)
    thread.start()
    spawned.wait()

    def wait() -> str:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["url"]

    return wait


# ----------------------------------------------------------------- a kept local server

KEPT_SERVER_FILE = "denoise-server.json"  # in PREFECT_HOME: the URL of `denoise server start`'s


def _prefect_home() -> Path:
    """PREFECT_HOME as Prefect resolves it, read without importing Prefect."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def _answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Prefect API answers at ``url``: its health check says
    ``true`` and its version is a version (a server answering 200 to
    everything is not one)."""
    import re
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            if response.status != 200 or json.loads(response.read(64)) is not True:
                return False
        with urllib.request.urlopen(f"{url}/admin/version", timeout=timeout) as response:
            version = json.loads(response.read(64))
    except (OSError, ValueError):
        return False
    return isinstance(version, str) and re.fullmatch(r"\d+\.\d+\S*", version) is not None


def _remove_stale_pid_file() -> None:
    """``prefect server start --background`` refuses to start while its pid
    file exists, even when that server was killed: remove a file whose
    process is gone."""
    pid_file = _prefect_home() / "server.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        pid = None
    if pid_file.exists() and (pid is None or not pid_alive(pid)):
        pid_file.unlink(missing_ok=True)


def kept_server_url() -> str | None:
    """The API URL of the server ``denoise server start`` left running for
    this PREFECT_HOME, when it answers; commands without ``PREFECT_API_URL``
    use it instead of starting a temporary server (about 10 s here)."""
    try:
        url = json.loads((_prefect_home() / KEPT_SERVER_FILE).read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if isinstance(url, str) and _answers(url) else None


def start_kept_server(port: int, timeout: float = 120) -> tuple[str, bool]:
    """Start a Prefect server in the background (``prefect server start
    --background``) on 127.0.0.1:``port`` for this PREFECT_HOME, and record
    its URL for later commands. Returns (API URL, whether it was started now);
    one that already answers is kept as it is."""
    import time

    from denoiser.errors import ConfigError

    url = kept_server_url()
    if url:
        return url, False
    url = f"http://127.0.0.1:{port}/api"
    if _answers(url, timeout=0.5):
        raise ConfigError(f"port {port} already serves an API; choose another with --port")
    _remove_stale_pid_file()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # PREFECT_UI_URL: the run links in alerts' messages (flows/alerts.py) point at this UI
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=url,
        PREFECT_UI_URL=url.removesuffix("/api"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", "server", "start", "--background"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        said = " ".join((proc.stderr + proc.stdout).split())  # one line, however it was wrapped
        raise ConfigError(f"the Prefect server did not start: {said[-300:] or '?'}")
    deadline = time.monotonic() + timeout
    while not _answers(url):
        if time.monotonic() > deadline:
            stop_kept_server()
            raise ConfigError(
                f"the Prefect server on port {port} did not answer in {timeout:.0f} s"
            )
        time.sleep(0.3)
    write_text_atomic(_prefect_home() / KEPT_SERVER_FILE, json.dumps({"url": url}))
    return url, True


def stop_kept_server() -> bool:
    """Stop the server ``denoise server start`` started for this PREFECT_HOME
    (``prefect server stop``); False when none was running."""
    record = _prefect_home() / KEPT_SERVER_FILE
    was = record.exists() or (_prefect_home() / "server.pid").exists()
    record.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    subprocess.run(
        [sys.executable, "-m", "prefect", "server", "stop"],
        env=env,
        capture_output=True,
        check=False,
    )
    return was


# ----------------------------------------------------------------- the run ledger


def _ledger_dir() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()).expanduser() / "denoise-runs"


def _process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(entry: dict) -> bool:
    pid = entry.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    return entry.get("started") is None or _process_start(pid) == entry.get("started")


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
            "started": _process_start(os.getpid()),
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
    from denoiser.checkpoints import release_open_runs

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
            if entry.get("host") != host or _alive(entry):
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


# ----------------------------------------------------------------- losing the API


@dataclass
class Outcome:
    value: Any = None


def _is_api_failure(exc: BaseException) -> bool:
    import httpx

    from tasks.publish import api_unreachable

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (httpx.TransportError, OSError)) or api_unreachable():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def finished_despite_api(task_key: str) -> Iterator[Outcome]:
    """Runs a flow call; if Prefect fails because the API went away after the
    task named ``task_key`` finished its work, the task's result stands."""
    from tasks.publish import api_unreachable, recall_outcome

    outcome = Outcome()
    try:
        yield outcome
    except Exception as exc:
        finished = recall_outcome(task_key)
        if finished is None or not _is_api_failure(exc):
            raise
        outcome.value = finished
    if api_unreachable():
        print(
            "denoise: the Prefect API was unreachable during the run; the UI missed updates "
            "(the files and the report are complete)",
            file=sys.stderr,
        )


def install_signal_handlers() -> None:
    """SIGTERM ends a command as Ctrl-C does: the flow run is reported and the
    temporary server stopped, instead of both being left behind. (While a
    flow runs Prefect installs its own SIGTERM handler, to the same effect;
    stretches the work holds wait either way, see :mod:`denoiser.interrupts`.)"""
    from denoiser.interrupts import Terminated

    def terminate(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
