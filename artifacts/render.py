"""Small, Prefect-free helpers to render outputs as artifact content.

Kept apart from the Prefect calls so the rendering can be unit tested, and so
every task formats tables, keys and images the same way.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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
