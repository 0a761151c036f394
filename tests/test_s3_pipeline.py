"""The pipeline with its store in a bucket (moto's S3 server) and one real
Prefect server: a training writes everything to the bucket and nothing to
local disk; a second machine (another working directory and PREFECT_HOME)
reuses the first one's download and shards (their task runs show Cached);
the folder denoiser reads its model from the bucket and leaves its report there."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.faults.harness import TRAIN_ARGS, denoise_env, tail

STORE = "s3://denoise-e2e/team-store"


class Machine:
    """One "machine": its own working directory, PREFECT_HOME, stage and caches."""

    def __init__(self, root: Path, api: str, s3, mirror: Path):
        self.root = root
        self.cwd = root / "work"
        self.cwd.mkdir(parents=True)
        self.env = denoise_env(
            STORE,
            root / "prefect-home",
            api,
            mirror,
            env_extra={
                **s3.env(),
                "DENOISE_STAGE_DIR": str(self._dir("stage")),
                "DENOISE_CACHE": str(self._dir("cache")),
                "DENOISE_CHECKPOINTS": str(self._dir("checkpoints")),
            },
        )

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run(self, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, (
            f"`denoise {' '.join(args)}` exit {result.returncode}:\n{tail(result.stderr, 30)}"
        )
        return result

    def local_store_files(self) -> list[str]:
        """Store files on this machine's disk: none may be outside the bucket."""
        names = ("*.parquet", "*.keras", "registry.json", "manifest.json", "*.gz", "report.csv")
        skip = {"cache"}  # the model file cached for inference is a cache, checked separately
        return [
            str(p)
            for pattern in names
            for p in self.root.rglob(pattern)
            if not skip.intersection(p.relative_to(self.root).parts)
        ]


def _last_training_states(api: str) -> dict[str, str]:
    """The state names of the task runs of the latest training run on the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterId,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["train-denoiser"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        )
    return {t.name.rsplit("-", 1)[0]: t.state.name for t in tasks}


def _modified(fs, prefix: str) -> dict[str, object]:
    fs.invalidate_cache()
    return {p: info["LastModified"] for p, info in fs.find(prefix, detail=True).items()}


def test_two_machines_share_one_bucket(s3, prefect_api, mnist_mirror, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    s3.bucket("denoise-e2e")
    fs = s3.fs()
    first = Machine(tmp_path / "machine-a", prefect_api, s3, mnist_mirror)
    trained = first.run([*TRAIN_ARGS, "--store", STORE])
    assert "reusing finished shards" not in trained.stderr
    states = _last_training_states(prefect_api)
    assert (states["download_dataset"], states["write_noisy_shards"]) == ("Completed", "Completed")

    keys = set(fs.find("denoise-e2e/team-store"))
    version = json.loads(fs.cat_file("denoise-e2e/team-store/models/registry.json"))["production"]
    for key in (
        "downloads/mnist/manifest.json",
        "downloads/mnist/train-images-idx3-ubyte.gz",
        "models/registry.json",
        f"models/{version}/model.keras",
        f"models/{version}/model.json",
        f"models/{version}/metrics.json",
        f"models/{version}/samples.png",
        f"models/{version}/report.md",
    ):
        assert f"denoise-e2e/team-store/{key}" in keys, key
    assert any(k.endswith(".parquet") for k in keys) and any(
        "/shards/" in k and k.endswith("manifest.json") for k in keys
    )
    card = json.loads(fs.cat_file(f"denoise-e2e/team-store/models/{version}/model.json"))
    assert (
        card["data"]["shards_dir"].startswith(f"{STORE}/shards/") and card["quality_gate"]["passed"]
    )
    # LiteRT was retired: no model.tflite pushed, no facts of one on the card
    assert "litert_sha256" not in card
    assert not fs.exists(f"denoise-e2e/team-store/models/{version}/model.tflite")
    # its OpenVINO export is pushed with it, the card naming both files
    for name, field in (("model.xml", "openvino_xml_sha256"), ("model.bin", "openvino_bin_sha256")):
        blob = fs.cat_file(f"denoise-e2e/team-store/models/{version}/{name}")
        assert hashlib.sha256(blob).hexdigest() == card[field], name
    assert first.local_store_files() == [] and not list(
        first.cwd.iterdir()
    )  # no local "s3:" folder
    assert not any((first.root / "stage").iterdir())  # stages are removed
    # the run's checkpoint lived in the bucket while it trained; finished, it is gone from both
    assert not any("/checkpoints/" in k for k in keys)
    assert not [p for p in (first.root / "checkpoints").rglob("*") if p.is_file()]

    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        cards = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["model-card"]))
        )
    assert any(version in (a.data or "") and STORE in (a.data or "") for a in cards)

    # the second machine: same server, same bucket, nothing of the first one's disk
    before = _modified(fs, "denoise-e2e/team-store/downloads") | _modified(
        fs, "denoise-e2e/team-store/shards"
    )
    second = Machine(tmp_path / "machine-b", prefect_api, s3, mnist_mirror)
    again = second.run([*TRAIN_ARGS, "--store", STORE])
    assert "reusing finished shards in s3://denoise-e2e/team-store/shards/" in again.stderr
    assert "fetching" not in again.stderr and "cached train-images-idx3-ubyte.gz" in again.stderr
    after = _modified(fs, "denoise-e2e/team-store/downloads") | _modified(
        fs, "denoise-e2e/team-store/shards"
    )
    assert after == before  # no download, no corruption: not one object rewritten
    # found in the bucket, not in this machine's Prefect result cache: shown as Cached all the same
    states = _last_training_states(prefect_api)
    assert (states["download_dataset"], states["write_noisy_shards"]) == ("Cached", "Cached")
    assert second.local_store_files() == []

    listed = second.run(["models", "--store", STORE]).stdout
    registry = json.loads(fs.cat_file("denoise-e2e/team-store/models/registry.json"))
    assert len(registry["versions"]) == 2 and all(v in listed for v in registry["versions"])

    noisy = second.cwd / "noisy"
    noisy.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((40, 56)) * 255).astype(np.uint8)).save(noisy / f"{i}.png")
    second.run(["folder", str(noisy), str(second.cwd / "clean"), "--store", STORE])
    assert sorted(p.name for p in (second.cwd / "clean").glob("*.png")) == [
        "0.png",
        "1.png",
        "2.png",
        "3.png",
    ]
    reports = [k for k in fs.find("denoise-e2e/team-store/reports") if k.endswith("summary.json")]
    assert len(reports) == 1
    summary = json.loads(fs.cat_file(reports[0]))
    assert summary["counts"]["denoised"] == 4 and summary["report"].startswith(f"{STORE}/reports/")
    # fetched from the bucket, checked against the card and run by OpenVINO on this CPU
    assert summary["model"]["runtime"] == "openvino"
