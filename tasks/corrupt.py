"""Task: corrupt a dataset with noise into Parquet shards (train/validation/test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from artifacts.render import artifact_key, markdown_image, markdown_table, table_rows
from artifacts.store import Store
from denoiser.config import NoiseConfig
from denoiser.datasets import load_images
from denoiser.plots import grid_png
from denoiser.shards import (
    SplitArrays,
    load_split,
    shard_set_key,
    split_train_validation,
    verify_shard_set,
    write_shard_set,
)
from tasks.common import CACHE_ACROSS_RUNS


def shard_dir_for(dataset: dict, noise: NoiseConfig, store_root: str,
                  train_limit: int | None, test_limit: int | None) -> Path:
    noise = NoiseConfig.model_validate(noise)
    key = shard_set_key(dataset, noise.model_dump(mode="json"), train_limit, test_limit)
    return Store.at(store_root).shards_root / f"{dataset['dataset']}-{key}"


def verify_shards(dataset: dict, noise: NoiseConfig, store_root: str,
                  train_limit: int | None = None, test_limit: int | None = None) -> list[str]:
    """The files of the shard set a cached result would hand on that are missing
    or damaged (empty when all verify): decides whether the cache may be trusted."""
    return verify_shard_set(shard_dir_for(dataset, noise, store_root, train_limit, test_limit))


@task(name="write_noisy_shards", cache_policy=CACHE_ACROSS_RUNS, persist_result=True)
def write_noisy_shards(dataset: dict, noise: NoiseConfig, store_root: str,
                       train_limit: int | None = None, test_limit: int | None = None) -> str:
    """Returns the shard folder; the same request reuses a finished folder once
    its shards verify, and rebuilds only the damaged ones of a finished set."""
    logger = get_run_logger()
    noise = NoiseConfig.model_validate(noise)
    out = shard_dir_for(dataset, noise, store_root, train_limit, test_limit)
    if not verify_shard_set(out):
        logger.info("reusing finished shards in %s", out)
    else:
        images, labels = load_images(dataset, "train", train_limit)
        test_images, test_labels = load_images(dataset, "test", test_limit)
        cut = split_train_validation(len(images), noise.validation_fraction)
        index = np.arange(len(images))
        splits = {
            "train": SplitArrays(images[:cut], labels[:cut], index[:cut], copies=noise.copies),
            "validation": SplitArrays(images[cut:], labels[cut:], index[cut:]),
            "test": SplitArrays(test_images, test_labels, np.arange(len(test_images))),
        }
        meta = {"dataset": dataset["dataset"], "key": out.name.rsplit("-", 1)[1],
                "config": noise.model_dump(mode="json"), "train_limit": train_limit,
                "test_limit": test_limit,
                "sources": {r: f["payload_sha256"] for r, f in dataset["files"].items()}}
        write_shard_set(out, splits, {"kind": noise.kind, "level": noise.level,
                                              "density": noise.level_density}, noise.shard_rows,
                        noise.seed, meta=meta, log=logger)
    _publish(out, dataset["dataset"], noise)
    return str(out)


def _publish(out: Path, name: str, noise: NoiseConfig) -> None:
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    rows = [{"split": r["split"], "file": r["file"], "rows": r["rows"], "sha256": r["sha256"][:16]}
            for r in manifest["shards"]]
    create_table_artifact(key=artifact_key("shards", name), table=table_rows(rows),
                          description=f"Noisy Parquet shards in {out}")
    sample = load_split(out, "test", limit=8)
    grid = grid_png([sample["clean"], sample["noisy"]], scale=3)
    splits = [{"split": s, **v} for s, v in manifest["splits"].items()]
    create_markdown_artifact(
        key=artifact_key("shards", name, "examples"),
        markdown=(f"# Noisy shards of {name}\n\n`{out}`\n\n"
                  f"Noise: **{noise.kind}**, level {noise.level}, {noise.copies} cop"
                  f"{'y' if noise.copies == 1 else 'ies'} per training image, seed {noise.seed}.\n\n"
                  f"{markdown_table(splits)}\n\nTop row clean, bottom row noisy (test split):\n\n"
                  f"{markdown_image(grid, 'clean and noisy test images')}\n"),
        description=f"Examples from the shards of {name}",
    )
