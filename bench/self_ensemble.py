"""Test-time self-ensemble: what averaging a model's outputs over the eight
flips and 90-degree rotations of the input gains over one pass, for the
built-in photo models, beside (C)BM3D measured on the same noisy images.

The grey model on Set12 and the colour model on CSet9, at sigma 15 / 25 / 50,
the noisy images from one fixed draw (seed 12, as ``bench/natural.py`` and
``bench/colour.py``, so their (C)BM3D rows compare), whole images through
Keras, or with ``--openvino`` through each model's OpenVINO export. What ``denoise folder --self-ensemble`` gains, the mean here computed
from the same turns (:mod:`denoiser.folder.predictor`).

    python bench/self_ensemble.py                  # both built-in models
    python bench/self_ensemble.py --only grey
    python bench/self_ensemble.py --openvino       # each model's OpenVINO export, as denoise folder runs it
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import REPO, awgn_test_set, psnr  # noqa: E402
from colour import load_model, load_openvino_export, load_rgb_pngs, whole  # noqa: E402
from natural import DEFAULT_DATA, SIGMAS, load_grey_pngs  # noqa: E402


def eight_ways(model, y: np.ndarray) -> list[np.ndarray]:
    """The model's outputs for the eight flips and rotations of ``y`` (H, W, C),
    each turned back (:func:`denoiser.folder.predictor.turn_batch`, as
    ``denoise folder --self-ensemble`` turns them); the first is the one pass
    on ``y`` as it is."""
    from denoiser.folder.predictor import TURNS, turn_batch, unturn_batch

    return [
        unturn_batch(whole(model, np.ascontiguousarray(turn_batch(y[None], t)[0]))[None], t)[0]
        for t in range(TURNS)
    ]


def compare(model, clean: list[np.ndarray], seed: int) -> dict:
    """Mean PSNR per sigma of one pass and of the eight-way mean, and the
    eight-way seconds per image."""
    noisy = awgn_test_set(clean, SIGMAS, seed)
    rows = {"one pass": {}, "eight-way mean": {}}
    seconds = []
    for s, ys in noisy.items():
        one, eight = [], []
        for x, y in zip(clean, ys, strict=True):
            t0 = time.perf_counter()
            outs = eight_ways(model, y)
            seconds.append(time.perf_counter() - t0)
            one.append(psnr(x, outs[0]))
            eight.append(psnr(x, np.mean(outs, axis=0)))
        rows["one pass"][s], rows["eight-way mean"][s] = float(np.mean(one)), float(np.mean(eight))
    return {"rows": rows, "seconds_per_image": float(np.median(seconds))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("grey", "colour"))
    parser.add_argument("--seed", type=int, default=12, help="the noise draw")
    parser.add_argument(
        "--openvino",
        action="store_true",
        help="the model's OpenVINO export at its card's precision instead of Keras",
    )
    args = parser.parse_args()
    builtin = REPO / "artifacts" / "builtin_models"
    index = json.loads((builtin / "index.json").read_text())["models"]
    sets = {  # domain: (its entry in the built-in index, its test images)
        "grey": ("photos", lambda: [c[..., None] for c in load_grey_pngs(DEFAULT_DATA / "set12")]),
        "colour": ("colour", lambda: load_rgb_pngs(DEFAULT_DATA / "cset9", None)[1]),
    }
    for domain, (entry, load) in sets.items():
        if args.only and domain != args.only:
            continue
        version = index[entry]["version"]
        folder = str(builtin / version)
        model = load_openvino_export(folder) if args.openvino else load_model(folder)
        runtime = f"OpenVINO {model.precision}" if args.openvino else "Keras"
        result = compare(model, load(), args.seed)
        print(f"\n{domain}: built-in {version}, {runtime}, seed {args.seed}")
        print("| PSNR (dB) | " + " | ".join(f"sigma {s}" for s in SIGMAS) + " |")
        print("|---|" + "---|" * len(SIGMAS))
        for name, figures in result["rows"].items():
            print(f"| {name} | " + " | ".join(f"{figures[s]:.3f}" for s in SIGMAS) + " |")
        gain = [result["rows"]["eight-way mean"][s] - result["rows"]["one pass"][s] for s in SIGMAS]
        print("| gain | " + " | ".join(f"{g:+.3f}" for g in gain) + " |")
        print(f"eight-way: {result['seconds_per_image']:.1f} s an image ({runtime})", flush=True)


if __name__ == "__main__":
    main()
