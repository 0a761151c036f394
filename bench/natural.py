"""Photographs: train a blind denoiser on Train400 within a time budget, score it on Set12 beside BM3D.

The literature's protocol (DnCNN, Zhang et al. 2017): 40x40 patches of the 400
Train400 photographs with the eight flips/rotations; noise
``y = x + (sigma/255) N(0, 1)`` in floating point, neither clipped nor
quantised, sigma drawn uniformly in [0, 55] per patch (blind, as DnCNN-B) and
added fresh every batch inside the TensorFlow graph; Set12 scored at sigma 15,
25 and 50 on whole images (reflect-padded to the model's size multiple), PSNR
per image with peak 1 on the output clipped to [0, 1], averaged over the 12.
The noisy test images are drawn once from a fixed seed, so every method (BM3D,
the model, an MNIST model) sees the same ones.

Self-contained: it reads the PNGs of the mirror directly, not the pipeline's
shards. Prints PSNR against training minutes (checkpoints), then the table:
noisy input, BM3D (the ``bm3d`` package, measured here with its time), the
model, an MNIST model if ``--mnist-model`` is given, and the published BM3D
and DnCNN-S rows, with parameters and seconds per 512x512 image. The last
stdout line is the whole result as JSON.

    python bench/natural.py                      # 60 minutes, the run of record
    python bench/natural.py --quick              # smoke run, about 2 minutes
    python bench/natural.py --minutes 7 --checkpoints 7 --no-bm3d \\
        --options '{"batch_norm": true}'         # a probe of one variant
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import REPO, awgn_test_set, print_sigma_table, psnr  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets"
SIGMAS = (15, 25, 50)
PUBLISHED = {  # Set12 averages, Zhang et al., "Beyond a Gaussian Denoiser", IEEE TIP 2017, Table 2
    "BM3D (published)": (32.37, 29.97, 26.72),
    "DnCNN-S (published)": (32.86, 30.44, 27.18),
}


def load_grey_pngs(folder: Path) -> list[np.ndarray]:
    """Every *.png of the folder, sorted by name, as float32 [0, 1] (H, W) arrays."""
    from PIL import Image

    paths = sorted(folder.glob("*.png"))
    if not paths:
        sys.exit(f"no PNG images in {folder}")
    return [np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0 for p in paths]


def mean_psnr(clean, outs) -> float:
    return float(np.mean([psnr(c, o) for c, o in zip(clean, outs, strict=True)]))


class PatchSampler:
    """Random ``patch`` x ``patch`` crops of the training images with a random one
    of the eight flips/rotations each, and blind AWGN, all in the TF graph."""

    def __init__(
        self, images: list[np.ndarray], patch: int, batch: int, sigma_max: float, seed: int
    ):
        import tensorflow as tf

        shapes = {x.shape for x in images}
        if len(shapes) != 1:  # Train400 is all 180x180; crop others to the smallest
            h = min(s[0] for s in shapes)
            w = min(s[1] for s in shapes)
            images = [x[:h, :w] for x in images]
        self.images = tf.constant(np.stack(images)[..., None])
        self.n, self.h, self.w = (int(d) for d in self.images.shape[:3])
        self.patch, self.batch, self.sigma_max = patch, batch, sigma_max
        self.gen = tf.random.Generator.from_seed(seed)

    def __call__(self):
        import tensorflow as tf

        b, p, g = self.batch, self.patch, self.gen
        idx = g.uniform([b], 0, self.n, dtype=tf.int32)
        oy = g.uniform([b], 0, self.h - p + 1, dtype=tf.int32)
        ox = g.uniform([b], 0, self.w - p + 1, dtype=tf.int32)
        r = tf.range(p, dtype=tf.int32)
        rows = oy[:, None] + r[None, :]  # (b, p)
        cols = ox[:, None] + r[None, :]
        grid = tf.stack(
            [
                tf.broadcast_to(idx[:, None, None], [b, p, p]),
                tf.broadcast_to(rows[:, :, None], [b, p, p]),
                tf.broadcast_to(cols[:, None, :], [b, p, p]),
            ],
            axis=-1,
        )
        x = tf.gather_nd(self.images, grid)  # (b, p, p, 1)
        flips = g.uniform([3, b, 1, 1, 1], 0, 2, dtype=tf.int32) > 0
        x = tf.where(flips[0], tf.transpose(x, [0, 2, 1, 3]), x)  # square: transposes stay square
        x = tf.where(flips[1], tf.reverse(x, [1]), x)
        x = tf.where(flips[2], tf.reverse(x, [2]), x)
        sigma = g.uniform([b, 1, 1, 1], 0.0, self.sigma_max / 255.0)
        y = x + sigma * g.normal(tf.shape(x))
        return y, x


def denoise_whole(model, noisy: np.ndarray, multiple: int) -> np.ndarray:
    """One whole image through a fully convolutional model, reflect-padded
    (bottom and right) to the size multiple."""
    h, w = noisy.shape
    ph, pw = (-h) % multiple, (-w) % multiple
    x = np.pad(noisy, ((0, ph), (0, pw)), mode="reflect") if ph or pw else noisy
    out = model(x[None, :, :, None], training=False)
    return np.asarray(out)[0, :h, :w, 0]


def score_model(predict, clean, noisy, sigmas) -> dict[int, float]:
    return {s: mean_psnr(clean, [predict(y) for y in noisy[s]]) for s in sigmas}


def seconds_per_512(predict, repeats: int = 3) -> float:
    x = np.random.default_rng(1).random((512, 512), dtype=np.float32)
    predict(x)  # trace
    t0 = time.perf_counter()
    for _ in range(repeats):
        predict(x)
    return (time.perf_counter() - t0) / repeats


def load_mnist_predict(path: str):
    """An MNIST model (.keras) as a plane -> plane function: whole images
    when it is fully convolutional, else the folder denoiser's tiling."""
    import keras

    from denoiser.imaging.tiling import denoise_plane
    from denoiser.runtimes.inference import tile_spec_for_model

    model = keras.saving.load_model(path, compile=False)
    spec = tile_spec_for_model(model)

    def predict(plane):
        if spec.whole_max:
            return denoise_whole(model, plane, spec.multiple)
        return denoise_plane(plane, spec, lambda t: model.predict(t, batch_size=256, verbose=0))

    return model, predict


