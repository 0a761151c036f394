"""The model registry: every trained model is a version in the store, one of
them is in production.

State lives in ``<store>/models/registry.json`` (written atomically); each
version's own files stay in ``<store>/models/<version>/``. Promotion rule: a
model that passed its quality gate and beats the production model's test PSNR
becomes production. PSNRs are only compared when both models were evaluated on
the same test set (same shard set manifest); otherwise the newcomer stays a
candidate and the reason says so, because a quick run's 1,000 test images do
not rank against the full 10,000. Prefect-free: the task in
``tasks/register.py`` and the ``denoise models`` command both use it.

Every change is a compare-and-swap through :func:`update_registry`: read the
fresh state, decide, write, all under a file lock beside the registry, so two
trainings and a ``denoise models promote`` never lose each other's versions.
Readers take no lock: the file is replaced atomically, so a reader sees the old
state or the new one. Only ``_lock_registry``, ``_load_registry`` and
``_save_registry`` touch the file; an object-storage backend replaces those
three (a read returning the ETag, a conditional PUT with If-Match, a retry of
the change on a lost race) and no caller changes.

Production is per domain. A model's domain is what it learned from, read from
its card (:func:`card_domain`): ``digits`` (28x28 IDX images: MNIST and its
kin, and every model from before domains existed), ``photos`` (folders of
images: train400, a user's photographs) or ``colour`` (cbsd432). Each domain has its own production
model (``production_by_domain``), and a newcomer only competes with the
production model of its own domain, so a digit model never replaces a photo
model and the other way round. ``denoise folder`` without ``--model`` uses
the production model of the images' domain when it can tell, else the overall
``production``, which stays in the file as the most recently promoted
version of any domain (what readers of the old schema understand). An old
registry.json without ``production_by_domain`` reads as before: its
``production`` is the production model of that version's domain.

Models shipped in the package (:mod:`artifacts.builtin`) stand in for a
domain the store has no production model of; the registry never writes them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from artifacts.store import Store
from denoiser.core.cards import CARD_FILE, CardMetrics, ModelCard, QualityGate, parse_card
from denoiser.core.errors import ConfigError, ModelError, ModelNotFound
from denoiser.core.faults import failpoint
from denoiser.core.files import atomic_file, is_url, join_location, open_read
from denoiser.runtimes.openvino_runtime import BIN_FILE, XML_FILE

REGISTRY_FILE = "registry.json"
logger = logging.getLogger(__name__)
LOCK_TIMEOUT = 60.0  # seconds to wait for another process's registry update
FIX_HINT = "move it aside or fix it"

T = TypeVar("T")

DOMAINS = ("digits", "photos", "colour")  # denoiser.domains' names, kept here to import light

# a version is a folder name under models/, never a path: letters, digits, '.', '_', '-',
# not starting with a dot (so neither '..' nor a hidden name)
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_version_name(name: Any) -> bool:
    """Whether ``name`` can name a version (and nothing outside the models folder)."""
    return isinstance(name, str) and VERSION_NAME.fullmatch(name) is not None


def check_version_name(name: str) -> str:
    """``name``, or a ConfigError when it is not a version name (a path, say)."""
    if not is_version_name(name):
        raise ConfigError(
            f"{name!r} is not a version name (letters, digits, '.', '_' and '-', "
            "such as 20261127-105202-unet-296b)"
        )
    return name


#: the domain of a card written before cards recorded one, by its shard kind: only
#: digits (noisy/clean pairs) and grey photographs (patches) existed then; a new
#: domain's cards record it, so this table never grows
DOMAIN_BY_OLD_SHARD_KIND = {"pairs": "digits", "patches": "photos"}


def card_domain(card: ModelCard) -> str:
    """The domain a model card says its model learned: the one it records,
    else (an older card) the one its shard kind was for; a card that names no
    shard kind but whose noise was drawn in training is of a patch set."""
    data = card.data
    if data.domain in DOMAINS:
        return data.domain
    shard_kind = data.shard_kind
    if (data.noise or {}).get("applied") == "in_training":
        shard_kind = "patches"
    return DOMAIN_BY_OLD_SHARD_KIND.get(shard_kind or "", "digits")


@dataclass(frozen=True)
class ModelRef:
    version: str
    dir: Path | str  # a URL in a remote store
    model_path: Path | str
    card: ModelCard
    status: str  # "production", "candidate" or "built in" (in the package: artifacts/builtin.py)

    @property
    def passed(self) -> bool:
        return self.card.quality_gate is not None and self.card.quality_gate.passed

    @property
    def psnr(self) -> float | None:
        return self.card.metrics.psnr_denoised if self.card.metrics else None

    @property
    def domain(self) -> str:
        return card_domain(self.card)

    def summary(self) -> dict[str, Any]:
        card = self.card
        return {
            "version": self.version,
            "status": self.status,
            "domain": self.domain,
            "dataset": card.data.dataset,
            "architecture": card.architecture,
            "params": card.params,
            "psnr": self.psnr,
            "ssim": card.metrics.ssim_denoised if card.metrics else None,
            "passed": self.passed,
            "data_manifest_sha256": card.data.manifest_sha256,
            "model_path": str(self.model_path),
            "model_sha256": card.model_sha256,
            # the OpenVINO export, when it has one (denoiser.runtimes.openvino_runtime)
            "openvino_xml_path": (
                str(join_location(self.dir, XML_FILE)) if card.openvino_xml_sha256 else None
            ),
            "openvino_bin_path": (
                str(join_location(self.dir, BIN_FILE)) if card.openvino_bin_sha256 else None
            ),
            "openvino_xml_sha256": card.openvino_xml_sha256,
            "openvino_bin_sha256": card.openvino_bin_sha256,
            "openvino_precision": card.openvino_precision,
            "created": card.created,
        }


def _registry_location(store: Store) -> str:
    return store.join("models", REGISTRY_FILE)


def empty_registry() -> dict:
    return {"production": None, "production_by_domain": {}, "versions": {}}


def _type_name(value: Any) -> str:
    return (
        "null"
        if value is None
        else {dict: "an object", list: "a list", str: "a string"}.get(
            type(value), type(value).__name__
        )
    )


def registry_problem(state: Any) -> str | None:
    """What makes ``state`` not a model registry, in a few words; None if it is one."""
    if not isinstance(state, dict) or "versions" not in state:
        got = "an object without it" if isinstance(state, dict) else _type_name(state)
        return f"not a model registry (expected an object with 'versions', got {got})"
    production = state.get("production")
    if production is not None and not isinstance(production, str):
        return f"'production' must be a version name or null, not {_type_name(production)}"
    versions = state["versions"]
    if not isinstance(versions, dict):
        return f"'versions' must be an object, not {_type_name(versions)}"
    bad = next((name for name, entry in versions.items() if not isinstance(entry, dict)), None)
    if bad is not None:
        return f"'versions'[{bad!r}] must be an object, not {_type_name(versions[bad])}"
    by_domain = state.get("production_by_domain", {})
    if not isinstance(by_domain, dict):
        return f"'production_by_domain' must be an object, not {_type_name(by_domain)}"
    bad = next((d for d, v in by_domain.items() if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        return f"'production_by_domain'[{bad!r}] must be a version name or null, not {_type_name(by_domain[bad])}"
    if not isinstance(state.get("history", []), list):
        return f"'history' must be a list, not {_type_name(state['history'])}"
    names = [("'production'", production), *((f"'versions'[{v!r}]", v) for v in versions)]
    names += [(f"'production_by_domain'[{d!r}]", v) for d, v in by_domain.items()]
    bad = next(((where, v) for where, v in names if v is not None and not is_version_name(v)), None)
    if bad is not None:
        return f"{bad[0]} is {bad[1]!r}, not a version name"
    return None


def parse_registry(path: str | os.PathLike, raw: bytes) -> dict:
    """The registry in ``raw`` (the bytes of ``path``), checked; a ModelError
    naming the file otherwise."""
    try:
        state = json.loads(raw)
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not a model registry (not UTF-8 text); {FIX_HINT}") from None
    except ValueError as exc:
        raise ModelError(
            f"{path}: not a model registry (invalid JSON: {exc}); {FIX_HINT}"
        ) from None
    problem = registry_problem(state)
    if problem:
        raise ModelError(f"{path}: {problem}; {FIX_HINT}")
    state.setdefault("production", None)
    state.setdefault("production_by_domain", {})
    return state


def _load_registry(store: Store) -> dict:
    """Read and check the registry file; a missing file is an empty registry."""
    path = _registry_location(store)
    try:
        raw = store.read_bytes(path)
    except FileNotFoundError:
        return empty_registry()
    except OSError as exc:
        raise ModelError(
            f"{path}: cannot read the model registry ({exc.strerror or exc})"
        ) from None
    return parse_registry(path, raw)


def _save_registry(path: Path, state: dict) -> None:
    """Replace the registry file with ``state``, durably: a unique temporary file
    in the same folder, fsynced, renamed over the old one, the folder fsynced."""
    with atomic_file(path, ".tmp") as tmp:
        tmp.write_bytes(json.dumps(state, indent=2, sort_keys=True).encode())
        failpoint("registry.before_write")
    failpoint("registry.after_write")


def _remove_orphans(path: Path) -> None:
    """Temporary files of writers killed mid-write; only called under the lock,
    when no live writer can own one."""
    # the atomic writer's names (.registry.<pid>.<token>.tmp), and older ones (.registry.json.*)
    for orphan in path.parent.glob(f".{path.stem}.*.tmp"):
        orphan.unlink(missing_ok=True)


@contextmanager
def _lock_registry(path: Path, timeout: float) -> Iterator[None]:
    """Hold the registry's lock file (released by the OS if the holder dies)."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    try:
        with FileLock(lock, timeout=timeout):
            yield
    except Timeout:
        raise ModelError(
            f"{path}: another process has held {lock.name} for over {timeout:g} s; "
            "retry when its update is done"
        ) from None


