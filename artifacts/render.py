"""Small, Prefect-free helpers to render outputs as artifact content.

Kept apart from the Prefect calls so the rendering can be unit tested, and so
every task formats tables, keys and images the same way.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from denoiser.core.cards import ModelCard

_KEY_BAD = re.compile(r"[^a-z0-9-]+")


def artifact_key(*parts: object) -> str:
    """Prefect artifact keys allow only lowercase letters, digits and dashes."""
    raw = "-".join(str(p) for p in parts if p is not None and str(p) != "")
    key = _KEY_BAD.sub("-", raw.lower()).strip("-")
    key = re.sub(r"-{2,}", "-", key)
    if not key:
        raise ValueError("artifact key is empty")
    return key


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def markdown_image(png: bytes, alt: str) -> str:
    """An inline image the Prefect UI renders inside a markdown artifact (image
    artifacts only take a URL, and there is no web server for the store)."""
    return f"![{alt}]({png_data_uri(png)})"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = (
            f"{value:.4g}"
            if abs(value) < 1e-3 or abs(value) >= 1e5
            else f"{value:.4f}".rstrip("0").rstrip(".")
        )
    else:
        text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Iterable[str] | None = None) -> str:
    rows = list(rows)
    cols = list(columns) if columns is not None else (list(rows[0].keys()) if rows else [])
    if not cols:
        return "_(empty)_"
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def table_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Table artifacts want JSON-safe cells; numpy scalars and paths are not."""
    out = []
    for row in rows:
        clean = {}
        for k, v in row.items():
            if hasattr(v, "item") and callable(v.item):
                v = v.item()
            elif not isinstance(v, (str, int, float, bool, type(None))):
                v = str(v)
            clean[str(k)] = v
        out.append(clean)
    return out


LOSS_COLUMNS = ("epoch", "val_psnr", "val_ssim", "loss", "val_loss", "seconds")


def loss_rows(card: ModelCard) -> list[dict[str, Any]]:
    """The training's epochs as table rows: validation PSNR, SSIM and the losses."""
    return [{k: h.get(k) for k in LOSS_COLUMNS} for h in card.history]


def render_model_card(card: ModelCard) -> str:
    """A model card as a Markdown page: its facts, its training config, its noise."""
    recipe, data, gate = card.recipe, card.data, card.quality_gate
    facts = [
        {"field": "version", "value": card.version},
        {"field": "architecture", "value": card.architecture},
        {"field": "parameters", "value": f"{card.params:,}"},
        {"field": "loss", "value": recipe.loss},
        {
            "field": "learning rate",
            "value": f"{recipe.learning_rate:g} ({recipe.lr_schedule})",
        },
        {"field": "reframed pairs", "value": f"{recipe.reframe:.0%}"},
        {"field": "device", "value": card.device["description"]},
        {"field": "precision", "value": card.precision or "float32"},
        {"field": "training time (s)", "value": card.seconds},
        {"field": "epochs run", "value": card.epochs_run},
        {"field": "best validation loss", "value": card.best_val_loss},
        {
            "field": "trained on",
            "value": f"{data.dataset} ({data.domain or 'digits'}, {data.shard_kind}, "
            f"{data.channels or 1} channel{'s' if (data.channels or 1) > 1 else ''})",
        },
        {
            "field": "test images",
            "value": data.test_dataset or "the dataset's own test split",
        },
        {"field": "patch size", "value": data.patch_size or "whole images"},
        {"field": "data manifest sha256", "value": data.manifest_sha256},
        {"field": "shards", "value": data.shards_dir},
        {"field": "model file sha256", "value": card.model_sha256 or "not recorded"},
        {
            "field": "TensorFlow / Keras",
            "value": f"{card.versions['tensorflow']} / {card.versions['keras']}",
        },
    ]
    if gate:
        facts.append({"field": "quality gate", "value": "PASSED" if gate.passed else "FAILED"})
    config = "\n".join(f"- `{k}`: {v}" for k, v in card.training.items())
    return (
        f"# Model card: {card.version}\n\n{markdown_table(facts)}\n\n"
        f"## Training config\n\n{config}\n\n## Noise\n\n`{json.dumps(data.noise)}`\n"
    )
