"""The model registry: promotion rules, resolution, and `denoise models`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from artifacts.registry import list_models, promote, read_registry, register_model
from artifacts.resolution import resolve_model
from denoiser.core.errors import ConfigError, ModelError
from flows.cli import main


def version_card(version: str, psnr: float, passed: bool = True, data: str = "d1") -> dict:
    """The card fields the registry decides on."""
    return {
        "version": version,
        "architecture": "unet",
        "params": 118945,
        "created": version,
        "data": {"manifest_sha256": data},
        "metrics": {"psnr_denoised": psnr, "ssim_denoised": 0.9},
        "quality_gate": {"passed": passed, "psnr_gain": psnr - 9.4, "min_psnr_gain": 5.0},
    }


def make_version(
    store: Path, version: str, psnr: float, passed: bool = True, data: str = "d1"
) -> Path:
    folder = store / "models" / version
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"weights")  # the registry never loads it
    (folder / "model.json").write_text(json.dumps(version_card(version, psnr, passed, data)))
    return folder


def test_promotion_rules(tmp_path):
    first = register_model(
        tmp_path, make_version(tmp_path, "20260101-000000-unet-0001", 20.0), None, "run-1"
    )
    assert first["promoted"] and first["status"] == "production"
    worse = register_model(tmp_path, make_version(tmp_path, "20260102-000000-unet-0002", 19.0))
    assert not worse["promoted"] and "does not beat production" in worse["reason"]
    failing = register_model(
        tmp_path, make_version(tmp_path, "20260103-000000-unet-0003", 30.0, passed=False)
    )
    assert not failing["promoted"] and "failed the quality gate" in failing["reason"]
    other_data = register_model(
        tmp_path, make_version(tmp_path, "20260104-000000-unet-0004", 25.0, data="d2")
    )
    assert not other_data["promoted"] and "different test set" in other_data["reason"]
    better = register_model(tmp_path, make_version(tmp_path, "20260105-000000-unet-0005", 21.0))
    assert better["promoted"] and "beats production" in better["reason"]

    state = read_registry(tmp_path)
    assert state["production"] == "20260105-000000-unet-0005"
    assert state["versions"]["20260101-000000-unet-0001"]["flow_run_id"] == "run-1"
    assert [m.version for m in list_models(tmp_path)][0] == "20260105-000000-unet-0005"
    assert not list(tmp_path.glob("models/.*.tmp"))

    promote(tmp_path, "20260101-000000-unet-0001")
    assert resolve_model(tmp_path).version == "20260101-000000-unet-0001"
    with pytest.raises(ConfigError, match="unknown model version"):
        promote(tmp_path, "nope")


def test_models_tested_on_the_same_images_compare_whatever_they_trained_on(tmp_path):
    """A photo model trained on bsd432 and one trained on train400 are both
    scored on Set12 (the same test images, the same sigmas): the better one
    is promoted, though their shard sets differ; other test images or other
    sigmas are not compared."""

    def version(name: str, psnr: float, data: str, test: str, sigmas=(15.0, 25.0, 50.0)):
        folder = make_version(tmp_path, name, psnr, data=data)
        card = json.loads((folder / "model.json").read_text())
        card["data"]["test_sha256"] = test
        card["metrics"]["sigmas"] = list(sigmas)
        (folder / "model.json").write_text(json.dumps(card))
        return folder

    assert register_model(tmp_path, version("20260101-000000-unet-0001", 29.0, "a", "set12"))[
        "promoted"
    ]
    better = register_model(tmp_path, version("20260102-000000-unet-0002", 29.5, "b", "set12"))
    assert better["promoted"] and "beats production" in better["reason"]
    worse = register_model(tmp_path, version("20260103-000000-unet-0003", 29.1, "c", "set12"))
    assert not worse["promoted"] and "does not beat production" in worse["reason"]
    for name, test, sigmas in (
        ("20260104-000000-unet-0004", "other", (15.0, 25.0, 50.0)),
        ("20260105-000000-unet-0005", "set12", (15.0, 25.0)),
    ):
        other = register_model(tmp_path, version(name, 35.0, "d", test, sigmas))
        assert not other["promoted"] and "different test set" in other["reason"]
    assert read_registry(tmp_path)["production"] == "20260102-000000-unet-0002"


def test_resolve_model_by_version_folder_and_file(tmp_path):
    folder = make_version(tmp_path, "v1", 20.0)
    assert resolve_model(tmp_path, "v1").model_path == folder / "model.keras"
    assert resolve_model(tmp_path, str(folder)).version == "v1"
    assert resolve_model(tmp_path, str(folder / "model.keras")).card.architecture == "unet"
    assert resolve_model(tmp_path).version == "v1"  # no production yet: newest that passed
    with pytest.raises(ModelError, match="not found"):
        resolve_model(tmp_path, str(tmp_path / "nowhere.keras"))
    with pytest.raises(ModelError, match="holds no model.keras"):
        resolve_model(tmp_path, str(tmp_path))


def test_an_empty_store_says_to_train_first(tmp_path):
    with pytest.raises(ModelError, match="run `denoise train` first"):
        resolve_model(tmp_path)
    make_version(tmp_path, "v1", 12.0, passed=False)
    with pytest.raises(ModelError, match="none passed its quality gate"):
        resolve_model(tmp_path)


def test_models_command_lists_and_promotes(tmp_path, capsys):
    make_version(tmp_path, "20260101-000000-unet-0001", 20.0)
    make_version(tmp_path, "20260102-000000-unet-0002", 21.0)
    assert main(["--store", str(tmp_path), "models"]) == 0
    out = capsys.readouterr().out
    assert "20260102-000000-unet-0002" in out and "21.00" in out
    assert main(["--store", str(tmp_path), "models", "promote", "20260101-000000-unet-0001"]) == 0
    assert "production" in capsys.readouterr().out
    assert main(["--store", str(tmp_path), "models", "promote", "missing"]) == 2
    assert "unknown model version 'missing'" in capsys.readouterr().err


# ------------------------------------------------------------ concurrency, faults, corrupt files (issue 13)

import multiprocessing  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import artifacts.registry as registry  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPAWN = multiprocessing.get_context("spawn")


INTERLEAVED = 11  # registrations that each wait for a promotion since the one before


def _register_all(store: str, versions: list[str], after=None, promotions=None) -> None:
    """Register ``versions``; with ``promotions`` (a shared count), INTERLEAVED of
    them spread over the list each wait until another promotion has landed: the
    two overlap for sure, whatever the scheduling."""
    if after is not None:
        after.wait(120)
    waits = {round(k * len(versions) / INTERLEAVED) for k in range(INTERLEAVED)}
    seen = 0
    for i, version in enumerate(versions):
        if promotions is not None and i in waits:
            seen = _wait_for_more(promotions, seen)
        register_model(store, f"{store}/models/{version}")  # a path or a bucket URL


def _wait_for_more(count, seen: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while count.value <= seen:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no promotion in {timeout:.0f} s (still {seen})")
        time.sleep(0.001)
    return count.value


def _promote_until(store: str, versions: list[str], stop, started, promotions=None) -> None:
    i = 0
    while not stop.is_set():
        promote(store, versions[i % len(versions)])
        started.set()
        if promotions is not None:
            with promotions.get_lock():
                promotions.value += 1
        i += 1


def _poll_registry(store: str, stop, results) -> None:
    """Read the registry as fast as possible until told to stop; report what was seen."""
    reads, errors = 0, []
    while not stop.is_set():
        try:
            read_registry(store)  # parses and checks the whole file
            reads += 1
        except Exception as exc:  # noqa: BLE001 - any failure to read is what this test looks for
            errors.append(f"{type(exc).__name__}: {exc}")
    results.put((reads, errors[:5]))


def _run(target, *args):
    proc = SPAWN.Process(target=target, args=args)
    proc.start()
    return proc


def race_two_registrars(store: str, names: list[str], psnrs: list[float]) -> dict:
    """Two processes register interleaved halves of ``names`` (already in the
    store, with ``psnrs``) while a third reads the registry as fast as it can:
    every read valid, no version lost, the best one production. Returns the state."""
    stop, results = SPAWN.Event(), SPAWN.Queue()
    poller = _run(_poll_registry, store, stop, results)
    writers = [_run(_register_all, store, names[0::2]), _run(_register_all, store, names[1::2])]
    for w in writers:
        w.join(300)
    stop.set()
    reads, errors = results.get(timeout=60)
    poller.join(60)
    assert [w.exitcode for w in writers] == [0, 0]
    assert errors == [] and reads > 0
    state = read_registry(store)
    assert sorted(state["versions"]) == sorted(names)
    # every decision was taken on the fresh state: the best model won
    assert state["production"] == names[psnrs.index(max(psnrs))]
    return state


def race_register_and_promote(store: str, bases: list[str], names: list[str]) -> dict:
    """One process registers ``names`` while another promotes ``bases`` by hand
    in a loop, from the first promotion on, with INTERLEAVED promotions landed
    between registrations: no version lost. Returns the state."""
    stop, started, promotions = SPAWN.Event(), SPAWN.Event(), SPAWN.Value("i", 0)
    promoter = _run(_promote_until, store, bases, stop, started, promotions)
    writer = _run(_register_all, store, names, started, promotions)
    writer.join(300)
    stop.set()
    promoter.join(60)
    assert (writer.exitcode, promoter.exitcode) == (0, 0)
    state = read_registry(store)
    assert set(bases + names) <= set(state["versions"])
    assert all(e["version"] in state["versions"] for e in state["history"])
    # the promotions waited for, each one recorded
    assert sum(e["reason"] == "promoted by hand" for e in state["history"]) >= min(
        INTERLEAVED, len(names)
    )
    return state


def test_two_processes_registering_lose_no_version_and_the_registry_is_always_valid(tmp_path):
    rng = random.Random(13)
    psnrs = [x / 100 for x in rng.sample(range(1500, 2500), 200)]
    names = [f"20260101-000000-unet-{i:04d}" for i in range(200)]
    for name, psnr in zip(names, psnrs, strict=True):
        make_version(tmp_path, name, psnr)
    state = race_two_registrars(str(tmp_path), names, psnrs)
    assert sorted(state["versions"]) == names
    assert not list(tmp_path.glob("models/.*.tmp"))


def test_registering_while_promoting_by_hand_loses_no_version(tmp_path):
    bases = [f"20250101-000000-unet-{i:04d}" for i in range(3)]
    for name in bases:
        register_model(tmp_path, make_version(tmp_path, name, 20.0, data="other"))
    names = [f"20260101-000000-unet-{i:04d}" for i in range(60)]
    for i, name in enumerate(names):
        make_version(tmp_path, name, 20.0 + i / 100)
    state = race_register_and_promote(str(tmp_path), bases, names)
    assert sorted(state["versions"]) == sorted(bases + names)
    assert len(state["history"]) > 10  # the promotions went on while the versions were registered


GARBAGE = {
    "empty object": b"{}",
    "list": b"[]",
    "null": b"null",
    "string": b'"x"',
    "not JSON": b"{not json",
    "empty file": b"",
    "not UTF-8": b"\xff\xfe\x00",
    "production a number": b'{"production": 3, "versions": {}}',
    "versions a list": b'{"production": null, "versions": []}',
    "a version not an object": b'{"production": null, "versions": {"v1": "x"}}',
    "history not a list": b'{"production": null, "versions": {}, "history": {}}',
}


@pytest.fixture(params=sorted(GARBAGE))
def garbage_store(request, tmp_path) -> Path:
    make_version(tmp_path, "v1", 20.0)
    (tmp_path / "models" / "registry.json").write_bytes(GARBAGE[request.param])
    return tmp_path


def _assert_one_line_naming_the_registry(exc: BaseException, store: Path) -> None:
    text = str(exc)
    assert isinstance(exc, ModelError)
    assert "\n" not in text
    assert str(store / "models" / "registry.json") in text
    assert "move it aside or fix it" in text


def test_a_garbage_registry_is_one_line_naming_the_file(garbage_store, capsys):
    before = (garbage_store / "models" / "registry.json").read_bytes()
    for call in (
        lambda: read_registry(garbage_store),
        lambda: registry.check_registry(garbage_store),
        lambda: register_model(garbage_store, garbage_store / "models" / "v1"),
        lambda: promote(garbage_store, "v1"),
        lambda: list_models(garbage_store),
        lambda: resolve_model(garbage_store),
        lambda: resolve_model(garbage_store, "v1"),
    ):
        with pytest.raises(ModelError) as info:
            call()
        _assert_one_line_naming_the_registry(info.value, garbage_store)
    assert (
        garbage_store / "models" / "registry.json"
    ).read_bytes() == before  # left for the user to look at

    assert main(["--store", str(garbage_store), "models"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "registry.json" in err and "Traceback" not in err
    assert "unexpected error" not in err


def test_a_model_file_or_folder_outside_the_store_needs_no_registry(
    garbage_store, tmp_path_factory
):
    elsewhere = make_version(tmp_path_factory.mktemp("elsewhere"), "mine", 21.0)
    ref = resolve_model(garbage_store, str(elsewhere / "model.keras"))
    assert (ref.model_path, ref.status) == (elsewhere / "model.keras", "candidate")
    assert resolve_model(garbage_store, str(elsewhere)).card.architecture == "unet"


def test_a_model_file_of_the_store_given_as_a_path_needs_no_registry(garbage_store, caplog):
    path = garbage_store / "models" / "v1" / "model.keras"
    ref = resolve_model(garbage_store, str(path))
    assert (ref.model_path, ref.status) == (path, "candidate")
    assert "registry.json" in caplog.text  # the broken registry is still reported, in one line
    with pytest.raises(ModelError, match="registry.json"):
        resolve_model(garbage_store, "v1")  # a version name does need it


def test_check_registry_accepts_a_missing_or_valid_registry(tmp_path):
    registry.check_registry(tmp_path)  # no store yet: an empty registry
    register_model(tmp_path, make_version(tmp_path, "v1", 20.0))
    registry.check_registry(tmp_path)
    (tmp_path / "models" / "registry.json").write_text(
        '{"versions": {}}'
    )  # production may be left out
    registry.check_registry(tmp_path)
    assert read_registry(tmp_path)["production"] is None


def test_the_summary_carries_the_model_checksum(tmp_path):
    folder = make_version(tmp_path, "v1", 20.0)
    card = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**card, "model_sha256": "ab" * 32}))
    assert resolve_model(tmp_path, "v1").summary()["model_sha256"] == "ab" * 32
    assert resolve_model(tmp_path, str(folder)).summary()["model_sha256"] == "ab" * 32


def test_update_registry_is_a_compare_and_swap_that_returns_the_change_result(tmp_path):
    register_model(tmp_path, make_version(tmp_path, "v1", 20.0))

    def rename_production(state: dict) -> tuple[dict, str]:
        return {**state, "production": None}, state["production"]

    assert registry.update_registry(tmp_path, rename_production) == "v1"
    assert read_registry(tmp_path)["production"] is None

    def break_it(state: dict) -> tuple[dict, None]:
        return {"versions": []}, None

    before = (tmp_path / "models" / "registry.json").read_bytes()
    with pytest.raises(ModelError, match="versions"):
        registry.update_registry(tmp_path, break_it)  # a bad change is never written
    assert (tmp_path / "models" / "registry.json").read_bytes() == before


def test_a_registry_lock_held_too_long_is_one_line(tmp_path):
    from filelock import FileLock

    register_model(tmp_path, make_version(tmp_path, "v1", 20.0))
    with FileLock(tmp_path / "models" / "registry.json.lock"):
        with pytest.raises(ModelError) as info:
            registry.update_registry(tmp_path, lambda state: (state, None), timeout=0.2)
    assert "\n" not in str(info.value) and "registry.json" in str(info.value)
    registry.update_registry(tmp_path, lambda state: (state, None), timeout=0.2)  # released: works


_REGISTER = "import sys; from artifacts.registry import register_model; register_model(sys.argv[1], sys.argv[2])"


@pytest.mark.parametrize(
    "point, registered", [("registry.before_write", False), ("registry.after_write", True)]
)
def test_a_registration_killed_while_writing_loses_nothing(tmp_path, point, registered):
    register_model(tmp_path, make_version(tmp_path, "v1", 20.0))
    v2 = make_version(tmp_path, "v2", 21.0)
    path = tmp_path / "models" / "registry.json"
    before = path.read_bytes()
    env = {**os.environ, "DENOISE_FAILPOINTS": f"{point}=kill"}
    killed = subprocess.run(
        [sys.executable, "-c", _REGISTER, str(tmp_path), str(v2)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    state = read_registry(tmp_path)  # valid whichever moment the kill hit
    assert ("v2" in state["versions"]) is registered
    if not registered:
        assert path.read_bytes() == before

    env.pop("DENOISE_FAILPOINTS")
    rerun = subprocess.run(
        [sys.executable, "-c", _REGISTER, str(tmp_path), str(v2)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 0, rerun.stderr
    state = read_registry(tmp_path)
    assert sorted(state["versions"]) == ["v1", "v2"] and state["production"] == "v2"
    assert not list(
        tmp_path.glob("models/.*.tmp")
    )  # the killed writer's temporary file is cleaned up


def test_a_promote_killed_before_the_write_keeps_the_previous_production(tmp_path):
    register_model(tmp_path, make_version(tmp_path, "v1", 20.0))
    register_model(tmp_path, make_version(tmp_path, "v2", 19.0))
    env = {**os.environ, "DENOISE_FAILPOINTS": "registry.before_write=kill"}
    cmd = [sys.executable, "-m", "flows.cli", "--store", str(tmp_path), "models", "promote", "v2"]
    killed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert read_registry(tmp_path)["production"] == "v1"
    env.pop("DENOISE_FAILPOINTS")
    assert subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=120).returncode == 0
    assert read_registry(tmp_path)["production"] == "v2"


def test_a_full_disk_while_writing_leaves_the_previous_registry_and_no_temporary_file(
    tmp_path, monkeypatch
):
    register_model(tmp_path, make_version(tmp_path, "v1", 20.0))
    before = (tmp_path / "models" / "registry.json").read_bytes()
    monkeypatch.setenv("DENOISE_FAILPOINTS", "registry.before_write=enospc")
    with pytest.raises(OSError, match="No space left"):
        register_model(tmp_path, make_version(tmp_path, "v2", 21.0))
    assert (tmp_path / "models" / "registry.json").read_bytes() == before
    assert not list(tmp_path.glob("models/.*.tmp"))
