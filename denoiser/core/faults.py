"""Named fault points, for the fault-injection suite (``tests/faults/``).

Code that writes data calls :func:`failpoint` at the moments where a crash
would hurt most (a shard written but not the manifest, the registry read but
not written, ...). Nothing happens unless ``$DENOISE_FAILPOINTS`` names the
point, so a test can kill a real ``denoise`` command exactly there::

    DENOISE_FAILPOINTS="registry.before_write=kill" denoise train ...
    DENOISE_FAILPOINTS="train.epoch_end=kill@2" denoise train ...   # the 2nd time

Actions: ``kill`` (SIGKILL, no clean-up runs), ``term`` (SIGTERM), ``enospc``
(raise ``OSError(ENOSPC)``, as a full disk does), ``sleep:<seconds>``. An
optional ``@N`` fires on the N-th pass only. Several points: comma-separated.
"""

from __future__ import annotations

import errno
import os
import signal
import time

FAILPOINTS_ENV = "DENOISE_FAILPOINTS"
_passes: dict[str, int] = {}


def _parse(spec: str) -> dict[str, tuple[str, int | None]]:
    points = {}
    for item in spec.split(","):
        name, _, action = item.strip().partition("=")
        if not name:
            continue
        action, _, nth = (action or "kill").partition("@")
        points[name] = (action, int(nth) if nth else None)
    return points


def failpoint(name: str) -> None:
    """Act if ``$DENOISE_FAILPOINTS`` names this point; otherwise nothing."""
    spec = os.environ.get(FAILPOINTS_ENV)
    if not spec:
        return
    point = _parse(spec).get(name)
    if point is None:
        return
    action, nth = point
    _passes[name] = _passes.get(name, 0) + 1
    if nth is not None and _passes[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # let the handler run, as a real signal would arrive mid-work
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    else:
        raise ValueError(f"{FAILPOINTS_ENV}: unknown action {action!r} for {name}")