def read_registry(store_root: Store | str | os.PathLike | None) -> dict:
    """The registry's current state, checked (a ModelError naming the file if it
    is not a registry); a store without one has an empty registry."""
    return _load_registry(Store.at(store_root))


def check_registry(store_root: Store | str | os.PathLike | None) -> None:
    """Fail now, with one line naming the file, if the registry is unusable:
    called before a training so that a bad registry does not surface after it."""
    read_registry(store_root)


def open_store(store_root: str) -> Store:
    """The store a training writes to, found usable before any work: reachable
    (one StoreError line for a missing bucket, refused credentials, an
    unreachable endpoint) and with a registry that reads (one line naming the
    file), so neither surfaces after a whole training."""
    store = Store.at(store_root)
    store.check()
    check_registry(store)
    return store


def update_registry(
    store_root: Store | str | os.PathLike | None,
    change: Callable[[dict], tuple[dict, T]],
    timeout: float | None = None,
) -> T:
    """Apply ``change`` to the fresh registry state and write what it returns,
    with no other update in between; returns ``change``'s second value.

    ``change`` gets its own copy of the state, decides on it alone, and may run
    again on a newer state (an object-storage backend retries a lost race), so
    it must have no other effect. A state that is not a registry is never written.
    """
    store = Store.at(store_root)
    if store.remote:
        return _update_remote_registry(store, change)
    path = Path(_registry_location(store))
    with _lock_registry(path, LOCK_TIMEOUT if timeout is None else timeout):
        _remove_orphans(path)
        state, result = change(_load_registry(store))
        problem = registry_problem(state)
        if problem:
            raise ModelError(f"{path}: refusing to write an invalid registry: {problem}")
        _save_registry(path, state)
    return result


