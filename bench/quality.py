"""Denoising quality: the reference autoencoder against this project's default,
trained and evaluated side by side in one run (issue 4).

Test set: MNIST's 10,000 test images as float64 in [0, 1], noise
``clip(x + f * N(0, 1), 0, 1)`` with ``np.random.default_rng(12345)`` (the
same normal draw scaled by f = 0.3, 0.5, 0.7). PSNR: per image
``10 * log10(1 / mse)``, then the mean. SSIM: scikit-image's defaults
(``denoiser.core.metrics.ssim`` equals it), the mean over all test images. The
reference is one seed (0); ``bench/reference.py`` gives its spread over seeds.

Methods: the noisy input; a 3x3 median filter; ``seed`` trained the reference
way (numpy float64 arrays, one fixed noise draw, Adam, BCE, batch 64, 35
epochs, 54,000 training images = validation_split 0.1); the default
architecture with this project's recipe (fresh noise every batch, its loss:
PSNR + SSIM, Adam with cosine decay, a fifth of the pairs reframed) at
f = 0.5, blind over f in [0.1, 0.7] (levels drawn with a rising density, as
the pipeline does), and at 0.3 and 0.7 alone. Also times how long the
default takes to reach the reference's final PSNR (checked on 2,000 test
images every half epoch), and scores it on 2x2 mosaics of test digits
(framed otherwise than in MNIST).

    python bench/quality.py --quick        # minutes: small subsets, 1-2 epochs
    python bench/quality.py                # the full comparison (hours on 2 CPU cores)

Writes bench/out/quality.md, quality_psnr.png and quality_examples.png.
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
LEVELS = (0.3, 0.5, 0.7)
PROBE_N = 2000  # test images scored every half epoch


def log(msg: str) -> None:
    print(msg, flush=True)


def load_mnist(mirror: Path):
    from denoiser.data.datasets import read_idx

    train = read_idx(mirror / "train-images-idx3-ubyte.gz")[..., None]
    test = read_idx(mirror / "t10k-images-idx3-ubyte.gz")[..., None].astype("float64") / 255.0
    return train, test


def test_draws(x_test: np.ndarray) -> dict[float, np.ndarray]:
    normal = np.random.default_rng(12345).normal(size=x_test.shape)
    return {f: np.clip(x_test + f * normal, 0, 1) for f in LEVELS}


def psnr_mean(clean, out) -> float:
    from denoiser.core.metrics import psnr

    return float(psnr(clean, out).mean())


def ssim_mean(clean, out, n: int | None = None) -> float:
    from denoiser.core.metrics import ssim

    return float(ssim(clean[:n], out[:n]).mean())


def predict(model, x: np.ndarray, batch: int = 500) -> np.ndarray:
    return model.predict(x.astype("float32"), batch_size=batch, verbose=0).astype("float64")


class Timer:
    """Training seconds only: evaluation pauses the clock."""

    def __init__(self):
        self.total = 0.0
        self._t = None

    def start(self):
        self._t = time.perf_counter()

    def stop(self):
        if self._t is not None:
            self.total += time.perf_counter() - self._t
            self._t = None


def train_reference(x_train_u8, epochs: int, probe, log) -> tuple[object, dict]:
    """The blog post's recipe, exactly: float64 arrays, one noise draw, BCE, batch 64."""
    import keras

    from denoiser.nets.models import build_model

    x = x_train_u8.astype("float64") / 255.0
    noisy = np.clip(x + 0.5 * np.random.default_rng(0).normal(size=x.shape), 0, 1)
    keras.utils.set_random_seed(0)
    model = build_model("seed")
    model.compile(optimizer="adam", loss="binary_crossentropy")
    timer, curve = Timer(), []
    for epoch in range(epochs):
        timer.start()
        hist = model.fit(
            noisy, x, epochs=1, batch_size=64, shuffle=True, validation_split=0.1, verbose=0
        )
        timer.stop()
        p = probe(model)
        curve.append((timer.total, p))
        log(
            f"  reference epoch {epoch + 1}/{epochs}: {timer.total:.0f} s, val_loss "
            f"{hist.history['val_loss'][-1]:.4f}, PSNR(2000) {p:.2f}"
        )
    return model, {"seconds": timer.total, "epochs": epochs, "curve": curve}


