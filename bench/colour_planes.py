"""Where a colour model's error is, beside CBM3D's: each opponent plane's share.

The error of each output (clipped to [0, 1]) goes into the orthonormal
opponent planes (``denoiser/core/opponent.py``: the mean of R, G and B and two
colour differences, rows scaled to unit length), where its squares add up to
the RGB error's. Per image and sigma: the RGB PSNR of the model and of CBM3D
and each plane's PSNR; then, over the set, each plane's share of the RGB mean
squared error and the ratio model / CBM3D per plane. A ratio above 1 is where
the model loses. The noisy images are bench/colour.py's (CSet9, seed 12), so
its tables apply. CBM3D takes 14-100 s an image here. The last stdout line is
the whole result as JSON.

    python bench/colour_planes.py --score <colour model folder> --sigmas 15
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import awgn_test_set  # noqa: E402
from colour import DEFAULT_DATA, SIGMAS, load_model, load_rgb_pngs, whole  # noqa: E402

from denoiser.core.opponent import TO_OPPONENT  # noqa: E402

PLANES = ("mean", "R-B", "R-2G+B")
UNIT = TO_OPPONENT / np.linalg.norm(TO_OPPONENT, axis=1, keepdims=True)  # orthonormal rows


def plane_mse(out: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """The mean squared error of ``out`` (clipped) in each orthonormal opponent plane."""
    error = (np.clip(out, 0.0, 1.0) - clean).reshape(-1, 3).astype(np.float64) @ UNIT.T
    return (error**2).mean(axis=0)


def db(mse) -> np.ndarray:
    return -10.0 * np.log10(np.asarray(mse))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSet9's folder")
    parser.add_argument("--score", required=True, help="the colour model (.keras or folder)")
    parser.add_argument("--sigmas", default="15", help="of 15,25,50 (bench/colour.py's draw)")
    parser.add_argument("--seed", type=int, default=12, help="the noise draw")
    parser.add_argument("--limit", type=int, help="the first N images")
    args = parser.parse_args()
    import bm3d

    names, clean = load_rgb_pngs(args.data, args.limit)
    noisy = awgn_test_set(clean, SIGMAS, args.seed)  # all three: the same draws as colour.py
    model = load_model(args.score)
    result = {}
    for sigma in (int(s) for s in args.sigmas.split(",")):
        mine, theirs = [], []
        for name, x, y in zip(names, clean, noisy[sigma], strict=True):
            t0 = time.perf_counter()
            ref = np.asarray(bm3d.bm3d_rgb(y, sigma / 255.0), np.float32)
            seconds = time.perf_counter() - t0
            mine.append(plane_mse(whole(model, y), x))
            theirs.append(plane_mse(ref, x))
            print(
                f"sigma {sigma} {name:24s} RGB model {db(mine[-1].mean()):.2f} "
                f"CBM3D {db(theirs[-1].mean()):.2f} ({seconds:.0f} s) | planes model "
                + " ".join(f"{v:.2f}" for v in db(mine[-1]))
                + " CBM3D "
                + " ".join(f"{v:.2f}" for v in db(theirs[-1])),
                flush=True,
            )
        m, c = np.mean(mine, axis=0), np.mean(theirs, axis=0)
        rgb = [float(np.mean([db(e.mean()) for e in runs])) for runs in (mine, theirs)]
        result[sigma] = {
            "psnr_rgb": {"model": rgb[0], "cbm3d": rgb[1]},
            "share": {
                "model": dict(zip(PLANES, (m / m.sum()).round(3).tolist(), strict=True)),
                "cbm3d": dict(zip(PLANES, (c / c.sum()).round(3).tolist(), strict=True)),
            },
            "ratio": dict(zip(PLANES, (m / c).round(3).tolist(), strict=True)),
        }
        print(
            f"sigma {sigma}: RGB PSNR model {rgb[0]:.2f}, CBM3D {rgb[1]:.2f}; "
            f"mse model / CBM3D per plane ({', '.join(PLANES)}): "
            + ", ".join(f"{v:.3f}" for v in (m / c))
            + "; the model's mse shares: "
            + ", ".join(f"{v:.3f}" for v in m / m.sum())
        )
    print(json.dumps({"model": args.score, "seed": args.seed, "sigmas": result}))


if __name__ == "__main__":
    main()
