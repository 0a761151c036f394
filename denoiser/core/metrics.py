"""Image quality metrics, vectorised over batches.

Convention: images are floats in [0, 1]. PSNR is computed per image,
``10 * log10(1 / mse)`` (data range 1), capped at 100 dB for identical
images, then averaged over images ("per-image mean PSNR"). SSIM reproduces
scikit-image's ``structural_similarity`` defaults with ``data_range=1``: a 7x7
uniform window, K1 = 0.01, K2 = 0.03, sample covariance, averaged over the
area whose windows lie inside the image. Colour channels are averaged.
"""

from __future__ import annotations

import numpy as np

PSNR_CAP = 100.0
_WIN = 7


def _as_batch(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 4:  # (N, H, W, C) -> (N*C, H, W) planes
        x = np.moveaxis(x, -1, 1).reshape(-1, x.shape[1], x.shape[2])
    return x


def _channels(x: np.ndarray) -> int:
    return np.asarray(x).shape[-1] if np.asarray(x).ndim == 4 else 1


def mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)


def psnr(clean: np.ndarray, test: np.ndarray) -> np.ndarray:
    err = mse(clean, test)
    with np.errstate(divide="ignore"):
        values = 10.0 * np.log10(1.0 / err)
    return np.minimum(values, PSNR_CAP)


