"""Faults during `denoise train`: kills at each step, SIGTERM, a full disk,
two trainings and a promote loop racing, corrupt files in the store."""

from __future__ import annotations

import functools
import http.server
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    TRAIN_ARGS,
    card,
    check_store,
    check_tree,
    check_unchanged,
    epoch_records,
    expect_success,
    finished_files,
    last_error_line,
    model_version,
    sha256_file,
    wait_for,
)

KILLED = -signal.SIGKILL
NO_SPACE = ("No space left on device", "File too large", "disk is full", "full disk")


def data_files(store: Path) -> dict:
    """Finished downloads and shards (the cache manifest is rewritten on purpose)."""
    files = {
        f"downloads/{k}": v
        for k, v in finished_files(store / "downloads").items()
        if not k.endswith("manifest.json")
    }
    files.update({f"shards/{k}": v for k, v in finished_files(store / "shards").items()})
    return files


# --------------------------------------------------------------------------- kill in the download


@pytest.fixture()
def slow_mirror(mnist_mirror):
    """The MNIST mirror over HTTP; the test images stall after 1.1 MB until released."""
    release = threading.Event()
    requests: list[str] = []
    stalled = "t10k-images-idx3-ubyte.gz"

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path.rsplit("/", 1)[-1])
            if self.path.endswith(stalled) and not release.is_set():
                data = (mnist_mirror / stalled).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data[:1_100_000])
                    self.wfile.flush()
                    release.wait(120)
                    self.wfile.write(data[1_100_000:])
                except OSError:
                    pass
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(mnist_mirror))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", requests, release
    release.set()
    server.shutdown()
    server.server_close()


