"""Colour photographs: CSet9 at sigma 15 / 25 / 50 beside CBM3D, as bench/natural.py is for grey.

The protocol of ``../shared/datasets/README.md``: ``y = x + (sigma/255) N(0, 1)``
added independently to R, G and B in floating point, neither clipped nor
quantised; outputs clipped to [0, 1]; PSNR on the RGB image (all three
channels, peak 1) per image, averaged over the set. The noisy images are drawn
once from a fixed seed, so every row sees the same ones.

Rows: the noisy input; the colour model (``--score``: a ``.keras`` file or a
model folder), RGB in and out; the grey model (``--grey``) run on the
opponent planes (what ``denoise folder`` does), on R, G and B separately, and
on the luminance only (what ``denoise folder`` did with a
colour image before it routed images per domain: Y denoised, the chroma kept); CBM3D measured
(``bm3d.bm3d_rgb``, told the true sigma, with its seconds per image;
``--no-bm3d`` skips it, it takes 14-29 s an image); the published CBSD68
rows for reference (another test set: a guide, not a comparison).
``--self-ensemble`` adds the colour model as ``denoise folder --self-ensemble``
runs it: the mean of its outputs for the eight flips and rotations of each
image; ``--openvino`` adds the model folder's OpenVINO export, one pass and
(with ``--self-ensemble``) eight, at the precision its card gives, as
``denoise folder`` runs it on a CPU. The last stdout line is the whole result
as JSON.

    python bench/colour.py --score /work/colour-store/models/<version> --grey photo-60.keras
    python bench/colour.py --quick --score model.keras --no-bm3d   # smoke run
    python bench/colour.py --score <model folder> --self-ensemble --openvino --no-bm3d
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import REPO, awgn_test_set, print_sigma_table, psnr  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "cset9"
SIGMAS = (15, 25, 50)
PUBLISHED = {  # CBSD68 averages, DRUNet's paper (Zhang et al. 2021), Table 4
    "CBM3D (published, CBSD68)": (33.52, 30.71, 27.38),
    "CDnCNN-B (published, CBSD68)": (33.89, 31.23, 27.92),
    "FFDNet (published, CBSD68)": (33.87, 31.21, 27.96),
    "DRUNet (published, CBSD68)": (34.30, 31.69, 28.51),
}
PARAMS = {"CDnCNN-B": 668_000}


def load_rgb_pngs(folder: Path, limit: int | None) -> tuple[list[str], list[np.ndarray]]:
    """The folder's PNGs, sorted by name, as float32 [0, 1] (H, W, 3) arrays."""
    from PIL import Image

    paths = sorted(folder.glob("*.png"))[:limit]
    if not paths:
        sys.exit(f"no PNG images in {folder}")
    images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    return [p.name for p in paths], images


def load_model(path: str):
    """A saved model (``.keras``, or a model folder holding ``model.keras``)."""
    import keras

    p = Path(path)
    return keras.saving.load_model(p / "model.keras" if p.is_dir() else p, compile=False)


def whole(model, x: np.ndarray, multiple: int = 4) -> np.ndarray:
    """One (H, W, C) image through a fully convolutional model (anything with
    ``predict_on_batch``: Keras, OpenVINO, a self-ensemble), reflect-padded
    (bottom and right) to the size multiple."""
    h, w = x.shape[:2]
    ph, pw = (-h) % multiple, (-w) % multiple
    padded = np.pad(x, ((0, ph), (0, pw), (0, 0)), mode="reflect") if ph or pw else x
    return np.asarray(model.predict_on_batch(padded[None]), np.float32)[0, :h, :w]


def eight_orientations(model, x: np.ndarray) -> np.ndarray:
    """One (H, W, C) image as ``denoise folder --self-ensemble`` denoises it:
    the mean of the model's outputs for its eight flips and rotations
    (:class:`denoiser.folder.SelfEnsemble`)."""
    from denoiser.folder import SelfEnsemble

    return whole(SelfEnsemble(model), x)


def load_openvino_export(folder: str):
    """A model folder's OpenVINO export, checked against its card and compiled
    at the card's precision, as ``denoise folder`` loads it."""
    from denoiser.core.cards import ModelCard
    from denoiser.runtimes.openvino_runtime import DEFAULT_PRECISION, load_openvino

    if not (Path(folder) / "model.json").is_file():
        raise SystemExit(f"--openvino needs a model folder with its card and export, not {folder}")
    card = ModelCard.model_validate_json((Path(folder) / "model.json").read_text())
    return load_openvino(
        Path(folder) / "model.xml",
        Path(folder) / "model.bin",
        card.openvino_xml_sha256,
        card.openvino_bin_sha256,
        card.openvino_precision or DEFAULT_PRECISION,
    )


def per_channel(grey, x: np.ndarray) -> np.ndarray:
    """R, G and B each through the grey model."""
    return np.concatenate([whole(grey, x[..., c : c + 1]) for c in range(3)], axis=-1)


def per_opponent_channel(grey, x: np.ndarray) -> np.ndarray:
    """What ``denoise folder`` does with a colour image and a grey model: the
    opponent planes (mean and two colour differences) each through it."""
    from denoiser.core.opponent import opponent_to_rgb, rgb_to_opponent

    return opponent_to_rgb(per_channel(grey, rgb_to_opponent(x)))


