"""Task: make a dataset's raw files present, verified and cached in the store."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from artifacts.render import artifact_key, table_rows
from artifacts.store import Store
from denoiser.config import DataConfig
from denoiser.datasets import TransientDownloadError, fetch_dataset, verify_download_cache
from tasks.common import CACHE_ACROSS_RUNS


def download_dir(data: DataConfig, store_root: str) -> Path:
    return Store.at(store_root).downloads(DataConfig.model_validate(data).dataset)


def verify_download(data: DataConfig, store_root: str) -> list[str]:
    """The cached files a cached download result would hand on that are missing or
    damaged (empty when all verify): decides whether the cache may be trusted."""
    return verify_download_cache(download_dir(data, store_root))


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
    cache_policy=CACHE_ACROSS_RUNS,
    persist_result=True,
)
def download_dataset(data: DataConfig, store_root: str) -> dict:
    """Fetch (or find cached) the dataset's files; returns the dataset manifest."""
    logger = get_run_logger()
    data = DataConfig.model_validate(data)
    manifest = fetch_dataset(data.dataset, data.source, download_dir(data, store_root), log=logger)
    rows = []
    for role, rec in manifest["files"].items():
        logger.info("%s %s (%s bytes) from %s", rec["status"], rec["name"], f"{rec['bytes']:,}", rec["source"])
        rows.append({"role": role, "file": rec["name"], "bytes": rec["bytes"], "sha256": rec["sha256"],
                     "payload_sha256": rec["payload_sha256"], "source": rec["source"], "status": rec["status"]})
    create_table_artifact(
        key=artifact_key("dataset", data.dataset), table=table_rows(rows),
        description=f"Raw files of {data.dataset}, verified and cached in {manifest['dir']}",
    )
    return manifest
