"""What a domain is: one kind of image the pipeline learns to denoise, and
what each stage needs from it (shards, noise, recipe, evaluation, how a
folder's images are recognised).

Imports the configs and the cards only; each domain module imports what its
own stages use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from denoiser.config import EvalConfig, NoiseConfig, TrainConfig
    from denoiser.core.cards import ModelCard
    from denoiser.imaging.images import LoadedImage


class Judged(NamedTuple):
    """A model's evaluation on a shard set's test split: the metrics (with
    ``overall``, whose ``psnr_gain`` the quality gate reads), the sample grid
    (PNG bytes), the rows of the metrics table, the report's table and the
    grid's caption."""

    metrics: dict
    samples: bytes
    rows: list[dict]
    table: list[dict]
    caption: str


#: (out, request: ShardRequest, log) -> out: writes (finishes, repairs) a fetched
#: dataset's shard set into a folder
ShardWriter = Callable[..., Path]
#: (model, card, shards_dir, evaluation) -> Judged
Evaluator = Callable[[Any, "ModelCard", str, "EvalConfig"], Judged]
#: (noise, training) -> (noise, training): checks, and the recipe's defaults filled in
RequestResolver = Callable[["NoiseConfig", "TrainConfig"], tuple["NoiseConfig", "TrainConfig"]]


@dataclass(frozen=True)
class Domain:
    """One kind of image, as every stage sees it.

    ``name`` is what cards and the registry record (each domain has its own
    production model); ``channels`` what the model takes and gives (1 grey,
    3 RGB); ``shard_kind`` the shard set it trains on (``pairs``: noisy/clean
    pairs written once; ``patches``: clean patches, noise added in training);
    ``folder_domain`` the domain whose model ``denoise folder`` runs its
    images through (itself when the folder pipeline can run its models);
    ``fallbacks`` the domains whose models take its images as they are meant
    (with a channel adaptation), in order of preference, for a store without
    a model of its own; ``orientation_free``: its images have no up and no
    left (a flip or a quarter turn of one is as likely an image), so its
    models learn them in all eight orientations and a folder run may take,
    from any of its models, the mean of the outputs for the eight
    orientations of an image (``denoise folder --self-ensemble``): what
    decides is the model's domain, not the image's.
    """

    name: str
    words: str  # how messages name its images
    channels: int
    shard_kind: str
    default_architecture: str
    train_hint: str  # how to get a model of this domain
    default_noise: Callable[[], NoiseConfig]
    write_shards: ShardWriter
    evaluate: Evaluator
    resolve_request: RequestResolver
    recognises: Callable[[LoadedImage], bool]
    folder_domain: str = ""
    fallbacks: tuple[str, ...] = ()
    orientation_free: bool = False

    @property
    def noise_in_training(self) -> bool:
        """Whether its shards hold clean images only and training draws the
        noise fresh for every batch (patch sets), rather than noisy/clean pairs."""
        return self.shard_kind == "patches"

    def takes_model_of(self, domain: str) -> bool:
        """Whether a model of ``domain`` denoises this domain's images as they
        are meant: its own domain's, or one of its fallbacks'."""
        return domain == self.name or domain in self.fallbacks

    def resolve(self, noise: NoiseConfig, training: TrainConfig) -> tuple[NoiseConfig, TrainConfig]:
        """The request as this domain trains it: ``architecture: auto`` made
        concrete (the domain's own), the domain's checks (a one-line
        ConfigError each), then what the user left unset from the recipe."""
        if training.architecture == "auto":
            training = training.model_copy(update={"architecture": self.default_architecture})
        return self.resolve_request(noise, training)

    def noise_from(self, options: dict) -> NoiseConfig:
        """The noise of a request that names only some of its fields: the
        domain's own noise with ``options`` over it, or the config's defaults
        under them when ``options`` asks for another kind of noise (which the
        domain's checks may then refuse)."""
        default = self.default_noise()
        kind = options.get("kind")
        base = default.model_dump(exclude_defaults=True) if kind in (None, default.kind) else {}
        return type(default)(**{**base, **options})
