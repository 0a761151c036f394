"""Model architectures, one entry each in :data:`ARCHITECTURES`.

Builders take an input shape and return an uncompiled ``keras.Model``. Keras is
imported inside the builders so that importing this module stays cheap. No
``Lambda`` layers: models must load with Keras' safe mode on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from denoiser.core.cards import Recipe


@dataclass(frozen=True)
class ArchitectureSpec:
    """An architecture: its builder, its training recipe, one line for
    listings, and, for one grown from another domain's model, that domain
    (``grows_from``) and how its weights start from such a model
    (``warm_start(model, seed_model)``)."""

    builder: Callable[..., Any]
    recipe: Recipe = field(default_factory=Recipe)
    description: str = ""
    grows_from: str = ""
    warm_start: Callable[[Any, Any], int] | None = None


def _conv_bn_relu(
    x, filters: int, name: str, strides: int = 1, dilation: int = 1, batch_norm: bool = True
):
    from keras import layers

    x = layers.Conv2D(
        filters,
        3,
        strides=strides,
        dilation_rate=dilation,
        padding="same",
        use_bias=not batch_norm,
        name=f"{name}_conv",
    )(x)
    if batch_norm:
        # momentum 0.9, not Keras' 0.99: the moving statistics must settle within a
        # short (quick-mode) run, or inference sees different activations than training
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def build_seed(input_shape=(28, 28, 1)):
    """The reference blog post's conv autoencoder, layer for layer: 440,865 parameters.

    Conv2D 16/32/32 with BatchNorm and two MaxPoolings (28 -> 7), a Dense 128
    sigmoid bottleneck, Dense 7*7*32, Conv2DTranspose 32/32/16 with BatchNorm
    and two UpSamplings, a sigmoid Conv2D output. BatchNorm follows every
    convolution except the one feeding the bottleneck and the one feeding the
    output (with BatchNorm everywhere the count would be 441,057, 192 more).
    The dense bottleneck is what gives it digit-level context, and also what
    ties it to 28x28 inputs.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=tuple(input_shape), name="noisy")
    x = layers.Conv2D(16, 3, activation="relu", padding="same", name="enc_conv1")(inputs)
    x = layers.BatchNormalization(name="enc_bn1")(x)
    x = layers.MaxPooling2D(2, padding="same", name="enc_pool1")(x)
    x = layers.Conv2D(32, 3, activation="relu", padding="same", name="enc_conv2")(x)
    x = layers.BatchNormalization(name="enc_bn2")(x)
    x = layers.MaxPooling2D(2, padding="same", name="enc_pool2")(x)
    x = layers.Conv2D(32, 3, activation="relu", padding="same", name="enc_conv3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="sigmoid", name="bottleneck")(x)
    x = layers.Dense(7 * 7 * 32, activation="relu", name="dec_dense")(x)
    x = layers.Reshape((7, 7, 32), name="dec_reshape")(x)
    x = layers.Conv2DTranspose(32, 3, activation="relu", padding="same", name="dec_convt1")(x)
    x = layers.BatchNormalization(name="dec_bn1")(x)
    x = layers.UpSampling2D(2, name="dec_up1")(x)
    x = layers.Conv2DTranspose(32, 3, activation="relu", padding="same", name="dec_convt2")(x)
    x = layers.BatchNormalization(name="dec_bn2")(x)
    x = layers.UpSampling2D(2, name="dec_up2")(x)
    x = layers.Conv2DTranspose(16, 3, activation="relu", padding="same", name="dec_convt3")(x)
    x = layers.Conv2D(1, 3, padding="same", name="out_conv")(x)
    outputs = layers.Activation("sigmoid", dtype="float32", name="denoised")(x)
    return keras.Model(inputs, outputs, name="seed")


def build_unet_small(input_shape=(None, None, 1), filters=(16, 32, 64)):
    """A small U-Net (the calibration probe of issue 4): the skips keep stroke
    detail, the 1/4-resolution level sees most of a digit. Fully
    convolutional: any size that is a multiple of 4."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=tuple(input_shape), name="noisy")
    skips, x = [], inputs
    for i, f in enumerate(filters[:-1]):
        x = _conv_bn_relu(x, f, f"enc{i}a")
        x = _conv_bn_relu(x, f, f"enc{i}b")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{i}_pool")(x)
    x = _conv_bn_relu(x, filters[-1], "mid_a")
    x = _conv_bn_relu(x, filters[-1], "mid_b")
    for i, f in reversed(list(enumerate(filters[:-1]))):
        x = layers.UpSampling2D(2, name=f"dec{i}_up")(x)
        x = layers.Concatenate(name=f"dec{i}_cat")([x, skips[i]])
        x = _conv_bn_relu(x, f, f"dec{i}a")
        x = _conv_bn_relu(x, f, f"dec{i}b")
    return keras.Model(inputs, _output(x, "sigmoid"), name="unet_small")


def _output(x, output: str, noisy=None):
    """``clip``: a linear 1x1 convolution clipped to [0, 1] (``ReLU(max_value=1)``),
    so a background pixel can come out exactly black. A sigmoid only tends to 0,
    and in short runs the faint haze it leaves on the background costs SSIM far
    more than PSNR. ``sigmoid``: the reference's output; from two epochs on it
    matches the clip's SSIM and is a little ahead on PSNR (figures in
    docs/measurements.md), the first change to try with the next run of
    record. ``residual``:
    the network predicts the noise and the output is the input minus it,
    clipped (DnCNN's residual learning), kept for comparisons too."""
    from keras import layers

    x = layers.Conv2D(1, 1, name="out_conv")(x)
    if output == "clip":
        return layers.ReLU(max_value=1.0, dtype="float32", name="denoised")(x)
    if output == "sigmoid":
        return layers.Activation("sigmoid", dtype="float32", name="denoised")(x)
    if output == "residual" and noisy is not None:
        x = layers.Subtract(name="minus_noise")([noisy, x])
        return layers.ReLU(max_value=1.0, dtype="float32", name="denoised")(x)
    raise ValueError(f"output must be clip, sigmoid or residual, not {output!r}")


def build_unet(
    input_shape=(None, None, 1),
    filters=(16, 48, 96),
    full_convs=1,
    context=(1, 2, 1),
    output="clip",
    skips=True,
    batch_norm=True,
):
    """The default: a U-Net that spends its compute at low resolution.

    At full resolution ``full_convs`` cheap convolutions make the skip that
    keeps stroke detail; strided convolutions go down to 1/2 and 1/4, where a
    block of convolutions (``context`` gives their dilations) has a receptive
    field covering a whole digit, the context the reference's dense bottleneck
    gave it; transposed convolutions come back up, each joined by its skip.
    Fewer parameters than the reference. Fully convolutional: any size that
    is a multiple of 4. (A wider full-resolution end gained little for much
    more time: docs/measurements.md.) ``skips=False``, ``batch_norm=False`` and
    ``output="residual"`` exist to measure what each part gives
    (``bench/ablation.py``).
    """
    import keras
    from keras import layers

    def block(x, filters, name, **kw):
        return _conv_bn_relu(x, filters, name, batch_norm=batch_norm, **kw)

    def join(x, skip, name):
        return layers.Concatenate(name=name)([x, skip]) if skips else x

    f0, f1, f2 = filters
    inputs = keras.Input(shape=tuple(input_shape), name="noisy")
    s0 = inputs
    for i in range(full_convs):
        s0 = block(s0, f0, "full" if i == 0 else f"full{i}")
    x = block(s0, f1, "down1", strides=2)
    s1 = block(x, f1, "half")
    x = block(s1, f2, "down2", strides=2)
    for i, dilation in enumerate(context):
        x = block(x, f2, f"quarter{i}", dilation=dilation)
    x = layers.Conv2DTranspose(f1, 2, strides=2, padding="same", name="up1")(x)
    x = block(join(x, s1, "cat1"), f1, "dec1a")
    x = block(x, f1, "dec1b")
    x = layers.Conv2DTranspose(f0, 2, strides=2, padding="same", name="up0")(x)
    x = block(join(x, s0, "cat0"), f0, "dec0a")
    x = block(x, f0, "dec0b")
    return keras.Model(inputs, _output(x, output, inputs), name="unet")


def build_photo_unet(
    input_shape=(None, None, 1),
    filters=(16, 64, 128),
    convs=(1, 2),
    middle=2,
    block="plain",
    skip="add",
    batch_norm=False,
    name="photo_unet",
):
    """For photographs: a residual U-Net that spends its compute at 1/2 and 1/4
    resolution (issue 14).

    ``filters`` gives the channels per level (full, 1/2, 1/4, ...); ``convs``
    the 3x3 convolutions (``block="res"``: residual blocks of two) at each
    level above the lowest, once on the way down and once on the way up;
    ``middle`` those at the lowest level. Down by 2x2 convolutions of stride 2,
    up by 2x2 transposed convolutions, each level's skip added (``skip="add"``,
    DRUNet's way) or concatenated. The network estimates the noise and the
    output is the input minus it (DnCNN's residual learning), linear and not
    clipped inside, so unclipped Gaussian noise trains without dead gradients;
    clip the output to [0, 1] for images and PSNR. No batch norm by default.
    Fully convolutional: any size that is a multiple of 2 ** (levels - 1).
    The input's channels (``input_shape[-1]``: 1 grey, 3 RGB) are the output's.
    The defaults measured best of the short probes (docs/natural.md; the
    figures of the alternatives in docs/measurements.md).
    """
    import keras
    from keras import layers

    options = dict(filters=filters, convs=convs, middle=middle, block=block, skip=skip)
    inputs = keras.Input(shape=tuple(input_shape), name="noisy")
    noise = _photo_trunk(inputs, int(input_shape[-1] or 1), batch_norm=batch_norm, **options)
    outputs = layers.Subtract(dtype="float32", name="denoised")([inputs, noise])
    return keras.Model(inputs, outputs, name=name)


def _photo_trunk(inputs, noise_channels, filters, convs, middle, block, skip, batch_norm):
    """``photo_unet``'s layers from its input to its noise estimate (the
    ``noise`` convolution, ``noise_channels`` wide)."""
    from keras import layers

    if len(filters) < 2 or len(convs) != len(filters) - 1:
        raise ValueError("filters needs one entry per level, convs one per level above the lowest")

    def unit(x, f, name):
        if block == "res":
            y = _conv_bn_relu(x, f, f"{name}_1", batch_norm=batch_norm)
            y = layers.Conv2D(f, 3, padding="same", use_bias=not batch_norm, name=f"{name}_2_conv")(
                y
            )
            if batch_norm:
                y = layers.BatchNormalization(momentum=0.9, name=f"{name}_2_bn")(y)
            return layers.Add(name=f"{name}_add")([x, y])
        if block == "plain":
            return _conv_bn_relu(x, f, name, batch_norm=batch_norm)
        raise ValueError(f"block must be plain or res, not {block!r}")

    x = layers.Conv2D(filters[0], 3, padding="same", name="head")(inputs)
    if block == "plain":
        x = layers.ReLU(name="head_relu")(x)
    skips = []
    for level, (f, n) in enumerate(zip(filters[:-1], convs, strict=True)):
        for i in range(n):
            x = unit(x, f, f"enc{level}_{i}")
        skips.append(x)
        x = layers.Conv2D(filters[level + 1], 2, strides=2, name=f"down{level}")(x)
    for i in range(middle):
        x = unit(x, filters[-1], f"mid_{i}")
    for level in reversed(range(len(filters) - 1)):
        x = layers.Conv2DTranspose(filters[level], 2, strides=2, name=f"up{level}")(x)
        if skip == "add":
            x = layers.Add(name=f"skip{level}")([x, skips[level]])
        elif skip == "concat":
            x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
            x = _conv_bn_relu(x, filters[level], f"merge{level}", batch_norm=batch_norm)
        else:
            raise ValueError(f"skip must be add or concat, not {skip!r}")
        for i in range(convs[level]):
            x = unit(x, filters[level], f"dec{level}_{i}")
    return layers.Conv2D(noise_channels, 3, padding="same", name="noise")(x)


def build_colour_unet(input_shape=(None, None, 3), **options):
    """For colour photographs: ``photo_unet``'s layout with RGB in and RGB
    out, so one network sees the three channels' noise together."""
    return build_photo_unet(input_shape, **{"name": "colour_unet", **options})


def build_opponent_unet(input_shape=(None, None, 3), name="opponent_unet", **options):
    """For colour photographs, grown from a grey photo model: RGB in, RGB out.

    Each of the image's three opponent planes (:mod:`denoiser.core.opponent`)
    goes through one shared ``photo_unet`` trunk, which sees the plane, all
    three planes (the guide: a colour difference is denoised knowing the
    image's structure) and which plane it is; its noise estimates go back to
    RGB and are taken from the input. The transforms are fixed 1x1
    convolutions, so the model is plain Keras layers. With the guide's and the
    plane's weights at zero and the trunk's from a grey model
    (:func:`warm_start_from`) it is exactly that grey model run per opponent
    plane, and training starts from there. ``options`` as ``photo_unet``'s.
    """
    import keras
    from keras import layers

    from denoiser.core.opponent import FROM_OPPONENT, OPPONENT_OFFSET, TO_OPPONENT

    options = {**_photo_trunk_defaults(), **options}
    batch_norm = options.pop("batch_norm", False)
    trunk_in = keras.Input(shape=(None, None, 7), name="plane")
    trunk = keras.Model(
        trunk_in, _photo_trunk(trunk_in, 1, batch_norm=batch_norm, **options), name="trunk"
    )
    inputs = keras.Input(shape=tuple(input_shape), name="noisy")
    feeds, noises = [], []
    for c in range(3):
        feed = layers.Conv2D(7, 1, trainable=False, name=f"feed{c}")
        noises.append(trunk(feed(inputs)))
        feeds.append((feed, c))
    back = layers.Conv2D(3, 1, use_bias=False, trainable=False, name="to_rgb")
    noise_rgb = back(layers.Concatenate(name="noises")(noises))
    outputs = layers.Subtract(dtype="float32", name="denoised")([inputs, noise_rgb])
    model = keras.Model(inputs, outputs, name=name)
    for feed, c in feeds:  # [plane c, the three planes, which plane] from RGB
        kernel = np.zeros((1, 1, 3, 7), np.float32)
        kernel[0, 0, :, 0] = TO_OPPONENT[c]
        kernel[0, 0, :, 1:4] = TO_OPPONENT.T
        bias = np.concatenate([OPPONENT_OFFSET[c : c + 1], OPPONENT_OFFSET, np.eye(3)[c]])
        feed.set_weights([kernel, bias.astype(np.float32)])
    back.set_weights([FROM_OPPONENT[None, None]])
    return model


_TRUNK_OPTIONS = ("filters", "convs", "middle", "block", "skip", "batch_norm")


def _photo_trunk_defaults() -> dict:
    """``build_photo_unet``'s trunk options as its signature sets them (one
    source for both architectures)."""
    params = inspect.signature(build_photo_unet).parameters
    return {k: params[k].default for k in _TRUNK_OPTIONS}


def warm_start_from(model, seed) -> int:
    """Set ``model``'s trunk (an ``opponent_unet``) from ``seed``
    (:func:`grow_photo_unet`): a grey ``photo_unet`` of the same trunk or a
    smaller one, whose head takes the plane's input channel, with zeros from
    the guide's, so ``model`` starts as the grey model run per opponent plane;
    or a colour ``opponent_unet`` of a smaller trunk, whose trunk goes into
    ``model``'s whole, so ``model`` starts as that colour model. Returns the
    number of layers set; ValueError when the trunks do not fit."""
    if any(layer.name == "trunk" for layer in seed.layers):  # a colour model: its trunk
        seed = seed.get_layer("trunk")
    return grow_photo_unet(model.get_layer("trunk"), seed)


def grow_photo_unet(model, seed) -> int:
    """Start ``model`` (a ``photo_unet`` layout) as ``seed``, a ``photo_unet``
    with no more channels at any level and no more convolutions: each of the
    seed's layers goes into the layer of its name, its channels first; the
    weights from a new channel into an old one are zero, so the seed's
    channels compute what they did; a convolution the seed lacks starts as
    the identity (it follows a ReLU, so its ReLU passes its input on). The
    model starts as the seed's function, and the new channels and layers
    then learn from there. Returns the number of layers set; ValueError when
    the seed does not fit."""
    seed_layers = {layer.name: layer for layer in seed.layers if layer.weights}
    layers_ = [layer for layer in model.layers if layer.weights]
    if not set(seed_layers) <= {layer.name for layer in layers_}:
        raise ValueError(f"{seed.name}'s layers are not all in {model.name}")
    for layer in layers_:
        weights = [np.asarray(w) for w in layer.get_weights()]
        kernel = weights[0]
        # Conv2D kernels are (h, w, in, out); Conv2DTranspose ones (h, w, out, in)
        transposed = type(layer).__name__ == "Conv2DTranspose"
        in_axis, out_axis = (3, 2) if transposed else (2, 3)
        if layer.name not in seed_layers:
            if kernel.shape[2] != kernel.shape[3] or kernel.shape[:2] != (3, 3) or transposed:
                raise ValueError(f"{model.name}'s new layer {layer.name} cannot start as identity")
            kernel = np.zeros_like(kernel)
            kernel[1, 1] = np.eye(kernel.shape[2], dtype=kernel.dtype)
            layer.set_weights([kernel, *(np.zeros_like(w) for w in weights[1:])])
            continue
        old = [np.asarray(w) for w in seed_layers[layer.name].get_weights()]
        if len(old) != len(weights) or any(
            o.ndim != w.ndim or any(a > b for a, b in zip(o.shape, w.shape, strict=True))
            for o, w in zip(old, weights, strict=True)
        ):
            raise ValueError(f"{seed.name}'s {layer.name} does not fit in {model.name}'s")
        if old[0].shape[:2] != kernel.shape[:2]:
            raise ValueError(f"{seed.name}'s {layer.name} has another kernel size")
        n_in, n_out = old[0].shape[in_axis], old[0].shape[out_axis]
        into_old = [slice(None)] * 4
        into_old[in_axis], into_old[out_axis] = slice(n_in, None), slice(None, n_out)
        kernel[tuple(into_old)] = 0.0
        kernel[tuple(slice(0, n) for n in old[0].shape)] = old[0]
        for w, o in zip(weights[1:], old[1:], strict=True):
            w[tuple(slice(0, n) for n in o.shape)] = o
        layer.set_weights([kernel, *weights[1:]])
    return len(layers_)


WIDE_TRUNK = {"filters": (32, 64, 128), "convs": (2, 2)}


def build_opponent_unet_wide(input_shape=(None, None, 3), **options):
    """``opponent_unet`` on ``photo_unet_wide``'s trunk, grown from a grey
    photo model that fits it (a ``photo_unet_wide`` or a ``photo_unet``)."""
    return build_opponent_unet(
        input_shape, **{"name": "opponent_unet_wide", **WIDE_TRUNK, **options}
    )


# 48 channels at full resolution: the colour model's colour differences lose
# their fine detail there (docs/natural.md)
WIDER_TRUNK = {"filters": (48, 64, 128), "convs": (2, 2)}


def build_opponent_unet_wider(input_shape=(None, None, 3), **options):
    """``opponent_unet_wide`` with 48 channels at full resolution instead of
    32: 620,030 parameters, about 1.4 times the compute a step. Grows from a
    colour model of a narrower trunk (``opponent_unet_wide``) or from a grey
    photo model, as ``opponent_unet_wide`` does."""
    return build_opponent_unet(
        input_shape, **{"name": "opponent_unet_wider", **WIDER_TRUNK, **options}
    )


def build_photo_unet_wide(input_shape=(None, None, 1), **options):
    """``photo_unet`` with more at full resolution, where the finest detail
    (and a low sigma's noise) is: 32 channels and two convolutions a side
    there instead of 16 and one. 562,689 parameters, 1.5 times the
    compute a step. Grows from a ``photo_unet`` model (:func:`grow_photo_unet`)."""
    return build_photo_unet(
        input_shape,
        **{**WIDE_TRUNK, "name": "photo_unet_wide", **options},
    )


def unet_recipe(**choices) -> Recipe:
    """A U-Net's recipe: fully convolutional, grey in and out, halving twice
    (so sizes are a multiple of 4), with its own training ``choices``."""
    return Recipe(fully_convolutional=True, input_shape=(None, None, 1), size_multiple=4, **choices)


# the photographs' recipe (grey and colour alike): patches of 64, blind awgn sigma 0-55
PHOTO_RECIPE = unet_recipe(
    loss="mse",
    lr_schedule="cosine",
    learning_rate=1e-3,
    reframe=0.0,
    patch_size=64,
    batch_size=32,
    epochs=8,
    noise="awgn",
    sigma_range=(0.0, 55.0),
)

# the colour models grown from a grey one: RGB, and a gentler start than from scratch
OPPONENT_RECIPE = PHOTO_RECIPE.model_copy(
    update={"input_shape": (None, None, 3), "learning_rate": 2e-4}
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "seed": ArchitectureSpec(
        build_seed,
        Recipe(
            loss="bce",
            fully_convolutional=False,
            input_shape=(28, 28, 1),
            size_multiple=28,
        ),
        "the reference conv autoencoder (Keras blog), 28x28 only",
    ),
    "unet": ArchitectureSpec(
        build_unet,
        unet_recipe(loss="psnr_ssim", lr_schedule="cosine", learning_rate=2e-3, reframe=0.2),
        "U-Net computing at 1/2 and 1/4 resolution, dilated context block, clipped output; the default",
    ),
    "unet-small": ArchitectureSpec(
        build_unet_small,
        unet_recipe(loss="mse"),
        "two-level U-Net 16/32/64 (issue 4's calibration probe)",
    ),
    "photo_unet": ArchitectureSpec(
        build_photo_unet,
        PHOTO_RECIPE,
        "residual U-Net for photographs (issue 14): 16/64/128 channels at 1, 1/2, 1/4 resolution, "
        "added skips, no batch norm, output = input - estimated noise, blind AWGN sigma 0-55",
    ),
    "photo_unet_wide": ArchitectureSpec(
        build_photo_unet_wide,
        PHOTO_RECIPE,
        "photo_unet with 32 channels and two convolutions a side at full resolution; "
        "grows from a photo_unet model",
        grows_from="photos",
        warm_start=grow_photo_unet,
    ),
    "colour_unet": ArchitectureSpec(
        build_colour_unet,
        PHOTO_RECIPE.model_copy(update={"input_shape": (None, None, 3)}),
        "photo_unet's layout for colour photographs: RGB in, RGB out, awgn in each channel, "
        "blind sigma 0-55",
    ),
    "opponent_unet": ArchitectureSpec(
        build_opponent_unet,
        OPPONENT_RECIPE,
        "for colour photographs, grown from a grey photo model: photo_unet's trunk shared by the "
        "three opponent colour planes, each seeing the others as its guide; RGB in and out",
        grows_from="photos",
        warm_start=warm_start_from,
    ),
    "opponent_unet_wide": ArchitectureSpec(
        build_opponent_unet_wide,
        OPPONENT_RECIPE,
        "opponent_unet on photo_unet_wide's trunk, grown from a grey photo model that fits it",
        grows_from="photos",
        warm_start=warm_start_from,
    ),
    "opponent_unet_wider": ArchitectureSpec(
        build_opponent_unet_wider,
        OPPONENT_RECIPE,
        "opponent_unet_wide with 48 channels at full resolution; grown from a colour model of a "
        "narrower trunk (--warm-start) or from a grey photo model",
        grows_from="photos",
        warm_start=warm_start_from,
    ),
}
