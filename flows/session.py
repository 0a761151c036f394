"""Where the names of the former ``flows.session`` went, for imports written
before it was split by purpose: :mod:`flows.server` (the API's server and
losing it), :mod:`flows.ledger` (the run ledger and the flows' state hooks),
:mod:`flows.signals` (SIGTERM). New code imports from those."""

from flows.ledger import (
    STATE_HOOKS,
    forget_run,
    mark_crashed_runs,
    record_running,
    release_training_runs,
)
from flows.server import (
    ensure_api,
    finished_despite_api,
    kept_server_url,
    start_api,
    start_kept_server,
    stop_kept_server,
)
from flows.signals import install_signal_handlers

__all__ = [
    "STATE_HOOKS",
    "ensure_api",
    "finished_despite_api",
    "forget_run",
    "install_signal_handlers",
    "kept_server_url",
    "mark_crashed_runs",
    "record_running",
    "release_training_runs",
    "start_api",
    "start_kept_server",
    "stop_kept_server",
]