CAS_ATTEMPTS = 50  # lost races in a row before an object-storage update gives up


def _update_remote_registry(store: Store, change: Callable[[dict], tuple[dict, T]]) -> T:
    """:func:`update_registry` on object storage: read the object and its ETag,
    decide, PUT only if the ETag is still the same (``If-None-Match: *`` for the
    first write); a lost race decides again on the fresh state, after a random
    backoff."""
    path = _registry_location(store)
    for attempt in range(CAS_ATTEMPTS):
        try:
            raw, etag = store.read_versioned(path)
        except OSError as exc:
            raise ModelError(f"{path}: cannot read the model registry ({exc})") from None
        state, result = change(parse_registry(path, raw) if raw is not None else empty_registry())
        problem = registry_problem(state)
        if problem:
            raise ModelError(f"{path}: refusing to write an invalid registry: {problem}")
        failpoint("registry.before_write")
        if (
            store.write_if(path, json.dumps(state, indent=2, sort_keys=True).encode(), etag)
            is not None
        ):
            failpoint("registry.after_write")
            return result
        time.sleep(random.uniform(0, min(1.0, 0.02 * 2**attempt)))
    raise ModelError(f"{path}: lost {CAS_ATTEMPTS} races in a row with other writers; retry")


def _card(folder: str | os.PathLike) -> ModelCard | None:
    """The version's card; None when there is none or it is not a model card
    (see :func:`denoiser.core.cards.parse_card`). Any other failure to read it (a
    network error on object storage) is a ModelError, so a registry decision
    is never taken on a card that could not be read."""
    where = join_location(folder, CARD_FILE)
    try:
        with open_read(where) as fh:
            raw = fh.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ModelError(f"{where}: cannot read the model card ({exc})") from None
    return parse_card(raw)


