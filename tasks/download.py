"""Task: make a dataset's raw files present, verified and cached in the store."""

from __future__ import annotations

import json

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from artifacts.render import artifact_key, table_rows
from artifacts.store import Store
from denoiser.config import DataConfig
from denoiser.datasets import (
    TransientDownloadError,
    fetch_dataset,
    is_image_dataset,
    verify_download_cache,
)
from denoiser.image_datasets import IMAGE_DATASETS, dataset_slug, source_changes
from tasks.common import CACHE_ACROSS_RUNS


def download_location(data: DataConfig, store_root: str) -> str:
    return Store.at(store_root).join(
        "downloads", dataset_slug(DataConfig.model_validate(data).dataset)
    )


def _remote_cache_problems(store: Store, location: str) -> list[str]:
    """A remote download cache's problems without reading its files: no finished
    manifest, or files missing or of another size than recorded (the task that
    uses them checks their sha256 when it stages them)."""
    try:
        recorded = json.loads(store.read_bytes(f"{location}/manifest.json"))
        files = recorded["files"] if recorded.get("complete") else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        files = None
    if not isinstance(files, dict):
        return ["manifest.json"]
    sizes = store.sizes(location)
    images = recorded.get("kind") == "images"
    names = {
        (key if images else rec.get("name")): rec.get("bytes")
        for key, rec in files.items()
        if isinstance(rec, dict)
    }
    return [
        name
        for name, size in names.items()
        if name not in sizes or (size is not None and sizes[name] != size)
    ]


def _test_name(data: DataConfig) -> str | None:
    spec = IMAGE_DATASETS.get(data.dataset)
    return data.test_dataset or (spec.test if spec else None)


def verify_download(data: DataConfig, store_root: str) -> list[str]:
    """The cached files a cached download result would hand on that are missing or
    damaged (empty when all verify), and for a user's local folder of images the
    files added, removed or changed there since: decides whether the cache may be trusted."""
    data = DataConfig.model_validate(data)
    store = Store.at(store_root)
    test = _test_name(data) if is_image_dataset(data.dataset) else None
    caches = [download_location(data, store_root)] + (
        [store.join("downloads", dataset_slug(test))] if test else []
    )
    if store.remote:
        return [name for cache in caches for name in _remote_cache_problems(store, cache)]
    problems = [name for cache in caches for name in verify_download_cache(cache)]
    if not is_image_dataset(data.dataset):
        return problems
    if not problems:  # hashing the user's folder is only worth it while the cache itself verifies
        problems = [name for cache in caches for name in source_changes(cache)]
    return problems


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
    with Store.at(
        store_root
    ).stage() as stage:  # a remote store's cache is staged, checked, and pushed back
        test = _test_name(data) if is_image_dataset(data.dataset) else None
        folders = [stage.pull(stage.local(download_location(data, store_root)))]
        if test:
            folders.append(stage.pull(stage.downloads(dataset_slug(test))))
        manifest = fetch_dataset(
            data.dataset, data.source, folders[0], log=logger, test_dataset=data.test_dataset
        )
        for folder in folders:  # only what was fetched; the manifest last
            stage.store_json_urls(folder / "manifest.json")
            stage.push(folder, last=("manifest.json",), retract=True)
        manifest = stage.to_urls(manifest)
    if manifest.get("kind") == "images":
        _publish_images(manifest, logger)
        return manifest
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
        key=artifact_key("dataset", data.dataset),
        table=table_rows(rows),
        description=f"Raw files of {data.dataset}, verified and cached in {manifest['dir']}",
    )
    return manifest


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