def train_default(
    x_train_u8,
    level,
    epochs: int,
    probe,
    log,
    arch: str,
    batch: int | None = None,
    lr: float | None = None,
    label: str = "",
    loss: str | None = None,
    options: dict | None = None,
    reframe: float | None = None,
    schedule: str = "cosine",
    fixed_noise: bool = False,
) -> tuple[object, dict]:
    """This project's recipe: fresh noise every batch, the architecture's loss
    (PSNR + SSIM for the default), learning rate and share of reframed images,
    Adam with cosine decay, the pipeline's batch size (``TrainConfig``).

    ``fixed_noise``: one noise draw per training image for the whole run, as
    the reference trains and as the pipeline's shards hold it (``copies=1``);
    noisy and clean are then reframed together, as the pipeline does."""
    import keras
    import tensorflow as tf

    from denoiser.config import TrainConfig
    from denoiser.data.augment import reframe as recut
    from denoiser.data.noise import level_from_uniform
    from denoiser.learning.losses import make_loss
    from denoiser.learning.training import learning_rate
    from denoiser.nets.models import architecture_recipe, build_model

    batch = batch or TrainConfig().batch_size
    recipe = architecture_recipe(arch)
    lr = lr or recipe.learning_rate
    share = recipe.reframe if reframe is None else reframe
    n = len(x_train_u8) - len(x_train_u8) // 10  # the same 90% the reference trains on
    keras.utils.set_random_seed(0)
    model = build_model(arch, **(options or {}))
    steps = n // batch
    model.compile(
        keras.optimizers.Adam(learning_rate(lr, schedule, epochs * steps)),
        loss=make_loss(loss or recipe.loss),
    )
    lo, hi = (level, level) if not isinstance(level, tuple) else level

    def corrupt(clean):
        clean = tf.cast(clean, tf.float32) / 255.0
        if share:
            clean = recut(clean, share)
        f = level_from_uniform(tf.random.uniform((tf.shape(clean)[0], 1, 1, 1)), lo, hi, "rising")
        return tf.clip_by_value(clean + f * tf.random.normal(tf.shape(clean)), 0.0, 1.0), clean

    def cut_fixed(noisy, clean):
        pair = tf.concat([noisy, tf.cast(clean, tf.float32) / 255.0], axis=-1)
        pair = recut(pair, share) if share else pair
        return pair[..., :1], pair[..., 1:]

    if fixed_noise:
        rng = np.random.default_rng(0)
        clean = x_train_u8[:n].astype(np.float32) / 255.0
        f = level_from_uniform(rng.random((n, 1, 1, 1), dtype=np.float32), lo, hi, "rising")
        noisy = np.clip(clean + f * rng.standard_normal(clean.shape, dtype=np.float32), 0.0, 1.0)
        ds = tf.data.Dataset.from_tensor_slices((noisy, x_train_u8[:n]))
        del clean
    else:
        ds = tf.data.Dataset.from_tensor_slices(x_train_u8[:n])
    ds = (
        ds.shuffle(n, seed=0)
        .batch(batch, drop_remainder=True)
        .map(cut_fixed if fixed_noise else corrupt, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(2)
        .repeat()
    )
    timer, curve = Timer(), []
    half = max(steps // 2, 1)

    class Probe(keras.callbacks.Callback):
        """Every half epoch: pause the clock, measure PSNR, resume."""

        def on_epoch_begin(self, epoch, logs=None):
            timer.start()

        def on_epoch_end(self, epoch, logs=None):
            timer.stop()
            p = probe(self.model)
            curve.append((timer.total, p))
            log(
                f"  {label} epoch {(epoch + 1) / 2:.1f}/{epochs}: {timer.total:.0f} s, PSNR(2000) {p:.2f}"
            )

    model.fit(ds, steps_per_epoch=half, epochs=epochs * 2, verbose=0, callbacks=[Probe()])
    return model, {"seconds": timer.total, "epochs": epochs, "curve": curve}


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Training seconds at the first probe at or above ``target``."""
    return next((t for t, p in curve if p >= target), None)


def load_data(mirror: Path, quick: bool):
    train, x_test = load_mnist(mirror)
    return (train[:6000], x_test[:1000]) if quick else (train, x_test)


def limit_threads(threads: int | None) -> None:
    """Run TensorFlow on ``threads`` threads (before it starts), so runs side
    by side each get their own cores."""
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def run_job(job: dict, mirror: Path, quick: bool, out: Path, threads: int | None) -> dict:
    """Train one model (in a worker process) and save it; returns its timings.

    With several jobs at once each worker gets its share of the cores, so
    every model trains under the same conditions as the ones beside it.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    limit_threads(threads)
    train, x_test = load_data(mirror, quick)
    draws = test_draws(x_test)
    level = job.get("level", 0.5)
    blind = isinstance(level, list)
    probe_level = 0.5 if blind else level

    def probe(model):
        return psnr_mean(x_test[:PROBE_N], predict(model, draws[probe_level][:PROBE_N]))

    if job["name"] == "reference":
        model, info = train_reference(train, job["epochs"], probe, log)
    else:
        model, info = train_default(
            train,
            tuple(level) if blind else level,
            job["epochs"],
            probe,
            log,
            job["architecture"],
            label=job["name"],
        )
    path = out / "models" / f"{job['name']}.keras"
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return {**info, "path": str(path), "params": int(model.count_params())}


def run_jobs(jobs: list[dict], args) -> dict[str, dict]:
    """All trainings, ``args.jobs`` at a time, each in a fresh process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            job["name"]: pool.submit(run_job, job, args.mirror, args.quick, args.out, threads)
            for job in jobs
        }
        return {name: future.result() for name, future in futures.items()}


def draw_plot(rows: list[dict], path: Path) -> None:
    """PSNR against noise level, one line per method (Pillow: no matplotlib dependency)."""
    from PIL import Image, ImageDraw

    # the legend gets its own column right of the axes: the lines meet at f = 0.7
    w, h, m, legend = 860, 420, 60, 230
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    values = [r[f"psnr@{f}"] for r in rows for f in LEVELS]
    lo, hi = np.floor(min(values)) - 1, np.ceil(max(values)) + 1
    right = w - legend
    x_of = {f: m + i * (right - 2 * m) / (len(LEVELS) - 1) for i, f in enumerate(LEVELS)}

    def y_of(v):
        return h - m - (v - lo) / (hi - lo) * (h - 2 * m)

    d.line([(m, h - m), (right - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    for f in LEVELS:
        d.text((x_of[f] - 8, h - m + 8), f"{f}", fill="black")
    for v in range(int(lo), int(hi) + 1, 2):
        d.text((10, y_of(v) - 6), f"{v} dB", fill="black")
        d.line([(m - 4, y_of(v)), (m, y_of(v))], fill="black")
    d.text((right // 2 - 40, h - 25), "noise factor f", fill="black")
    d.text((m, 20), "PSNR (dB) against the noise factor", fill="black")
    colours = ["#999999", "#8c564b", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    for i, r in enumerate(rows):
        pts = [(x_of[f], y_of(r[f"psnr@{f}"])) for f in LEVELS]
        c = colours[i % len(colours)]
        d.line(pts, fill=c, width=3)
        for x, y in pts:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=c)
        y = m + 20 * i
        d.line([(right, y + 6), (right + 24, y + 6)], fill=c, width=3)
        d.text((right + 32, y), r["method"][:32], fill=c)
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small subsets and 1-2 epochs (smoke run)"
    )
    parser.add_argument("--reference-epochs", type=int, default=35)
    parser.add_argument(
        "--epochs", type=int, default=8, help="epochs for each model of the default recipe"
    )
    parser.add_argument("--architecture", default="unet")
    parser.add_argument(
        "--skip-levels", action="store_true", help="skip the single-level 0.3 / 0.7 models"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="trainings at once, each on cores/jobs threads (2 on 2 cores: ~1.4x the throughput)",
    )
    add_mirror_argument(parser)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.quick:
        args.reference_epochs, args.epochs = min(args.reference_epochs, 2), min(args.epochs, 2)
    import keras
    from scipy.ndimage import median_filter

    from denoiser.data.noise import add_noise
    from denoiser.imaging.plots import grid_png
    from denoiser.nets.models import architecture_recipe

    args.out.mkdir(parents=True, exist_ok=True)
    train, x_test = load_data(args.mirror, args.quick)
    draws = test_draws(x_test)

    # the longest first, so that two workers finish together
    jobs = [
        {"name": "reference", "epochs": args.reference_epochs},
        {"name": "default", "level": 0.5},
        {"name": "blind", "level": [0.1, 0.7]},
    ]
    if not args.skip_levels:
        jobs += [{"name": "level-0.3", "level": 0.3}, {"name": "level-0.7", "level": 0.7}]
    for job in jobs[1:]:
        job.update(epochs=args.epochs, architecture=args.architecture)
    log(
        f"training {len(jobs)} models, {args.jobs} at a time: " + ", ".join(j["name"] for j in jobs)
    )
    started = time.perf_counter()
    trained = run_jobs(jobs, args)
    log(f"all trained in {time.perf_counter() - started:.0f} s wall")
    models = {
        name: keras.saving.load_model(info["path"], compile=False) for name, info in trained.items()
    }

    def evaluate(name, params, epochs, seconds, fn):
        row = {"method": name, "params": params, "epochs": epochs, "train_s": seconds}
        for f in LEVELS:
            out = fn(draws[f])
            row[f"psnr@{f}"] = psnr_mean(x_test, out)
            row[f"ssim@{f}"] = ssim_mean(x_test, out)
        log(
            f"{name}: "
            + ", ".join(f"{f}: {row[f'psnr@{f}']:.2f} dB / {row[f'ssim@{f}']:.3f}" for f in LEVELS)
        )
        return row

    def evaluate_model(name, method):
        info = trained[name]
        return evaluate(
            method,
            info["params"],
            info["epochs"],
            info["seconds"],
            lambda x: predict(models[name], x),
        )

    loss_name = architecture_recipe(args.architecture).loss
    arch = args.architecture
    rows = [
        evaluate("noisy input", 0, 0, 0, lambda x: x),
        evaluate("3x3 median filter", 0, 0, 0, lambda x: median_filter(x, size=(1, 3, 3, 1))),
        ref_row := evaluate_model("reference", "reference (seed, BCE)"),
        default_row := evaluate_model("default", f"{arch} @ 0.5 ({loss_name})"),
        blind_row := evaluate_model("blind", f"{arch} blind 0.1-0.7"),
    ]
    single = {0.5: default_row}
    for f in (0.3, 0.7):
        if f"level-{f}" in trained:
            rows.append(
                single.setdefault(f, evaluate_model(f"level-{f}", f"{arch} @ {f} ({loss_name})"))
            )

    # other noise kinds through the blind model
    kinds = []
    for kind, level in (("salt_and_pepper", 0.2), ("speckle", 0.5), ("poisson", 0.1)):
        noisy = add_noise(x_test, kind, level, np.random.default_rng(12345)).astype("float64")
        kinds.append(
            {
                "kind": f"{kind} {level}",
                "noisy": psnr_mean(x_test, noisy),
                "median": psnr_mean(x_test, median_filter(noisy, size=(1, 3, 3, 1))),
                "blind": psnr_mean(x_test, predict(models["blind"], noisy)),
            }
        )

    # report
    cols = ["method", "params", "epochs", "train_s"] + [
        f"{k}@{f}" for f in LEVELS for k in ("psnr", "ssim")
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["method"], f"{r['params']:,}", str(r["epochs"]), f"{r['train_s']:.0f}"]
        cells += [
            f"{r[f'{k}@{f}']:.2f}" if k == "psnr" else f"{r[f'{k}@{f}']:.3f}"
            for f in LEVELS
            for k in ("psnr", "ssim")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    gain = default_row["psnr@0.5"] - ref_row["psnr@0.5"]
    ssim_gain = default_row["ssim@0.5"] - ref_row["ssim@0.5"]
    ref_seconds = trained["reference"]["seconds"]
    ref_probe_final = trained["reference"]["curve"][-1][1]
    reached = first_reach(trained["default"]["curve"], ref_probe_final)
    facts = [
        f"PSNR gain over the reference at f=0.5: {gain:+.2f} dB (goal +2.0); SSIM gain {ssim_gain:+.3f} (goal +0.05)",
        f"parameters: {default_row['params']:,} vs the reference's {ref_row['params']:,}",
        f"time to the reference's final PSNR ({ref_probe_final:.2f} dB on {min(PROBE_N, len(x_test)):,} test images): "
        + (
            f"{reached:.0f} s vs the reference's {ref_seconds:.0f} s = "
            f"1/{ref_seconds / reached:.1f} (goal 1/8)"
            if reached
            else "not reached"
        ),
    ]
    from translation import mosaic_psnr

    n4 = min(PROBE_N, len(x_test)) // 4 * 4
    framed = mosaic_psnr(models["default"], x_test[:n4], draws[0.5][:n4])
    facts.append(
        f"the default on digits framed otherwise, 2x2 mosaics of the first {n4:,} test images at f=0.5: "
        f"{framed:.2f} dB (the same images one by one: "
        f"{psnr_mean(x_test[:n4], predict(models['default'], draws[0.5][:n4])):.2f} dB)"
    )
    for f, r in single.items():
        facts.append(
            f"blind vs single-level model at f={f}: {blind_row[f'psnr@{f}'] - r[f'psnr@{f}']:+.2f} dB "
            "(goal within 0.3 dB)"
        )
    kinds_table = "\n".join(
        ["| noise | noisy | median 3x3 | blind model |", "|---|---|---|---|"]
        + [
            f"| {k['kind']} | {k['noisy']:.2f} | {k['median']:.2f} | {k['blind']:.2f} |"
            for k in kinds
        ]
    )
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    report = (
        f"# Denoising quality\n\n`{command.strip()}` ({len(train):,} training images incl. validation, "
        f"{len(x_test):,} test images; {args.jobs} training(s) at a time)\n\n{table}\n\n"
        + "\n".join(f"- {f}" for f in facts)
        + f"\n\nOther noise kinds (PSNR, dB):\n\n{kinds_table}\n"
    )
    print("\n" + report)
    (args.out / "quality.md").write_text(report)
    (args.out / "quality.json").write_text(
        json.dumps({"rows": rows, "facts": facts, "kinds": kinds, "trained": trained}, indent=2)
    )
    draw_plot(rows, args.out / "quality_psnr.png")
    (args.out / "quality_examples.png").write_bytes(
        grid_png(
            [
                x_test[:8],
                draws[0.5][:8],
                predict(models["reference"], draws[0.5][:8]),
                predict(models["default"], draws[0.5][:8]),
            ],
            scale=3,
        )
    )


if __name__ == "__main__":
    main()
