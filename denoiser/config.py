"""Typed, validated configuration, one model per pipeline stage.

These pydantic models are the flows' parameters: Prefect builds its UI form and
its parameter schema from them, and a bad value is refused before any work with
a message naming the field.
"""

from __future__ import annotations

import shlex
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from denoiser.core.catalog import check_dataset_name, is_idx_dataset

NoiseKind = Literal["gaussian", "salt_and_pepper", "speckle", "poisson", "awgn"]
LevelDensity = Literal["rising", "uniform"]
LossName = Literal["auto", "psnr_ssim", "psnr", "bce", "mse", "l1"]
LrSchedule = Literal["auto", "constant", "cosine"]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Config):
    """Which dataset to fetch and from where."""

    dataset: str = Field(
        "mnist",
        description="A registered dataset (mnist, fashion-mnist; train400, set12, bsd432: photographs; "
        "cbsd432, cset9: colour photographs), or a "
        "folder of your own images: a path, a file:// URL or an http(s):// URL (over HTTP a SHA256SUMS "
        "beside the images must list them).",
    )
    source: str | None = Field(
        None,
        description="Mirror to download a registered dataset from: http(s) URL, file:// URL or folder "
        "path, holding the dataset's files or a folder per dataset (<source>/<name>/). "
        "Defaults to $DENOISE_DATA_SOURCE, then to the dataset's origin.",
    )
    test_dataset: str | None = Field(
        None,
        description="Images to test on (image-folder datasets only): a registered name or a folder "
        "path/URL. None: the registered dataset's own test set (train400: set12), or for your own "
        "folder a held-out share of it chosen by each file's content hash.",
    )
    train_limit: int | None = Field(
        None, ge=10, description="Use only the first N training images (quick runs)."
    )
    test_limit: int | None = Field(
        None, ge=1, description="Use only the first N test images (quick runs)."
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        return check_dataset_name(value)

    @field_validator("test_dataset")
    @classmethod
    def _known_test_dataset(cls, value: str | None) -> str | None:
        if value is not None and is_idx_dataset(check_dataset_name(value)):
            raise ValueError(
                f"test dataset {value!r} is an IDX dataset; a test dataset is a folder of images"
            )
        return value

    @model_validator(mode="after")
    def _test_dataset_needs_images(self):
        if self.test_dataset is not None and is_idx_dataset(self.dataset):
            raise ValueError(
                f"test_dataset applies to image-folder datasets; {self.dataset} brings its own"
            )
        return self


#: the highest meaningful level of each noise kind, and what its level means
LEVEL_LIMITS: dict[str, tuple[float, str]] = {
    "gaussian": (2.0, "the standard deviation on [0, 1] pixels"),
    "salt_and_pepper": (1.0, "the fraction of pixels flipped"),
    "speckle": (2.0, "the standard deviation of the multiplicative noise"),
    "poisson": (1.0, "1/peak photon count"),
    "awgn": (255.0, "sigma in 0-255 units"),
}


class NoiseConfig(_Config):
    """How clean images are corrupted into training pairs."""

    kind: NoiseKind = Field("gaussian", description="Noise model.")
    level: float | tuple[float, float] = Field(
        0.5,
        description="Noise level, or a range [lo, hi] drawn per image (blind training). "
        "gaussian: std factor; salt_and_pepper: fraction of pixels; speckle: std; "
        "poisson: 1/peak photon count; awgn: sigma in 0-255 units (the literature's, unclipped).",
    )
    level_density: LevelDensity = Field(
        "rising",
        description="How a range of levels is drawn: 'rising' (density growing with the level, "
        "more heavy-noise pairs, which teach a blind model most) or 'uniform'.",
    )
    copies: int = Field(1, ge=1, le=64, description="Noisy draws per clean image.")
    seed: int = Field(0, ge=0, description="Run seed; every shard's seed is spawned from it.")
    shard_rows: int = Field(10_000, ge=1, description="Rows per Parquet shard.")
    validation_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Deterministic share of the training set held out (IDX: the "
        "last images; image folders: chosen by a hash of each file's content).",
    )
    patch_size: int | None = Field(
        None,
        ge=8,
        le=1024,
        description="Image-folder datasets: side of the square training patches "
        "(None: 40, the literature's). Ignored for IDX datasets, whose images are whole.",
    )
    patches_per_image: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Image-folder datasets: random patches (each with one of the "
        "eight flips/rotations) cut from each training and validation image for one epoch "
        "(None: 64). Ignored for IDX datasets.",
    )

    @field_validator("level")
    @classmethod
    def _valid_level(cls, value: float | tuple[float, float], info: ValidationInfo):
        levels = value if isinstance(value, tuple) else (value,)
        for v in levels:
            if v < 0:
                raise ValueError("noise level must be >= 0")
        if isinstance(value, tuple) and value[0] > value[1]:
            raise ValueError("noise level range must be [lo, hi] with lo <= hi")
        kind = info.data.get("kind")
        if kind in LEVEL_LIMITS and max(levels) > LEVEL_LIMITS[kind][0]:
            top, unit = LEVEL_LIMITS[kind]
            raise ValueError(
                f"a {kind} level is {unit}, from 0 to {top:g}; {max(levels):g} is out of range"
            )
        return value


class TrainConfig(_Config):
    """Model and training recipe."""

    architecture: str = Field(
        "auto",
        description="Architecture name (see build_model). auto: the dataset's own, unet for "
        "28x28 IDX datasets and the photographs' architecture (photo_unet) for image folders.",
    )
    epochs: int = Field(35, ge=1, description="Maximum number of epochs.")
    batch_size: int = Field(64, ge=1)
    learning_rate: float | None = Field(
        None,
        gt=0,
        description="Adam's initial learning rate. None: the architecture's own recipe "
        "(seed: 1e-3, Keras' default as in the blog; unet: 2e-3).",
    )
    reframe: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Share of training pairs recut at a random offset from 2x2 mosaics "
        "of the batch, so the model does not learn where the 28x28 frame is and works on whole images "
        "and tiles. None: the architecture's own recipe (unet: 0.2, seed: 0).",
    )
    colour_gains: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of colour training patches whose R, G and B are each scaled by a "
        "gain drawn from [colour_gains_low, 1] (a colour cast), which gives the colour "
        "differences detail where the luminance has it: JPEG training photographs (4:2:0) keep "
        "none there. Grey patches ignore it.",
    )
    colour_gains_low: float = Field(
        0.6,
        gt=0,
        lt=1,
        description="The lowest gain of a colour cast (colour_gains): each of R, G and B is "
        "scaled by a gain drawn from [colour_gains_low, 1].",
    )
    colour_gains_balanced: bool = Field(
        False,
        description="Divide a colour cast's three gains by their mean, so the cast keeps a "
        "grey's brightness instead of darkening the patch, and clip the patch to [0, 1].",
    )
    loss: LossName = Field(
        "auto", description="auto: the architecture's own recipe (seed: bce, unet: psnr_ssim)."
    )
    lr_schedule: LrSchedule = Field(
        "auto",
        description="Learning rate over the run. auto: the architecture's own recipe "
        "(seed: constant, unet: cosine decay over `epochs`).",
    )
    patience: int = Field(5, ge=1, description="Early stopping patience in epochs.")
    shuffle_buffer: int = Field(10_000, ge=1)
    seed: int = Field(0, ge=0)
    mixed_precision: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: on when training on a GPU."
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="On a CPU: auto is mixed bfloat16 where the CPU computes it in hardware "
        "(AMX or AVX512-BF16), float32 elsewhere. GPUs follow mixed_precision (float16).",
    )

    warm_start: str = Field(
        "",
        description="The model whose weights start the training: a version (the store's or "
        "a built-in one), a model folder or a .keras file, of the same architecture or, for an "
        "architecture grown from another domain's model (opponent_unet: a grey photo model), "
        "of that domain. Empty: for the latter, the store's production model of that domain, "
        "else the package's built-in one; from scratch for the others.",
    )

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        # the architectures' module (and the cards') only when a config is made: the CLI's
        # start-up imports this module
        from denoiser.nets.models import available_architectures

        names = available_architectures()
        if value != "auto" and value not in names:
            raise ValueError(f"unknown architecture {value!r}; known: {', '.join(names)}")
        return value

    @model_validator(mode="after")
    def _reframe_fits_architecture(self):
        from denoiser.nets.models import architecture_recipe

        if (
            self.reframe
            and self.architecture != "auto"
            and not architecture_recipe(self.architecture).fully_convolutional
        ):
            raise ValueError(
                f"architecture {self.architecture} is tied to its input frame; "
                "reframing needs a fully convolutional one (use reframe 0)"
            )
        return self