def luminance_only(grey, x: np.ndarray) -> np.ndarray:
    """What ``denoise folder`` did with a colour image before routing: Y
    (BT.601) denoised, Cb and Cr kept as they are."""
    from denoiser.imaging.images import _rgb_to_ycc, _ycc_to_rgb

    y, chroma = _rgb_to_ycc(x)
    return _ycc_to_rgb(whole(grey, y[..., None])[..., 0], chroma)


def score(method, names, clean, noisy) -> tuple[dict[int, float], float]:
    """Mean PSNR per sigma, and seconds per image."""
    out, seconds = {}, []
    for s, ys in noisy.items():
        values = []
        for x, y in zip(clean, ys, strict=True):
            t0 = time.perf_counter()
            d = method(y)
            seconds.append(time.perf_counter() - t0)
            values.append(psnr(x, d))
        out[s] = float(np.mean(values))
    return out, float(np.median(seconds))


def run_cbm3d(clean, noisy) -> tuple[dict[int, float], float]:
    try:
        import bm3d
    except ImportError:
        sys.exit("CBM3D needs the bm3d package: pip install bm3d (or run with --no-bm3d)")
    scores, seconds = {}, []
    for s, ys in noisy.items():
        values = []
        for x, y in zip(clean, ys, strict=True):
            t0 = time.perf_counter()
            d = np.asarray(bm3d.bm3d_rgb(y, s / 255.0), np.float32)
            seconds.append(time.perf_counter() - t0)
            values.append(psnr(x, d))
        scores[s] = float(np.mean(values))
        print(f"  CBM3D sigma {s}: {scores[s]:.2f} dB", flush=True)
    return scores, float(np.mean(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CSet9's folder")
    parser.add_argument("--score", help="the colour model: a .keras file or a model folder")
    parser.add_argument("--grey", help="a grey photo model, run per channel and on luminance")
    parser.add_argument("--no-bm3d", action="store_true", help="skip CBM3D (14-29 s an image)")
    parser.add_argument("--seed", type=int, default=12, help="the noise draw")
    parser.add_argument("--quick", action="store_true", help="first 2 images; CBM3D on 1")
    parser.add_argument(
        "--self-ensemble", action="store_true", help="the colour model on eight orientations too"
    )
    parser.add_argument(
        "--openvino", action="store_true", help="the model folder's OpenVINO export too"
    )
    args = parser.parse_args()

    names, clean = load_rgb_pngs(args.data, 2 if args.quick else None)
    noisy = awgn_test_set(clean, SIGMAS, args.seed)
    rows: dict[str, dict[int, float]] = {}
    meta: dict[str, dict] = {}
    rows["noisy input"], _ = score(lambda y: y, names, clean, noisy)
    meta["noisy input"] = {"params": 0, "s_per_image": 0.0}
    if args.score:
        model = load_model(args.score)
        label = f"colour model {model.name} (measured)"
        rows[label], sec = score(lambda y: whole(model, y), names, clean, noisy)
        meta[label] = {"params": model.count_params(), "s_per_image": sec}
        runs = {"Keras": model}
        if args.openvino:
            runs["OpenVINO"] = exported = load_openvino_export(args.score)
            label = f"colour model {model.name}, OpenVINO {exported.precision} (measured)"
            rows[label], sec = score(lambda y: whole(exported, y), names, clean, noisy)
            meta[label] = {"params": model.count_params(), "s_per_image": sec}
        for runtime, run in runs.items() if args.self_ensemble else ():
            label = f"colour model {model.name}, {runtime}, mean of eight orientations (measured)"
            rows[label], sec = score(lambda y, m=run: eight_orientations(m, y), names, clean, noisy)
            meta[label] = {"params": model.count_params(), "s_per_image": sec}
    if args.grey:
        grey = load_model(args.grey)
        for label, method in (
            (
                f"grey model {grey.name} per opponent channel, as denoise folder does (measured)",
                per_opponent_channel,
            ),
            (f"grey model {grey.name} per RGB channel (measured)", per_channel),
            (
                f"grey model {grey.name} on luminance only, as denoise folder did (measured)",
                luminance_only,
            ),
        ):
            rows[label], sec = score(lambda y, m=method: m(grey, y), names, clean, noisy)
            meta[label] = {"params": grey.count_params(), "s_per_image": sec}
    if not args.no_bm3d:
        subset = 1 if args.quick else len(clean)
        print(f"CBM3D on {subset} image(s) at each sigma", flush=True)
        sub_noisy = {s: ys[:subset] for s, ys in noisy.items()}
        label = "CBM3D, bm3d.bm3d_rgb (measured)" + (" first image" if args.quick else "")
        rows[label], sec = run_cbm3d(clean[:subset], sub_noisy)
        meta[label] = {"params": 0, "s_per_image": sec}
    if not args.quick:
        for name, figures in PUBLISHED.items():
            rows[name] = dict(zip(SIGMAS, figures, strict=True))
            meta[name] = {"params": PARAMS.get(name.split(" ")[0], 0), "s_per_image": float("nan")}

    print(f"\nCSet9 ({len(clean)} images: {', '.join(names)}), mean PSNR (dB) on RGB, clipped")
    print_sigma_table(rows, meta, SIGMAS, "s_per_image", "s / image")
    print(
        json.dumps(
            {
                "rows": {k: {str(s): round(v, 3) for s, v in r.items()} for k, r in rows.items()},
                "meta": meta,
                "images": names,
                "args": {k: str(v) for k, v in vars(args).items()},
            }
        )
    )


if __name__ == "__main__":
    main()
