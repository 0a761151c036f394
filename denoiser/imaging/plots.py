"""Small PNG renderings of image batches (sample grids, examples, thumbnails).

Pillow only, no matplotlib: these PNGs are embedded as data URIs in Prefect
markdown artifacts, so they must be small and quick to make.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Floats are taken as [0, 1]; integers as already-scaled pixels."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def grid_image(rows: Sequence[np.ndarray], scale: int = 2, gap: int = 2) -> np.ndarray:
    """Tile rows of images (each row an array (N, H, W) or (N, H, W, 1|3)) into
    one uint8 picture; rows may hold different counts, short rows stay blank."""
    if not rows:
        raise ValueError("grid_image needs at least one row")
    prepared = []
    for row in rows:
        arr = to_uint8(row)
        if arr.ndim == 4 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 2:
            arr = arr[None]
        prepared.append(arr)
    h = max(r.shape[1] for r in prepared)
    w = max(r.shape[2] for r in prepared)
    cols = max(r.shape[0] for r in prepared)
    channels = 3 if any(r.ndim == 4 for r in prepared) else None
    height = len(prepared) * h + (len(prepared) + 1) * gap
    width = cols * w + (cols + 1) * gap
    shape = (height, width, channels) if channels else (height, width)
    canvas = np.full(shape, 255, dtype=np.uint8)
    for i, row in enumerate(prepared):
        for j, img in enumerate(row):
            if channels and img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=-1)
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            canvas[y : y + img.shape[0], x : x + img.shape[1]] = img
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return canvas


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def grid_png(rows: Sequence[np.ndarray], scale: int = 2, gap: int = 2) -> bytes:
    """PNG bytes of :func:`grid_image`; e.g. rows = [clean, noisy, denoised]."""
    return png_bytes(grid_image(rows, scale=scale, gap=gap))