def run_bm3d(clean, noisy, sigmas) -> tuple[dict[int, float], float]:
    """BM3D (the ``bm3d`` package, default profile, told the true sigma)."""
    try:
        import bm3d
    except ImportError:
        sys.exit("BM3D needs the bm3d package: pip install bm3d (or run with --no-bm3d)")
    scores, per_512 = {}, []
    for s in sigmas:
        outs = []
        for y in noisy[s]:
            t0 = time.perf_counter()
            outs.append(np.asarray(bm3d.bm3d(y, sigma_psd=s / 255.0), dtype=np.float32))
            if y.shape == (512, 512):
                per_512.append(time.perf_counter() - t0)
        scores[s] = mean_psnr(clean, outs)
        print(f"  BM3D sigma {s}: {scores[s]:.2f} dB", flush=True)
    return scores, float(np.mean(per_512)) if per_512 else float("nan")


def load_now() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def train(args, clean_test, noisy_test, log) -> tuple[object, list[dict]]:
    import keras
    import tensorflow as tf

    from denoiser.nets.models import architecture_recipe, build_model

    recipe = architecture_recipe(args.architecture)
    args.patch = args.patch or recipe.patch_size or 40
    args.batch = args.batch or recipe.batch_size or 64
    options = json.loads(args.options) if args.options else {}
    model = build_model(args.architecture, (None, None, 1), **options)
    multiple = recipe.size_multiple
    if args.patch % multiple:
        sys.exit(
            f"--patch {args.patch} is not a multiple of {args.architecture}'s size multiple {multiple}"
        )
    sampler = PatchSampler(
        load_grey_pngs(args.data / "train400"), args.patch, args.batch, args.sigma_max, args.seed
    )
    base_lr = args.lr or recipe.learning_rate
    optimizer = keras.optimizers.Adam(learning_rate=base_lr)
    loss_fn = {
        "mse": lambda a, b: tf.reduce_mean(tf.square(a - b)),
        "l1": lambda a, b: tf.reduce_mean(tf.abs(a - b)),
    }[args.loss]

    @tf.function(jit_compile=False)
    def step():
        y, x = sampler()
        with tf.GradientTape() as tape:
            loss = loss_fn(x, model(y, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    budget = args.minutes * 60.0
    marks = sorted({min(float(m), args.minutes) for m in args.checkpoints})
    print(
        f"training {args.architecture} {options or ''} ({model.count_params():,} parameters), "
        f"{args.loss}, Adam {base_lr:g} {args.schedule}, patch {args.patch}, batch {args.batch}, "
        f"sigma U[0, {args.sigma_max:g}], {args.minutes:g} min; {load_now()}",
        flush=True,
    )
    curve, steps, trained, losses = [], 0, 0.0, []
    predict = lambda plane: denoise_whole(model, plane, multiple)  # noqa: E731
    for mark in marks:
        t0 = time.perf_counter()
        steps0 = steps
        while trained + (time.perf_counter() - t0) < mark * 60.0:
            if args.schedule == "cosine":  # over the time budget, to 1% at its end
                frac = min((trained + time.perf_counter() - t0) / budget, 1.0)
                optimizer.learning_rate = base_lr * (
                    0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac))
                )
            losses.append(float(step()))
            steps += 1
        trained += time.perf_counter() - t0
        rate = (steps - steps0) / (time.perf_counter() - t0)
        scores = score_model(predict, clean_test, noisy_test, args.eval_sigmas)
        point = {
            "minutes": round(trained / 60, 2),
            "steps": steps,
            "steps_per_s": round(rate, 2),
            "loss": float(np.mean(losses[-200:])),
            "load": os.getloadavg()[0],
            **{f"psnr@{s}": round(v, 2) for s, v in scores.items()},
        }
        curve.append(point)
        print(
            f"  {point['minutes']:6.2f} min  {steps:6d} steps  {rate:5.2f} steps/s  "
            + "  ".join(f"sigma {s}: {v:.2f}" for s, v in scores.items())
            + f"  ({load_now()})",
            flush=True,
        )
        log(point)
    return model, curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="folder holding train400/ and set12/ (default: the shared mirror)",
    )
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget (minutes)")
    parser.add_argument(
        "--checkpoints",
        type=float,
        nargs="*",
        default=[5, 10, 20, 40, 60],
        help="training minutes at which to score on Set12 (the budget always is)",
    )
    parser.add_argument(
        "--eval-sigmas",
        type=int,
        nargs="*",
        default=list(SIGMAS),
        help="sigmas scored at the checkpoints (the final table has all three)",
    )
    parser.add_argument("--architecture", default="photo_unet")
    parser.add_argument("--options", default="", help="JSON keyword arguments for the builder")
    parser.add_argument("--loss", choices=("mse", "l1"), default="mse")
    parser.add_argument("--lr", type=float, default=None, help="default: the architecture's recipe")
    parser.add_argument(
        "--schedule",
        choices=("cosine", "constant"),
        default="cosine",
        help="cosine: decays to 1%% over the time budget",
    )
    parser.add_argument(
        "--patch", type=int, default=None, help="default: the recipe's patch_size, else 40"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="default: the recipe's batch_size, else 64"
    )
    parser.add_argument("--sigma-max", type=float, default=55.0)
    parser.add_argument(
        "--seed", type=int, default=0, help="training seed (the test noise's is fixed)"
    )
    parser.add_argument("--test-seed", type=int, default=12)
    parser.add_argument("--no-bm3d", action="store_true", help="skip BM3D (probes)")
    parser.add_argument(
        "--mnist-model", help="an MNIST model (.keras) to score on the same noisy images"
    )
    parser.add_argument("--save", type=Path, help="save the trained model here (.keras)")
    parser.add_argument(
        "--score",
        type=Path,
        help="score this saved model (.keras, from --save) instead of training one",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="TF intra-op threads (0: TF's default)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1.5 minutes of training, Set12's first 3 images, BM3D at sigma 25 only",
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.quick:
        args.minutes = min(args.minutes, 1.5)
        args.checkpoints = [0.75, 1.5]

    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.keras.utils.set_random_seed(args.seed)

    clean_test = load_grey_pngs(args.data / "set12")
    names = sorted(p.name for p in (args.data / "set12").glob("*.png"))
    noisy_test = awgn_test_set(clean_test, SIGMAS, args.test_seed)
    if args.quick:  # the first three images (256x256), same noise draw
        clean_test, names = clean_test[:3], names[:3]
        noisy_test = {s: v[:3] for s, v in noisy_test.items()}
    args.checkpoints = [m for m in args.checkpoints if 0 < m < args.minutes] + [args.minutes]
    print(
        f"Set12: {len(clean_test)} images ({', '.join(names)}), noise seed {args.test_seed}; "
        f"{os.cpu_count()} CPUs; {load_now()}",
        flush=True,
    )

    rows = {"noisy input": {s: mean_psnr(clean_test, noisy_test[s]) for s in SIGMAS}}
    meta = {"noisy input": {"params": 0, "s_per_512": 0.0}}

    if args.score:  # a model saved by an earlier run (--save): scored, not trained
        from denoiser.nets.models import load_model

        model = load_model(args.score)
        curve = [{"minutes": float("nan")}]
    else:
        model, curve = train(args, clean_test, noisy_test, log=lambda point: None)
    from denoiser.nets.models import architecture_recipe

    multiple = architecture_recipe(args.architecture).size_multiple
    predict = lambda plane: denoise_whole(model, plane, multiple)  # noqa: E731
    label = (
        f"{args.architecture} blind, {Path(args.score).name} (measured)"
        if args.score
        else f"{args.architecture} blind, {curve[-1]['minutes']:g} min (measured)"
    )
    rows[label] = score_model(predict, clean_test, noisy_test, SIGMAS)
    meta[label] = {"params": model.count_params(), "s_per_512": seconds_per_512(predict)}
    if args.save and not args.score:
        model.save(args.save)

    if args.mnist_model:
        mnist, mnist_predict = load_mnist_predict(args.mnist_model)
        mlabel = f"MNIST model {Path(args.mnist_model).name} (measured)"
        rows[mlabel] = score_model(mnist_predict, clean_test, noisy_test, SIGMAS)
        meta[mlabel] = {"params": mnist.count_params(), "s_per_512": seconds_per_512(mnist_predict)}

    if not args.no_bm3d:
        sig = (25,) if args.quick else SIGMAS
        print(f"BM3D on the same noisy images ({load_now()})", flush=True)
        t0 = time.perf_counter()
        scores, s512 = run_bm3d(clean_test, noisy_test, sig)
        rows["BM3D, bm3d package (measured)"] = scores
        meta["BM3D, bm3d package (measured)"] = {
            "params": 0,
            "s_per_512": s512,
            "seconds_total": round(time.perf_counter() - t0, 1),
        }
    if not args.quick:
        for name, figures in PUBLISHED.items():
            rows[name] = dict(zip(SIGMAS, figures, strict=True))
            meta[name] = {"params": 556_000 if "DnCNN" in name else 0, "s_per_512": float("nan")}

    print(
        f"\nSet12 ({len(clean_test)} images), mean PSNR (dB), output clipped to [0, 1]; {load_now()}"
    )
    print_sigma_table(rows, meta, SIGMAS, "s_per_512", "s / 512x512")
    bm = rows.get("BM3D, bm3d package (measured)")
    if bm:
        print(
            "model - BM3D (measured): "
            + ", ".join(f"sigma {s}: {rows[label][s] - bm[s]:+.2f} dB" for s in SIGMAS if s in bm)
        )
    print(
        "model - DnCNN-S (published): "
        + ", ".join(
            f"sigma {s}: {rows[label][s] - v:+.2f} dB"
            for s, v in zip(SIGMAS, PUBLISHED["DnCNN-S (published)"], strict=True)
        )
    )
    print(
        json.dumps(
            {
                "curve": curve,
                "rows": {k: {str(s): round(v, 3) for s, v in r.items()} for k, r in rows.items()},
                "meta": meta,
                "args": {k: str(v) for k, v in vars(args).items()},
            }
        )
    )


if __name__ == "__main__":
    main()
