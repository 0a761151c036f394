"""Fixtures of the fault-injection suite: one real Prefect server for the
session, a runner for the real ``denoise`` command, a model trained once and
shared by copying its store, a small disk, and the tally printed at the end."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.faults.harness import (
    TRAIN_ARGS,
    Command,
    Scenario,
    denoise_env,
    model_version,
    start_denoise,
    tail,
)
from tests.servers import PrefectServer

TALLY: list[tuple[str, bool, int, int]] = []
SPARE_SERVER_FIXTURE = "spare_prefect_api"


# --------------------------------------------------------------------------- Prefect servers


@pytest.fixture(scope="session")
def fault_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def _spare_server(request, fault_dir):
    """A second server for the scenario that kills one, started early (in the
    background) only when that scenario was collected."""
    wanted = any(
        SPARE_SERVER_FIXTURE in getattr(item, "fixturenames", ()) for item in request.session.items
    )
    server = PrefectServer(fault_dir / "spare-server") if wanted else None
    yield server
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def prefect_api(fault_dir, _spare_server) -> str:
    """The URL of one real Prefect server shared by the whole suite."""
    server = PrefectServer(fault_dir / "server")
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


@pytest.fixture()
def spare_prefect_api(_spare_server) -> PrefectServer:
    assert _spare_server is not None
    _spare_server.wait_healthy()
    return _spare_server


# --------------------------------------------------------------------------- the runner


@dataclass
class Runner:
    """Runs ``python -m flows.cli --store STORE ...`` with this test's Prefect home."""

    api_url: str | None
    home: Path
    logs: Path
    data_source: Path | str | None

    def start(
        self,
        args: list[str],
        store: Path,
        env_extra: dict | None = None,
        failpoints: str | None = None,
        api_url: str | None | bool = True,
        preexec=None,
        cwd: Path | None = None,
    ) -> Command:
        url = self.api_url if api_url is True else (api_url or None)
        env = denoise_env(store, self.home, url, self.data_source, failpoints, env_extra)
        return start_denoise(["--store", str(store), *args], env, self.logs, preexec, cwd)

    def run(
        self,
        args: list[str],
        store: Path,
        env_extra: dict | None = None,
        failpoints: str | None = None,
        timeout: float = 300,
        api_url: str | None | bool = True,
        preexec=None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        return self.start(args, store, env_extra, failpoints, api_url, preexec, cwd).wait(timeout)


@pytest.fixture()
def denoise(tmp_path, prefect_api, mnist_mirror) -> Runner:
    return Runner(prefect_api, tmp_path / "prefect-home", tmp_path / "logs", mnist_mirror)


@pytest.fixture()
def run_denoise(denoise):
    """``run_denoise(args, store, env_extra=None, failpoints=None, timeout=...) -> CompletedProcess``."""
    return denoise.run


# --------------------------------------------------------------------------- a model trained once


@dataclass(frozen=True)
class Golden:
    """A store with the downloads, the shards and one registered model (the
    production one), kept pristine; scenarios copy it. ``live`` is the path it
    was made at."""

    copy: Path
    live: Path
    version: str

    def copy_to(
        self, dst: Path, parts: tuple[str, ...] = ("downloads", "shards", "models")
    ) -> Path:
        dst.mkdir(parents=True, exist_ok=True)
        for part in parts:
            shutil.copytree(self.copy / part, dst / part, symlinks=True)
        return dst

    def restore_live(self) -> Path:
        """The store back at its original path, so the next ``denoise train``
        finds the download and shards there and reuses them."""
        shutil.rmtree(self.live, ignore_errors=True)
        shutil.copytree(self.copy, self.live, symlinks=True)
        return self.live


@pytest.fixture(scope="session")
def golden(fault_dir, prefect_api, mnist_mirror) -> Golden:
    runner = Runner(prefect_api, fault_dir / "golden-home", fault_dir / "golden-logs", mnist_mirror)
    live = fault_dir / "store"
    result = runner.run(TRAIN_ARGS, live, timeout=600)
    if result.returncode != 0:
        pytest.fail(
            f"the shared training run failed (exit {result.returncode}):\n{tail(result.stderr)}"
        )
    version = model_version(result)
    copy = fault_dir / "golden-store"
    shutil.copytree(live, copy, symlinks=True)
    return Golden(copy, live, version)


# --------------------------------------------------------------------------- inputs


def _write_images(root: Path, count: int = 36, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / ("" if i % 3 else "sub") / ("deeper" if i % 9 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        h, w = 48 + 4 * (i % 5), 64
        if i % 6 == 5:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                folder / f"pic{i:03d}.jpg", quality=90
            )
        else:
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(
                folder / f"img{i:03d}.png"
            )


@pytest.fixture(scope="session")
def _image_template(fault_dir) -> Path:
    root = fault_dir / "images"
    _write_images(root)
    return root


@pytest.fixture()
def noisy_folder(tmp_path, _image_template) -> Path:
    """A few dozen small images (gray PNG and RGB JPEG, in subfolders), fresh per test."""
    dst = tmp_path / "noisy"
    shutil.copytree(_image_template, dst)
    return dst


@pytest.fixture()
def model_store(tmp_path, golden) -> Path:
    """A store holding the shared model (production) and its registry."""
    return golden.copy_to(tmp_path / "store", ("models",))


# --------------------------------------------------------------------------- a small disk


class SmallDisk:
    """A folder that fills up: a tmpfs of ``size`` bytes when mounting works
    here (the real thing: ENOSPC from the kernel, for every file at once), else
    a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) applied to the command, so
    its writes fail with EFBIG: one file too large, not a disk full. ``kind``
    says which; ``grow()`` brings the space back."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        path.mkdir(parents=True, exist_ok=True)
        try:
            probe = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                capture_output=True,
                text=True,
            )
        except OSError as exc:  # no mount command at all
            probe = subprocess.CompletedProcess([], 127, "", f"mount: {exc.strerror}")
        self.kind = "tmpfs" if probe.returncode == 0 else "rlimit"
        self.why_not_tmpfs = (probe.stderr or probe.stdout).strip() or f"exit {probe.returncode}"
        self.limited = True

    def preexec(self):
        if self.kind == "tmpfs" or not self.limited:
            return None
        size = self.size

        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

        return limit

    def grow(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=256m", str(self.path)], check=True)
        self.limited = False

    def release(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture()
def small_disk(scenario):
    """Makes a :class:`SmallDisk`; the scenario's record and output name its
    kind. Under CI=true a disk that is not a tmpfs fails the test: the size
    limit proves something else than a full disk."""
    disks: list[SmallDisk] = []

    def make(path: Path, size: int) -> SmallDisk:
        disk = SmallDisk(path, size)
        disks.append(disk)
        scenario.mode = disk.kind
        print(f"small disk of {size} bytes at {path}: {disk.kind}")
        if disk.kind != "tmpfs":
            said = f"no tmpfs could be mounted at {path} ({disk.why_not_tmpfs})"
            if in_ci():
                pytest.fail(f"{said}: CI=true needs the real full disk, not a file-size limit")
            warnings.warn(
                f"{said}: the full disk is a file-size limit (RLIMIT_FSIZE) here", stacklevel=2
            )
        return disk

    yield make
    for disk in disks:
        disk.release()


# --------------------------------------------------------------------------- the tally


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"_fault_report_{report.when}", report)


@pytest.fixture()
def scenario(request) -> Scenario:
    """This scenario's findings; recorded in the tally when the test ends."""
    sc = Scenario(request.node.name.removeprefix("test_"))
    yield sc
    report = getattr(request.node, "_fault_report_call", None)
    survived = bool(report is not None and report.passed)
    name = f"{sc.name} [{sc.mode}]" if sc.mode else sc.name
    TALLY.append((name, survived, sc.checked, sc.lost))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not TALLY:
        return
    tr = terminalreporter
    width = max(len(name) for name, *_ in TALLY)
    tr.section("fault-injection suite")
    tr.write_line(
        f"faults tried {len(TALLY)}, survived {sum(s for _, s, _, _ in TALLY)}, "
        f"files checked {sum(c for *_, c, _ in TALLY)}, files lost {sum(lost for *_, lost in TALLY)}"
    )
    tr.write_line(f"{'scenario':<{width}}  {'survived':>8}  {'checked':>7}  {'lost':>4}")
    for name, survived, checked, lost in TALLY:
        tr.write_line(f"{name:<{width}}  {'yes' if survived else 'NO':>8}  {checked:>7}  {lost:>4}")