def test_sigkill_in_download(denoise, slow_mirror, scenario, tmp_path):
    url, requests, release = slow_mirror
    store = tmp_path / "store"
    cache = store / "downloads" / "mnist"
    cmd = denoise.start(TRAIN_ARGS, store, env_extra={"DENOISE_DATA_SOURCE": url})

    def midway() -> bool:
        return (
            any(
                p.name.startswith(".t10k-images") and p.stat().st_size >= 1 << 20
                for p in cache.glob(".*")
            )
            if cache.is_dir()
            else False
        )

    wait_for(midway, 120, "the test images half downloaded", cmd)
    cmd.signal(signal.SIGKILL)
    assert cmd.wait(30).returncode == KILLED
    before = {k: v for k, v in finished_files(cache).items() if k != "manifest.json"}
    assert {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"} <= set(before), before
    release.set()

    rerun = denoise.run(TRAIN_ARGS, store, env_extra={"DENOISE_DATA_SOURCE": url})
    if expect_success(scenario, rerun, "the rerun"):
        check_store(scenario, store, [model_version(rerun)])
    check_unchanged(scenario, before, cache, "downloads")
    for name in before:
        scenario.expect(
            requests.count(name) == 1,
            f"{name} fetched {requests.count(name)} times, though it was finished before the kill",
        )
    scenario.assert_ok()


# --------------------------------------------------------------------------- kill in shard writing


def test_sigkill_in_shard_writing(denoise, golden, scenario, tmp_path):
    store = golden.copy_to(tmp_path / "store", ("downloads",))
    killed = denoise.run(TRAIN_ARGS, store, failpoints="shards.after_shard=kill@1")
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    before = finished_files(store / "shards")
    assert any(k.endswith(".parquet") for k in before), (
        f"no finished shard before the kill: {before}"
    )

    rerun = denoise.run(TRAIN_ARGS, store)
    if expect_success(scenario, rerun, "the rerun"):
        check_store(scenario, store, [model_version(rerun)])
    check_unchanged(scenario, before, store / "shards", "shards")
    scenario.assert_ok()


# --------------------------------------------------------------------------- kill / SIGTERM in an epoch


@pytest.mark.parametrize("fault", ["sigkill_failpoint", "sigterm_from_outside"])
def test_fault_in_an_epoch(fault, denoise, golden, scenario, tmp_path):
    store = golden.copy_to(tmp_path / "store")
    checkpoints = store / "checkpoints"
    data = data_files(store)
    if fault == "sigkill_failpoint":
        killed = denoise.run(TRAIN_ARGS, store, failpoints="train.epoch_end=kill@1")
        assert killed.returncode == KILLED, killed.stderr[-2000:]
    else:
        cmd = denoise.start(TRAIN_ARGS, store)
        wait_for(
            lambda: checkpoints.is_dir() and len(epoch_records(checkpoints)) >= 1,
            180,
            "the first epoch",
            cmd,
            poll=0.02,
        )
        cmd.signal(signal.SIGTERM)
        scenario.expect(cmd.wait(60).returncode != 0, "a train ended by SIGTERM exited 0")
    done = {rec["epoch"]: rec for rec in epoch_records(checkpoints)}
    assert 1 in done, "no epoch recorded before the fault"

    rerun = denoise.run(TRAIN_ARGS, store)
    if expect_success(scenario, rerun, "the rerun"):
        version = model_version(rerun)
        check_store(scenario, store, [golden.version, version])
        c = card(store, version)
        epochs = [h["epoch"] for h in c["history"]]
        scenario.expect(epochs == [1, 2], f"the card's history has epochs {epochs}, not [1, 2]")
        scenario.expect(c["epochs_run"] == 2, f"epochs_run {c['epochs_run']}, not 2")
        first = c["history"][0] if c["history"] else {}
        same = all(first.get(k) == v for k, v in done[1].items())
        scenario.expect(
            same, f"epoch 1 was rerun: the card says {first}, the killed run logged {done[1]}"
        )
        scenario.expect(
            not epoch_records(checkpoints), "the finished run's checkpoint was not cleaned up"
        )
    check_unchanged(scenario, data, store, "data")
    scenario.assert_ok()


# --------------------------------------------------------------------------- kill in evaluation / registration


@pytest.mark.parametrize("point", ["evaluate.before_card", "registry.before_write"])
def test_sigkill_in_evaluation_and_registration(point, denoise, golden, scenario, tmp_path):
    store = golden.copy_to(tmp_path / "store")
    killed = denoise.run(TRAIN_ARGS, store, failpoints=f"{point}=kill")
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    before = data_files(store)
    before.update(
        {
            f"models/{golden.version}/{k}": v
            for k, v in finished_files(store / "models" / golden.version).items()
        }
    )
    trained = [
        p.parent.name
        for p in (store / "models").glob("*/model.keras")
        if p.parent.name != golden.version
    ]
    weights = {v: (store / "models" / v / "model.keras").stat().st_mtime_ns for v in trained}

    rerun = denoise.run(TRAIN_ARGS, store)
    if expect_success(scenario, rerun, "the rerun"):
        version = model_version(rerun)
        state = check_store(scenario, store, [golden.version, version])
        scenario.expect(
            state.get("production") in state.get("versions", {}), "no valid production model"
        )
        # the killed run had finished training: the rerun registers that model, it does not train another
        scenario.expect(
            trained == [version],
            f"the rerun trained {version}; the killed run had trained {trained}",
        )
        model = store / "models" / version / "model.keras"
        scenario.expect(
            model.is_file() and model.stat().st_mtime_ns == weights.get(version),
            "the trained model was written again",
        )
    check_unchanged(scenario, before, store, "store")
    scenario.assert_ok()


# --------------------------------------------------------------------------- full disk while writing shards


def test_full_disk_during_shards(denoise, golden, scenario, small_disk, tmp_path):
    store = golden.copy_to(tmp_path / "store", ("downloads",))
    disk = small_disk(store / "shards", 16 * 1024)
    started = time.monotonic()
    full = denoise.run(TRAIN_ARGS, store, preexec=disk.preexec())
    seconds = time.monotonic() - started
    line = last_error_line(full)
    scenario.expect(full.returncode not in (0, KILLED), f"exit {full.returncode} on a full disk")
    scenario.expect(
        any(s in line for s in NO_SPACE),
        f"no one-line 'no space' error ({disk.kind}); last line: {line!r}",
    )
    scenario.expect(
        seconds < 90, f"a full disk took {seconds:.0f} s to report (retried like a network error?)"
    )
    check_tree(scenario, store, "store after the full disk")
    for folder in (store / "shards").glob("*"):
        scenario.expect(
            not (folder / "manifest.json").exists(), "a shard set looks finished on a full disk"
        )

    disk.grow()
    rerun = denoise.run(TRAIN_ARGS, store)
    if expect_success(scenario, rerun, "the rerun after space came back"):
        check_store(scenario, store, [model_version(rerun)])
    scenario.assert_ok()


# --------------------------------------------------------------------------- two trainings and a promote loop


def test_two_trainings_and_a_promote_loop(denoise, golden, scenario, tmp_path):
    store = golden.copy_to(tmp_path / "store")
    trains = [denoise.start(TRAIN_ARGS, store), denoise.start(TRAIN_ARGS, store)]
    promotions = 0
    while any(t.proc.poll() is None for t in trains):
        result = denoise.run(["models", "promote", golden.version], store, timeout=120)
        if expect_success(scenario, result, "denoise models promote"):
            promotions += 1
    results = [t.wait(300) for t in trains]
    versions = [model_version(r) for r in results if expect_success(scenario, r, "a training")]
    scenario.expect(
        len(set(versions)) == len(versions), f"two trainings made the same version {versions}"
    )
    state = check_store(scenario, store, [golden.version, *versions])
    by_hand = [h for h in state.get("history", []) if h.get("reason") == "promoted by hand"]
    scenario.expect(
        len(by_hand) == promotions,
        f"{promotions} promotions done, {len(by_hand)} in the registry's history (lost updates)",
    )
    histories = []
    for version in versions:
        c = card(store, version)
        epochs = [h["epoch"] for h in c["history"]]
        scenario.expect(
            epochs == [1, 2] and c["epochs_run"] == 2,
            f"{version}: history epochs {epochs}, epochs_run {c['epochs_run']} (not its own run)",
        )
        histories.append(c["history"])
    if len(histories) == 2:
        scenario.expect(
            histories[0] != histories[1], "the two cards carry the same history (shared checkpoint)"
        )
    scenario.assert_ok()


# --------------------------------------------------------------------------- corrupt files a rerun would reuse


def test_truncated_shard(denoise, golden, scenario):
    store = golden.restore_live()
    shard_dir = next((store / "shards").glob("mnist-*"))
    victim = shard_dir / "train-00000.parquet"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    manifest = shard_dir / "manifest.json"
    manifest_sha = sha256_file(manifest)
    # the repair may rewrite the manifest, but not change it
    before = {
        k: v for k, v in data_files(store).items() if not k.endswith((victim.name, manifest.name))
    }

    rerun = denoise.run(TRAIN_ARGS, store)
    said = [ln for ln in (rerun.stdout + rerun.stderr).splitlines() if victim.name in ln]
    scenario.expect(bool(said), f"no line names the damaged shard {victim.name}")
    if expect_success(scenario, rerun, "the rerun with a truncated shard"):
        check_store(scenario, store, [golden.version, model_version(rerun)])
    check_unchanged(scenario, before, store, "data")
    scenario.expect(sha256_file(manifest) == manifest_sha, "the shard set's manifest changed")
    scenario.assert_ok()


def test_corrupt_cached_download(denoise, golden, scenario, mnist_mirror):
    store = golden.restore_live()
    name = "train-images-idx3-ubyte.gz"
    victim = store / "downloads" / "mnist" / name
    data = bytearray(victim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    victim.write_bytes(bytes(data))
    before = {k: v for k, v in data_files(store).items() if not k.endswith(name)}

    # another noise level: new shards, made from the cached download
    rerun = denoise.run([*TRAIN_ARGS, "--noise-level", "0.3"], store)
    said = [ln for ln in (rerun.stdout + rerun.stderr).splitlines() if name in ln]
    scenario.expect(bool(said), f"no line names the corrupt download {name}")
    if expect_success(scenario, rerun, "the rerun with a corrupt download"):
        check_store(scenario, store, [golden.version, model_version(rerun)])
    expected = sha256_file(mnist_mirror / name)
    scenario.expect(sha256_file(victim) == expected, f"{name} was not re-fetched")
    check_unchanged(scenario, before, store, "data")
    scenario.assert_ok()


# --------------------------------------------------------------------------- a garbage registry


@pytest.mark.parametrize(
    "garbage", ["{}", "[]", "null", "not json {"], ids=["empty_object", "list", "null", "not_json"]
)
def test_garbage_registry(garbage, denoise, golden, scenario, tmp_path, noisy_folder):
    store = golden.copy_to(tmp_path / "store")
    registry = store / "models" / "registry.json"
    registry.write_text(garbage)
    models_before = sorted(p.name for p in (store / "models").iterdir())

    refused = denoise.run(TRAIN_ARGS, store)
    line = last_error_line(refused)
    scenario.expect(
        refused.returncode not in (0, KILLED),
        f"a training with registry {garbage!r} exited {refused.returncode}",
    )
    scenario.expect(
        "registry.json" in line and "unexpected error" not in line,
        f"no one line naming the registry; last line: {line!r}",
    )
    models_after = sorted(p.name for p in (store / "models").iterdir())
    scenario.expect(
        models_after == models_before, f"trained before checking the registry: {models_after}"
    )
    scenario.expect(registry.read_text() == garbage, "the registry was rewritten")
    scenario.checked += 1
    if garbage == "not json {":
        # a .keras file needs no registry
        model = store / "models" / golden.version / "model.keras"
        out = tmp_path / "out"
        result = denoise.run(["folder", str(noisy_folder), str(out), "--model", str(model)], store)
        if expect_success(
            scenario, result, "denoise folder --model file.keras beside a non-JSON registry"
        ):
            check_tree(scenario, out, "OUT")
    check_tree(scenario, store / "models" / golden.version, "model")
    scenario.assert_ok()
