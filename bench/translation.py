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
    return (
        x.reshape(n // 4, 2, 2, h, w, c)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(n // 4, 2 * h, 2 * w, c)
    )


def unmosaic(x: np.ndarray) -> np.ndarray:
    k, h2, w2, c = x.shape
    h, w = h2 // 2, w2 // 2
    return x.reshape(k, 2, h, 2, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(4 * k, h, w, c)


def mosaic_psnr(model, clean: np.ndarray, noisy: np.ndarray) -> float:
    """PSNR of the digits denoised four to a 2x2 mosaic, each scored in its quarter."""
    return psnr_mean(clean, unmosaic(predict(model, mosaic(noisy))))


def scatter(x: np.ndarray, rng: np.random.Generator, side: int = 600, cell: int = 40):
    """Clean canvases with one digit a cell, and each digit's box (canvas, y, x)."""
    per_row = side // cell
    per = per_row * per_row
    canvases = np.zeros((-(-len(x) // per), side, side), np.float64)
    boxes = []
    for i, digit in enumerate(x[..., 0]):
        c, k = divmod(i, per)
        y = (k // per_row) * cell + int(rng.integers(0, cell - 28 + 1))
        xx = (k % per_row) * cell + int(rng.integers(0, cell - 28 + 1))
        canvases[c, y : y + 28, xx : xx + 28] = digit
        boxes.append((c, y, xx))
    return canvases, boxes


def tiled_scatter_psnr(model, clean: np.ndarray) -> float:
    """The digits scattered over large canvases, through the folder denoiser's tiling."""
    from denoiser.folder import BatchPredictor
    from denoiser.imaging.tiling import denoise_plane, tile_spec_for

    rng = np.random.default_rng(12345)
    canvases, boxes = scatter(clean, rng)
    noisy = np.clip(canvases + 0.5 * rng.normal(size=canvases.shape), 0, 1)
    spec, predict = (
        tile_spec_for({"fully_convolutional": True, "size_multiple": 4}),
        BatchPredictor(model),
    )
    out = np.stack([denoise_plane(plane, spec, predict) for plane in noisy])
    cut = np.stack([out[c, y : y + 28, x : x + 28] for c, y, x in boxes])[..., None]
    return psnr_mean(clean, cut.astype("float64"))


def main() -> None:
    args, model = parse_model_arguments(__doc__, "test images (a multiple of 4)")
    _, x_test = load_mnist(args.mirror)
    n = args.count - args.count % 4
    clean, noisy = x_test[:n], test_draws(x_test)[0.5][:n]
    padded = np.pad(noisy, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    rows = [
        ("28x28, as in MNIST", psnr_mean(clean, predict(model, noisy))),
        ("reflect-padded to 32x32", psnr_mean(clean, predict(model, padded)[:, 2:30, 2:30])),
        ("2x2 mosaic, 56x56", mosaic_psnr(model, clean, noisy)),
        (
            "scattered over 600x600 canvases, 256x256 tiles (fresh noise)",
            tiled_scatter_psnr(model, clean),
        ),
    ]
    print("| input | PSNR@0.5 |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
