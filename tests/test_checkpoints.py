"""Checkpoints that belong to one run: concurrent trainings, resuming a killed
run, cleaning up what dead runs left. Real processes, real locks, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from denoiser.config import TrainConfig
from denoiser.core.faults import FAILPOINTS_ENV
from denoiser.learning.checkpoints import (
    LEASE_FILE,
    RUN_FILE,
    checkpoint_key,
    claim_run,
    clean_checkpoints,
    finish_run,
    keep_open,
)
from denoiser.nets.models import file_sha256

REPO = Path(__file__).resolve().parent.parent
DAY = 86400

# claims a run under argv[1] (version argv[2]), says which, then dies or holds the lease until stdin closes
HOLD = """
import json, os, signal, sys
from denoiser.learning.checkpoints import claim_run
run = claim_run(sys.argv[1], lambda: sys.argv[2])
print(json.dumps({"run_id": run.run_id, "dir": str(run.dir), "version": run.version,
                  "resumed": run.resumed}), flush=True)
if sys.argv[3] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()
"""

# one training as the task runs it, without Prefect
TRAIN = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
from artifacts.store import new_model_version
from denoiser.learning.checkpoints import finish_run
from denoiser.config import TrainConfig
from denoiser.core.faults import failpoint
from denoiser.learning.training import train_in_run
args = json.loads(sys.argv[1])
config = TrainConfig(**args["training"])
result = train_in_run(args["shards"], config, args["models"], args["checkpoints"],
                      lambda: new_model_version(config.architecture))
failpoint("test.before_registration")  # where evaluation and registration would run
finish_run(result["checkpoint"])  # as registering the model does
print("RESULT " + json.dumps(result), flush=True)
"""

CONFIG = {"architecture": "unet-small", "epochs": 3, "batch_size": 16, "patience": 10}


def _env(failpoints: str | None = None) -> dict:
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "TF_NUM_INTRAOP_THREADS": "1",
        "TF_NUM_INTEROP_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    env.pop(FAILPOINTS_ENV, None)
    if failpoints:
        env[FAILPOINTS_ENV] = failpoints
    return env


def _hold(key_dir: Path, version: str, then: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(key_dir), version, then],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    info = json.loads(proc.stdout.readline())
    if then == "die":
        assert proc.wait(timeout=30) == -signal.SIGKILL
    return proc, info


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)
    proc.stdout.close()


def _age(folder: Path, seconds: float) -> None:
    """Backdate a folder and everything in it, as if untouched for ``seconds``."""
    then = time.time() - seconds
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (then, then))


def _start_training(
    store: Path, shards: Path, failpoints: str | None = None, **training
) -> subprocess.Popen:
    args = {
        "training": {**CONFIG, **training},
        "shards": str(shards),
        "models": str(store / "models"),
        "checkpoints": str(store / "checkpoints"),
    }
    return start_script(TRAIN, args, REPO, failpoints)


def start_script(script: str, args: dict, cwd: Path, failpoints: str | None = None):
    """``python -c script`` with ``args`` as JSON, its output piped (see :func:`_finish`)."""
    return subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(failpoints),
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, dict | None, str]:
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    return proc.returncode, json.loads(lines[-1][7:]) if lines else None, err


def _history_epochs(model_dir: Path) -> list[int]:
    return [h["epoch"] for h in json.loads((model_dir / "model.json").read_text())["history"]]


# --- leases, without TensorFlow ----------------------------------------------------------------


def test_a_live_runs_folder_is_never_claimed_a_dead_ones_is(tmp_path):
    key = tmp_path / "checkpoints" / "k"
    live, live_info = _hold(key, "v-live", "hold")
    try:
        ours = claim_run(key, lambda: "v-ours", flow_run_id="f1")
        assert not ours.resumed and ours.run_id != live_info["run_id"] and ours.version == "v-ours"
        meta = json.loads((ours.dir / RUN_FILE).read_text())
        assert (
            meta["run_id"] == ours.run_id
            and meta["version"] == "v-ours"
            and meta["flow_run_id"] == "f1"
        )
        assert meta["pid"] == os.getpid() and meta["host"] and meta["created"]
        ours.release()  # as if this process had died: its run is resumable now

        again = claim_run(key, lambda: "v-never")
        assert again.resumed and (again.run_id, again.version, again.dir) == (
            ours.run_id,
            "v-ours",
            ours.dir,
        )
        again.release()
    finally:
        _release(live)
    # the holder ended: its run, the oldest, is the one resumed
    resumed = claim_run(key, lambda: "v-never")
    assert resumed.resumed and resumed.run_id == live_info["run_id"] and resumed.version == "v-live"
    resumed.finish()
    assert not Path(live_info["dir"]).exists() and Path(ours.dir).exists()