def _version_ref(
    store: Store, version: str | None, productions: Iterable[str | None] = ()
) -> ModelRef | None:
    """The store's version folder ``version``, if it holds a model file;
    ``productions``: the production versions (one per domain)."""
    if not version or not is_version_name(version):
        return None
    folder = store.join("models", version)
    if not store.exists(join_location(folder, "model.keras")):
        return None
    if store.remote and not store.exists(join_location(folder, "model.json")):
        return None  # the card is pushed last: without it the version is not finished
    folder = folder if store.remote else Path(folder)
    return ModelRef(
        version,
        folder,
        join_location(folder, "model.keras"),
        _card(folder) or ModelCard(),
        "production" if version in set(productions) else "candidate",
    )


def _version_domain(store: Store, state: dict, version: str) -> str:
    """A registered version's domain: its entry's record, else its card's."""
    recorded = state["versions"].get(version, {}).get("domain")
    if recorded in DOMAINS:
        return recorded
    return card_domain(_card(store.join("models", version)) or ModelCard())


def production_by_domain(store: Store, state: dict) -> dict[str, str]:
    """The production version of each domain that has one in ``state``, the
    registry of ``store``. An old registry's lone ``production`` counts for
    its own domain."""
    found = {d: v for d, v in (state.get("production_by_domain") or {}).items() if v}
    legacy = state.get("production")
    if legacy and legacy not in found.values():
        domain = _version_domain(store, state, legacy)
        found.setdefault(domain, legacy)
    return found


def read_production_versions(store: Store) -> set[str]:
    """The production versions of the store's registry (one per domain)."""
    return set(production_by_domain(store, read_registry(store)).values())


def list_models(store_root: Store | str | os.PathLike | None) -> list[ModelRef]:
    """Every version with a model file, newest first."""
    store = Store.at(store_root)
    if store.remote:  # one listing, not a request per version
        found = store.sizes(store.join("models"))
        names = sorted(
            {
                k.split("/")[0]
                for k in found
                if k.count("/") == 1
                and k.endswith("/model.json")
                and f"{k[:-10]}model.keras" in found
            },
            reverse=True,
        )
    else:
        root = store.models_root
        if not root.is_dir():
            return []
        names = sorted(
            (
                p.name
                for p in root.iterdir()
                if is_version_name(p.name) and (p / "model.keras").is_file()
            ),
            reverse=True,
        )
    if not names:
        return []
    productions = read_production_versions(store)
    return [ref for name in names if (ref := _version_ref(store, name, productions))]


def production_model(
    store_root: Store | str | os.PathLike | None, domain: str | None = None
) -> ModelRef | None:
    """The production model of ``domain``; without one, the overall
    production (the most recently promoted of any domain)."""
    store = Store.at(store_root)
    state = read_registry(store)
    version = production_by_domain(store, state).get(domain) if domain else state["production"]
    return _version_ref(store, version, [version])


def same_test_set(card: ModelCard, other: ModelCard) -> bool:
    """Whether two models' PSNRs compare: scored on the same test images at
    the same sigmas (photo sets: their cards' ``test_sha256``, whatever the
    models trained on), else (older cards, digit sets, whose test pairs hold
    their noise) learned from the same shard set."""
    mine, theirs = card.data.test_sha256, other.data.test_sha256
    if mine and theirs:
        sigmas = [c.metrics.sigmas if c.metrics else None for c in (card, other)]
        return mine == theirs and sigmas[0] == sigmas[1]
    return card.data.manifest_sha256 == other.data.manifest_sha256


