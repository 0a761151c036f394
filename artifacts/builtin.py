"""Models shipped inside the package: a fresh install denoises photographs
with no store content, no training and no network.

The package folder ``artifacts/builtin_models/`` holds one folder per built-in
model (``<version>/``: ``model.keras`` without optimizer state, its OpenVINO
export ``model.xml``/``model.bin``, ``metrics.json`` and the card ``model.json``
naming every file's sha256) and ``index.json``, which says which version is the built-in
model of each domain and the sha256 of its card. ``$DENOISE_BUILTIN_DIR``
points elsewhere (the tests' folders); nothing else differs.

Precedence: the store's production model of a domain, when it has one, else
the built-in model of that domain (:func:`artifacts.resolution.resolve_model`).
Every file of a built-in model is checked against its card (and the card
against the index) before it is used: a damaged install is refused in one line.

The registry never writes here; only the maintainer's command
``denoise models build-in VERSION`` does (:func:`build_in_model`), atomically:
the new folder is written under a temporary name and renamed, then the index
is replaced; a crash before the index is replaced leaves the previous built-in
model in use, and the next run clears what the crashed one left.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path

from artifacts.registry import (
    DOMAINS,
    ModelRef,
    _version_ref,
    card_domain,
    check_version_name,
    is_version_name,
)
from artifacts.store import Store
from denoiser.core.cards import CARD_FILE, RETIRED_CARD_KEYS, ModelCard, parse_card
from denoiser.core.errors import ConfigError, ModelError, ModelNotFound
from denoiser.core.faults import failpoint
from denoiser.core.files import file_sha256, fsync_dir, write_text_atomic
from denoiser.runtimes.openvino_runtime import BIN_FILE, DEFAULT_PRECISION, XML_FILE

BUILTIN_ENV = "DENOISE_BUILTIN_DIR"
PACKAGE_DIR = Path(__file__).resolve().parent / "builtin_models"
INDEX_FILE = "index.json"
METRICS_FILE = "metrics.json"
BUILT_IN = "built in"  # a built-in model's status, beside "production" and "candidate"
DAMAGED_HINT = "a damaged install: reinstall denoise-flow"
# the domain a folder of unknown kind falls back to
DOMAIN_ORDER = ("photos", "colour", "digits")
# what an earlier export's evaluation said: void when the export is made again
_EXPORT_SCORES = ("openvino_psnr", "keras_psnr", "openvino_scored_at")


def builtin_root() -> Path:
    """The folder of the built-in models: the package's own, or ``$DENOISE_BUILTIN_DIR``."""
    override = os.environ.get(BUILTIN_ENV)
    return Path(override).expanduser() if override else PACKAGE_DIR


def read_index(root: Path | None = None) -> dict[str, dict]:
    """The index: for each domain with a built-in model, ``version`` and
    ``card_sha256``. No index (or no folder) is no built-in model; an index
    that cannot be read is a one-line ModelError."""
    path = (root or builtin_root()) / INDEX_FILE
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{path}: not an index of built-in models ({exc}); {DAMAGED_HINT}"
        ) from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or not all(
        d in DOMAINS
        and isinstance(e, dict)
        and is_version_name(e.get("version"))
        and isinstance(e.get("card_sha256"), str)
        for d, e in models.items()
    ):
        raise ModelError(f"{path}: not an index of built-in models; {DAMAGED_HINT}")
    return models


def _ref(root: Path, version: str) -> ModelRef:
    folder = root / version
    try:
        card = parse_card((folder / CARD_FILE).read_bytes())
    except OSError as exc:
        raise ModelError(
            f"built-in model {version}: cannot read {folder / CARD_FILE} "
            f"({exc.strerror or exc}); {DAMAGED_HINT}"
        ) from None
    if card is None:
        raise ModelError(
            f"built-in model {version}: {folder / CARD_FILE} is damaged (not a model card); "
            f"{DAMAGED_HINT}"
        )
    return ModelRef(version, folder, folder / "model.keras", card, BUILT_IN)


def list_builtins(root: Path | None = None) -> list[ModelRef]:
    """Every built-in model (photos, colour, digits), unchecked: for listings."""
    root = root or builtin_root()
    index = read_index(root)
    return [_ref(root, index[d]["version"]) for d in DOMAIN_ORDER if d in index]


def check_builtin(ref: ModelRef, card_sha256: str) -> ModelRef:
    """``ref`` when its card is the one the index names and every file its
    card names is whole; a one-line ModelError naming the damaged file otherwise."""
    folder = Path(ref.dir)
    card = ref.card
    expected = {
        CARD_FILE: card_sha256,
        "model.keras": card.model_sha256,
        XML_FILE: card.openvino_xml_sha256,
        BIN_FILE: card.openvino_bin_sha256,
        METRICS_FILE: (card.built_in or {}).get("metrics_sha256"),
    }
    for name, sha256 in expected.items():
        if name != CARD_FILE and sha256 is None:
            continue
        try:
            got = file_sha256(folder / name)
        except OSError as exc:
            raise ModelError(
                f"built-in model {ref.version}: cannot read {folder / name} "
                f"({exc.strerror or exc}); {DAMAGED_HINT}"
            ) from None
        if got != sha256:
            raise ModelError(
                f"built-in model {ref.version}: {folder / name} is damaged (its sha256 does "
                f"not match the {'index' if name == CARD_FILE else 'card'}); {DAMAGED_HINT}"
            )
    return ref


