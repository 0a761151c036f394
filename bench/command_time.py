"""How long short commands take from start to exit, as a user runs them.

``denoise --help``, ``denoise models``, and ``denoise folder`` on 20 small PNGs
(MNIST test digits with noise 0.5), the model run by its OpenVINO export
(what ``--runtime auto`` picks on a CPU) and by Keras (``--runtime keras``),
each with a Prefect server running (``PREFECT_API_URL`` set) and without one
(the command starts a temporary server), and the export with the server
``denoise server start`` keeps, in alternating rounds.
The model is an untrained ``unet`` from seed 0 with its OpenVINO export,
registered as the production model of a local store. Each command is a fresh process
(``python -m flows.cli``, as a virtualenv's ``denoise`` script runs it).
OpenVINO's model cache (``$DENOISE_CACHE``, in the bench's folder) is filled
by one folder run before the rounds, as a user's first command fills it.

    python bench/command_time.py [--rounds 3] [--mirror PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, add_mirror_argument, free_port, start_prefect_server

sys.path.insert(0, str(REPO))

VERSION = "20260101-000000-unet-bench"


def make_store(store: Path) -> None:
    """The untrained unet and its OpenVINO export as the store's production model."""
    import keras

    from artifacts.registry import register_model
    from denoiser.core.files import file_sha256
    from denoiser.learning.training import probe_shape
    from denoiser.nets.models import build_model
    from denoiser.runtimes.openvino_runtime import export_openvino

    keras.utils.set_random_seed(0)
    model = build_model("unet")
    folder = store / "models" / VERSION
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    facts = export_openvino(model, folder, probe_shape(model))
    if not facts:
        sys.exit("the unet did not export to OpenVINO")
    card = {
        "version": VERSION,
        "architecture": "unet",
        "params": model.count_params(),
        "data": {"dataset": "mnist", "domain": "digits"},
        "quality_gate": {"passed": True},
        "metrics": {"psnr_denoised": 0.0},
        "model_sha256": file_sha256(folder / "model.keras"),
        **facts,
    }
    (folder / "model.json").write_text(json.dumps(card))
    register_model(str(store), folder)


def make_images(mirror: Path, folder: Path, n: int = 20) -> None:
    from PIL import Image

    from denoiser.data.datasets import read_idx

    x = read_idx(mirror / "t10k-images-idx3-ubyte.gz")[:n].astype("float64") / 255.0
    noisy = np.clip(x + 0.5 * np.random.default_rng(12345).normal(size=x.shape), 0, 1)
    folder.mkdir(parents=True)
    for i, img in enumerate(np.rint(noisy * 255).astype(np.uint8)):
        Image.fromarray(img).save(folder / f"{i:02d}.png")


def timed(args: list[str], env: dict, cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    add_mirror_argument(parser)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    work = Path(tempfile.mkdtemp(prefix="denoise-command-time-"))
    server = kept = None
    try:
        store = work / "store"
        make_store(store)
        make_images(args.mirror, work / "noisy")
        server, api = start_prefect_server(work / "server-home")
        base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        base.update(
            DENOISE_STORE=str(store),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            TF_CPP_MIN_LOG_LEVEL="3",
            PYTHONPATH=str(REPO),
            DENOISE_CACHE=str(work / "cache"),
        )
        with_server = {**base, "PREFECT_API_URL": api, "PREFECT_HOME": str(work / "client")}
        no_server = {**base, "PREFECT_HOME": str(work / "ephemeral")}
        kept = {**base, "PREFECT_HOME": str(work / "kept")}
        (work / "kept").mkdir()
        kept_port = free_port()
        timed(["server", "start", "--port", str(kept_port)], kept, work)
        cases = {
            "denoise --help": (["--help"], with_server),
            "denoise models": (["models"], with_server),
            "folder, OpenVINO (auto), server running": (["folder"], with_server),
            "folder, Keras, server running": (["folder", "--runtime", "keras"], with_server),
            "folder, OpenVINO (auto), kept server": (["folder"], kept),
            "folder, OpenVINO (auto), no server": (["folder"], no_server),
            "folder, Keras, no server": (["folder", "--runtime", "keras"], no_server),
        }
        timed(["models"], with_server, work)  # a first run writes Python's bytecode caches
        # and one folder run fills OpenVINO's model cache
        timed(["folder", str(work / "noisy"), str(work / "warm")], with_server, work)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(args.rounds):
            for name, (argv, env) in cases.items():
                if argv[0] == "folder":
                    out = work / "clean"
                    shutil.rmtree(out, ignore_errors=True)
                    argv = ["folder", str(work / "noisy"), str(out), *argv[1:]]
                times[name].append(timed(argv, env, work))
            print(f"round {r + 1} of {args.rounds} done", file=sys.stderr)
    finally:
        if server is not None:
            server.kill()
        if kept is not None:
            subprocess.run(
                [sys.executable, "-m", "flows.cli", "server", "stop"], env=kept, cwd=work
            )
        shutil.rmtree(work, ignore_errors=True)

    cpus = os.cpu_count()
    print(f"wall seconds per command, {args.rounds} alternating rounds, {cpus} CPU cores")
    print(f"{'command':42} {'median':>7} {'min':>6} {'max':>6}  all")
    for name, values in times.items():
        print(
            f"{name:42} {statistics.median(values):7.2f} {min(values):6.2f} {max(values):6.2f}  "
            + " ".join(f"{v:.2f}" for v in values)
        )


if __name__ == "__main__":
    main()
