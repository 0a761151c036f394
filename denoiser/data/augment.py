"""Training-time augmentation, inside the tf.data graph.

Why reframing: every MNIST digit sits centred in its 28x28 frame, and zero
padding at every layer tells a fully convolutional model where that frame's
borders are. Trained on plain MNIST it learns position as a prior ("strokes
are never near the border") and gets much worse on the same digits framed
otherwise, below a 3x3 median filter on 2x2 mosaics of the test digits
(docs/measurements.md). The folder denoiser runs on whole images and on
tiles cut anywhere, so that is what its users would get.
"""

from __future__ import annotations


def reframe(images, share: float, seed: int | None = None):
    """Recut a ``share`` of a batch at random offsets.

    ``images`` is a (batch, height, width, channels) tensor. Each image is,
    with probability ``share``, replaced by a height x width window at a
    random offset into a 2x2 mosaic of itself and the next three images of the
    batch (offset (0, 0) is the image itself), so the model sees strokes cut
    at the frame's edges and digits anywhere in it. Stack noisy and clean
    images as channels to cut both the same way: pixel-wise noise stays the
    same noise after the cut.
    """
    import tensorflow as tf

    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], not {share!r}")
    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    mosaic = tf.concat(
        [
            tf.concat([images, tf.roll(images, -1, 0)], 2),
            tf.concat([tf.roll(images, -2, 0), tf.roll(images, -3, 0)], 2),
        ],
        1,
    )
    # three ops with one seed would draw the same stream: give each its own
    seeds = (None, None, None) if seed is None else (seed, seed + 1, seed + 2)
    moved = tf.random.uniform((b,), seed=seeds[0]) < share
    oy = tf.where(moved, tf.random.uniform((b,), 0, h + 1, tf.int32, seed=seeds[1]), 0)
    ox = tf.where(moved, tf.random.uniform((b,), 0, w + 1, tf.int32, seed=seeds[2]), 0)
    rows = tf.gather(mosaic, oy[:, None] + tf.range(h), axis=1, batch_dims=1)
    return tf.gather(rows, ox[:, None] + tf.range(w), axis=2, batch_dims=1)
