"""A signal during a held stretch is delivered at its end, not in the middle."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = """
import os, signal, sys, time
from denoiser import interrupts

events = []
signal.signal(signal.SIGTERM, lambda s, f: events.append("handler"))
interrupts.hold()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
events.append("stretch done")
interrupts.release()
time.sleep(0.2)
events.append("after")
print(",".join(events))
"""


def test_a_signal_in_a_held_stretch_waits_for_its_end():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "stretch done,handler,after"


def test_outside_a_stretch_signals_are_untouched():
    script = SCRIPT.replace("interrupts.hold()", "").replace("interrupts.release()", "")
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "handler,stretch done,after"
    assert signal.getsignal(signal.SIGTERM) is not None
