"""Which model a command uses: :func:`resolve_model` picks among the store's
models (:mod:`artifacts.registry`) and the package's built-in ones
(:mod:`artifacts.builtin`). Above both, so that neither imports the other's
user.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from artifacts.builtin import builtin_model, find_builtin
from artifacts.registry import (
    ModelRef,
    _card,
    _version_ref,
    is_version_name,
    list_models,
    production_model,
    read_production_versions,
)
from artifacts.store import Store
from denoiser.config import DataConfig, TrainConfig
from denoiser.core.cards import ModelCard
from denoiser.core.errors import ModelError, ModelNotFound
from denoiser.domains import domain_for_dataset

logger = logging.getLogger("artifacts.registry")  # its messages read as the registry's


def resolve_model(
    store_root: Store | str | os.PathLike | None, spec: str | None = None, domain: str | None = None
) -> ModelRef:
    """``spec``: None (the production model of ``domain`` when given and there
    is one, else the package's built-in model of ``domain``, else the overall
    production, else the newest that passed its gate, else a built-in model),
    a version name (the store's, else a built-in one), a model folder, or a
    ``.keras`` file. Only
    production and version names need the registry: a file or folder given as
    a path is usable whatever state the registry is in (its status is read
    when the registry can be read)."""
    store = Store.at(store_root)
    if spec is None:
        models = list_models(store)
        chosen = (
            (domain and production_model(store, domain))
            or (domain and builtin_model(domain))  # the package's, for the images' domain
            or production_model(store)
            or next((m for m in models if m.status == "production"), None)
            or next((m for m in models if m.passed), None)
            or builtin_model(None)
        )
        if chosen is None:
            hint = " (none passed its quality gate)" if models else ""
            raise ModelError(f"no trained model in {store.url}{hint}; run `denoise train` first")
        return chosen
    if store.remote and Path(spec).name == spec:  # a version name in a remote store
        ref = _version_ref(store, spec, read_production_versions(store))
        ref = ref or (find_builtin(spec) if is_version_name(spec) else None)
        if ref is None:
            raise ModelNotFound(f"model {spec!r} not found (not a version in {store.url})")
        return ref
    models_root = None if store.remote else store.models_root  # a local path is never in a bucket
    named = (
        models_root is not None
        and is_version_name(spec)
        and (models_root / spec / "model.keras").is_file()
    )  # a name, not a path
    if not named and is_version_name(spec) and not Path(spec).exists():
        builtin = find_builtin(spec)  # a version of the package's, the store having none
        if builtin is not None:
            return builtin
    path = models_root / spec if named else Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model.keras").is_file():
            raise ModelError(f"{path} holds no model.keras")
        path = path / "model.keras"
    if not path.is_file():
        raise ModelNotFound(
            f"model {spec!r} not found (not a version in {store.url}, a folder or a .keras file)"
        )
    if path.suffix != ".keras":
        raise ModelError(f"{path}: not a .keras model file")
    folder = path.parent
    in_store = models_root is not None and folder.resolve().parent == models_root
    productions: set[str] = set()
    if named:
        productions = read_production_versions(store)
    elif in_store:
        try:
            productions = read_production_versions(store)
        except ModelError as exc:
            logger.warning("%s; using %s as a candidate", exc, path)
    return ModelRef(
        folder.name or path.name,  # a file in the current folder: its own name
        folder,
        path,
        _card(folder) or ModelCard(),
        "production" if in_store and folder.name in productions else "candidate",
    )


def with_seed_architecture(
    store_root: Store | str | os.PathLike | None, data: DataConfig | dict, training: TrainConfig
) -> TrainConfig:
    """``training`` with ``architecture: auto`` made its warm start's own
    architecture when that model is of the dataset's domain: a model trains on
    in its own layout (the built-in grey model is wider than the grey
    default). A seed of another domain is grown into the domain's default, and
    a given architecture is kept. ModelNotFound when the seed is nowhere."""
    if training.architecture != "auto" or not training.warm_start:
        return training
    seed = resolve_model(store_root, training.warm_start)
    dataset = DataConfig.model_validate(data).dataset
    if not seed.card.architecture or seed.domain != domain_for_dataset(dataset).name:
        return training
    return training.model_copy(update={"architecture": seed.card.architecture})
