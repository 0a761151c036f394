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
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from artifacts.store import Store, resolve_store_root
from denoiser.errors import ConfigError, ModelError

REGISTRY_FILE = "registry.json"


@dataclass(frozen=True)
class ModelRef:
    version: str
    dir: Path
    model_path: Path
    card: dict
    status: str  # "production" or "candidate"

    @property
    def passed(self) -> bool:
        return bool(self.card.get("quality_gate", {}).get("passed"))

    @property
    def psnr(self) -> float | None:
        return self.card.get("metrics", {}).get("psnr_denoised")

    def summary(self) -> dict[str, Any]:
        data = self.card.get("data", {})
        return {"version": self.version, "status": self.status, "architecture": self.card.get("architecture"),
                "params": self.card.get("params"), "psnr": self.psnr,
                "ssim": self.card.get("metrics", {}).get("ssim_denoised"), "passed": self.passed,
                "data_manifest_sha256": data.get("manifest_sha256"), "model_path": str(self.model_path),
                "created": self.card.get("created")}


def _registry_path(store_root: str | os.PathLike | None) -> Path:
    return Store.at(store_root).models_root / REGISTRY_FILE


def read_registry(store_root: str | os.PathLike | None) -> dict:
    path = _registry_path(store_root)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {"production": None, "versions": {}}
    except ValueError as exc:
        raise ModelError(f"{path}: unreadable registry ({exc})") from None


