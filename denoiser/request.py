"""One training request, resolved once: what ``denoise train`` and the
training flow (run from the command line, the UI or a deployment) both call
before any work, so that every check runs in one place and every later stage
gets concrete values (no ``auto`` architecture, the recipe's defaults filled
in, the store's root known).

The dataset's domain decides the defaults (its noise, architecture and
recipe) and runs its checks; see :mod:`denoiser.domains`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from denoiser.config import DataConfig, EvalConfig, NoiseConfig, TrainConfig
from denoiser.core.files import resolve_store_root
from denoiser.domains import Domain, domain_for_dataset, domain_named


class TrainRequest(BaseModel):
    """A training request with nothing left to decide: the dataset, its
    domain's name, the noise, the recipe (architecture concrete), the
    evaluation and the store's root (an absolute path or a URL)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataConfig
    domain: str
    noise: NoiseConfig
    training: TrainConfig
    evaluation: EvalConfig
    store: str

    @property
    def domain_spec(self) -> Domain:
        """The domain object the request trains (its shard writer, evaluator...)."""
        return domain_named(self.domain)


def resolve_request(
    data: DataConfig | dict | None = None,
    noise: NoiseConfig | dict | None = None,
    training: TrainConfig | dict | None = None,
    evaluation: EvalConfig | dict | None = None,
    store: str | None = None,
) -> TrainRequest:
    """The request made concrete and checked: the configs validated, no noise
    given meaning the dataset's domain's own, the domain's checks of noise
    and recipe (one-line ConfigErrors naming the field), ``architecture:
    auto`` made the domain's, what the user left unset from the recipe, and
    the store's root resolved (given, else $DENOISE_STORE, else ./store).
    Resolving a resolved request gives it back unchanged."""
    data = DataConfig.model_validate(data if data is not None else {})
    domain = domain_for_dataset(data.dataset)
    noise = domain.default_noise() if noise is None else NoiseConfig.model_validate(noise)
    training = TrainConfig.model_validate(training if training is not None else {})
    noise, training = domain.resolve(noise, training)
    return TrainRequest(
        data=data,
        domain=domain.name,
        noise=noise,
        training=training,
        evaluation=EvalConfig.model_validate(evaluation if evaluation is not None else {}),
        store=resolve_store_root(store),
    )


def default_noise_for(dataset: str | DataConfig) -> NoiseConfig:
    """The noise a request of ``dataset`` gets when it names none: its domain's."""
    name = dataset if isinstance(dataset, str) else dataset.dataset
    return domain_for_dataset(name).default_noise()
