"""The Prefect API a ``denoise`` command talks to: its server's lifecycle,
and what happens when it goes away.

- :func:`ensure_api`: without ``PREFECT_API_URL`` a command uses the server
  ``denoise server start`` keeps for this PREFECT_HOME (:func:`kept_server_url`),
  else starts a temporary local server; a guard process kills that server
  when the command dies, however it dies (SIGKILL included), so no server is
  left behind.
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
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from denoiser.core.files import pid_alive, write_text_atomic

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


def prefect_home() -> Path:
    """PREFECT_HOME as Prefect resolves it, read without importing Prefect."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def api_answers(url: str, timeout: float = 1.0) -> bool:
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
    pid_file = prefect_home() / "server.pid"
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
        url = json.loads((prefect_home() / KEPT_SERVER_FILE).read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if isinstance(url, str) and api_answers(url) else None


def start_kept_server(port: int, timeout: float = 120) -> tuple[str, bool]:
    """Start a Prefect server in the background (``prefect server start
    --background``) on 127.0.0.1:``port`` for this PREFECT_HOME, and record
    its URL for later commands. Returns (API URL, whether it was started now);
    one that already answers is kept as it is."""
    import time

    from denoiser.core.errors import ConfigError

    url = kept_server_url()
    if url:
        return url, False
    url = f"http://127.0.0.1:{port}/api"
    if api_answers(url, timeout=0.5):
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
    while not api_answers(url):
        if time.monotonic() > deadline:
            stop_kept_server()
            raise ConfigError(
                f"the Prefect server on port {port} did not answer in {timeout:.0f} s"
            )
        time.sleep(0.3)
    write_text_atomic(prefect_home() / KEPT_SERVER_FILE, json.dumps({"url": url}))
    return url, True


def stop_kept_server() -> bool:
    """Stop the server ``denoise server start`` started for this PREFECT_HOME
    (``prefect server stop``); False when none was running."""
    record = prefect_home() / KEPT_SERVER_FILE
    was = record.exists() or (prefect_home() / "server.pid").exists()
    record.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    subprocess.run(
        [sys.executable, "-m", "prefect", "server", "stop"],
        env=env,
        capture_output=True,
        check=False,
    )
    return was


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
