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

import numpy as np
from _common import parse_model_arguments
from quality import load_mnist, predict, psnr_mean


def main() -> None:
    args, model = parse_model_arguments(__doc__, "images per set")
    train, x_test = load_mnist(args.mirror)
    train = train.astype("float64") / 255.0
    sets = [
        ("training images (seen in training)", train[: args.count]),
        ("held-out last tenth of the training set", train[-args.count :]),
        ("test images", x_test[: args.count]),
    ]
    rng = np.random.default_rng(12345)
    print("| images | PSNR@0.5 |\n|---|---|")
    for name, clean in sets:
        noisy = np.clip(clean + 0.5 * rng.normal(size=clean.shape), 0, 1)
        print(f"| {name} | {psnr_mean(clean, predict(model, noisy)):.2f} |")


if __name__ == "__main__":
    main()