class EvalConfig(_Config):
    """How a trained model is judged."""

    min_psnr_gain: float = Field(
        5.0, description="Quality gate: minimum PSNR gain (dB) over the noisy input."
    )
    sample_count: int = Field(8, ge=1, le=32, description="Columns in the sample grid.")
    batch_size: int = Field(256, ge=1)
    sigmas: list[float] = Field(
        [15.0, 25.0, 50.0],
        min_length=1,
        max_length=8,
        description="Photo datasets: the awgn sigmas (0-255 units) every test image is scored at, "
        "each from a fixed seed (the literature's Set12 table: 15, 25, 50). The quality gate takes "
        "the mean PSNR gain over them. Ignored for IDX datasets, whose test pairs carry their noise.",
    )

    @field_validator("sigmas")
    @classmethod
    def _valid_sigmas(cls, value: list[float]) -> list[float]:
        for sigma in value:
            if not 0 < sigma <= 255:
                raise ValueError(f"each sigma must be in (0, 255] (0-255 units), not {sigma:g}")
        if len(set(value)) != len(value):
            raise ValueError("sigmas must be distinct")
        return value


# the `denoise train` flag of each config field that has one (the others keep their defaults)
TRAIN_FLAGS: dict[str, dict[str, str]] = {
    "data": {
        "dataset": "--dataset",
        "source": "--source",
        "test_dataset": "--test-dataset",
        "train_limit": "--train-limit",
        "test_limit": "--test-limit",
    },
    "noise": {
        "kind": "--noise-kind",
        "level": "--noise-level",
        "level_density": "--level-density",
        "copies": "--copies",
        "seed": "--seed",
        "patch_size": "--patch-size",
        "patches_per_image": "--patches-per-image",
    },
    "training": {
        "architecture": "--architecture",
        "epochs": "--epochs",
        "batch_size": "--batch-size",
        "learning_rate": "--learning-rate",
        "loss": "--loss",
        "lr_schedule": "--lr-schedule",
        "reframe": "--reframe",
        "colour_gains": "--colour-gains",
        "colour_gains_low": "--colour-gains-low",
        "colour_gains_balanced": "--colour-gains-balanced",
        "seed": "--seed",
        "precision": "--precision",
        "warm_start": "--warm-start",
    },
    "evaluation": {"min_psnr_gain": "--min-psnr-gain", "sigmas": "--sigmas"},
}
_CONFIGS = {
    "data": DataConfig,
    "noise": NoiseConfig,
    "training": TrainConfig,
    "evaluation": EvalConfig,
}


def _flag_value(value) -> str:
    if isinstance(value, list | tuple):
        return ",".join(_flag_value(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def train_command(parameters: dict) -> str:
    """The ``denoise train`` command that gives the training flow these
    parameters (``data``, ``noise``, ``training``, ``evaluation``: configs or
    their dicts): one flag per field that differs from its default. What a
    model card records, so that a model can be trained again."""
    words, seen = ["denoise", "train"], set()
    for name, flags in TRAIN_FLAGS.items():
        value = parameters.get(name)
        if value is None:
            continue
        config = _CONFIGS[name].model_validate(value)
        defaults = _CONFIGS[name]()
        for field, flag in flags.items():
            given = getattr(config, field)
            if given is None or given == getattr(defaults, field) or flag in seen:
                continue
            seen.add(flag)
            words += [flag] if given is True else [flag, shlex.quote(_flag_value(given))]
    return " ".join(words)
