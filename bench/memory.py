"""Peak memory of a folder run against the number of large images in it.

Folders of 1, 6 and 14 colour JPEGs of 6000x6000 pixels (36 megapixels,
camera-sized), denoised by ``denoiser.folder.denoise_tree`` with an untrained
``photo_unet`` (Keras, fp32), or ``--model identity`` (a 1x1 convolution:
the folder pipeline's own memory, minutes instead of an hour on 2 cores), in
a child process each, whose peak resident memory (``ru_maxrss``) is
reported; ``--unbounded`` also runs each folder with the pixel budget lifted
(the pipeline as it was before the budget: only the encoded bytes read ahead
were bounded).

    python bench/memory.py [--counts 1 6 14] [--side 6000] [--model photo_unet|identity] [--unbounded]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO

sys.path.insert(0, str(REPO))


def make_images(folder: Path, count: int, side: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((side, side), Image.BILINEAR)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-20, 21, (side, side, 3))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / "0000.jpg", quality=90)
    for i in range(1, count):
        os.link(folder / "0000.jpg", folder / f"{i:04d}.jpg")  # same bytes, separate files


def identity_model():
    import keras

    x = keras.Input((None, None, 1))
    y = keras.layers.Conv2D(1, 1, kernel_initializer="ones", bias_initializer="zeros")(x)
    return keras.Model(x, y)


def child(folder: str, out: str, unbounded: bool, architecture: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    import denoiser.folder.pipeline as folder_module
    from denoiser.folder import BatchPredictor, denoise_tree
    from denoiser.nets.models import build_model
    from denoiser.runtimes.inference import tile_spec_for_model

    if unbounded:
        folder_module.PIXELS_IN_FLIGHT = 1 << 40
    keras.utils.set_random_seed(0)
    model = identity_model() if architecture == "identity" else build_model(architecture)
    started = time.perf_counter()
    results = denoise_tree(
        folder, out, BatchPredictor(model), tile_spec_for_model(model, "photo_unet")
    )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"files": len(results), "seconds": seconds, "peak": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 6, 14])
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--model", default="photo_unet", help="photo_unet or identity")
    parser.add_argument("--unbounded", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2] == "1", args.child[3])
        return
    with tempfile.TemporaryDirectory(prefix="denoise-memory-") as tmp:
        print(f"model {args.model}, {args.side}x{args.side} colour JPEGs")
        print(f"{'images':>6}  {'budget':>9}  {'peak GB':>7}  {'seconds':>7}")
        for count in args.counts:
            src = Path(tmp) / f"in-{count}"
            make_images(src, count, args.side)
            for unbounded in [False, True] if args.unbounded else [False]:
                out = Path(tmp) / f"out-{count}-{int(unbounded)}"
                run = subprocess.run(
                    [sys.executable, __file__, "--child", str(src), str(out)]
                    + [str(int(unbounded)), args.model],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                got = json.loads(run.stdout.strip().splitlines()[-1])
                budget = "none" if unbounded else "64 MP"
                print(
                    f"{count:>6}  {budget:>9}  {got['peak'] / 1e9:>7.2f}  {got['seconds']:>7.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
