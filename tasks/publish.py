"""Best-effort publishing to the Prefect API while the data work runs.

Artifacts, progress and logs are for people watching the UI; the files in the
store are the product. A task hands its API calls to :class:`Publisher`, which
makes them from one background thread with a time limit, so an unreachable or
slow API never stops, slows or corrupts the work: the first failure is logged
in one line, later calls are dropped (and counted) and logs stop being sent
until a probe a little later finds the API back.

A task also leaves its result with :func:`remember_outcome`, so the command
that ran the flow in this process can still report the finished work when
Prefect, unable to record the task's final state, raises.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("denoise.publish")

#: seconds one API call may take before the API counts as unreachable
CALL_TIMEOUT = 10.0
#: seconds between probes once the API is unreachable
RETRY_AFTER = 30.0

_outcomes: dict[str, Any] = {}
_api_down = threading.Event()


def remember_outcome(key: str, value: Any) -> None:
    """Keep a task's result in this process (see the module docstring)."""
    _outcomes[key] = value


def recall_outcome(key: str) -> Any:
    return _outcomes.pop(key, None)


def api_unreachable() -> bool:
    """True once a publisher in this process found the API unreachable."""
    return _api_down.is_set()


class _MuteWhileDown(logging.Filter):
    """Keeps log records local while the API is unreachable (Prefect's log
    worker would otherwise print an error block for every batch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _api_down.is_set():
            record.send_to_api = False
        return True


def mute_api_logs_while_down() -> None:
    """Install the filter on Prefect's API log handlers (idempotent)."""
    from prefect.logging.handlers import APILogHandler

    for name in [None, *logging.root.manager.loggerDict]:
        log = logging.getLogger(name)
        for handler in getattr(log, "handlers", []):
            if isinstance(handler, APILogHandler) and not any(
                isinstance(f, _MuteWhileDown) for f in handler.filters
            ):
                handler.addFilter(_MuteWhileDown())
    for noisy in ("prefect.events.clients", "prefect._internal.concurrency"):
        _add_once(logging.getLogger(noisy), _DropWhileDown)
    for run_logger in ("prefect.flow_runs", "prefect.task_runs"):
        _add_once(logging.getLogger(run_logger), _OneLineWhileDown)


def _add_once(log: logging.Logger, kind: type[logging.Filter]) -> None:
    if not any(isinstance(f, kind) for f in log.filters):
        log.addFilter(kind())


class _DropWhileDown(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _api_down.is_set()


class _OneLineWhileDown(logging.Filter):
    """Prefect's own run loggers: the connection error in one line, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _api_down.is_set() and record.exc_info:
            record.exc_info = record.exc_text = None
        return True


class Publisher:
    """Makes a task's API calls in the background; never raises into the task.

    ``publish(fn, *args)`` queues a call (made in the caller's Prefect
    context); ``latest(key, fn, *args)`` keeps only the newest call of a kind
    (progress updates); ``close()`` waits a bounded time for what is queued.
    """

    def __init__(self, run_logger: logging.Logger | logging.LoggerAdapter | None = None):
        self.log = run_logger or logger
        self.missed = 0
        self._queue: queue.Queue = queue.Queue()
        self._latest: dict[str, tuple] = {}
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._thread = threading.Thread(target=self._run, name="publish", daemon=True)
        self._thread.start()
        mute_api_logs_while_down()

    # -- producer side ------------------------------------------------------
    def publish(self, fn: Callable, *args, **kwargs) -> None:
        self._queue.put((contextvars.copy_context(), fn, args, kwargs))

    def latest(self, key: str, fn: Callable, *args, **kwargs) -> None:
        with self._lock:
            fresh = key not in self._latest
            self._latest[key] = (contextvars.copy_context(), fn, args, kwargs)
        if fresh:
            self._queue.put(key)

    def close(self, timeout: float = 2 * CALL_TIMEOUT) -> None:
        """Wait for the queued calls (at most ``timeout`` s), then report misses."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.missed += self._queue.qsize()
        if self.missed:
            self.log.warning(
                "the Prefect UI missed %d update(s) of this task (API unreachable); "
                "the files in the store are complete",
                self.missed,
            )

    # -- the background thread ----------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, str):
                with self._lock:
                    call = self._latest.pop(item, None)
                if call is None:
                    continue
            else:
                call = item
            self._call(*call)

    def _call(self, ctx: contextvars.Context, fn: Callable, args: tuple, kwargs: dict) -> None:
        if time.monotonic() < self._down_until:
            self.missed += 1
            return
        done = threading.Event()
        failure: list[BaseException] = []

        def attempt() -> None:
            try:
                ctx.run(fn, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any failure only costs the UI an update
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=attempt, name="publish-call", daemon=True).start()
        if done.wait(CALL_TIMEOUT) and not failure:
            if _api_down.is_set():
                _api_down.clear()
                self.log.info("the Prefect API is reachable again; the UI gets updates again")
            return
        self.missed += 1
        self._down_until = time.monotonic() + RETRY_AFTER
        if not _api_down.is_set():
            _api_down.set()
            reason = (
                f"{type(failure[0]).__name__}: {failure[0]}"
                if failure
                else f"no answer in {CALL_TIMEOUT:.0f} s"
            )
            self.log.warning(
                "the Prefect API is unreachable (%s); the work goes on and the UI misses "
                "updates until it is back",
                str(reason).splitlines()[0],
            )


class ProgressArtifact:
    """A Prefect progress artifact fed through a :class:`Publisher`: only the
    newest value is sent, and the artifact is created on the first send."""

    def __init__(self, publisher: Publisher, key: str, description: str):
        self.publisher, self.key, self.description = publisher, key, description
        self._id = None

    def update(self, percent: float) -> None:
        self.publisher.latest(f"progress:{self.key}", self._send, float(percent))

    def _send(self, percent: float) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if self._id is None:
            self._id = create_progress_artifact(
                progress=percent, key=self.key, description=self.description
            )
        else:
            update_progress_artifact(self._id, progress=percent)
