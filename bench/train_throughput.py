"""Training throughput and memory: the reference way against this pipeline.

Trains the ``seed`` architecture (the reference's) for the same number of
samples two ways, each in its own subprocess so their peak memory is separate:

* reference: ``model.fit`` on in-memory float64 numpy arrays, batch 64, the
  noise drawn with numpy up front (as the blog post did);
* pipeline: Parquet shards written by this project, streamed by
  ``denoiser.learning.training.make_dataset`` (uint8 on disk, float32 on the fly).

Prints samples per second of each, their ratio (target >= 1.0), and the peak
resident memory of each (target for the pipeline: < 1.5 GB on the full set).

    python bench/train_throughput.py            # full training set, 1 epoch
    python bench/train_throughput.py --quick    # 6,000 samples
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _common import add_mirror_argument, peak_rss_mb, run_child, write_mnist_shards


def _load(mirror: Path, samples: int):
    from denoiser.data.datasets import fetch_dataset, load_images

    cache = Path(tempfile.gettempdir()) / "denoise-bench-downloads"
    manifest = fetch_dataset("mnist", str(mirror), cache)
    images, labels = load_images(manifest, "train", samples)
    return manifest, images, labels


def run_reference(mirror: Path, samples: int, epochs: int) -> dict:
    import keras
    import numpy as np

    from denoiser.nets.models import build_model

    _, images, _ = _load(mirror, samples)
    x = images.astype("float64") / 255.0  # the blog's arrays: float64, in memory
    noisy = np.clip(x + 0.5 * np.random.default_rng(0).normal(size=x.shape), 0, 1)
    del images
    keras.utils.set_random_seed(0)
    model = build_model("seed")
    model.compile(keras.optimizers.Adam(), loss="binary_crossentropy")
    model.fit(noisy[:64], x[:64], batch_size=64, epochs=1, verbose=0)  # build and trace first
    start = time.perf_counter()
    model.fit(noisy, x, batch_size=64, epochs=epochs, shuffle=True, verbose=0)
    seconds = time.perf_counter() - start
    return {"samples": len(x) * epochs, "seconds": seconds, "peak_mb": peak_rss_mb()}


def run_pipeline(mirror: Path, samples: int, epochs: int) -> dict:
    import keras

    from denoiser.learning.training import make_dataset
    from denoiser.nets.models import build_model

    manifest, images, labels = _load(mirror, samples)
    out = Path(tempfile.mkdtemp(prefix="denoise-bench-shards-")) / "shards"
    write_mnist_shards(out, images, labels, shard_rows=10_000)
    rows = len(images)
    del images, labels
    keras.utils.set_random_seed(0)
    model = build_model("seed")
    model.compile(keras.optimizers.Adam(), loss="binary_crossentropy")
    ds = make_dataset(out, "train", batch_size=64, shuffle_buffer=10_000, seed=0, training=True)
    model.fit(ds.take(1), epochs=1, verbose=0)  # build and trace first
    start = time.perf_counter()
    model.fit(ds, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    return {"samples": rows * epochs, "seconds": seconds, "peak_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=54_000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="6,000 samples")
    add_mirror_argument(parser)
    parser.add_argument("--child", choices=["reference", "pipeline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    samples = 6_000 if args.quick else args.samples

    if args.child:
        fn = run_reference if args.child == "reference" else run_pipeline
        print(json.dumps(fn(args.mirror, samples, args.epochs)))
        return

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    results = {
        way: run_child(
            __file__,
            [
                "--child",
                way,
                "--samples",
                str(samples),
                "--epochs",
                str(args.epochs),
                "--mirror",
                str(args.mirror),
            ],
            way,
            env,
        )
        for way in ("reference", "pipeline")
    }

    print(
        f"seed architecture, {samples:,} samples x {args.epochs} epoch(s), batch 64, "
        f"{os.cpu_count()} CPU cores"
    )
    print(f"{'way':<10} {'samples/s':>10} {'seconds':>8} {'peak RSS (MB)':>14}")
    for way, r in results.items():
        print(
            f"{way:<10} {r['samples'] / r['seconds']:>10.0f} {r['seconds']:>8.1f} {r['peak_mb']:>14.0f}"
        )
    ratio = (results["pipeline"]["samples"] / results["pipeline"]["seconds"]) / (
        results["reference"]["samples"] / results["reference"]["seconds"]
    )
    print(f"ratio pipeline/reference: {ratio:.2f} (target >= 1.0)")
    print(f"pipeline peak memory: {results['pipeline']['peak_mb']:.0f} MB (target < 1536 MB)")


if __name__ == "__main__":
    main()