def test_a_failed_flow_lets_go_of_the_runs_it_kept_open_and_of_no_other(tmp_path):
    from types import SimpleNamespace

    from flows.ledger import STATE_HOOKS, release_training_runs

    assert release_training_runs in STATE_HOOKS["on_failure"] + STATE_HOOKS["on_crashed"]
    key = tmp_path / "checkpoints" / "k"
    a, b = claim_run(key, lambda: "v-a"), claim_run(key, lambda: "v-b")
    keep_open(a, "flow-a")  # trained, then evaluation failed in a process that lives on
    keep_open(b, "flow-b")  # another flow of the same process, still running
    release_training_runs(None, SimpleNamespace(id="flow-a"), None)
    again = claim_run(key, lambda: "v-never")
    assert again.resumed and (again.run_id, again.version) == (a.run_id, "v-a")
    assert claim_run(key, lambda: "v-c").version == "v-c"  # b is still held
    again.finish()
    finish_run(str(b.dir))  # registered: the open run is finished by this process
    assert not b.dir.exists()


def test_a_run_killed_with_sigkill_is_resumed_as_itself(tmp_path):
    key = tmp_path / "checkpoints" / "k"
    _, dead = _hold(key, "v-dead", "die")
    run = claim_run(key, lambda: "v-new")
    assert run.resumed and run.run_id == dead["run_id"] and run.version == "v-dead"
    assert (
        claim_run(key, lambda: "v-other").run_id != run.run_id
    )  # ours is live now: a new run beside it
    run.finish()
    assert not Path(dead["dir"]).exists()


def test_clean_up_removes_what_dead_runs_left_and_nothing_live(tmp_path):
    checkpoints, models = tmp_path / "checkpoints", tmp_path / "models"
    # three requests (a dead run would be resumed by the next claim of its own request)
    _, stale = _hold(checkpoints / "k1", "v-stale", "die")
    _, recent = _hold(checkpoints / "k2", "v-recent", "die")
    live, busy = _hold(checkpoints / "k3", "v-busy", "hold")
    try:
        leftover = checkpoints / "k2" / "20200101-000000-abcdef"  # a crash's leftover: no run.json
        leftover.mkdir()
        (leftover / LEASE_FILE).touch()
        for version in ("v-stale", "v-recent", "v-busy", "v-orphan", "v-young", "v-done"):
            (models / version / "tensorboard").mkdir(parents=True)
        (models / "v-done" / "model.keras").write_bytes(b"a finished model")
        (models / "registry.json").write_text("{}")
        for folder in (Path(stale["dir"]), Path(busy["dir"]), leftover):
            _age(folder, 8 * DAY)
        for version in ("v-stale", "v-recent", "v-busy", "v-orphan", "v-done"):
            _age(models / version, 2 * 3600)

        lines = []
        removed = clean_checkpoints(checkpoints, models, log=lambda fmt, *a: lines.append(fmt % a))

        assert set(removed) == {
            Path(stale["dir"]),
            leftover,
            models / "v-stale",
            models / "v-orphan",
        }
        assert not Path(stale["dir"]).exists() and not leftover.exists()
        assert sorted(p.name for p in checkpoints.iterdir()) == ["k2", "k3"]
        assert Path(recent["dir"]).exists() and Path(busy["dir"]).exists()  # resumable; live
        assert sorted(p.name for p in models.iterdir()) == [
            "registry.json",
            "v-busy",
            "v-done",
            "v-recent",
            "v-young",
        ]
        assert len(lines) == 4 and all("removed" in line for line in lines)
        assert clean_checkpoints(checkpoints, models, log=lines.append) == []
    finally:
        _release(live)


# --- real trainings ------------------------------------------------------------------------------