def _write_registry(store_root: str | os.PathLike | None, state: dict) -> None:
    path = _registry_path(store_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _card(folder: Path) -> dict:
    try:
        return json.loads((folder / "model.json").read_text())
    except (OSError, ValueError):
        return {}


def list_models(store_root: str | os.PathLike | None) -> list[ModelRef]:
    """Every version with a model file, newest first."""
    root = Store.at(store_root).models_root
    if not root.is_dir():
        return []
    production = read_registry(store_root).get("production")
    refs = []
    for folder in sorted((p for p in root.iterdir() if (p / "model.keras").is_file()), reverse=True):
        refs.append(ModelRef(folder.name, folder, folder / "model.keras", _card(folder),
                             "production" if folder.name == production else "candidate"))
    return refs


def production_model(store_root: str | os.PathLike | None) -> ModelRef | None:
    return next((m for m in list_models(store_root) if m.status == "production"), None)


def resolve_model(store_root: str | os.PathLike | None, spec: str | None = None) -> ModelRef:
    """``spec``: None (production, else the newest that passed its gate), a
    version name, a model folder, or a ``.keras`` file."""
    store = resolve_store_root(store_root)
    if spec is None:
        models = list_models(store)
        chosen = next((m for m in models if m.status == "production"), None) or next(
            (m for m in models if m.passed), None)
        if chosen is None:
            hint = " (none passed its quality gate)" if models else ""
            raise ModelError(f"no trained model in {store}{hint}; run `denoise train` first")
        return chosen
    by_version = Store.at(store).model_dir(spec)
    path = by_version if (by_version / "model.keras").is_file() else Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model.keras").is_file():
            raise ModelError(f"{path} holds no model.keras")
        path = path / "model.keras"
    if not path.is_file():
        raise ModelError(f"model {spec!r} not found (not a version in {store}, a folder or a .keras file)")
    if path.suffix != ".keras":
        raise ModelError(f"{path}: not a .keras model file")
    folder = path.parent
    production = read_registry(store).get("production")
    return ModelRef(folder.name, folder, path, _card(folder),
                    "production" if folder.name == production else "candidate")


def _test_set(card: dict) -> str | None:
    data = card.get("data", {})
    return data.get("manifest_sha256")


def decide_promotion(card: dict, current: ModelRef | None) -> tuple[bool, str]:
    gate = card.get("quality_gate") or {}
    psnr = card.get("metrics", {}).get("psnr_denoised")
    if not gate.get("passed"):
        return False, (f"failed the quality gate: PSNR gain {gate.get('psnr_gain', float('nan')):.2f} dB "
                       f"< {gate.get('min_psnr_gain', float('nan')):.2f} dB")
    if current is None:
        return True, "passed the quality gate; no production model yet"
    if _test_set(card) != _test_set(current.card):
        return False, (f"evaluated on a different test set than production {current.version}; "
                       f"PSNRs are not comparable (promote by hand with `denoise models promote`)")
    if current.psnr is None or psnr > current.psnr:
        return True, f"PSNR {psnr:.2f} dB beats production {current.version} ({current.psnr or 0:.2f} dB)"
    return False, f"PSNR {psnr:.2f} dB does not beat production {current.version} ({current.psnr:.2f} dB)"


def register_model(store_root: str | os.PathLike | None, model_dir: str | os.PathLike,
                   metrics: dict | None = None, flow_run_id: str | None = None) -> dict:
    """Record a version and promote it if it earns it; returns the decision."""
    folder = Path(model_dir)
    card = _card(folder)
    if not card:
        raise ModelError(f"{folder} has no model card (model.json)")
    if metrics and "metrics" not in card:
        card["metrics"] = metrics
    current = production_model(store_root)
    promoted, reason = decide_promotion(card, current)
    state = read_registry(store_root)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    state["versions"][folder.name] = {
        "registered": now, "flow_run_id": flow_run_id, "metrics": card.get("metrics"),
        "quality_gate": card.get("quality_gate"), "data_manifest_sha256": _test_set(card),
        "architecture": card.get("architecture"), "reason": reason,
    }
    if promoted:
        state["production"] = folder.name
        state.setdefault("history", []).append({"version": folder.name, "promoted": now, "reason": reason})
    _write_registry(store_root, state)
    return {"version": folder.name, "status": "production" if promoted else "candidate",
            "promoted": promoted, "reason": reason,
            "production": state["production"]}


def promote(store_root: str | os.PathLike | None, version: str) -> ModelRef:
    if not (Store.at(store_root).model_dir(version) / "model.keras").is_file():
        known = ", ".join(m.version for m in list_models(store_root)[:5]) or "none"
        raise ConfigError(f"unknown model version {version!r} (newest: {known})")
    state = read_registry(store_root)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    state["production"] = version
    state.setdefault("history", []).append({"version": version, "promoted": now, "reason": "promoted by hand"})
    state["versions"].setdefault(version, {"registered": now})["reason"] = "promoted by hand"
    _write_registry(store_root, state)
    return resolve_model(store_root, version)


# --------------------------------------------------------------------------- CLI

def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    sub.add_parser("list", help="list model versions (the default)")
    promote_parser = sub.add_parser("promote", help="make VERSION the production model")
    promote_parser.add_argument("version")


def run_models_command(args: argparse.Namespace) -> int:
    import sys

    from rich.console import Console
    from rich.table import Table

    # piped output (scripts, tests) gets whole lines rather than truncated cells
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if getattr(args, "models_command", None) == "promote":
        ref = promote(args.store, args.version)
        console.print(f"[green]{ref.version}[/] is now the production model")
        return 0
    models = list_models(args.store)
    if not models:
        console.print(f"no models in {resolve_store_root(args.store)}; run `denoise train` first")
        return 0
    table = Table(title=f"models in {Store.at(args.store).models_root}")
    for col in ("version", "status", "architecture", "params", "PSNR (dB)", "SSIM", "gate", "created"):
        table.add_column(col)
    for m in models:
        s = m.summary()
        table.add_row(
            m.version, "[bold green]production[/]" if m.status == "production" else "candidate",
            str(s["architecture"]), f"{s['params']:,}" if s["params"] else "",
            f"{s['psnr']:.2f}" if s["psnr"] is not None else "",
            f"{s['ssim']:.3f}" if s["ssim"] is not None else "",
            ("passed" if m.passed else "failed") if m.card.get("quality_gate") else "not evaluated",
            str(s["created"] or ""))
    console.print(table)
    return 0
