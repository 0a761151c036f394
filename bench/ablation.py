"""What each change of the default recipe gives: one variant at a time, the
same training as ``bench/quality.py``'s default (fresh noise at f = 0.5 every
batch, the pipeline's batch size and the architecture's learning rate, Adam
with cosine decay, 54,000 training images),
PSNR and SSIM at f = 0.5 on the first 2,000 test images, and PSNR on 2x2
mosaics of them (digits framed otherwise, see ``bench/translation.py``).

    python bench/ablation.py --epochs 1                 # every variant, ~3 min each on 2 cores
    python bench/ablation.py --epochs 2 --only default wide-full-res
    python bench/ablation.py --epochs 2 --threads 1 --only default residual &  # two at a time
    python bench/ablation.py --epochs 2 --threads 1 --only mse l1
"""

from __future__ import annotations

import argparse
import os
import time

from _common import add_mirror_argument
from quality import (
    limit_threads,
    load_mnist,
    predict,
    psnr_mean,
    ssim_mean,
    test_draws,
    train_default,
)
from translation import mosaic_psnr

# name: (what changed, build_model options, loss[, training overrides])
VARIANTS = {
    "mse-sigmoid": ("the previous default: sigmoid output, MSE", {"output": "sigmoid"}, "mse"),
    "loss-sigmoid": ("+ PSNR/SSIM loss", {"output": "sigmoid"}, "psnr_ssim"),
    "default": ("+ clipped output (the default)", {}, "psnr_ssim"),
    "wide-full-res": (
        "+ 32 filters, 2 convolutions at full resolution",
        {"filters": (32, 48, 88), "full_convs": 2},
        "psnr_ssim",
    ),
    "wide-full-res-24": (
        "+ 24 filters, 2 convolutions at full resolution",
        {"filters": (24, 48, 96), "full_convs": 2},
        "psnr_ssim",
    ),
    "wide-half-res": (
        "+ 56 filters at 1/2, four convolutions of 80 at 1/4",
        {"filters": (16, 56, 80), "context": (1, 2, 2, 1)},
        "psnr_ssim",
    ),
    "deep-quarter-5": (
        "+ five convolutions of 80 filters at 1/4 (dilations 1, 2, 4, 2, 1)",
        {"filters": (16, 48, 80), "context": (1, 2, 4, 2, 1)},
        "psnr_ssim",
    ),
    "deep-quarter-8": (
        "+ eight convolutions of 64 filters at 1/4",
        {"filters": (16, 48, 64), "context": (1, 2, 4, 2, 1, 2, 4, 1)},
        "psnr_ssim",
    ),
    "batch-128": ("batch 128 (the previous bench recipe)", {}, "psnr_ssim", {"batch": 128}),
    "batch-32": ("batch 32, Adam 1e-3", {}, "psnr_ssim", {"batch": 32, "lr": 1e-3}),
    "no-reframe": (
        "no reframing: every pair in its MNIST frame",
        {},
        "psnr_ssim",
        {"reframe": 0.0},
    ),
    "reframe-50": ("50% of pairs reframed", {}, "psnr_ssim", {"reframe": 0.5}),
    # the directions issue 4 lists, each taken out of (or put into) the default
    "residual": (
        "predict the noise: output = clip(noisy - network) (DnCNN's residual learning)",
        {"output": "residual"},
        "psnr_ssim",
    ),
    "no-skips": ("no skip connections between encoder and decoder", {"skips": False}, "psnr_ssim"),
    "no-batch-norm": (
        "no batch normalisation (biases instead)",
        {"batch_norm": False},
        "psnr_ssim",
    ),
    # without batch normalisation the output is all black by the first probe (half an
    # epoch) at 2e-3, 1e-3 and 5e-4 alike, and with a sigmoid output too: the first
    # steps overshoot into the output's flat region (docs/quality.md, fourth round)
    "no-batch-norm-1e-3": (
        "no batch normalisation, Adam 1e-3",
        {"batch_norm": False},
        "psnr_ssim",
        {"lr": 1e-3},
    ),
    "no-batch-norm-5e-4": (
        "no batch normalisation, Adam 5e-4",
        {"batch_norm": False},
        "psnr_ssim",
        {"lr": 5e-4},
    ),
    "no-batch-norm-sigmoid": (
        "no batch normalisation, sigmoid output",
        {"batch_norm": False, "output": "sigmoid"},
        "psnr_ssim",
    ),
    "mse": ("MSE loss instead of PSNR + SSIM", {}, "mse"),
    "l1": ("L1 loss instead of PSNR + SSIM", {}, "l1"),
    "constant-lr": (
        "constant learning rate instead of cosine decay",
        {},
        "psnr_ssim",
        {"schedule": "constant"},
    ),
    "fixed-noise": (
        "one noise draw per image for the whole run (the pipeline's shards, copies=1)",
        {},
        "psnr_ssim",
        {"fixed_noise": True},
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--only", nargs="+", choices=sorted(VARIANTS), help="variants to run (default: all)"
    )
    parser.add_argument(
        "--threads", type=int, help="TensorFlow threads (1: two runs side by side on 2 cores)"
    )
    add_mirror_argument(parser)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    limit_threads(args.threads)

    train, x_test = load_mnist(args.mirror)
    clean, noisy = x_test[:2000], test_draws(x_test)[0.5][:2000]
    rows = []
    for name in args.only or VARIANTS:
        what, options, loss, *overrides = VARIANTS[name]
        started = time.perf_counter()
        model, info = train_default(
            train,
            0.5,
            args.epochs,
            lambda m: psnr_mean(clean, predict(m, noisy)),
            print,
            "unet",
            label=name,
            loss=loss,
            options=options,
            **(overrides[0] if overrides else {}),
        )
        out = predict(model, noisy)
        rows.append(
            f"| {what} | {model.count_params():,} | {args.epochs} | {info['seconds']:.0f} | "
            f"{psnr_mean(clean, out):.2f} | {ssim_mean(clean, out):.3f} | "
            f"{mosaic_psnr(model, clean, noisy):.2f} |"
        )
        print(f"{name}: {time.perf_counter() - started:.0f} s wall", flush=True)
    print(
        "\n| variant | params | epochs | train s | PSNR@0.5 | SSIM@0.5 | PSNR@0.5, mosaics |\n"
        "|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
