"""Task: corrupt a dataset with noise into Parquet shards (train/validation/test).

IDX datasets become noisy/clean pairs; folders of images become patch sets
(clean patches and whole test images, noise added later in training; see
denoiser/data/shards.py)."""

from __future__ import annotations

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.states import State

from artifacts.render import artifact_key, markdown_image, markdown_table, table_rows
from artifacts.store import Store
from denoiser.config import NoiseConfig
from denoiser.data.noise import add_awgn
from denoiser.data.shards import (
    ShardRequest,
    load_split,
    noise_fields,
    read_manifest,
    shard_set_key,
    verify_shard_set,
)
from denoiser.domains import domain_for_dataset, domain_of_manifest
from denoiser.imaging.plots import grid_png
from tasks.common import reused

EXAMPLE_SIGMA = 25.0  # the examples grid's sample noise on photos, drawn with EXAMPLE_SEED
EXAMPLE_SEED = 0


def shard_dir_for(
    dataset: dict,
    noise: NoiseConfig,
    store: Store | str,
    train_limit: int | None,
    test_limit: int | None,
) -> str:
    """The shard set's location in the store (a path, or a URL for a remote store)."""
    noise = NoiseConfig.model_validate(noise)
    key = shard_set_key(dataset, noise_fields(dataset, noise), train_limit, test_limit)
    return Store.at(store).shards(f"{dataset['dataset']}-{key}")


@task(name="write_noisy_shards", cache_policy=NO_CACHE)  # reuse: the verified set at its key
def write_noisy_shards(
    dataset: dict,
    noise: NoiseConfig,
    store: Store | str,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> str | State:
    """Returns the shard folder; the same request reuses a finished folder once
    its shards verify (the state is then named Cached: call with
    ``return_state=True`` and take ``.result()``, see tasks/common.py), and
    rebuilds only the damaged ones of a finished set."""
    logger = get_run_logger()
    noise = NoiseConfig.model_validate(noise)
    store = Store.at(store)
    where = shard_dir_for(dataset, noise, store, train_limit, test_limit)
    found = not verify_shard_set(where)
    if found:
        logger.info("reusing finished shards in %s", where)
    else:
        # a remote store's set is written on a local stage from the staged raw files (the shards
        # that verify kept, only the damaged ones rebuilt), then pushed shard by shard and the
        # manifest last, so no reader sees half a set
        with (
            store.stage() as stage,
            stage.staged(
                where, last=("manifest.json",), retract=True, store_urls=("manifest.json",)
            ) as out,
        ):
            staged = stage.pull_dataset(dataset)
            domain = domain_for_dataset(staged.get("name") or staged["dataset"])
            domain.write_shards(out, ShardRequest(staged, noise, train_limit, test_limit), logger)
        if store.remote:
            logger.info("stored the shard set in %s", where)
    _publish(where, dataset["dataset"], noise)
    return reused(where, f"every shard found verified in {where}") if found else where


def _examples(out: str, manifest: dict, noise: NoiseConfig) -> tuple[str, str, str]:
    """The examples grid, its caption and alt text: test pairs, or clean
    validation patches over the same patches with sample awgn (noise added in training)."""
    if not domain_of_manifest(manifest).noise_in_training:
        sample = load_split(out, "test", limit=8)
        return (
            grid_png([sample["clean"], sample["noisy"]], scale=3),
            "Top row clean, bottom row noisy (test split)",
            "clean and noisy test images",
        )
    clean = load_split(out, "validation", limit=8)["clean"]
    noisy = add_awgn(
        clean.astype(np.float32) / 255.0, EXAMPLE_SIGMA, np.random.default_rng(EXAMPLE_SEED)
    )
    return (
        grid_png([clean, np.clip(noisy, 0.0, 1.0)], scale=3),
        f"Top row clean validation patches, bottom row the same with sample awgn at sigma "
        f"{EXAMPLE_SIGMA:g} (seed {EXAMPLE_SEED}); training adds {noise.kind} at {noise.level} "
        "fresh to every batch",
        "clean patches and the same with sample noise",
    )


def _publish(out: str, name: str, noise: NoiseConfig) -> None:
    manifest = read_manifest(out)
    fresh_noise = domain_of_manifest(manifest).noise_in_training
    rows = [
        {"split": r["split"], "file": r["file"], "rows": r["rows"], "sha256": r["sha256"][:16]}
        for r in manifest["shards"]
    ]
    create_table_artifact(
        key=artifact_key("shards", name),
        table=table_rows(rows),
        description=f"{'Patch' if fresh_noise else 'Noisy'} Parquet shards in {out}",
    )
    grid, caption, alt = _examples(out, manifest, noise)
    splits = [
        {"split": s, **{k: v for k, v in rec.items() if k != "image_shape"}}
        for s, rec in manifest["splits"].items()
    ]
    if fresh_noise:
        size = manifest["patch_size"]
        title = "Patch shards"
        what = (
            f"{manifest['patches_per_image']} patches of {size}x{size} per training image and epoch, "
            f"whole test images; noise **{noise.kind}**, level {noise.level} ({noise.level_density}), "
            f"added in training; seed {noise.seed}; {len(manifest.get('skipped', []))} file(s) skipped."
        )
    else:
        title = "Noisy shards"
        what = (
            f"Noise: **{noise.kind}**, level {noise.level}, {noise.copies} cop"
            f"{'y' if noise.copies == 1 else 'ies'} per training image, seed {noise.seed}."
        )
    create_markdown_artifact(
        key=artifact_key("shards", name, "examples"),
        markdown=(
            f"# {title} of {name}\n\n`{out}`\n\n{what}\n\n{markdown_table(splits)}\n\n{caption}:\n\n"
            f"{markdown_image(grid, alt)}\n"
        ),
        description=f"Examples from the shards of {name}",
    )
