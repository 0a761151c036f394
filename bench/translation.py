"""Does a trained model denoise digits that are not framed as in MNIST?

A fully convolutional model runs on any size, but nothing stops it from
learning where a 28x28 frame's borders are (zero padding at every layer tells
it) and using the position as a prior, as the reference's dense bottleneck
does. Then the same digits placed elsewhere come out worse. This measures it on
the f = 0.5 test draw: the 28x28 test images as they are, the same images
reflect-padded to 32x32 (cropped back), and 2x2 mosaics of them (56x56, each
digit scored in its own quarter).

    python bench/translation.py bench/out/models/default.keras
"""

from __future__ import annotations

import numpy as np
from _common import parse_model_arguments
from quality import load_mnist, predict, psnr_mean, test_draws


def mosaic(x: np.ndarray) -> np.ndarray:
    """(4k, 28, 28, 1) -> (k, 56, 56, 1), four digits a canvas."""
    n, h, w, c = x.shape
    return x.reshape(n // 4, 2, 2, h, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(n // 4, 2 * h, 2 * w, c)


def unmosaic(x: np.ndarray) -> np.ndarray:
    k, h2, w2, c = x.shape
    h, w = h2 // 2, w2 // 2
    return x.reshape(k, 2, h, 2, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(4 * k, h, w, c)


def main() -> None:
    args, model = parse_model_arguments(__doc__, "test images (a multiple of 4)")
    _, x_test = load_mnist(args.mirror)
    n = args.count - args.count % 4
    clean, noisy = x_test[:n], test_draws(x_test)[0.5][:n]
    padded = np.pad(noisy, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    rows = [("28x28, as in MNIST", psnr_mean(clean, predict(model, noisy))),
            ("reflect-padded to 32x32", psnr_mean(clean, predict(model, padded)[:, 2:30, 2:30])),
            ("2x2 mosaic, 56x56", psnr_mean(clean, unmosaic(predict(model, mosaic(noisy)))))]
    print("| input | PSNR@0.5 |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
