"""Faults during `denoise folder`: kills and SIGTERM mid-run, a full disk,
the Prefect server killed, OUT a parent of IN, a 250-byte file name, an
input replaced with an older mtime."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.faults.harness import (
    IMAGE_SUFFIXES,
    PACED,
    check_input_untouched,
    check_outputs,
    check_store,
    check_tree,
    check_unchanged,
    count_outputs,
    expect_success,
    finished_files,
    last_error_line,
    tree_hashes,
    wait_for,
)

NO_SPACE = ("No space left on device", "File too large")
MISSED = re.compile(
    r"(?i)(prefect|\bui\b|\bapi\b|server).*(miss|unreachable|not reach|lost|could not|cannot)"
)

REDO_AFTER_A_KILL = 4  # 2 writers: 2 outputs not yet recorded + 2 in the unwritten batch


def outputs(out: Path) -> dict:
    """Finished outputs (final names) in OUT."""
    return {
        k: v
        for k, v in finished_files(out).items()
        if Path(k).suffix.lower() in IMAGE_SUFFIXES and not Path(k).name.startswith(".")
    }


def plant_user_files(out: Path) -> dict:
    """Files of the user's in OUT, one named like a temporary file: never ours to touch."""
    out.mkdir(parents=True, exist_ok=True)
    (out / ".notes.part").write_text("my notes, not a temporary file of denoise\n")
    (out / "keep.txt").write_text("keep me\n")
    return tree_hashes(out)


def report_of(result) -> Path | None:
    for line in result.stdout.splitlines():
        if line.startswith("report:"):
            return Path(line.split(":", 1)[1].strip())
    return None


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_signal_in_a_folder_run(sig, denoise, model_store, noisy_folder, scenario, tmp_path):
    out = tmp_path / "out"
    mine = plant_user_files(out)
    inputs = tree_hashes(noisy_folder)
    args = ["folder", str(noisy_folder), str(out)]
    cmd = denoise.start(args, model_store, failpoints=PACED)
    wait_for(lambda: count_outputs(out) >= 8, 180, "8 outputs", cmd)
    cmd.signal(getattr(signal, sig))
    code = cmd.wait(60).returncode
    scenario.expect(code != 0, f"a folder run ended by {sig} exited 0")
    done = outputs(out)
    scenario.expect(len(done) < count_outputs(noisy_folder), "the run finished before the signal")
    check_tree(
        scenario, out, "OUT after the signal", temps_ok=True, ignore=mine
    )  # what has a final name is whole

    rerun = denoise.run(args, model_store)
    if expect_success(scenario, rerun, "the rerun"):
        check_outputs(scenario, noisy_folder, out, ignore=mine)
        check_store(scenario, model_store)
    # records are written in batches (JOURNAL_SECONDS apart at most): a kill loses
    # the batch being gathered and the outputs between rename and record, which
    # are redone; paced at 0.3 s an output per writer, that is at most 2 + 2
    check_unchanged(scenario, done, out, "outputs", redo_allowed=REDO_AFTER_A_KILL)
    check_unchanged(scenario, mine, out, "the user's files in OUT")
    check_input_untouched(scenario, inputs, noisy_folder)
    scenario.assert_ok()


def test_full_disk_during_a_folder_run(
    denoise, model_store, noisy_folder, scenario, small_disk, tmp_path
):
    out = tmp_path / "out"
    disk = small_disk(out, 40 * 1024)
    inputs = tree_hashes(noisy_folder)
    args = ["folder", str(noisy_folder), str(out)]
    full = denoise.run(args, model_store, preexec=disk.preexec())
    text = full.stdout + full.stderr
    scenario.expect(
        full.returncode not in (0, -signal.SIGKILL), f"exit {full.returncode} on a full disk"
    )
    scenario.expect(
        any(s in text for s in NO_SPACE), f"no line says the disk is full ({disk.kind})"
    )
    check_tree(
        scenario, out, "OUT on a full disk", temps_ok=True
    )  # nothing half-written under a final name
    done = outputs(out)

    disk.grow()
    rerun = denoise.run(args, model_store)
    if expect_success(scenario, rerun, "the rerun after space came back"):
        check_outputs(scenario, noisy_folder, out)
        check_store(scenario, model_store)
    check_unchanged(scenario, done, out, "outputs", redo_allowed=REDO_AFTER_A_KILL)
    check_input_untouched(scenario, inputs, noisy_folder)
    scenario.assert_ok()


