"""Task: make a dataset's raw files present, verified and cached in the store."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.states import State

from artifacts.render import artifact_key, table_rows
from artifacts.store import Store
from denoiser.config import DataConfig
from denoiser.core.catalog import test_dataset_of
from denoiser.data.datasets import (
    TransientDownloadError,
    fetch_dataset,
)
from denoiser.data.image_datasets import dataset_slug
from tasks.common import reused


def _fetched(manifest: dict) -> int:
    """How many of the dataset's files (its test folder's too) had to be fetched."""
    parts = [manifest, manifest.get("test")]
    return sum(r["status"] != "cached" for part in parts if part for r in part["files"].values())


def _retry_network_errors(task, task_run, state) -> bool:
    """Retry a dropped connection, never a checksum mismatch, a 404 or a full disk."""
    try:
        state.result()
    except TransientDownloadError:
        return True
    except Exception:  # noqa: BLE001 - anything else is permanent
        return False
    return False


@task(
    name="download_dataset",
    retries=3,
    retry_delay_seconds=[2, 8, 30],
    retry_condition_fn=_retry_network_errors,
    cache_policy=NO_CACHE,  # reuse is decided by the files in the store, verified
)
def download_dataset(data: DataConfig, store: Store | str) -> dict | State:
    """Fetch (or find cached) the dataset's files; returns the dataset manifest,
    in a state named Cached when every file was found verified in the store
    (call with ``return_state=True`` and take ``.result()``, see tasks/common.py)."""
    logger = get_run_logger()
    data = DataConfig.model_validate(data)
    store = Store.at(store)
    # the dataset's download cache (and its test folder's: an IDX dataset brings its own) staged,
    # checked, and what was fetched pushed back, the manifest last
    caches = [
        store.download(dataset_slug(name))
        for name in (data.dataset, test_dataset_of(data.dataset, data.test_dataset))
        if name
    ]
    with (
        store.stage() as stage,
        stage.staged_folders(
            caches, last=("manifest.json",), retract=True, store_urls=("manifest.json",)
        ) as folders,
    ):
        manifest = fetch_dataset(
            data.dataset, data.source, folders[0], log=logger, test_dataset=data.test_dataset
        )
        manifest = stage.to_urls(manifest)
    if manifest.get("kind") == "images":
        _publish_images(manifest, logger)
    else:
        _publish_files(manifest, data.dataset, logger)
    if _fetched(manifest):
        return manifest
    return reused(manifest, f"every file found verified in {manifest['dir']}, none fetched")


def _publish_files(manifest: dict, dataset: str, logger) -> None:
    """One log line per file and the file table artifact."""
    rows = []
    for role, rec in manifest["files"].items():
        logger.info(
            "%s %s (%s bytes) from %s",
            rec["status"],
            rec["name"],
            f"{rec['bytes']:,}",
            rec["source"],
        )
        rows.append(
            {
                "role": role,
                "file": rec["name"],
                "bytes": rec["bytes"],
                "sha256": rec["sha256"],
                "payload_sha256": rec["payload_sha256"],
                "source": rec["source"],
                "status": rec["status"],
            }
        )
    create_table_artifact(
        key=artifact_key("dataset", dataset),
        table=table_rows(rows),
        description=f"Raw files of {dataset}, verified and cached in {manifest['dir']}",
    )


def _image_rows(manifest: dict, used_as: str) -> list[dict]:
    rows = [
        {
            "dataset": manifest["dataset"],
            "as": used_as,
            "file": rec["name"],
            "bytes": rec["bytes"],
            "size": f"{rec['width']}x{rec['height']}",
            "mode": rec["mode"],
            "sha256": rec["sha256"],
            "status": rec["status"],
            "source": rec["source"],
        }
        for rec in manifest["files"].values()
    ]
    rows += [
        {
            "dataset": manifest["dataset"],
            "as": used_as,
            "file": s["name"],
            "bytes": s.get("bytes"),
            "size": "",
            "mode": "",
            "sha256": s.get("sha256", ""),
            "status": f"skipped: {s['reason']}",
            "source": manifest.get("location") or "",
        }
        for s in manifest["skipped"]
    ]
    return rows


def _publish_images(manifest: dict, logger) -> None:
    """One log line per folder (not per file) and the file table artifact."""
    rows = []
    for part, used_as in ((manifest, "train"), (manifest.get("test"), "test")):
        if not part:
            continue
        statuses = [r["status"] for r in part["files"].values()]
        logger.info(
            "%s: %d images (%d fetched, %d cached), %d skipped, from %s",
            part["dataset"],
            len(statuses),
            statuses.count("fetched"),
            statuses.count("cached"),
            len(part["skipped"]),
            part.get("location") or "the cache",
        )
        rows += _image_rows(part, used_as)
    if manifest.get("held_out_test"):
        logger.info(
            "no test dataset: %.0f%% of %s held out as the test split (by content hash)",
            100 * manifest["held_out_test"],
            manifest["dataset"],
        )
    create_table_artifact(
        key=artifact_key("dataset", manifest["dataset"]),
        table=table_rows(rows),
        description=f"Image files of {manifest['dataset']}"
        + (f" (test: {manifest['test']['dataset']})" if manifest.get("test") else "")
        + f", verified and cached in {manifest['dir']}",
    )
