"""What the benchmark scripts share: paths, the data mirror, peak memory,
running a measurement in a child process of the same script, and the
photographs' test protocol (fixed awgn draws, PSNR of clipped outputs).

The scripts run as ``python bench/<name>.py``, so this folder is on
``sys.path`` and they import this module as ``_common``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MIRROR = REPO.parent / "shared" / "datasets" / "mnist"


def add_mirror_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mirror", type=Path, default=Path(os.environ.get("DENOISE_DATA_SOURCE", DEFAULT_MIRROR))
    )


def parse_model_arguments(doc: str, count_help: str):
    """The command line of the scripts that score one saved model: the model
    file, ``--count`` images and ``--mirror``. Returns (args, loaded model)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("model", help="a .keras file")
    parser.add_argument("--count", type=int, default=2000, help=count_help)
    add_mirror_argument(parser)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    return args, keras.saving.load_model(args.model, compile=False)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_child(script: str, args: list[str], name: str, env: dict[str, str] | None = None) -> dict:
    """``python script args`` with the repository importable; its last stdout
    line, as JSON. Exits with the end of its stderr if it fails."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode:
        sys.exit(f"{name} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_mnist_shards(out: Path, images, labels, shard_rows: int) -> None:
    """A shard set of MNIST-like digits at the blog's noise (gaussian 0.5):
    ``images`` for training, their first 64 as validation and test."""
    import numpy as np

    from denoiser.data.shards import SplitArrays, write_shard_set

    small = SplitArrays(images[:64], labels[:64], np.arange(64))
    write_shard_set(
        out,
        {
            "train": SplitArrays(images, labels, np.arange(len(images))),
            "validation": small,
            "test": small,
        },
        {"kind": "gaussian", "level": 0.5},
        shard_rows=shard_rows,
        seed=0,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Until ``url`` answers; exits the script if ``proc`` ends or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - loopback
                return
        except OSError:
            time.sleep(0.3)
    sys.exit(f"{what} did not answer at {url}")


def start_prefect_server(home: Path, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """A ``prefect server`` of its own (``home`` its PREFECT_HOME) on a free
    loopback port, its own process group; returns it and its API URL once
    it answers. Output to ``log``, or nowhere."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_API_URL=api,
        PREFECT_API_URL=api,
    )
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        + ["--port", str(port)],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"{api}/health", proc, "prefect server", timeout=300)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)  # no server left behind when it does not answer
        raise
    return proc, api


def awgn_test_set(clean: list[np.ndarray], sigmas, seed: int) -> dict[int, list[np.ndarray]]:
    """The noisy test images, one fixed draw per sigma (0-255 units) of
    ``y = x + (sigma/255) N(0, 1)`` in every channel: unclipped, unquantised
    (the protocol of ``../shared/datasets/README.md``)."""
    rng = np.random.default_rng(seed)
    return {
        s: [(x + (s / 255.0) * rng.standard_normal(x.shape)).astype(np.float32) for x in clean]
        for s in sigmas
    }


def psnr(clean: np.ndarray, out: np.ndarray) -> float:
    """PSNR (peak 1) of an output clipped to [0, 1], over all its pixels and channels."""
    mse = float(np.mean((np.clip(out, 0.0, 1.0).astype(np.float64) - clean) ** 2))
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def print_sigma_table(rows: dict, meta: dict, sigmas, seconds: str, seconds_header: str) -> None:
    """The markdown table of mean PSNR per sigma: a row per method (``rows``:
    name -> sigma -> dB) with its parameters and its ``meta[name][seconds]``
    (NaN: not measured); a published row without a parameter count shows -."""
    print(
        f"| method | params | {seconds_header} | " + " | ".join(f"sigma {s}" for s in sigmas) + " |"
    )
    print("|---|---|---|" + "---|" * len(sigmas))
    for name, figures in rows.items():
        m = meta[name]
        cells = [f"{figures[s]:.2f}" if s in figures else "-" for s in sigmas]
        sec = "-" if math.isnan(m[seconds]) else f"{m[seconds]:.2f}"
        params = "-" if "published" in name and not m["params"] else f"{m['params']:,}"
        print(f"| {name} | {params} | {sec} | " + " | ".join(cells) + " |")