def test_prefect_server_killed_during_a_folder_run(
    denoise, spare_prefect_api, model_store, noisy_folder, scenario, tmp_path
):
    out = tmp_path / "out"
    inputs = tree_hashes(noisy_folder)
    cmd = denoise.start(
        ["folder", str(noisy_folder), str(out)],
        model_store,
        failpoints=PACED,
        api_url=spare_prefect_api.url,
    )
    wait_for(lambda: count_outputs(out) >= 5, 180, "5 outputs", cmd)
    spare_prefect_api.kill()
    killed_at = time.monotonic()
    result = cmd.wait(240)
    seconds = time.monotonic() - killed_at
    scenario.expect(
        result.returncode == 0,
        f"exit {result.returncode} after the server died; last line: {last_error_line(result)!r}",
    )
    scenario.expect(seconds < 90, f"{seconds:.0f} s from the server's death to the end of the run")
    said = [ln for ln in (result.stdout + result.stderr).splitlines() if MISSED.search(ln)]
    scenario.expect(bool(said), "no line says the UI missed updates")
    report = report_of(result)
    scenario.expect(report is not None and report.is_file(), f"no report written ({report})")
    check_outputs(scenario, noisy_folder, out)
    check_store(scenario, model_store)
    check_input_untouched(scenario, inputs, noisy_folder)
    scenario.assert_ok()


def test_out_a_parent_of_in(denoise, model_store, noisy_folder, scenario, tmp_path):
    parent = tmp_path / "d"
    src = parent / "noisy"
    shutil.copytree(noisy_folder, src)
    (src / ".notes.part").write_text("the user's, inside the input\n")
    shutil.copytree(noisy_folder, src / "noisy")  # same names one level down, as in the issue
    (parent / "keep.txt").write_text("beside the input\n")
    before = tree_hashes(parent)

    result = denoise.run(["folder", str(src), str(parent)], model_store)
    line = last_error_line(result)
    scenario.expect(
        result.returncode == 2, f"OUT a parent of IN: exit {result.returncode}, not 2 (refused)"
    )
    scenario.expect(
        bool(line) and "unexpected" not in line, f"no one-line refusal; last line {line!r}"
    )
    check_input_untouched(scenario, before, parent)
    scenario.assert_ok()


def test_a_250_byte_file_name(denoise, model_store, scenario, tmp_path):
    src = tmp_path / "long"
    src.mkdir()
    name = "n" * 246 + ".png"
    assert len(name.encode()) == 250
    Image.new("L", (40, 40), 128).save(src / name)
    Image.new("L", (40, 40), 64).save(src / "short.png")
    inputs = tree_hashes(src)
    out = tmp_path / "out"

    first = denoise.run(["folder", str(src), str(out)], model_store)
    if expect_success(scenario, first, "a folder with a 250-byte file name"):
        check_outputs(scenario, src, out)
    check_input_untouched(scenario, inputs, src)
    scenario.assert_ok()


def test_input_replaced_with_an_older_mtime(denoise, model_store, noisy_folder, scenario, tmp_path):
    out = tmp_path / "out"
    args = ["folder", str(noisy_folder), str(out)]
    first = denoise.run(args, model_store)
    assert first.returncode == 0, first.stderr[-2000:]
    done = outputs(out)

    # `cp -p` of another picture over an input: new content, an older mtime than its output
    replaced = noisy_folder / "img001.png"
    Image.new("L", (64, 52), 200).save(replaced)
    os.utime(replaced, (time.time() - 86400 * 365, time.time() - 86400 * 365))
    # a damaged output that is newer than its input
    damaged = out / "img002.png"
    damaged.write_bytes(damaged.read_bytes()[:100])
    inputs = tree_hashes(noisy_folder)

    rerun = denoise.run(args, model_store)
    if expect_success(scenario, rerun, "the rerun"):
        check_outputs(scenario, noisy_folder, out)
    scenario.expect(
        tree_hashes(out)["img001.png"][0] != done["img001.png"][0],
        "the output of the replaced input was kept (stale)",
    )
    # the damaged output (newer than its input) must have been redone: check_outputs decodes it
    others = {k: v for k, v in done.items() if k not in ("img001.png", "img002.png")}
    check_unchanged(scenario, others, out, "outputs")
    check_input_untouched(scenario, inputs, noisy_folder)
    scenario.assert_ok()