def test_two_trainings_with_the_same_settings_keep_their_own_runs(tiny_shards, tmp_path):
    store = tmp_path / "store"
    key_dir = (
        store / "checkpoints" / checkpoint_key(tiny_shards, TrainConfig(**{**CONFIG, "epochs": 2}))
    )
    # each waits after its first epoch so that both runs are alive at once
    procs = [
        _start_training(store, tiny_shards, "train.epoch_end=sleep:6@1", epochs=2) for _ in range(2)
    ]
    most = 0
    while any(p.poll() is None for p in procs):
        runs = [d for d in key_dir.glob("*") if (d / RUN_FILE).exists()] if key_dir.exists() else []
        most = max(most, len(runs))
        time.sleep(0.2)
    outcomes = [_finish(p) for p in procs]
    for code, result, err in outcomes:
        assert code == 0, err[-3000:]
        assert not result["resumed"] and result["epochs_run"] == 2
        assert _history_epochs(Path(result["dir"])) == [1, 2]
        card = json.loads((Path(result["dir"]) / "model.json").read_text())
        assert card["epochs_run"] == card["training"]["epochs"] == 2
    (_, a, _), (_, b, _) = outcomes
    assert a["version"] != b["version"] and a["run_id"] != b["run_id"]
    assert most == 2  # two run folders side by side, neither removed while the other ran
    assert not key_dir.exists()  # each removed its own on success


def test_a_training_killed_after_an_epoch_resumes_its_own_run(tiny_shards, tmp_path):
    store = tmp_path / "store"
    code, _, err = _finish(_start_training(store, tiny_shards, "train.epoch_end=kill@1"))
    assert code == -signal.SIGKILL, err[-3000:]
    (run_dir,) = [d for d in (store / "checkpoints").glob("*/*")]
    meta = json.loads((run_dir / RUN_FILE).read_text())
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1]
    # the generation holds early stopping's state after its epoch, and the best weights
    state = json.loads((run_dir / "state" / "current" / "early_stopping.json").read_text())
    assert state == {"best": history[0]["val_loss"], "wait": 0, "best_epoch": 0}
    assert (run_dir / "state" / "current" / "best.weights.npz").is_file()
    assert not (store / "models" / meta["version"] / "model.keras").exists()

    code, result, err = _finish(_start_training(store, tiny_shards))
    assert code == 0, err[-3000:]
    assert f"resuming interrupted run {meta['run_id']} at epoch 2" in err
    assert (
        result["resumed"]
        and result["run_id"] == meta["run_id"]
        and result["version"] == meta["version"]
    )
    assert result["dir"] == str(store / "models" / meta["version"])
    assert _history_epochs(Path(result["dir"])) == [1, 2, 3] and result["epochs_run"] == 3
    assert sorted(p.name for p in (store / "models").iterdir()) == [meta["version"]]
    assert list((store / "checkpoints").iterdir()) == []


