"""``denoise watch`` as a user runs it: the real command in its own process, a
real Prefect server, files copied into the inbox in bursts (one of them
written slowly), and a watcher killed mid-run then restarted."""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.faults.harness import denoise_env, start_denoise, wait_for
from tests.test_folder import identity_model, save_model


@pytest.fixture()
def inbox(tmp_path):
    """A store with an identity model (outputs equal inputs: a half-read input
    shows), an empty inbox and 40 distinct PNGs to drop into it."""
    save_model(tmp_path / "store" / "models" / "20260101-000000-custom-0001", identity_model())
    src = tmp_path / "sources"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(src / f"f{i:02d}.png")
    (tmp_path / "in").mkdir()
    return tmp_path


def write_slowly(source: Path, target: Path, pieces: int = 8, pause: float = 0.25) -> None:
    """Append ``source`` to ``target`` a piece at a time, as a slow upload does."""
    data = source.read_bytes()
    step = -(-len(data) // pieces)
    with open(target, "wb") as fh:
        for start in range(0, len(data), step):
            fh.write(data[start : start + step])
            fh.flush()
            time.sleep(pause)


def outputs(out: Path) -> set[str]:
    return {p.name for p in out.glob("*.png")} if out.is_dir() else set()


def summaries(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(store.glob("reports/*/summary.json"))]


def report_rows(store: Path) -> list[dict]:
    return [r for p in store.glob("reports/*/report.csv") for r in csv.DictReader(p.open())]


def run_spans(api: str, ids: list[str]) -> list[tuple[float, float]]:
    """(start, end) of each flow run, in order."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read() -> list:
        async with get_client() as client:
            return [await client.read_flow_run(i) for i in ids]

    with temporary_settings({PREFECT_API_URL: api}):
        runs = asyncio.run(read())
    return sorted((r.start_time.timestamp(), r.end_time.timestamp()) for r in runs)


def test_three_bursts_give_every_output_in_at_most_three_runs(inbox, prefect_api):
    store, src, inn, out = inbox / "store", inbox / "sources", inbox / "in", inbox / "out"
    env = denoise_env(store, inbox / "home", prefect_api, None)
    watcher = start_denoise(["watch", str(inn), str(out), "--settle", "1"], env, inbox / "logs")
    try:
        wait_for(lambda: "watching" in watcher.out.read_text(), 120, "the watcher", watcher)
        names = sorted(p.name for p in src.iterdir())[:30]
        for burst in range(3):
            batch = names[burst * 10 : burst * 10 + 10]
            slow = threading.Thread(target=write_slowly, args=(src / batch[0], inn / batch[0]))
            slow.start()
            for name in batch[1:]:
                shutil.copy(src / name, inn / name)
            slow.join()
            wait_for(lambda b=batch: set(b) <= outputs(out), 180, f"burst {burst + 1}", watcher)
    finally:
        watcher.signal(signal.SIGTERM)
        watcher.wait(60)
    assert outputs(out) == set(names)
    for name in names:  # read whole: the identity model gives the input back
        assert np.array_equal(
            np.asarray(Image.open(out / name)), np.asarray(Image.open(src / name))
        )
    runs = summaries(store)
    assert 1 <= len(runs) <= 3, [r["counts"] for r in runs]
    assert all(r["counts"]["failed"] == 0 for r in runs)
    assert not [r for r in report_rows(store) if r["status"] == "failed"]
    spans = run_spans(prefect_api, [r["flow_run_id"] for r in runs])
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1)), spans


def test_a_killed_watcher_restarted_finishes_what_was_left(inbox, prefect_api):
    store, src, inn, out = inbox / "store", inbox / "sources", inbox / "in", inbox / "out"
    for p in sorted(src.iterdir())[:30]:
        shutil.copy(p, inn / p.name)
    env = denoise_env(store, inbox / "home", prefect_api, None)
    slow = {**env, "DENOISE_FAILPOINTS": "folder.after_output=sleep:0.3"}
    first = start_denoise(["watch", str(inn), str(out), "--settle", "1"], slow, inbox / "logs")
    try:
        wait_for(lambda: len(outputs(out)) >= 3, 180, "the first outputs", first)
    finally:
        first.signal(signal.SIGKILL)
        first.wait(30)
    assert len(outputs(out)) < 30
    for p in sorted(src.iterdir())[30:]:  # more land while nobody watches
        shutil.copy(p, inn / p.name)
    second = start_denoise(["watch", str(inn), str(out), "--settle", "1"], env, inbox / "logs")
    try:
        # the start run waits for no lease of the dead watcher: well within one lease (60 s)
        wait_for(lambda: len(outputs(out)) == 40, 120, "every output after the restart", second)
    finally:
        second.signal(signal.SIGTERM)
        second.wait(60)
    assert outputs(out) == {p.name for p in src.iterdir()}
    assert "waiting for" not in second.out.read_text()


@pytest.mark.parametrize(
    "option", [["--self-ensemble"], ["--model", "v1"], ["--runtime", "keras"], ["--workers", "2"]]
)
def test_emit_only_refuses_the_options_its_deployment_decides(tmp_path, capsys, option):
    # --emit-only hands each burst to the inbox-on-arrival deployment, which runs the
    # folder with its own parameters: an option given here would be silently dropped
    from flows.cli import main

    (tmp_path / "in").mkdir()
    args = ["watch", str(tmp_path / "in"), str(tmp_path / "out"), "--emit-only", *option]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--emit-only: {option[0]} is the inbox-on-arrival deployment's" in err
