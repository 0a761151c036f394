"""What a run shows on the terminal it was started from, in the command and
in its Dask workers alike: one line for a failure, the terminal's Ctrl-C for
the command alone. Imported by the CLI (flows) and the workers' tasks."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

DEBUG_ENV = "DENOISE_DEBUG"  # "1" under --debug; Dask workers inherit it

_RUN_LOGGERS = (
    "prefect.flow_runs",
    "prefect.task_runs",
    "prefect.flow_engine",
    "prefect.task_engine",
)


class _RunFailuresOffTerminal(logging.Filter):
    """Keeps a failed run's error records (each with its traceback, often the
    same one twice) off the terminal: the command ends with one line of its
    own for them. They still reach the run's log in the UI (the API handler
    is not filtered)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        return not (record.exc_info or record.name.startswith(_RUN_LOGGERS))


def quiet_run_failures(debug: bool | None = None) -> None:
    """Install :class:`_RunFailuresOffTerminal` on Prefect's terminal handler
    (in this process: the command, or a Dask worker); not under --debug."""
    if debug is None:
        debug = os.environ.get(DEBUG_ENV) == "1"
    if debug:
        return
    import prefect.main  # noqa: F401 - Prefect's logging is set up by now
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, _RunFailuresOffTerminal) for f in handler.filters
        ):
            handler.addFilter(_RunFailuresOffTerminal())


@contextlib.contextmanager
def sigint_ignored_by_children() -> Iterator[None]:
    """Processes started inside (Dask's workers) ignore SIGINT: Ctrl-C reaches
    the terminal's whole process group, and the command, not each worker,
    handles it (it stops the workers). Only the main thread can do this; other
    threads start children as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