def bce(clean: np.ndarray, test: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Binary cross-entropy of ``test`` as a prediction of ``clean``, per image."""
    y = np.asarray(clean, np.float64).reshape(len(clean), -1)
    p = np.clip(np.asarray(test, np.float64).reshape(len(test), -1), eps, 1 - eps)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(axis=1)


def _box_mean(x: np.ndarray) -> np.ndarray:
    """Means over every 7x7 window fully inside each (H, W) plane."""
    s = np.zeros((x.shape[0], x.shape[1] + 1, x.shape[2] + 1))
    s[:, 1:, 1:] = x.cumsum(axis=1).cumsum(axis=2)
    w = _WIN
    box = s[:, w:, w:] - s[:, :-w, w:] - s[:, w:, :-w] + s[:, :-w, :-w]
    return box / (w * w)


def ssim(clean: np.ndarray, test: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-image SSIM, equal to skimage.metrics.structural_similarity's defaults."""
    channels = _channels(clean)
    x, y = _as_batch(clean), _as_batch(test)
    if x.shape[1] < _WIN or x.shape[2] < _WIN:
        raise ValueError(f"SSIM needs images of at least {_WIN}x{_WIN}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = _WIN * _WIN
    cov = n / (n - 1)
    out = np.empty(len(x))
    for start in range(0, len(x), 512):  # bounded memory on large test sets
        xs, ys = x[start : start + 512], y[start : start + 512]
        ux, uy = _box_mean(xs), _box_mean(ys)
        vx = cov * (_box_mean(xs * xs) - ux * ux)
        vy = cov * (_box_mean(ys * ys) - uy * uy)
        vxy = cov * (_box_mean(xs * ys) - ux * uy)
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        out[start : start + 512] = s.reshape(len(s), -1).mean(axis=1)
    return out.reshape(-1, channels).mean(axis=1)


def _summary(clean, noisy, denoised, with_ssim: bool = True) -> dict[str, float]:
    row = {
        "count": int(len(clean)),
        "psnr_noisy": float(psnr(clean, noisy).mean()),
        "psnr_denoised": float(psnr(clean, denoised).mean()),
        "mse_noisy": float(mse(clean, noisy).mean()),
        "mse_denoised": float(mse(clean, denoised).mean()),
        "bce_noisy": float(bce(clean, noisy).mean()),
        "bce_denoised": float(bce(clean, denoised).mean()),
    }
    if with_ssim:
        row["ssim_noisy"] = float(ssim(clean, noisy).mean())
        row["ssim_denoised"] = float(ssim(clean, denoised).mean())
    row["psnr_gain"] = row["psnr_denoised"] - row["psnr_noisy"]
    return row


def evaluate_arrays(
    clean: np.ndarray,
    noisy: np.ndarray,
    denoised: np.ndarray,
    levels: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    level_bins: int = 6,
) -> dict:
    """Overall figures, and the same per noise level and per class label.

    Levels are grouped by exact value when there are few distinct ones (a
    fixed-level test set), else into equal-width bins (a blind range).
    """
    result = {"overall": _summary(clean, noisy, denoised), "per_level": [], "per_class": []}
    if levels is not None:
        levels = np.asarray(levels, dtype=np.float64)
        distinct = np.unique(np.round(levels, 4))
        if len(distinct) <= level_bins:
            groups = [(f"{v:g}", np.isclose(levels, v, atol=5e-5)) for v in distinct]
        else:
            edges = np.linspace(levels.min(), levels.max(), level_bins + 1)
            idx = np.clip(np.digitize(levels, edges[1:-1]), 0, level_bins - 1)
            groups = [(f"{edges[i]:.3g}-{edges[i + 1]:.3g}", idx == i) for i in range(level_bins)]
        for name, mask in groups:
            if mask.any():
                result["per_level"].append(
                    {"level": name, **_summary(clean[mask], noisy[mask], denoised[mask])}
                )
    if labels is not None:
        labels = np.asarray(labels)
        for value in np.unique(labels):
            mask = labels == value
            result["per_class"].append(
                {"label": int(value), **_summary(clean[mask], noisy[mask], denoised[mask])}
            )
    return result


def score_image(clean: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """PSNR (peak 1), SSIM and MSE of one whole image of any size, ``test``
    clipped to [0, 1] first, as the denoising literature scores its outputs."""
    c = np.asarray(clean, np.float64)[None]
    t = np.clip(np.asarray(test, np.float64), 0.0, 1.0)[None]
    return {"psnr": float(psnr(c, t)[0]), "ssim": float(ssim(c, t)[0]), "mse": float(mse(c, t)[0])}


def _mean_row(rows: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


SCORES = (
    "psnr_noisy",
    "psnr_denoised",
    "psnr_gain",
    "ssim_noisy",
    "ssim_denoised",
    "mse_noisy",
    "mse_denoised",
)


def evaluate_per_sigma(
    clean: list[np.ndarray],
    noisy: dict[float, list[np.ndarray]],
    denoised: dict[float, list[np.ndarray]],
    names: list[str] | None = None,
) -> dict:
    """Whole test images of any sizes, each scored at every sigma: a row per
    image and sigma (``per_image``), their means per sigma (``per_sigma``),
    and the mean of those over the sigmas (``overall``, whose ``psnr_gain``
    the quality gate reads). ``noisy`` and ``denoised`` map each sigma to
    the images in ``clean``'s order; both are clipped to [0, 1] to be scored."""
    names = names or [str(i) for i in range(len(clean))]
    per_image, per_sigma = [], []
    for sigma in noisy:
        rows = []
        for i, (c, y, d) in enumerate(zip(clean, noisy[sigma], denoised[sigma], strict=True)):
            before, after = score_image(c, y), score_image(c, d)
            rows.append(
                {
                    "image": names[i],
                    "height": int(c.shape[0]),
                    "width": int(c.shape[1]),
                    "sigma": float(sigma),
                    "psnr_noisy": before["psnr"],
                    "psnr_denoised": after["psnr"],
                    "psnr_gain": after["psnr"] - before["psnr"],
                    "ssim_noisy": before["ssim"],
                    "ssim_denoised": after["ssim"],
                    "mse_noisy": before["mse"],
                    "mse_denoised": after["mse"],
                }
            )
        per_image += rows
        per_sigma.append({"sigma": float(sigma), "count": len(rows), **_mean_row(rows, SCORES)})
    overall = {
        "count": len(clean),
        "sigmas": [float(s) for s in noisy],
        **_mean_row(per_sigma, SCORES),
    }
    return {
        "overall": overall,
        "per_sigma": per_sigma,
        "per_image": per_image,
        "per_level": [],
        "per_class": [],
    }
