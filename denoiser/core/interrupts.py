"""Signals that wait for a safe point.

Code with a short stretch that must not be cut in two (an epoch recorded but
its state not yet saved) wraps it in :func:`hold` and :func:`release`: a
SIGTERM or SIGINT arriving in between is delivered again at the release, to
whatever handler was installed (the command line's, or Prefect's while a flow
runs), instead of interrupting the stretch.
"""

from __future__ import annotations

import os
import signal
import threading

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_saved: dict[int, object] = {}
_pending: list[int] = []


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (raised by the command line's handler)."""


def _defer(signum, frame) -> None:
    _pending.append(signum)


def hold() -> None:
    """Start a stretch (main thread only; elsewhere signals are not delivered anyway)."""
    if _saved or threading.current_thread() is not threading.main_thread():
        return
    for sig in _SIGNALS:
        _saved[sig] = signal.signal(sig, _defer)


def release() -> None:
    """End the stretch; a signal that arrived during it is delivered now."""
    if not _saved:
        return
    for sig, handler in _saved.items():
        signal.signal(sig, handler)
    _saved.clear()
    while _pending:
        os.kill(os.getpid(), _pending.pop(0))