def builtin_model(domain: str | None) -> ModelRef | None:
    """The built-in model of ``domain`` (None: of the first domain that has
    one, photographs first), checked; None when there is none."""
    root = builtin_root()
    index = read_index(root)
    domain = domain if domain is not None else next((d for d in DOMAIN_ORDER if d in index), None)
    entry = index.get(domain) if domain else None
    if entry is None:
        return None
    return check_builtin(_ref(root, entry["version"]), entry["card_sha256"])


def find_builtin(version: str) -> ModelRef | None:
    """The built-in model named ``version``, checked; None when no built-in has that name."""
    root = builtin_root()
    entry = next((e for e in read_index(root).values() if e["version"] == version), None)
    if entry is None:
        return None
    return check_builtin(_ref(root, version), entry["card_sha256"])


def refuse_builtin_change(version: str, action: str) -> None:
    """A ConfigError when ``version`` is a built-in model (which registry
    commands never change); nothing otherwise."""
    if not is_version_name(version):
        return
    index = read_index()
    domain = next((d for d, e in index.items() if e["version"] == version), None)
    if domain is not None:
        raise ConfigError(
            f"{version} is a built-in model (in the package), not a version of the store: "
            f"nothing to {action}; it denoises {domain} whenever the store has no production "
            "model of that domain"
        )


# --------------------------------------------------------------------------- building one in


def _derived_command(card: ModelCard) -> str:
    """The ``denoise train`` command a card's recorded configs stand for, for
    cards from before the command was recorded."""
    from denoiser.config import NoiseConfig, TrainConfig, train_command

    def known(config, values) -> dict:
        return {k: v for k, v in (values or {}).items() if k in config.model_fields}

    data = {"dataset": card.data.dataset or "mnist"}
    if card.data.test_dataset:
        data["test_dataset"] = card.data.test_dataset
    return train_command(
        {
            "data": data,
            "noise": known(NoiseConfig, card.data.noise),
            "training": known(TrainConfig, card.training),
        }
    )


def _without_retired_keys(card: ModelCard) -> ModelCard:
    """``card`` without the facts of files a built-in model does not ship (a
    store's model trained before LiteRT was retired names its model.tflite)."""
    kept = {k: v for k, v in card.to_dict().items() if k not in RETIRED_CARD_KEYS}
    return ModelCard.model_validate(kept)


def _copy_whole(src: Path, dest: Path, sha256: str | None) -> bool:
    """Copy ``src`` to ``dest`` when it is there and matches ``sha256``."""
    if not sha256:
        return False
    try:
        if file_sha256(src) != sha256:
            return False
    except FileNotFoundError:
        return False
    shutil.copyfile(src, dest)
    return file_sha256(dest) == sha256


