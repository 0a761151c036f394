"""A killed `denoise` command and its temporary Prefect server: none may
survive it, and its flow run must end Crashed once the next command runs."""

from __future__ import annotations

import signal
import sqlite3
import time

from tests.faults.harness import (
    PACED,
    alive,
    check_outputs,
    command_line,
    count_outputs,
    descendants,
    expect_success,
    kill_survivors,
    wait_for,
)


def kill_and_expect_no_survivors(scenario, cmd, family: dict[int, int], what: str) -> None:
    """SIGKILL the command; none of the processes it started may outlive it by 10 s."""
    cmd.signal(signal.SIGKILL)
    cmd.wait(30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p, s) for p, s in family.items()):
        time.sleep(0.2)
    survivors = [f"{p}: {command_line(p)[:120]}" for p, s in family.items() if alive(p, s)]
    scenario.expect(not survivors, f"processes outlived {what}: " + "; ".join(survivors))


def test_killed_command_leaves_no_temporary_server(
    denoise, model_store, noisy_folder, scenario, tmp_path
):
    out = tmp_path / "out"
    args = ["folder", str(noisy_folder), str(out)]
    # no PREFECT_API_URL: the command starts its own temporary server
    cmd = denoise.start(args, model_store, failpoints=PACED, api_url=None)
    family: dict[int, int] = {}
    try:
        wait_for(lambda: count_outputs(out) >= 3, 240, "3 outputs", cmd)
        family = descendants(cmd.pid)
        scenario.expect(
            bool(family), "no child process found: where does the temporary server run?"
        )
        kill_and_expect_no_survivors(scenario, cmd, family, "the killed command")
    finally:
        kill_survivors(family)

    rerun = denoise.run(args, model_store, api_url=None)
    if expect_success(scenario, rerun, "the next command"):
        check_outputs(scenario, noisy_folder, out)
    with sqlite3.connect(denoise.home / "prefect.db") as db:
        runs = db.execute("SELECT name, state_type FROM flow_run ORDER BY created").fetchall()
    scenario.checked += len(runs)
    scenario.expect(len(runs) == 2, f"expected the killed run and the next one, found {runs}")
    if runs:
        scenario.expect(
            runs[0][1] == "CRASHED", f"the killed run {runs[0][0]} is {runs[0][1]}, not CRASHED"
        )
        scenario.expect(
            all(state != "RUNNING" for _, state in runs), f"a run stays RUNNING: {runs}"
        )
    scenario.assert_ok()


def test_command_killed_while_its_temporary_server_boots(
    denoise, model_store, noisy_folder, scenario, tmp_path
):
    """SIGKILL in the seconds the temporary server takes to answer: it must die too."""
    args = ["folder", str(noisy_folder), str(tmp_path / "out")]
    cmd = denoise.start(args, model_store, api_url=None)
    family: dict[int, int] = {}
    try:

        def server_spawned() -> bool:
            family.update(descendants(cmd.pid))
            return any("uvicorn" in command_line(p) for p in family)

        wait_for(server_spawned, 240, "the temporary server's process", cmd, poll=0.02)
        family.update(descendants(cmd.pid))
        scenario.checked += len(family)
        kill_and_expect_no_survivors(scenario, cmd, family, "the command killed at start-up")
    finally:
        kill_survivors(family)
    scenario.assert_ok()
