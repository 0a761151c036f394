"""Downloads against real files and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from denoiser.core.errors import ChecksumError, ConfigError, DownloadError, IDXFormatError
from denoiser.data import datasets
from denoiser.data.datasets import (
    DatasetSpec,
    FileSpec,
    fetch_dataset,
    load_images,
    read_idx,
)


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(">u1" if type_code == 0x08 else arr.dtype).tobytes()


@pytest.fixture()
def tiny(tmp_path: Path, monkeypatch):
    """A tiny IDX dataset (12 train, 5 test images) in a mirror folder, and its registry entry."""
    rng = np.random.default_rng(0)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    arrays = {
        "train_images": rng.integers(0, 256, (12, 28, 28)),
        "train_labels": rng.integers(0, 10, 12),
        "test_images": rng.integers(0, 256, (5, 28, 28)),
        "test_labels": rng.integers(0, 10, 5),
    }
    files, sums = {}, []
    for role, arr in arrays.items():
        name = datasets._IDX_NAMES[role]
        payload = idx_bytes(np.asarray(arr))
        blob = gzip.compress(payload, mtime=0)
        (mirror / name).write_bytes(blob)
        sums.append(f"{hashlib.sha256(blob).hexdigest()}  {name}")
        files[role] = FileSpec(
            name, hashlib.md5(blob).hexdigest(), hashlib.sha256(payload).hexdigest(), len(payload)
        )
    (mirror / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    spec = DatasetSpec("tiny", "http://127.0.0.1:9/never/", files)
    monkeypatch.setitem(datasets.DATASETS, "tiny", spec)
    monkeypatch.delenv(datasets.SOURCE_ENV, raising=False)
    return mirror, arrays


@pytest.fixture()
def served(tiny):
    """Serve the tiny mirror over HTTP, counting requests."""
    mirror, _ = tiny
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(mirror))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", hits, mirror
    server.shutdown()
    server.server_close()


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_idx_parser_reads_good_and_rejects_malformed(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "good.idx"
    good.write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(good), arr)
    (tmp_path / "good.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(tmp_path / "good.gz"), arr)

    cases = {
        "magic.idx": (b"\x01\x00" + idx_bytes(arr)[2:], "wrong magic"),
        "short.idx": (idx_bytes(arr)[:-1], "need 24 data bytes, file has 23"),
        "dims.idx": (idx_bytes(arr)[:4] + struct.pack(">3I", 2, 3, 5) + arr.tobytes(), "need 30"),
        "type.idx": (b"\x00\x00\x42\x01" + struct.pack(">I", 1) + b"x", "unknown IDX data type"),
    }
    for name, (blob, message) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(IDXFormatError, match=message) as err:
            read_idx(tmp_path / name)
        assert name in str(err.value)


@pytest.mark.parametrize("as_url", [False, True])
def test_fetch_from_folder_and_file_url(tiny, tmp_path, as_url):
    mirror, arrays = tiny
    source = mirror.as_uri() if as_url else str(mirror)
    manifest = fetch_dataset("tiny", source, tmp_path / "cache")
    assert {f["status"] for f in manifest["files"].values()} == {"fetched"}
    images, labels = load_images(manifest, "train")
    assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], arrays["train_images"])
    np.testing.assert_array_equal(labels, arrays["train_labels"])
    assert load_images(manifest, "test", limit=3)[0].shape == (3, 28, 28, 1)


def test_environment_variable_names_the_mirror(tiny, tmp_path, monkeypatch):
    mirror, _ = tiny
    monkeypatch.setenv("DENOISE_DATA_SOURCE", str(mirror))
    manifest = fetch_dataset("tiny", None, tmp_path / "cache")
    assert manifest["files"]["train_images"]["source"] == str(mirror)


def test_http_fetch_then_cache_hit_touches_no_network(served, tmp_path):
    url, hits, _ = served
    cache = tmp_path / "cache"
    first = fetch_dataset("tiny", url, cache)
    assert {f["status"] for f in first["files"].values()} == {"fetched"}
    assert "/SHA256SUMS" in hits
    hits.clear()
    second = fetch_dataset("tiny", url, cache)
    assert {f["status"] for f in second["files"].values()} == {"cached"}
    assert hits == []
    # a cached file damaged on disk is fetched again
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    third = fetch_dataset("tiny", url, cache)
    assert third["files"]["test_labels"]["status"] == "fetched"
    assert third["files"]["test_images"]["status"] == "cached"
    assert hits == ["/t10k-labels-idx1-ubyte.gz"] or hits == [
        "/SHA256SUMS",
        "/t10k-labels-idx1-ubyte.gz",
    ]


def test_checksum_mismatch_fails_and_leaves_nothing(served, tmp_path):
    url, _, mirror = served
    blob = bytearray((mirror / "train-labels-idx1-ubyte.gz").read_bytes())
    blob[-9] ^= 0xFF  # still valid gzip framing is not needed: the sha256 check comes first
    (mirror / "train-labels-idx1-ubyte.gz").write_bytes(bytes(blob))
    cache = tmp_path / "cache"
    with pytest.raises((ChecksumError, IDXFormatError), match="train-labels-idx1-ubyte.gz"):
        fetch_dataset("tiny", url, cache)
    assert "train-labels-idx1-ubyte.gz" not in leftovers(cache)
    assert not [n for n in leftovers(cache) if n.endswith(".part")]
    assert "train_labels" not in json.loads((cache / "manifest.json").read_text())["files"]


def test_sha256sums_mismatch_names_file(tiny, tmp_path):
    mirror, _ = tiny
    text = (mirror / "SHA256SUMS").read_text().replace("t10k-images", "t10k-imagez")
    (mirror / "SHA256SUMS").write_text(text)
    with pytest.raises(ChecksumError, match="t10k-images-idx3-ubyte.gz: not listed"):
        fetch_dataset("tiny", str(mirror), tmp_path / "cache")


def test_without_sha256sums_the_registry_checksums_are_used(tiny, tmp_path):
    mirror, _ = tiny
    (mirror / "SHA256SUMS").unlink()
    fetch_dataset("tiny", str(mirror), tmp_path / "ok")
    (mirror / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((12, 28, 28))))
    )
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz"):
        fetch_dataset("tiny", str(mirror), tmp_path / "bad")
    assert not (tmp_path / "bad" / "train-images-idx3-ubyte.gz").exists()


def test_http_404_names_the_file(served, tmp_path):
    url, _, mirror = served
    (mirror / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DownloadError, match=r"t10k-images-idx3-ubyte.gz: HTTP 404"):
        fetch_dataset("tiny", url, tmp_path / "cache")


def test_unreachable_server_is_a_transient_error(tiny, tmp_path):
    with pytest.raises(datasets.TransientDownloadError, match="cannot reach"):
        fetch_dataset("tiny", "http://127.0.0.1:9/", tmp_path / "cache")


def test_label_and_image_counts_must_agree(tiny, tmp_path):
    mirror, _ = tiny
    (mirror / "SHA256SUMS").unlink()
    payload = idx_bytes(np.zeros(7, dtype=np.uint8))
    spec = datasets.DATASETS["tiny"]
    files = dict(spec.files)
    files["test_labels"] = FileSpec(files["test_labels"].filename)
    datasets.DATASETS["tiny"] = DatasetSpec("tiny", spec.origin, files)
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(payload))
    with pytest.raises(IDXFormatError, match="5 images but t10k-labels-idx1-ubyte.gz has 7 labels"):
        fetch_dataset("tiny", str(mirror), tmp_path / "cache")


def test_bad_sources_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="ftp"):
        fetch_dataset("mnist", "ftp://example.org/mnist/", tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        fetch_dataset("mnist", str(tmp_path / "nowhere"), tmp_path / "cache")
    with pytest.raises(ConfigError, match="unknown dataset"):
        fetch_dataset("cifar", None, tmp_path)


def test_real_mnist_mirror_passes_its_checksums(mnist_mirror, tmp_path):
    manifest = fetch_dataset("mnist", str(mnist_mirror), tmp_path / "cache")
    images, labels = load_images(manifest, "test")
    assert images.shape == (10000, 28, 28, 1) and labels.shape == (10000,)
    assert manifest["files"]["train_images"]["payload_sha256"].startswith("ba891046")


# --------------------------------------------------------------------------- verification, write errors, leftovers


def _statuses(manifest: dict) -> dict[str, str]:
    return {rec["name"]: rec["status"] for rec in manifest["files"].values()}


def test_only_missing_or_damaged_cached_files_are_fetched_again(tiny, tmp_path):
    mirror, _ = tiny
    cache = tmp_path / "cache"
    assert set(_statuses(fetch_dataset("tiny", str(mirror), cache)).values()) == {"fetched"}
    assert set(_statuses(fetch_dataset("tiny", str(mirror), cache)).values()) == {"cached"}
    blob = bytearray((cache / "t10k-images-idx3-ubyte.gz").read_bytes())
    blob[40] ^= 0xFF  # same size: only its sha256 tells
    (cache / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(blob))
    (cache / "train-labels-idx1-ubyte.gz").unlink()
    statuses = _statuses(fetch_dataset("tiny", str(mirror), cache))
    assert [name for name, status in statuses.items() if status == "fetched"] == [
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
    ]
    (cache / "manifest.json").write_text("[]")
    assert set(_statuses(fetch_dataset("tiny", str(mirror), cache)).values()) == {"fetched"}


def test_a_damaged_cached_file_is_fetched_again_with_a_warning(tiny, tmp_path, caplog):
    mirror, _ = tiny
    cache = tmp_path / "cache"
    fetch_dataset("tiny", str(mirror), cache)
    (cache / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b truncated")
    with caplog.at_level("WARNING", logger="denoiser.data.datasets"):
        again = fetch_dataset("tiny", str(mirror), cache)
    assert again["files"]["test_images"]["status"] == "fetched"
    assert again["files"]["train_images"]["status"] == "cached"
    assert set(_statuses(fetch_dataset("tiny", str(mirror), cache)).values()) == {"cached"}
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines == [
        f"{cache / 't10k-images-idx3-ubyte.gz'}: sha256 mismatch with the cache manifest; "
        "fetching it again"
    ]


def _fetch_with_file_size_limit(cache: Path, source: Path, limit: int) -> tuple[str, str, str]:
    """Run fetch_dataset in a child whose files cannot grow past ``limit`` bytes
    (a real EFBIG on write, as a full disk gives ENOSPC)."""
    import subprocess
    import sys

    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from denoiser.data.datasets import fetch_dataset\n"
        "from denoiser.core.errors import DenoiseError\n"
        "try:\n"
        f"    fetch_dataset('mnist', {str(source)!r}, {str(cache)!r})\n"
        "except DenoiseError as exc:\n"
        "    print(type(exc).__module__, type(exc).__name__, exc, sep='|')\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    module, name, message = (child.stdout.strip().split("|", 2) + ["", ""])[:3]
    assert name, child.stdout + child.stderr
    return module, name, message


def test_a_cache_write_error_is_permanent_and_not_retried(mnist_mirror, tmp_path):
    from prefect.states import Failed

    from tasks.download import _retry_network_errors

    cache = tmp_path / "cache"
    _, name, message = _fetch_with_file_size_limit(cache, mnist_mirror, 100_000)
    assert name == "DownloadError"
    assert (
        message == f"train-images-idx3-ubyte.gz: cannot write to the cache {cache}: File too large"
    )
    assert not [p.name for p in cache.iterdir() if p.name.endswith(".part")]

    assert _retry_network_errors(None, None, Failed(data=DownloadError(message))) is False
    transient = datasets.TransientDownloadError("x: cannot reach y")
    assert _retry_network_errors(None, None, Failed(data=transient)) is True


def test_leftovers_of_killed_downloads_are_removed(tiny, tmp_path, caplog):
    mirror, _ = tiny
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = datasets.temp_path(cache / "train-images-idx3-ubyte.gz", "part", pid=_dead_pid())
    dead.write_bytes(b"half a download")
    live = datasets.temp_path(cache / "train-labels-idx1-ubyte.gz", "part")
    live.write_bytes(b"a concurrent download")
    with caplog.at_level("INFO", logger="denoiser.data.datasets"):
        fetch_dataset("tiny", str(mirror), cache)
    assert not dead.exists() and live.exists()
    assert any(dead.name in r.getMessage() for r in caplog.records)


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(child.stdout)


def test_killed_mid_file_the_rerun_fetches_it_whole(mnist_mirror, tmp_path):
    import signal
    import subprocess
    import sys

    cache = tmp_path / "cache"
    script = (
        "from denoiser.data.datasets import fetch_dataset\n"
        f"fetch_dataset('mnist', {str(mnist_mirror)!r}, {str(cache)!r})\n"
    )
    env = {**os.environ, "DENOISE_FAILPOINTS": "download.mid_file=kill@2"}
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, stderr
    parts = [p for p in cache.iterdir() if p.name.endswith(".part")]
    assert len(parts) == 1 and f"-{child.pid}-" in parts[0].name
    first = (cache / "train-images-idx3-ubyte.gz").stat().st_mtime_ns
    manifest = fetch_dataset("mnist", str(mnist_mirror), cache)
    assert manifest["files"]["train_images"]["status"] == "cached"
    assert (cache / "train-images-idx3-ubyte.gz").stat().st_mtime_ns == first
    assert set(_statuses(fetch_dataset("mnist", str(mnist_mirror), cache)).values()) == {"cached"}
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]
