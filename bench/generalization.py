"""Is a trained model short of data or short of capacity?

Scores a model at f = 0.5 on images it trained on (the first of the 54,000
training images), on the held-out last tenth of the training set, and on the
test set, each with its own fixed noise draw. A large train-over-held-out gap
would call for more data or augmentation; none means the model fits what it
sees no better than what it has not seen, and only capacity, compute or a
longer run can move it.

    python bench/generalization.py bench/out/models/default.keras
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from _common import add_mirror_argument
from quality import load_mnist, predict, psnr_mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .keras file")
    parser.add_argument("--count", type=int, default=2000, help="images per set")
    add_mirror_argument(parser)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    model = keras.saving.load_model(args.model, compile=False)
    train, x_test = load_mnist(args.mirror)
    train = train.astype("float64") / 255.0
    sets = [("training images (seen in training)", train[:args.count]),
            ("held-out last tenth of the training set", train[-args.count:]),
            ("test images", x_test[:args.count])]
    rng = np.random.default_rng(12345)
    print("| images | PSNR@0.5 |\n|---|---|")
    for name, clean in sets:
        noisy = np.clip(clean + 0.5 * rng.normal(size=clean.shape), 0, 1)
        print(f"| {name} | {psnr_mean(clean, predict(model, noisy)):.2f} |")


if __name__ == "__main__":
    main()
