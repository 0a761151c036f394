"""The reference autoencoder over several seeds, scored on the full test set
after every epoch: how much of its final PSNR is the seed, and whether it
peaks before its last epoch.

Same recipe as ``bench/quality.py``'s reference (the ``seed`` architecture,
float64 arrays, one noise draw at f = 0.5, Adam, BCE, batch 64, 35 epochs);
``--seeds`` sets both the weights' initialisation and the training noise
draw. ``--all-train`` trains on all 60,000 images (validation on the noisy
test set, as the blog post does) instead of ``validation_split=0.1``. Test
noise: ``default_rng(12345)``, f = 0.5, all 10,000 test images for PSNR and
SSIM.

    python bench/reference.py --seeds 0 1 2 --jobs 2
    python bench/reference.py --quick         # a minute: 1 epoch, small subsets

Prints one line per epoch and the table; writes bench/out/reference.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from _common import REPO, add_mirror_argument

sys.path.insert(0, str(REPO))


def train_one(run: dict, mirror: Path, quick: bool, threads: int | None) -> dict:
    """One reference training (in its own process); its curve and final scores."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from quality import limit_threads, load_data, predict, psnr_mean, ssim_mean

    limit_threads(threads)
    import keras

    from denoiser.nets.models import build_model

    seed, epochs = run["seed"], run["epochs"]
    train, x_test = load_data(mirror, quick)
    noisy_test = np.clip(
        x_test + 0.5 * np.random.default_rng(12345).normal(size=x_test.shape), 0, 1
    )
    x = train.astype("float64") / 255.0
    noisy = np.clip(x + 0.5 * np.random.default_rng(seed).normal(size=x.shape), 0, 1)
    keras.utils.set_random_seed(seed)
    model = build_model("seed")
    model.compile(optimizer="adam", loss="binary_crossentropy")
    if run["all_train"]:
        split = {"validation_data": (noisy_test.astype("float32"), x_test.astype("float32"))}
    else:
        split = {"validation_split": 0.1}
    curve, seconds = [], 0.0
    for epoch in range(epochs):
        t = time.perf_counter()
        hist = model.fit(noisy, x, epochs=1, batch_size=64, shuffle=True, verbose=0, **split)
        seconds += time.perf_counter() - t
        p = psnr_mean(x_test, predict(model, noisy_test))
        curve.append({"epoch": epoch + 1, "psnr": p, "val_loss": hist.history["val_loss"][-1]})
        print(
            f"  {run['name']} epoch {epoch + 1}/{epochs}: {seconds:.0f} s, val_loss "
            f"{hist.history['val_loss'][-1]:.4f}, PSNR {p:.2f}",
            flush=True,
        )
    out = predict(model, noisy_test)
    best = max(curve, key=lambda c: c["psnr"])
    return {
        **run,
        "psnr": psnr_mean(x_test, out),
        "ssim": ssim_mean(x_test, out, n=len(x_test)),
        "best_epoch": best["epoch"],
        "best_psnr": best["psnr"],
        "seconds": seconds,
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=35)
    parser.add_argument(
        "--all-train", action="store_true", help="also train seed 0 on all 60,000 images"
    )
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once")
    parser.add_argument("--quick", action="store_true")
    add_mirror_argument(parser)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 1
    runs = [
        {"name": f"seed {s}", "seed": s, "epochs": args.epochs, "all_train": False}
        for s in args.seeds
    ]
    if args.all_train:
        runs.append(
            {"name": "seed 0, all 60,000", "seed": 0, "epochs": args.epochs, "all_train": True}
        )

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_one, r, args.mirror, args.quick, threads) for r in runs]
        results = [f.result() for f in futures]
    print(f"{len(runs)} trainings in {time.perf_counter() - started:.0f} s wall")
    print("run                    PSNR 0.5  SSIM 0.5  best epoch  best PSNR  train s")
    for r in results:
        print(
            f"{r['name']:<22} {r['psnr']:8.2f}  {r['ssim']:8.3f}  {r['best_epoch']:10d}"
            f"  {r['best_psnr']:9.2f}  {r['seconds']:7.0f}"
        )
    seeded = [r for r in results if not r["all_train"]]
    psnrs = np.array([r["psnr"] for r in seeded])
    ssims = np.array([r["ssim"] for r in seeded])
    print(
        f"mean over {len(seeded)} seeds: PSNR {psnrs.mean():.2f} dB (min {psnrs.min():.2f}, "
        f"max {psnrs.max():.2f}), SSIM {ssims.mean():.3f} (min {ssims.min():.3f}, max {ssims.max():.3f})"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reference.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
