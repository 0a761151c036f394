"""Photo training speed and precision: steps per second of the bare model
(one random batch from memory) in float32 and mixed bfloat16, of the
pipeline's own training (its tf.data input: patch shards, noise added in the
graph), of the input alone, and the PSNR after equal steps in both precisions.

One process per precision (Keras' precision policy is global). In it, one
model trains in rounds on the bare batch and on the pipeline in turn, and
each step is timed by Keras' batch callbacks: separate processes on this VM
differ in speed by up to 2x, and a wall-clock total of ``fit`` also counts
the seconds tf.data can take to delete an autotuned iterator.

    python bench/train_speed.py                      # photo_unet, grey Train400 patches
    python bench/train_speed.py --precisions float32 --repeats 5 --steps 20
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


def _model(architecture: str, seed: int = 0):
    import keras

    from denoiser.nets.models import build_model

    keras.utils.set_random_seed(seed)
    model = build_model(architecture)
    model.compile(keras.optimizers.Adam(1e-3), loss="mse")
    return model


class _StepClock:
    """Seconds of each training step, from Keras' batch callbacks: what a step
    costs, without ``fit``'s set-up and tear-down (an iterator with tf.data's
    autotuning can take seconds to delete, which a wall-clock total of ``fit``
    would count as steps)."""

    def __init__(self):
        import keras

        clock = self

        class Callback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                clock.began = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                clock.seconds.append(time.perf_counter() - clock.began)

        self.seconds: list[float] = []
        self.callback = Callback()

    def run(self, model, ds, steps: int) -> list[float]:
        """The seconds of ``steps`` steps of ``fit`` on ``ds``, its first step left out."""
        self.seconds = []
        model.fit(ds, steps_per_epoch=steps + 1, epochs=1, verbose=0, callbacks=[self.callback])
        return self.seconds[1:]


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


def run_speed(architecture: str, precision: str, steps: int, rounds: int, shards: str) -> dict:
    """Seconds per step of one model on the bare batches and on the pipeline's
    input, in turn, ``rounds`` times, in one process: a slow spell of the
    machine hits both, and both share the process's threads and memory."""
    import numpy as np
    import tensorflow as tf

    from denoiser.learning.training import make_dataset
    from denoiser.nets.models import architecture_recipe

    _policy(precision)
    channels = architecture_recipe(architecture).input_shape[-1]
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, PATCH, PATCH, channels), dtype=np.float32)
    y = x + rng.normal(0, 0.1, x.shape).astype(np.float32)
    options = tf.data.Options()
    options.autotune.enabled = False  # as make_dataset's
    bare = tf.data.Dataset.from_tensors((y, x)).repeat().with_options(options)
    pipeline = make_dataset(shards, "train", BATCH, seed=0).repeat()
    model, clock = _model(architecture), _StepClock()
    seconds = {"bare": [], "pipeline": []}  # a list of step seconds per round
    for ds in (bare, pipeline):
        clock.run(model, ds, 5)  # warm-up: graph tracing, first allocations
    for _ in range(rounds):
        seconds["bare"].append(clock.run(model, bare, steps))
        seconds["pipeline"].append(clock.run(model, pipeline, steps))
    it = iter(make_dataset(shards, "train", BATCH, seed=1).repeat())
    next(it)
    start = time.perf_counter()
    for _ in range(steps * 10):
        next(it)
    return {
        **seconds,
        "input_batches_per_s": steps * 10 / (time.perf_counter() - start),
    }


def run_psnr(
    architecture: str, precision: str, steps: int, shards: str, batch: int, seed: int
) -> dict:
    """PSNR on the shard set's test images at sigma 15/25/50 after ``steps``
    steps from ``seed`` (the weights' start and the batches' order and noise)."""
    import numpy as np

    from denoiser.data.shards import load_split
    from denoiser.learning.training import make_dataset
    from denoiser.runtimes.inference import evaluate_planes

    _policy(precision)
    model = _model(architecture, seed)
    ds = make_dataset(shards, "train", batch, seed=seed).repeat()
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
    if args.child == "speed":
        return run_speed(args.architecture, args.precision, args.steps, args.repeats, args.shards)
    return run_psnr(
        args.architecture, args.precision, args.psnr_steps, args.shards, args.batch, args.seed
    )


def _spawn(args, kind: str, precision: str, shards: str, seed: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--precision", precision]
    cmd += ["--architecture", args.architecture, "--steps", str(args.steps)]
    cmd += ["--psnr-steps", str(args.psnr_steps), "--shards", shards, "--batch", str(args.batch)]
    cmd += ["--repeats", str(args.repeats), "--seed", str(seed)]
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
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each round")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds of bare then pipeline in one process (median and range of the rounds)",
    )
    parser.add_argument("--psnr-steps", type=int, default=0, help="0: no PSNR comparison")
    parser.add_argument(
        "--seeds",
        default="0",
        help="PSNR comparison's seeds: two or more show how far runs differ by their seed alone",
    )
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--batch", type=int, default=BATCH, help="PSNR comparison's batch")
    parser.add_argument("--patch", type=int, default=PATCH, help="PSNR comparison's patch side")
    parser.add_argument("--no-speed", action="store_true", help="only the PSNR comparison")
    parser.add_argument("--child", choices=["speed", "psnr"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--shards", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    store = Path(tempfile.gettempdir()) / "denoise-bench-speed"
    shards = str(shard_set(args.dataset, store, 16))
    psnr_shards = str(shard_set(args.dataset, store, 16, args.patch))
    print(f"{args.architecture} on {args.dataset}, {os.cpu_count()} CPUs")
    if not args.no_speed:
        print(f"batch {BATCH}, {PATCH}x{PATCH}")
        print(
            "| precision | bare steps/s | pipeline steps/s | pipeline / bare "
            "| input alone batches/s |"
        )
        print("|---|---|---|---|---|")
        for precision in args.precisions.split(","):
            r = _spawn(args, "speed", precision, shards)
            # each round's steps over its seconds
            rates = {kind: [len(s) / sum(s) for s in r[kind]] for kind in ("bare", "pipeline")}
            print(
                f"| {precision} | {_spread(rates['bare'])} | {_spread(rates['pipeline'])} | "
                f"{statistics.median(rates['pipeline']) / statistics.median(rates['bare']):.2f} | "
                f"{r['input_batches_per_s']:.1f} |",
                flush=True,
            )
    if args.psnr_steps:
        print(
            f"\nPSNR after {args.psnr_steps} steps of batch {args.batch}, {args.patch}x{args.patch} "
            "from each seed, first 4 test images:"
        )
        for seed in (int(v) for v in args.seeds.split(",")):
            for precision in args.precisions.split(","):
                r = _spawn(args, "psnr", precision, psnr_shards, seed)
                scores = " / ".join(f"{v:.2f}" for v in r["psnr"].values())
                print(
                    f"- seed {seed}, {precision}: {scores} dB (sigma 15 / 25 / 50), "
                    f"{r['seconds']:.0f} s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
