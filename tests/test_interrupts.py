"""A signal during a held stretch is delivered at its end, not in the middle."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = """
import os, signal, sys, time
from denoiser.core import interrupts

events = []
def on_term(s, f):
    events.append("handler")
signal.signal(signal.SIGTERM, on_term)
interrupts.hold()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
events.append("stretch done")
interrupts.release()
time.sleep(0.2)
events.append("after")
print(",".join(events))
print("handler kept" if signal.getsignal(signal.SIGTERM) is on_term else "handler replaced")
"""


def test_a_signal_in_a_held_stretch_waits_for_its_end():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["stretch done,handler,after", "handler kept"]


def test_outside_a_stretch_signals_are_untouched():
    script = SCRIPT.replace("interrupts.hold()", "").replace("interrupts.release()", "")
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    # the child's own handler ran at once and is still the one installed
    assert out.stdout.splitlines() == ["handler,stretch done,after", "handler kept"]


# the default disposition of SIGTERM (the process dies); the stretch moves a file into place
KILLED_AT_RELEASE = """
import os, sys, time
from pathlib import Path
from denoiser.core import interrupts

folder = Path(sys.argv[1])
interrupts.hold()
(folder / "out.part").write_text("half")
print("held", flush=True)
deadline = time.monotonic() + 60
while not interrupts._pending and time.monotonic() < deadline:  # the parent's SIGTERM
    time.sleep(0.01)
(folder / "out.part").write_text("whole")
os.replace(folder / "out.part", folder / "out")
print("stretch done", flush=True)
interrupts.release()
print("after", flush=True)
"""


def test_a_sigterm_from_outside_lets_the_stretch_finish_then_ends_the_process(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_AT_RELEASE, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline() == "held\n"
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGTERM, err  # delivered at the release, not lost
    assert out == "stretch done\n"  # nothing ran after the release
    assert (tmp_path / "out").read_text() == "whole" and not (tmp_path / "out.part").exists()