def test_a_damaged_checkpoint_trains_its_run_again_instead_of_failing(tiny_shards, tmp_path):
    store = tmp_path / "store"
    code, _, err = _finish(_start_training(store, tiny_shards, "train.epoch_end=kill@2"))
    assert code == -signal.SIGKILL, err[-3000:]
    (run_dir,) = [d for d in (store / "checkpoints").glob("*/*")]
    state = run_dir / "state"
    (current,) = [p for p in state.iterdir() if p.name.startswith("gen-")]  # one generation kept
    assert (state / "current").resolve() == current.resolve()
    weights = current / "latest.weights.h5"
    weights.write_bytes(
        weights.read_bytes()[: weights.stat().st_size // 2]
    )  # torn, as a crash mid-write would

    code, result, err = _finish(_start_training(store, tiny_shards))
    assert code == 0, err[-3000:]
    assert "checkpoint cannot be loaded" in err and "from epoch 1" in err
    assert _history_epochs(Path(result["dir"])) == [1, 2, 3] and result["epochs_run"] == 3
    assert list((store / "checkpoints").iterdir()) == []


def test_a_training_killed_before_its_model_is_registered_is_not_trained_again(
    tiny_shards, tmp_path
):
    store = tmp_path / "store"
    code, _, err = _finish(_start_training(store, tiny_shards, "test.before_registration=kill"))
    assert code == -signal.SIGKILL, err[-3000:]
    (run_dir,) = [d for d in (store / "checkpoints").glob("*/*")]
    version = json.loads((run_dir / RUN_FILE).read_text())["version"]
    model = store / "models" / version / "model.keras"
    mtime = model.stat().st_mtime_ns

    code, result, err = _finish(_start_training(store, tiny_shards))
    assert code == 0, err[-3000:]
    assert result["resumed"] and result["version"] == version and "after its last epoch" in err
    assert model.stat().st_mtime_ns == mtime  # not trained again
    assert _history_epochs(Path(result["dir"])) == [1, 2, 3]
    assert list((store / "checkpoints").iterdir()) == []


def test_a_training_killed_after_saving_its_model_only_writes_the_card(tiny_shards, tmp_path):
    store = tmp_path / "store"
    code, _, err = _finish(
        _start_training(store, tiny_shards, "train.after_model_saved=kill", epochs=1)
    )
    assert code == -signal.SIGKILL, err[-3000:]
    (model_dir,) = (store / "models").iterdir()
    saved = (model_dir / "model.keras").stat()
    assert not (model_dir / "model.json").exists()

    code, result, err = _finish(_start_training(store, tiny_shards, epochs=1))
    assert code == 0, err[-3000:]
    assert result["resumed"] and result["dir"] == str(model_dir) and "after its last epoch" in err
    assert (model_dir / "model.keras").stat().st_mtime_ns == saved.st_mtime_ns  # not trained again
    card = json.loads((model_dir / "model.json").read_text())
    assert card["model_sha256"] == file_sha256(model_dir / "model.keras")
    assert card["model_bytes"] == saved.st_size and _history_epochs(model_dir) == [1]
    assert list((store / "checkpoints").iterdir()) == []


def test_a_resumed_run_stops_and_restores_weights_as_the_whole_run_would(tmp_path):
    """Early stopping takes up the killed run's state: epochs without
    improvement count on, and the best weights may come from before the kill."""
    import keras
    import numpy as np

    from denoiser.learning.training import _resumable_early_stopping, _save_early_stopping

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    best = [np.full_like(w, 7.0) for w in model.get_weights()]
    before = keras.callbacks.EarlyStopping(patience=2, restore_best_weights=True)
    before.best, before.wait, before.best_epoch, before.best_weights = 0.1, 1, 0, best
    gen = tmp_path / "state" / "gen-00002-abcdef"
    gen.mkdir(parents=True)
    _save_early_stopping(before, gen)
    (tmp_path / "state" / "current").symlink_to(gen.name)

    resumed = _resumable_early_stopping(tmp_path / "state", "val_loss", patience=2)
    resumed.set_model(model)
    resumed.on_train_begin()
    assert (resumed.best, resumed.wait, resumed.best_epoch) == (0.1, 1, 0)
    resumed.on_epoch_end(2, {"val_loss": 0.5})  # worse than epoch 1, before the kill
    assert model.stop_training  # patience 2 ran out over the kill
    resumed.on_train_end()
    assert all(np.array_equal(w, b) for w, b in zip(model.get_weights(), best, strict=True))

    fresh = _resumable_early_stopping(tmp_path / "elsewhere", "val_loss", patience=2)
    fresh.set_model(model)
    fresh.on_train_begin()  # no backup: a new run starts with nothing
    assert fresh.best_weights is None and fresh.wait == 0


def test_a_warm_start_is_keyed_by_its_contents_not_where_it_was_staged(tmp_path):
    """A remote store's seed model is staged in a new temporary folder on
    every run: a rerun must still find its run's checkpoints."""
    first, second, other = (
        tmp_path / "a.keras",
        tmp_path / "b" / "model.keras",
        tmp_path / "c.keras",
    )
    second.parent.mkdir()
    first.write_bytes(b"the same seed")
    second.write_bytes(b"the same seed")
    other.write_bytes(b"another seed")

    def key(path):
        return checkpoint_key("s3://bucket/shards/x", TrainConfig(warm_start=str(path)))

    assert key(first) == key(second)
    assert key(first) != key(other)
    assert key(first) != checkpoint_key("s3://bucket/shards/x", TrainConfig())
