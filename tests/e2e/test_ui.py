"""End to end, as a user runs it: a real Prefect server, the work pool,
`prefect deploy --all`, a worker, both deployments triggered and completed,
then Debian's Chromium (driven by Playwright) checks that the UI renders the
artifacts. Every process started here is torn down whatever happens."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(os.environ.get("DENOISE_SCREENSHOTS", REPO / "tests" / "e2e" / "screenshots"))
BIN = Path(sys.executable).parent


def find_chromium() -> str | None:
    """Debian's Chromium, else the browser Playwright installed itself, else None."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            own = p.chromium.executable_path
        return own if own and Path(own).is_file() else None
    except Exception:  # noqa: BLE001 - no Playwright driver: no browser either
        return None


@pytest.fixture(scope="module", autouse=True)
def chromium() -> str:
    """Decided before any server starts: skipped in one line without a browser
    (a failure under CI=true, where the browser is part of the install)."""
    path = find_chromium()
    if path is None:
        message = (
            "no Chromium for the end-to-end UI test: `apt-get install chromium` (as root) or "
            "`python -m playwright install chromium`"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory, mnist_mirror):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": api,
        "PREFECT_API_URL": api,
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "results"),
        "DENOISE_DATA_SOURCE": str(mnist_mirror),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PWD": str(REPO),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("PREFECT_PROFILES_PATH", None)
    logs = home / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def spawn(name: str, *args: str, cwd: Path = REPO) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [str(BIN / "prefect"), *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    def run(*args: str) -> str:
        done = subprocess.run(
            [str(BIN / "prefect"), *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, (
            f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        )
        return done.stdout

    try:
        spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (logs / "server.log").read_text()[-3000:]
            assert procs[0].poll() is None, (logs / "server.log").read_text()[-3000:]
            time.sleep(1)
        run("work-pool", "create", "denoise-pool", "--type", "process")
        deployed = run("--no-prompt", "deploy", "--all")
        assert "nightly" in deployed and "inbox" in deployed
        # the worker starts in a folder of its own: the deployments import the flows by
        # module path and move it nowhere (no pull step); its flow runs work in a temporary folder
        elsewhere = home / "worker-folder"
        elsewhere.mkdir()
        spawn("worker", "worker", "start", "--pool", "denoise-pool", cwd=elsewhere)
        yield {"api": api, "ui": f"http://127.0.0.1:{port}", "env": env, "logs": logs}
    finally:
        for proc in reversed(procs):
            stop(proc)


def client_call(server, coro_fn):
    """Run an async client call against the e2e server (not the test harness)."""
    from prefect.client.orchestration import PrefectClient

    async def go():
        async with PrefectClient(server["api"]) as client:
            return await coro_fn(client)

    return asyncio.run(go())


def run_deployment_and_wait(server, name: str, parameters: dict, timeout: float = 420):
    async def create(client):
        deployment = await client.read_deployment_by_name(name)
        return await client.create_flow_run_from_deployment(deployment.id, parameters=parameters)

    run = client_call(server, create)
    deadline = time.monotonic() + timeout
    while True:
        state = client_call(server, lambda c: c.read_flow_run(run.id)).state
        if state.is_final():
            break
        if time.monotonic() > deadline:
            pytest.fail(
                f"{name} did not finish in {timeout} s (state {state.name}); worker log:\n"
                + (server["logs"] / "worker.log").read_text()[-4000:]
            )
        time.sleep(3)
    assert state.is_completed(), (
        f"{name} ended {state.name}: {state.message}\n"
        + (server["logs"] / "worker.log").read_text()[-4000:]
    )
    return run


def test_deployments_run_and_the_ui_shows_their_artifacts(chromium, server, mnist_mirror, tmp_path):
    from PIL import Image

    store = tmp_path / "store"

    # a bad parameter from the API is refused by the parameter schema
    async def bad(client):
        deployment = await client.read_deployment_by_name("train-denoiser/nightly")
        return await client.create_flow_run_from_deployment(
            deployment.id, parameters={"training": {"epochs": 0}}
        )

    with pytest.raises(Exception, match="(?i)epochs|validation|schema"):
        client_call(server, bad)

    training = run_deployment_and_wait(
        server,
        "train-denoiser/nightly",
        {
            "data": {"source": str(mnist_mirror), "train_limit": 600, "test_limit": 200},
            "training": {"epochs": 1, "batch_size": 64},
            # the gate off: the UI is the subject (the real gate: tests/test_training_flow.py)
            "evaluation": {"min_psnr_gain": -100.0},
            "store": str(store),
        },
    )
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(inbox / f"{i}.png")
    (inbox / "broken.png").write_text("not an image")
    folder = run_deployment_and_wait(
        server,
        "denoise-folder/inbox",
        {"input_dir": str(inbox), "output_dir": str(tmp_path / "clean"), "store": str(store)},
    )
    assert sorted(p.name for p in (tmp_path / "clean").glob("*.png")) == ["0.png", "1.png", "2.png"]

    async def deployments(client):
        return await client.read_deployments()

    schedules = {d.name: d.schedules for d in client_call(server, deployments)}
    assert schedules["nightly"][0].schedule.cron == "0 3 * * *"
    assert schedules["inbox"][0].schedule.interval.total_seconds() == 900

    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    ui = server["ui"]
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            page.goto(f"{ui}/runs/flow-run/{training.id}", wait_until="networkidle")
            page.get_by_text("Completed").first.wait_for(timeout=30_000)
            page.screenshot(path=str(SCREENSHOTS / "training-run.png"), full_page=True)
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("evaluation-report").first.wait_for(timeout=30_000)
            page.screenshot(path=str(SCREENSHOTS / "training-run-artifacts.png"), full_page=True)

            page.goto(f"{ui}/artifacts", wait_until="networkidle")
            for key in ("evaluation-metrics", "evaluation-report", "denoise-report", "model-card"):
                page.get_by_text(key).first.wait_for(timeout=30_000)
            page.screenshot(path=str(SCREENSHOTS / "artifacts.png"), full_page=True)

            def open_artifact(key: str) -> None:
                page.goto(f"{ui}/artifacts", wait_until="networkidle")
                page.get_by_text(key, exact=True).first.click()  # the key's history...
                page.wait_for_load_state("networkidle")
                page.locator(
                    "a[href*='/artifacts/artifact/']"
                ).first.click()  # ...its latest version
                page.wait_for_load_state("networkidle")
                page.wait_for_timeout(1000)
                page.screenshot(path=str(SCREENSHOTS / f"{key}.png"), full_page=True)

            open_artifact("evaluation-metrics")
            page.get_by_text("psnr_denoised").first.wait_for(timeout=30_000)
            page.screenshot(path=str(SCREENSHOTS / "evaluation-metrics.png"), full_page=True)

            open_artifact("evaluation-report")
            grid = page.locator("img[src^='data:image/png;base64,']").first
            grid.wait_for(timeout=30_000)
            assert grid.evaluate("img => img.naturalWidth") > 100  # the grid decoded and rendered
            page.screenshot(path=str(SCREENSHOTS / "evaluation-report.png"), full_page=True)

            open_artifact("denoise-report")
            page.get_by_text("broken.png").first.wait_for(timeout=30_000)
            page.get_by_text("not an image Pillow can read").first.wait_for(timeout=30_000)
            page.screenshot(path=str(SCREENSHOTS / "denoise-report.png"), full_page=True)

            page.goto(f"{ui}/runs/flow-run/{folder.id}", wait_until="networkidle")
            page.get_by_text("Completed").first.wait_for(timeout=30_000)
            page.screenshot(path=str(SCREENSHOTS / "folder-run.png"), full_page=True)
        finally:
            browser.close()
