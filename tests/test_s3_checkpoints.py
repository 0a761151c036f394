"""Training checkpoints kept in the bucket, against moto's real S3 server: the
lease is a head object renewed by conditional PUTs, one claimant wins a dead
run, an owner that was taken over writes nothing more, and a training killed
with SIGKILL is resumed from the bucket by a process with another local disk."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from artifacts.store import Store
from denoiser.learning import checkpoints
from denoiser.learning.checkpoints import (
    HEAD_FILE,
    LeaseLost,
    claim_remote_run,
    head_is_free,
    remove_stale_remote_runs,
)
from tests.test_checkpoints import CONFIG, REPO, _env, _finish, _history_epochs, start_script

KEY = "checkpoints/k"

# claims a run of the bucket's key argv[1], says which, then holds it until stdin closes
HOLD = """
import json, sys, tempfile
from artifacts.store import Store
from denoiser.learning.checkpoints import claim_remote_run
store = Store(sys.argv[1])
run = claim_remote_run(store, store.join("checkpoints/k"), tempfile.mkdtemp(), lambda: sys.argv[2])
print(json.dumps({"run_id": run.run_id, "version": run.version, "resumed": run.resumed}), flush=True)
sys.stdin.read()
"""

# one training as the task runs it on a store in a bucket, without Prefect
TRAIN = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
from artifacts.store import Store, new_model_version
from denoiser.learning.checkpoints import finish_run
from denoiser.config import TrainConfig
from denoiser.learning.training import train_in_run
args = json.loads(sys.argv[1])
config, store = TrainConfig(**args["training"]), Store(args["store"])
result = train_in_run(args["shards"], config, args["models"], args["local"],
                      lambda: new_model_version(config.architecture),
                      objects=store, checkpoints_url=store.checkpoints_url)
finish_run(result["checkpoint"])  # as registering the model does
print("RESULT " + json.dumps(result), flush=True)
"""


@pytest.fixture()
def store(s3) -> Store:
    return Store(f"s3://{s3.bucket('ckpt')}/store")


def _heads(store: Store) -> dict[str, dict]:
    url = store.join(KEY)
    return {
        name: json.loads(store.read_bytes(f"{url}/{name}/{HEAD_FILE}"))
        for name in store.list_names(url)
        if store.exists(f"{url}/{name}/{HEAD_FILE}")
    }


def _backdate(store: Store, run_id: str, seconds: float, **changes) -> None:
    """As if the run's owner stopped renewing ``seconds`` ago (and, with
    ``owner``, lived on another machine)."""
    location = store.join(KEY, run_id, HEAD_FILE)
    head = json.loads(store.read_bytes(location))
    head.update(renewed=time.time() - seconds, **changes)
    store.write_bytes(location, json.dumps(head).encode())


def _hold(store: Store, version: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, store.url, version],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    return proc, json.loads(proc.stdout.readline())


def _claim(store: Store, tmp_path: Path, version: str = "v-new"):
    return claim_remote_run(store, store.join(KEY), tmp_path / "local", lambda: version)


ELSEWHERE = {"host": "another-machine", "boot": "b00t", "pid": 1, "token": "t"}


# --- leases, without TensorFlow ----------------------------------------------------------------


def test_a_live_owner_keeps_its_run_and_a_dead_one_on_this_machine_loses_it_at_once(
    store, tmp_path
):
    live, held = _hold(store, "v-live")
    try:
        mine = _claim(store, tmp_path, "v-mine")
        assert not mine.resumed and mine.run_id != held["run_id"]  # a run beside the live one
        mine.release()  # let go: the next claim resumes it, not the live one
        again = _claim(store, tmp_path, "v-unused")
        assert again.resumed and (again.run_id, again.version) == (mine.run_id, "v-mine")
        again.release()
        # the live owner's process is killed: its run is taken over without waiting for the lease
        live.kill()
        assert live.wait(timeout=30) == -signal.SIGKILL
        run = _claim(store, tmp_path, "v-unused")
        assert run.resumed and (run.run_id, run.version) == (held["run_id"], "v-live")
        assert _heads(store)[run.run_id]["owner"]["token"] == run.remote.head["owner"]["token"]
        run.release()
    finally:
        live.kill()
        live.wait(timeout=30)


def test_another_machines_run_is_taken_only_once_its_lease_ran_out(store, tmp_path):
    first = _claim(store, tmp_path, "v-first")
    first.remote._stop.set()  # its machine goes quiet
    _backdate(store, first.run_id, checkpoints.LEASE_SECONDS - 20, owner=ELSEWHERE)
    second = _claim(store, tmp_path, "v-second")
    assert not second.resumed  # renewed 40 s ago: still its owner's
    second.release()
    _backdate(store, first.run_id, checkpoints.LEASE_SECONDS + 1, owner=ELSEWHERE)
    third = _claim(store, tmp_path, "v-third")
    assert third.resumed and third.version == "v-first"
    third.release()


