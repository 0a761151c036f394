"""Photo training speed and precision: steps per second of the bare model
(random batches from memory) in float32 and mixed bfloat16, of the
pipeline's own training (its tf.data input: patch shards, noise added in the
graph), of the input alone, and the PSNR after equal steps in both precisions.

Each measurement runs in its own process (Keras' precision policy is global).

    python bench/train_speed.py                      # photo_unet, grey Train400 patches
    python bench/train_speed.py --architecture colour_unet --dataset cbsd432
    python bench/train_speed.py --psnr-steps 300     # also: PSNR after equal steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIRROR = Path(__file__).resolve().parents[2] / "shared" / "datasets"
BATCH, PATCH = 32, 64


def _policy(precision: str) -> None:
    import keras

    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if precision == "bfloat16" else "float32"
    )


def _model(architecture: str):
    import keras

    from denoiser.nets.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model(architecture)
    model.compile(keras.optimizers.Adam(1e-3), loss="mse")
    return model


def _steps_per_second(model, ds, steps: int, warmup: int = 10) -> float:
    model.fit(ds, steps_per_epoch=warmup, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps / (time.perf_counter() - start)


def shard_set(dataset: str, store: Path, patches_per_image: int, patch: int = PATCH) -> Path:
    """The dataset's patch set (written once into ``store``)."""
    from denoiser.data.datasets import fetch_dataset
    from denoiser.data.shards import ShardRequest
    from denoiser.domains import domain_for_dataset

    domain = domain_for_dataset(dataset)
    manifest = fetch_dataset(dataset, str(MIRROR), store / "downloads" / dataset)
    noise = domain.default_noise().model_copy(
        update={"patch_size": patch, "patches_per_image": patches_per_image}
    )
    out = store / "shards" / f"{dataset}-{patches_per_image}-{patch}"
    return domain.write_shards(out, ShardRequest(manifest, noise, test_limit=4))


def run_bare(architecture: str, precision: str, steps: int) -> dict:
    import numpy as np
    import tensorflow as tf

    from denoiser.nets.models import architecture_recipe

    _policy(precision)
    channels = architecture_recipe(architecture).input_shape[-1]
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, PATCH, PATCH, channels), dtype=np.float32)
    y = x + rng.normal(0, 0.1, x.shape).astype(np.float32)
    ds = tf.data.Dataset.from_tensors((y, x)).repeat()
    return {"steps_per_s": _steps_per_second(_model(architecture), ds, steps)}


def run_pipeline(architecture: str, precision: str, steps: int, shards: str) -> dict:
    from denoiser.learning.training import make_dataset

    _policy(precision)
    ds = make_dataset(shards, "train", BATCH, seed=0).repeat()
    it = iter(ds)
    next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    input_only = steps / (time.perf_counter() - start)
    return {
        "steps_per_s": _steps_per_second(_model(architecture), ds, steps),
        "input_batches_per_s": input_only,
    }


def run_psnr(architecture: str, precision: str, steps: int, shards: str, batch: int) -> dict:
    """PSNR on the shard set's test images at sigma 15/25/50 after ``steps`` steps."""
    import numpy as np

    from denoiser.data.shards import load_split
    from denoiser.learning.training import make_dataset
    from denoiser.runtimes.inference import evaluate_planes

    _policy(precision)
    model = _model(architecture)
    ds = make_dataset(shards, "train", batch, seed=0).repeat()
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    import keras

    keras.mixed_precision.set_global_policy("float32")  # scored the same way for both
    test = load_split(shards, "test")
    grey = model.input_shape[-1] == 1
    clean = [np.asarray(x[..., 0] if grey else x, np.float32) / 255.0 for x in test["clean"]]
    metrics, _, _ = evaluate_planes(model, architecture, clean, [15.0, 25.0, 50.0], 8)
    return {
        "seconds": seconds,
        "psnr": {f"{r['sigma']:g}": r["psnr_denoised"] for r in metrics["per_sigma"]},
    }


def child(args) -> dict:
    if args.child == "bare":
        return run_bare(args.architecture, args.precision, args.steps)
    if args.child == "pipeline":
        return run_pipeline(args.architecture, args.precision, args.steps, args.shards)
    return run_psnr(args.architecture, args.precision, args.psnr_steps, args.shards, args.batch)


def _spawn(args, kind: str, precision: str, shards: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--precision", precision]
    cmd += ["--architecture", args.architecture, "--steps", str(args.steps)]
    cmd += ["--psnr-steps", str(args.psnr_steps), "--shards", shards, "--batch", str(args.batch)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"{kind} {precision} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> str:
    """The median, and the range when there are several runs."""
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.2f}"
    return f"{median:.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="photo_unet")
    parser.add_argument("--dataset", default="train400")
    parser.add_argument("--steps", type=int, default=80, help="timed steps after 10 of warm-up")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="bare and pipeline measured in turn this many times (median and range shown)",
    )
    parser.add_argument("--psnr-steps", type=int, default=0, help="0: no PSNR comparison")
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=BATCH, help="PSNR comparison's batch")
    parser.add_argument("--patch", type=int, default=PATCH, help="PSNR comparison's patch side")
    parser.add_argument("--no-speed", action="store_true", help="only the PSNR comparison")
    parser.add_argument("--child", choices=["bare", "pipeline", "psnr"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--shards", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    store = Path(tempfile.gettempdir()) / "denoise-bench-speed"
    shards = str(shard_set(args.dataset, store, 16))
    psnr_shards = str(shard_set(args.dataset, store, 16, args.patch))
    print(
        f"{args.architecture} on {args.dataset}, batch {BATCH}, {PATCH}x{PATCH}, {os.cpu_count()} CPUs"
    )
    print(
        "| precision | bare steps/s | pipeline steps/s | pipeline / bare | input alone batches/s |"
    )
    print("|---|---|---|---|---|")
    for precision in args.precisions.split(",") if not args.no_speed else ():
        bare, pipe, feed = [], [], []
        for _ in range(args.repeats):  # in turn, so that a slow spell of the machine hits both
            bare.append(_spawn(args, "bare", precision, shards)["steps_per_s"])
            p = _spawn(args, "pipeline", precision, shards)
            pipe.append(p["steps_per_s"])
            feed.append(p["input_batches_per_s"])
        print(
            f"| {precision} | {_spread(bare)} | {_spread(pipe)} | "
            f"{statistics.median(pipe) / statistics.median(bare):.2f} | "
            f"{statistics.median(feed):.1f} |",
            flush=True,
        )
    if args.psnr_steps:
        print(
            f"\nPSNR after {args.psnr_steps} steps of batch {args.batch}, {args.patch}x{args.patch} "
            "(same seed), first 4 test images:"
        )
        for precision in args.precisions.split(","):
            r = _spawn(args, "psnr", precision, psnr_shards)
            scores = " / ".join(f"{v:.2f}" for v in r["psnr"].values())
            print(
                f"- {precision}: {scores} dB (sigma 15 / 25 / 50), {r['seconds']:.0f} s", flush=True
            )


if __name__ == "__main__":
    main()
