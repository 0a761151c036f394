"""Signals: SIGTERM ends a ``denoise`` command as Ctrl-C does."""

from __future__ import annotations

import signal


def install_signal_handlers() -> None:
    """SIGTERM ends a command as Ctrl-C does: the flow run is reported and the
    temporary server stopped, instead of both being left behind. (While a
    flow runs Prefect installs its own SIGTERM handler, to the same effect;
    stretches the work holds wait either way, see :mod:`denoiser.core.interrupts`.)"""
    from denoiser.core.interrupts import Terminated

    def terminate(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