def test_one_of_many_racing_claimants_wins_a_dead_run(store, tmp_path):
    dead = _claim(store, tmp_path, "v-dead")
    dead.remote._stop.set()
    _backdate(store, dead.run_id, checkpoints.LEASE_SECONDS + 1, owner=ELSEWHERE)
    runs, barrier = [], threading.Barrier(6)

    def claim(i):
        barrier.wait()
        runs.append(_claim(store, tmp_path / str(i), f"v-{i}"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sum(r.resumed for r in runs) == 1
        (winner,) = [r for r in runs if r.resumed]
        assert winner.run_id == dead.run_id
        assert len({r.run_id for r in runs}) == 6  # the losers started runs of their own
        assert len(_heads(store)) == 6
    finally:
        for r in runs:
            r.release()


def test_an_owner_that_was_taken_over_writes_nothing_more(store, tmp_path):
    old = _claim(store, tmp_path, "v-1")
    old.remote._stop.set()  # a long pause: no renewals
    _backdate(store, old.run_id, checkpoints.LEASE_SECONDS + 1, owner=ELSEWHERE)
    new = _claim(store, tmp_path / "b", "v-2")
    assert new.resumed and new.run_id == old.run_id
    # the old owner wakes up with an epoch to save
    gen = old.dir / "state" / "gen-00001-aaaaaa"
    gen.mkdir(parents=True)
    (gen / "latest.weights.h5").write_bytes(b"w")
    (gen / "training_metadata.json").write_text('{"epoch": 1, "batch": -1}')
    (old.dir / "state" / "current").symlink_to(gen.name)
    with pytest.raises(LeaseLost, match="another process took this training run over"):
        old.save_epoch()
    head = _heads(store)[old.run_id]
    assert head["owner"]["token"] == new.remote.head["owner"]["token"] and not head["generation"]
    old.release()  # lets go of nothing it does not own
    assert not head_is_free(_heads(store)[old.run_id])
    new.release()
    assert head_is_free(_heads(store)[old.run_id])


def _wait_for_head(store: Store, run_id: str, ready, timeout: float = 120) -> dict:
    """The run's head once ``ready(head)`` holds (read every 0.1 s; fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        head = _heads(store)[run_id]
        if ready(head):
            return head
        assert time.monotonic() < deadline, f"the head never got there in {timeout:.0f} s: {head}"
        time.sleep(0.1)


def test_renewals_keep_a_run_whose_epochs_outlast_the_lease(store, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "LEASE_SECONDS", 1.5)
    monkeypatch.setattr(checkpoints, "RENEW_SECONDS", 0.2)
    run = _claim(store, tmp_path, "v-long")
    try:
        before = _heads(store)[run.run_id]["renewed"]
        # no epoch at all: wait (on the head, not the clock) until it was renewed past the
        # moment its first lease ran out, and again past the second one
        head = _wait_for_head(store, run.run_id, lambda h: h["renewed"] > before + 2 * 1.5)
        assert head["lease_seconds"] == 1.5 and head["renewed"] > before
        assert not head_is_free({**head, "owner": ELSEWHERE})  # live, seen from any machine
        other = _claim(store, tmp_path / "other", "v-other")
        assert not other.resumed
        other.release()
    finally:
        run.release()


def test_stale_runs_are_removed_and_live_ones_kept(store, tmp_path):
    stale, live = _claim(store, tmp_path, "v-stale"), _claim(store, tmp_path, "v-live")
    stale.remote._stop.set()
    _backdate(store, stale.run_id, 8 * 86400, owner=ELSEWHERE)
    store.write_bytes(store.join(KEY, stale.run_id, "gen-00003-abcdef", "latest.weights.h5"), b"w")
    removed = remove_stale_remote_runs(store, store.join("checkpoints"))
    assert removed == [store.join(KEY, stale.run_id)]
    assert list(_heads(store)) == [live.run_id]
    assert store.list_names(store.join(KEY)) == [live.run_id]
    live.release()


# --- trainings, killed and resumed from the bucket ---------------------------------------------


def _train(store: Store, shards: Path, local: Path, failpoints: str | None = None):
    args = {
        "training": CONFIG,
        "shards": str(shards),
        "models": str(local / "models"),
        "local": str(local / "checkpoints"),
        "store": store.url,
    }
    return _finish(start_script(TRAIN, args, local, failpoints))


def test_a_training_killed_on_one_machine_resumes_from_the_bucket_on_another(
    store, tiny_shards, tmp_path
):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    # killed during its second epoch's end, before that epoch reached the bucket
    code, _, err = _train(store, tiny_shards, one, "train.epoch_end=kill@2")
    assert code == -signal.SIGKILL, err[-3000:]
    ((key, runs),) = [
        (k, store.list_names(store.join("checkpoints", k)))
        for k in store.list_names(store.join("checkpoints"))
    ]
    (run_id,) = runs
    head = json.loads(store.read_bytes(store.join("checkpoints", key, run_id, HEAD_FILE)))
    assert head["epoch"] == 1 and head["generation"]
    assert sorted(store.list_names(store.join("checkpoints", key, run_id))) == sorted(
        [HEAD_FILE, head["generation"]]
    )

    # another working directory and local disk: the bucket's copy is all it has
    code, result, err = _train(store, tiny_shards, two)
    assert code == 0, err[-3000:]
    assert f"resuming interrupted run {run_id} at epoch 2" in err
    assert result["resumed"] and (result["run_id"], result["version"]) == (run_id, head["version"])
    assert _history_epochs(Path(result["dir"])) == [1, 2, 3] and result["epochs_run"] == 3
    assert store.list_names(store.join("checkpoints", key)) == []  # finished: gone from the bucket
    assert not (two / "checkpoints" / key).exists()  # and its working copy
