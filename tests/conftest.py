"""Shared test setup. Environment first: Prefect reads its settings at import."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", tempfile.mkdtemp(prefix="denoise-results-"))

import prefect.main  # noqa: E402, F401 - sets up Prefect logging now, on the real stderr, not a capsys one
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MNIST_MIRROR = REPO.parent / "shared" / "datasets" / "mnist"


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for the whole session: starting one
    takes about 15 s, too slow to pay per test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def mnist_mirror() -> Path:
    if not (MNIST_MIRROR / "SHA256SUMS").exists():
        pytest.fail(f"MNIST mirror not found at {MNIST_MIRROR} (CI puts ../shared beside the clone)")
    return MNIST_MIRROR
