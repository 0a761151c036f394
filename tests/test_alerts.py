"""Alerts end to end: a real Prefect server (its automations service), the real
``denoise`` commands, and a webhook receiver on 127.0.0.1 that records what
it is sent. Waits are on conditions with time limits, not sleeps."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.faults.harness import denoise_env
from tests.test_folder import identity_model, save_model

REPO = Path(__file__).resolve().parent.parent


class Receiver:
    """A webhook on 127.0.0.1: every POST's JSON body, in order of arrival."""

    def __init__(self):
        self.posts: list[dict] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.end_headers()
                with receiver.arrived:
                    receiver.posts.append(json.loads(body or b"{}"))
                    receiver.arrived.notify_all()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float, what: str) -> list[dict]:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.posts) >= count, timeout):
                raise AssertionError(f"no {what} message after {timeout:.0f} s: {self.posts}")
            return list(self.posts)

    def quiet_for(self, seconds: float) -> list[dict]:
        """The posts, once none arrived for ``seconds`` (a second message would be a bug)."""
        with self.arrived:
            seen = [len(self.posts)]
            while self.arrived.wait_for(lambda: len(self.posts) > seen[0], seconds):
                seen[0] = len(self.posts)
            return list(self.posts)

    def clear(self) -> None:
        with self.arrived:
            self.posts.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver():
    r = Receiver()
    yield r
    r.stop()


def denoise(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture()
def alert_env(prefect_api, receiver, tmp_path):
    """The command environment, with an alert on every kind sent to ``receiver``;
    removed afterwards (the server is shared with other tests)."""
    env = denoise_env(tmp_path / "store", tmp_path / "home", prefect_api, None)
    added = denoise(env, "alerts", "add", "--webhook", receiver.url, "--name", "test")
    assert added.returncode == 0, added.stderr
    yield env
    denoise(env, "alerts", "remove", "--all")


def folder_with_a_bad_file(root: Path) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / f"ok{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_alerts_are_added_listed_and_removed_with_bad_input_in_one_line(prefect_api, tmp_path):
    env = denoise_env(tmp_path / "store", tmp_path / "home", prefect_api, None)
    hook = "http://127.0.0.1:9/hook"
    assert denoise(env, "alerts", "add", "--webhook", hook, "--name", "a").returncode == 0
    assert (
        denoise(env, "alerts", "add", "--webhook", hook, "--name", "b", "--on", "gate").returncode
        == 0
    )
    # adding again replaces: still one automation per kind
    assert denoise(env, "alerts", "add", "--webhook", hook, "--name", "a").returncode == 0
    listed = denoise(env, "alerts", "list")
    assert listed.stdout.splitlines() == [
        f"a: failed, crashed, gate, files -> {hook}",
        f"b: gate -> {hook}",
    ]
    assert denoise(env, "alerts", "remove", "b").returncode == 0
    assert denoise(env, "alerts", "list").stdout.startswith("a: ")
    for argv, message in [
        (["add", "--webhook", "ftp://nowhere"], "expected an http:// or https:// URL"),
        (["add", "--webhook", hook, "--on", "failed,boom"], "unknown alert kind 'boom'"),
        (["remove", "nosuch"], "no alert named nosuch"),
        (["remove"], "give an alert's NAME or --all"),
    ]:
        result = denoise(env, "alerts", *argv)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    down = denoise({**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}, "alerts", "list")
    assert down.returncode == 2 and "does not answer" in down.stderr
    assert "Traceback" not in down.stderr
    assert "removed: a" in denoise(env, "alerts", "remove", "--all").stdout
    assert denoise(env, "alerts", "list").stdout.startswith("no denoise alerts")


def test_failed_files_and_a_failed_run_each_send_one_message(alert_env, receiver, tmp_path):
    store = tmp_path / "store"
    save_model(store / "models" / "20260101-000000-custom-0001", identity_model())
    src = folder_with_a_bad_file(tmp_path / "in")
    run = denoise(alert_env, "folder", str(src), str(tmp_path / "out"))
    assert run.returncode == 1, run.stderr  # one file failed
    receiver.wait_for(1, 60, "files-failed")
    [post] = receiver.quiet_for(3)
    body = post["body"]
    assert post["subject"].startswith("denoise: denoise-folder run ")
    assert post["subject"].endswith(": files failed")
    lines = dict(line.split(": ", 1) for line in body.splitlines())
    assert lines["flow"] == "denoise-folder"
    assert lines["what"].startswith(f"1 of 4 file(s) failed in {src}")
    assert "(3 denoised, 0 skipped)" in lines["what"]
    assert lines["link"].startswith(alert_env["PREFECT_API_URL"].removesuffix("/api") + "/runs/")
    assert lines["run"] in post["subject"]

    receiver.clear()
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(good / "x.png")
    # the flow itself, given a model that is not there: the run fails in resolve_denoiser
    failing = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from flows.denoising import denoise_folder; "
            "denoise_folder(sys.argv[1], sys.argv[2], model='v-nosuch')",
            str(good),
            str(tmp_path / "out2"),
        ],
        cwd=REPO,
        env=alert_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failing.returncode != 0 and "v-nosuch" in failing.stderr
    receiver.wait_for(1, 60, "run failed")
    [post] = receiver.quiet_for(3)
    lines = dict(line.split(": ", 1) for line in post["body"].splitlines())
    assert lines["flow"] == "denoise-folder"
    assert lines["what"].startswith("ended Failed: ")
    assert "v-nosuch" in lines["what"]
    assert lines["link"].endswith("/runs/flow-run/" + lines["link"].rsplit("/", 1)[1])
    assert post["subject"] == f"denoise: denoise-folder run {lines['run']} ended Failed"


@pytest.mark.slow
def test_a_model_failing_its_gate_sends_the_gate_message(alert_env, receiver, mnist_mirror):
    trained = denoise(
        {**alert_env, "DENOISE_DATA_SOURCE": str(mnist_mirror)},
        "train",
        "--train-limit",
        "400",
        "--test-limit",
        "200",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--min-psnr-gain",
        "60",  # out of reach
    )
    assert trained.returncode == 1, trained.stderr[-2000:]  # the gate failed, the run did not
    receiver.wait_for(1, 60, "quality gate")
    [post] = receiver.quiet_for(3)
    lines = dict(line.split(": ", 1) for line in post["body"].splitlines())
    assert lines["flow"] == "train-denoiser"
    assert " failed its quality gate: PSNR gain " in lines["what"]
    assert "< 60.00 dB required" in lines["what"] and "200 test images" in lines["what"]
    assert post["subject"].endswith("model failed its quality gate")
    assert "/runs/flow-run/" in lines["link"]
