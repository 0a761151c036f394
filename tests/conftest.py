"""Shared test setup. Environment first: Prefect reads its settings at import."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", tempfile.mkdtemp(prefix="denoise-results-"))
# the tests' stores start empty of models: none built in unless a test gives its own folder
# (tests/test_builtin.py), whatever the package ships
os.environ.setdefault("DENOISE_BUILTIN_DIR", tempfile.mkdtemp(prefix="denoise-no-builtin-"))
# commands the tests start (`denoise`, `python -c`) import this tree's code, not the
# checkout an editable install points at (a worktree's tests test the worktree)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(Path(__file__).resolve().parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
)

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
        pytest.fail(
            f"MNIST mirror not found at {MNIST_MIRROR} (CI puts ../shared beside the clone)"
        )
    return MNIST_MIRROR


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """A 28x28 shard set of 80 random sparse images (56 train, 8 validation, 16 test)."""
    import numpy as np

    from denoiser.data.shards import SplitArrays, write_shard_set

    rng = np.random.default_rng(0)
    images = (rng.random((80, 28, 28, 1)) < 0.2).astype(np.uint8) * 255
    labels = rng.integers(0, 10, 80).astype(np.uint8)
    idx = np.arange(80)
    splits = {
        "train": SplitArrays(images[:56], labels[:56], idx[:56]),
        "validation": SplitArrays(images[56:64], labels[56:64], idx[56:64]),
        "test": SplitArrays(images[64:], labels[64:], idx[64:]),
    }
    return write_shard_set(
        tmp_path_factory.mktemp("shards") / "tiny",
        splits,
        {"kind": "gaussian", "level": 0.5},
        shard_rows=20,
        seed=0,
    )


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback for the session (reset by ``s3`` per test)."""
    from tests.servers import S3Server

    server = S3Server()
    yield server
    server.stop()


class S3:
    """A test's view of the S3 server: its environment is set, it starts empty."""

    def __init__(self, server):
        self.server = server
        self.endpoint = server.endpoint

    def env(self) -> dict[str, str]:
        return self.server.env()

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem()

    def bucket(self, name: str = "denoise-test") -> str:
        self.fs().mkdir(name)
        return name


@pytest.fixture()
def s3(s3_server, monkeypatch) -> S3:
    from s3fs import S3FileSystem

    s3_server.reset()
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    S3FileSystem.clear_instance_cache()
    yield S3(s3_server)
    S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """The URL of one real ``prefect server`` for the session's command-line
    tests (tests/faults/ has its own, beside a spare one it kills)."""
    from tests.servers import PrefectServer

    server = PrefectServer(tmp_path_factory.mktemp("prefect-server") / "server")
    try:
        yield server.wait_healthy()
    finally:
        server.stop()
