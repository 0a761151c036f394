"""The folder flow: in this process, or in chunks on a Dask cluster."""

from __future__ import annotations

import contextlib
import os
from typing import Literal

from prefect import flow
from prefect.utilities.annotations import quote

from artifacts.store import resolve_store_root
from denoiser.core.errors import ConfigError
from denoiser.folder import check_folders
from denoiser.folder.trees import resolve_location
from flows.limits import hold_limit, limit_name
from flows.session import STATE_HOOKS
from tasks.denoise import (
    chunk_files_of,
    collect_chunks,
    denoise_chunk,
    denoise_images,
    plan_denoise_chunks,
    report_folder_run,
    resolve_denoiser,
)


@flow(name="denoise-folder", log_prints=True, validate_parameters=True, **STATE_HOOKS)
def denoise_folder(
    input_dir: str,
    output_dir: str,
    model: str | None = None,
    overwrite: bool = False,
    pattern: str = "*",
    format: Literal["same", "png"] = "same",
    store: str | None = None,
    workers: int | None = None,
    dask_address: str | None = None,
    chunk_files: int | None = None,
    runtime: Literal["auto", "keras", "openvino"] = "auto",
    settle: float = 0.0,
    self_ensemble: bool = False,
) -> dict:
    """Denoise every image under ``input_dir`` into ``output_dir`` (same tree).
    ``model``: a version, a model folder or a .keras file for every image;
    default: each image through the production model of its domain (colour
    or grey photographs, digits), or a fallback (see denoiser/folder/routing.py).
    ``workers`` (a local Dask cluster of that many processes) or
    ``dask_address`` (an existing cluster): the folder is cut into chunks of
    ``chunk_files`` files (default: about four per worker, 64 to 1,024 files),
    one task each, run by Dask; otherwise one task in
    this process. ``runtime``: Keras, or the model's OpenVINO export (no
    TensorFlow start-up); ``auto``: OpenVINO on a CPU when the model has its
    export and OpenVINO is installed, else Keras.
    ``settle``: files modified in the last that many seconds may still be being
    written and are left for a later run (an inbox, ``denoise watch``).
    ``self_ensemble``: photographs as the mean of the model's outputs for
    their eight flips and rotations (eight times the inference).
    An inbox's runs (``settle`` > 0) into one output folder take turns (a
    concurrency limit keyed by it); other runs may share an output folder (its
    journal is appended under a lock)."""
    store_root = str(resolve_store_root(store))
    # absolute, so that every worker (any cwd, any host sharing the file system) finds them
    input_dir, output_dir = resolve_location(input_dir), resolve_location(output_dir)
    check_folders(input_dir, output_dir, store_root)  # a run from the UI gets the CLI's checks
    # an inbox's runs (settle > 0) take turns: a concurrency limit keyed by the output folder
    turns = hold_limit(limit_name("folder", output_dir), f"the run writing into {output_dir}")
    with turns if settle > 0 else contextlib.nullcontext():
        return _denoise_folder(
            input_dir,
            output_dir,
            model,
            overwrite,
            pattern,
            format,
            store_root,
            workers,
            dask_address,
            chunk_files,
            runtime,
            settle,
            self_ensemble,
        )


def _denoise_folder(
    input_dir: str,
    output_dir: str,
    model: str | None,
    overwrite: bool,
    pattern: str,
    format: str,
    store_root: str,
    workers: int | None,
    dask_address: str | None,
    chunk_files: int | None,
    runtime: str,
    settle: float,
    self_ensemble: bool,
) -> dict:
    in_chunks = bool(workers or dask_address)
    chosen = resolve_denoiser(model, store_root, input_dir, pattern, runtime, self_ensemble)
    if not in_chunks:
        return denoise_images(
            input_dir, output_dir, chosen, overwrite, pattern, format, store_root, settle
        )
    runner = dask_task_runner(workers, dask_address)
    return denoise_in_chunks.with_options(task_runner=runner)(
        input_dir, output_dir, chosen, overwrite, pattern, format, store_root, chunk_files, settle
    )


@flow(name="denoise-folder-chunks", log_prints=True)
def denoise_in_chunks(
    input_dir: str,
    output_dir: str,
    chosen: dict,
    overwrite: bool,
    pattern: str,
    format: str,
    store_root: str,
    chunk_files: int | None,
    settle: float = 0.0,
) -> dict:
    """The folder as chunks of files, one ``denoise_chunk`` task each, merged into one report."""
    from tasks.workers import load_denoiser_on_workers, unload_denoiser_from_workers

    loaded = load_denoiser_on_workers(chosen)
    try:
        plan = plan_denoise_chunks(
            input_dir,
            output_dir,
            pattern,
            format,
            overwrite,
            chunk_files,
            loaded["workers"],
            settle,
        )
        futures = [
            denoise_chunk.submit(input_dir, output_dir, files, chosen, overwrite, format)
            for files in chunk_files_of(plan)
        ]
        outcomes = collect_chunks(futures, plan)
        # quote(): thousands of paths and records passed as they are, not
        # searched by Prefect for futures (seconds per run otherwise)
        return report_folder_run(
            input_dir, output_dir, quote(plan), quote(outcomes), chosen, store_root
        )
    finally:
        unload_denoiser_from_workers(loaded)


def dask_task_runner(workers: int | None, address: str | None):
    """Prefect's DaskTaskRunner on an existing cluster (``address``) or on a
    LocalCluster of ``workers`` single-threaded processes."""
    try:
        import prefect_dask  # noqa: F401

        from tasks.workers import QuietDaskTaskRunner
    except ImportError:
        raise ConfigError(
            '--workers and --dask-address need prefect-dask: pip install -e ".[dask]"'
        ) from None
    if address:
        return QuietDaskTaskRunner(address=address)
    # each worker's TensorFlow gets its share of the cores, not all of them each
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    return QuietDaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "env": {"TF_NUM_INTRAOP_THREADS": threads, "OMP_NUM_THREADS": threads},
        },
    )