def decide_promotion(card: ModelCard, current: ModelRef | None) -> tuple[bool, str]:
    gate = card.quality_gate or QualityGate()
    psnr = card.metrics.psnr_denoised if card.metrics else None
    if not gate.passed:
        nan = float("nan")
        return False, (
            f"failed the quality gate: PSNR gain "
            f"{nan if gate.psnr_gain is None else gate.psnr_gain:.2f} dB "
            f"< {nan if gate.min_psnr_gain is None else gate.min_psnr_gain:.2f} dB"
        )
    if current is None:
        return True, "passed the quality gate; no production model yet"
    if not same_test_set(card, current.card):
        return False, (
            f"evaluated on a different test set than production {current.version}; "
            f"PSNRs are not comparable (promote by hand with `denoise models promote`)"
        )
    if current.psnr is None or psnr > current.psnr:
        return (
            True,
            f"PSNR {psnr:.2f} dB beats production {current.version} ({current.psnr or 0:.2f} dB)",
        )
    return (
        False,
        f"PSNR {psnr:.2f} dB does not beat production {current.version} ({current.psnr:.2f} dB)",
    )


def register_model(
    store_root: Store | str | os.PathLike | None,
    model_dir: str | os.PathLike,
    metrics: dict | None = None,
    flow_run_id: str | None = None,
) -> dict:
    """Record a version and promote it if it earns it against the production
    model of the moment (read under the registry lock); returns the decision."""
    store = Store.at(store_root)
    folder = model_dir if is_url(model_dir) else Path(model_dir)
    card = _card(folder)
    if card is None:
        raise ModelError(f"{folder} has no model card ({CARD_FILE})")
    if metrics and card.metrics is None:
        card = card.model_copy(update={"metrics": CardMetrics.model_validate(metrics)})
    version = str(folder).rstrip("/").rsplit("/", 1)[-1]
    domain = card_domain(card)
    now = datetime.now(UTC).isoformat(timespec="seconds")

    def record(state: dict) -> tuple[dict, dict]:
        by_domain = production_by_domain(store, state)
        production = by_domain.get(domain)  # a newcomer competes within its own domain only
        if production == version:  # registered again (a rerun): it stays where it is
            promoted, reason = (
                False,
                state["versions"].get(version, {}).get("reason") or "production model",
            )
        else:
            promoted, reason = decide_promotion(card, _version_ref(store, production, [production]))
        state["versions"][version] = {
            "registered": now,
            "flow_run_id": flow_run_id,
            "metrics": card.metrics.to_dict() if card.metrics else None,
            "quality_gate": card.quality_gate.to_dict() if card.quality_gate else None,
            "data_manifest_sha256": card.data.manifest_sha256,
            "architecture": card.architecture,
            "domain": domain,
            "reason": reason,
        }
        if promoted:
            by_domain[domain] = version
            state["production"] = version
            state.setdefault("history", []).append(
                {"version": version, "domain": domain, "promoted": now, "reason": reason}
            )
        state["production_by_domain"] = by_domain
        return state, {
            "version": version,
            "domain": domain,
            "status": "production" if by_domain.get(domain) == version else "candidate",
            "promoted": promoted,
            "reason": reason,
            "production": by_domain.get(domain),
        }

    return update_registry(store, record)


def promote(store_root: Store | str | os.PathLike | None, version: str) -> ModelRef:
    store = Store.at(store_root)
    ref = _version_ref(store, check_version_name(version))
    if ref is None:
        known = ", ".join(m.version for m in list_models(store)[:5]) or "none"
        raise ModelNotFound(f"unknown model version {version!r} (newest: {known})")
    now = datetime.now(UTC).isoformat(timespec="seconds")

    domain = ref.domain

    def make_production(state: dict) -> tuple[dict, None]:
        state["production_by_domain"] = {**production_by_domain(store, state), domain: version}
        state["production"] = version
        state.setdefault("history", []).append(
            {"version": version, "domain": domain, "promoted": now, "reason": "promoted by hand"}
        )
        entry = state["versions"].setdefault(version, {"registered": now})
        entry.update(reason="promoted by hand", domain=domain)
        return state, None

    update_registry(store, make_production)
    return ModelRef(version, ref.dir, ref.model_path, ref.card, "production")
