"""The output store: one folder tree that keeps every task's files.

Layout under the root (``--store`` / ``$DENOISE_STORE``, default ``./store``)::

    downloads/<dataset>/        checksummed raw files (the download cache)
    shards/<dataset>-<key>/     noisy Parquet shards + manifest.json
    models/registry.json        versions and production (+ registry.json.lock)
    models/<version>/           model.keras, model.json (card), metrics.json,
                                samples.png, history.csv, tensorboard/
    checkpoints/<key>/<run>/    one training run's run.json, history.jsonl,
                                state/ and lease (deleted when the run ends)
    reports/<name>/             folder-denoising reports

Paths only; nothing here creates files at import.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_STORE = "store"
STORE_ENV = "DENOISE_STORE"


def resolve_store_root(root: str | os.PathLike | None = None) -> Path:
    """An explicit root wins, then $DENOISE_STORE, then ./store; always absolute
    so that paths passed between tasks (and worker processes) stay valid."""
    chosen = root or os.environ.get(STORE_ENV) or DEFAULT_STORE
    return Path(chosen).expanduser().resolve()


@dataclass(frozen=True)
class Store:
    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike | None = None) -> Store:
        return cls(resolve_store_root(root))

    def downloads(self, dataset: str) -> Path:
        return self.root / "downloads" / dataset

    @property
    def shards_root(self) -> Path:
        return self.root / "shards"

    @property
    def models_root(self) -> Path:
        return self.root / "models"

    def model_dir(self, version: str) -> Path:
        return self.models_root / version

    @property
    def reports_root(self) -> Path:
        return self.root / "reports"


def new_model_version(architecture: str, now: datetime | None = None) -> str:
    """Sortable by time, unique without a lock, readable in a listing."""
    now = now or datetime.now(UTC)
    arch = re.sub(r"[^a-z0-9]+", "-", architecture.lower()).strip("-")
    return f"{now:%Y%m%d-%H%M%S}-{arch}-{secrets.token_hex(2)}"