def _fsync_files(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb+") as fh:
            os.fsync(fh.fileno())
    fsync_dir(folder)


def _make_folder(
    source: Path, card: ModelCard, work: Path, store_root: str, version: str
) -> tuple[dict, dict]:
    """The built-in model's files in ``work``: the model without optimizer
    state, its OpenVINO export (copied when the store's is whole, else made), its
    metrics. Returns the card's new file facts and its ``built_in`` record."""
    import numpy as np

    from denoiser.learning.training import cpu_facts, probe_shape
    from denoiser.nets.models import load_model
    from denoiser.runtimes.openvino_runtime import make_openvino_export

    # loaded uncompiled, the model has no optimizer: saved again, only its weights go
    model = load_model(source / "model.keras", expected_sha256=card.model_sha256)
    model.save(work / "model.keras")
    probe = np.random.default_rng(0).random(probe_shape(model), dtype=np.float32)
    again = load_model(work / "model.keras")
    if not np.array_equal(model.predict_on_batch(probe), again.predict_on_batch(probe)):
        raise ModelError(f"{version}: the compact copy of the model does not give its outputs")

    facts: dict = {
        "model_sha256": file_sha256(work / "model.keras"),
        "model_bytes": (work / "model.keras").stat().st_size,
    }
    if _copy_whole(source / XML_FILE, work / XML_FILE, card.openvino_xml_sha256) and _copy_whole(
        source / BIN_FILE, work / BIN_FILE, card.openvino_bin_sha256
    ):
        exported = "copied from the store"
    else:  # the package's models run without TensorFlow: an export is required
        facts |= make_openvino_export(model, work, probe_shape(model))
        facts |= {k: None for k in _EXPORT_SCORES if k in card.model_fields_set}
        exported = "made at build-in"

    metrics = None
    if (source / METRICS_FILE).is_file():
        shutil.copyfile(source / METRICS_FILE, work / METRICS_FILE)
        metrics = json.loads((work / METRICS_FILE).read_text())
    scores = (metrics or {}).get("per_sigma") or ([card.metrics.to_dict()] if card.metrics else [])
    keep = ("sigma", "psnr_noisy", "psnr_denoised", "ssim_noisy", "ssim_denoised", "count")
    device = card.device or {}
    return facts, {
        "version": version,
        "domain": card_domain(card),
        "from_store": str(store_root),
        "source_model_sha256": card.model_sha256,
        "built_in_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "training_command": card.training_command or _derived_command(card),
        "training_command_source": (
            "recorded at training" if card.training_command else "derived from the card's configs"
        ),
        "dataset": card.data.dataset,
        "test_dataset": card.data.test_dataset,
        "data_manifest_sha256": card.data.manifest_sha256,
        "test_scores": [{k: r[k] for k in keep if k in r} for r in scores],
        "training_seconds": card.seconds,
        "epochs_run": card.epochs_run,
        "trained_on": {
            "device": device.get("description"),
            "cpu_model": device.get("cpu_model"),
            "cpu_cores": device.get("cpu_cores"),
            "precision": card.precision or "float32",
        },
        "built_on": cpu_facts(),  # the machine this command ran on
        "openvino_export": exported,
        "openvino_precision": facts.get("openvino_precision")
        or card.openvino_precision
        or DEFAULT_PRECISION,
        "metrics_sha256": file_sha256(work / METRICS_FILE) if metrics is not None else None,
    }


def _clear_leftovers(root: Path, index: dict[str, dict]) -> None:
    """Folders no index entry names (replaced models, a crashed build-in's
    temporary or renamed folder). Only version-named and temporary folders go."""
    named = {e["version"] for e in index.values()}
    for p in root.iterdir():
        temporary = p.name.startswith(".build-") and p.name.endswith(".tmp")
        if p.is_dir() and (temporary or (is_version_name(p.name) and p.name not in named)):
            shutil.rmtree(p, ignore_errors=True)


def build_in_model(
    store_root: str | os.PathLike | None, version: str, root: Path | None = None
) -> dict:
    """Make the store's model ``version`` the built-in model of its domain:
    its files copied into the package folder (``root``, default
    :func:`builtin_root`) with the card's facts rewritten, then the index
    marked. Only a model that passed its quality gate. Returns the new card's
    ``built_in`` record with the index entry (``made`` False: the version was
    built in already, whole, and nothing changed). Loads the model (imports
    TensorFlow)."""
    from filelock import FileLock

    store = Store.at(store_root)
    ref = _version_ref(store, check_version_name(version))
    if ref is None:
        raise ModelNotFound(f"unknown model version {version!r} (not in {store.url}/models)")
    if not ref.passed:
        raise ModelError(
            f"{version} has not passed its quality gate (or was not evaluated); only a model "
            "that passed is built in"
        )
    root = Path(root) if root is not None else builtin_root()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / f".{INDEX_FILE}.lock", timeout=60):
        index = read_index(root)
        _clear_leftovers(root, index)
        entry = next((e for e in index.values() if e["version"] == version), None)
        if entry is not None:
            try:
                check_builtin(_ref(root, version), entry["card_sha256"])
                return {"domain": ref.domain, **entry, "folder": str(root / version), "made": False}
            except ModelError:
                pass  # damaged: made again below
        work = root / f".build-{version}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        work.mkdir()
        try:
            with store.stage() as stage:
                names = (CARD_FILE, "model.keras", XML_FILE, BIN_FILE, METRICS_FILE)
                source = stage.pull(ref.dir, files=names)
                facts, record = _make_folder(source, ref.card, work, store.url, version)
            card = _without_retired_keys(ref.card).model_copy(update=facts | {"built_in": record})
            write_text_atomic(work / CARD_FILE, card.to_json())
            _fsync_files(work)
            failpoint("builtin.folder_written")
            final = root / version
            if final.exists():  # an earlier build-in of this version (the index may name it)
                final.rename(root / f".build-{version}.{secrets.token_hex(4)}.old.tmp")
            work.rename(final)
            fsync_dir(root)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        failpoint("builtin.before_index")
        index = read_index(root)
        domain = record["domain"]
        index[domain] = {"version": version, "card_sha256": file_sha256(final / CARD_FILE)}
        write_text_atomic(
            root / INDEX_FILE, json.dumps({"models": index}, indent=2, sort_keys=True) + "\n"
        )
        _clear_leftovers(root, index)
    return {**record, **index[domain], "folder": str(final), "made": True}
