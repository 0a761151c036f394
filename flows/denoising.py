"""The folder flow and the ``denoise folder IN OUT`` command."""

from __future__ import annotations

import argparse
import os
import socket
from typing import Literal

from prefect import flow

from artifacts.store import resolve_store_root
from denoiser.errors import ConfigError
from flows.session import STATE_HOOKS
from tasks.denoise import (
    denoise_chunk,
    denoise_images,
    plan_denoise_chunks,
    report_folder_run,
    resolve_denoiser,
)

DEFAULT_CHUNK_FILES = 256
MAX_WORKERS = 256
DASK_ENV = "DENOISE_DASK_ADDRESS"


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
    chunk_files: int = DEFAULT_CHUNK_FILES,
) -> dict:
    """Denoise every image under ``input_dir`` into ``output_dir`` (same tree).
    ``model``: a version, a model folder or a .keras file; default: the
    production model of the images' domain (photographs or digits).
    ``workers`` (a local Dask cluster of that many processes) or
    ``dask_address`` (an existing cluster): the folder is cut into chunks of
    ``chunk_files`` files, one task each, run by Dask; otherwise one task in
    this process."""
    store_root = str(resolve_store_root(store))
    chosen = resolve_denoiser(model, store_root, input_dir, pattern)
    if not workers and not dask_address:
        return denoise_images(input_dir, output_dir, chosen, overwrite, pattern, format, store_root)
    runner = dask_task_runner(workers, dask_address)
    return denoise_in_chunks.with_options(task_runner=runner)(
        input_dir, output_dir, chosen, overwrite, pattern, format, store_root, chunk_files
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
    chunk_files: int,
) -> dict:
    """The folder as chunks of files, one ``denoise_chunk`` task each, merged into one report."""
    plan = plan_denoise_chunks(input_dir, output_dir, pattern, format, overwrite, chunk_files)
    futures = [
        denoise_chunk.submit(input_dir, output_dir, rels, chosen, overwrite, format)
        for rels in plan["chunks"]
    ]
    return report_folder_run(
        input_dir, output_dir, plan, [f.result() for f in futures], chosen, store_root
    )


def dask_task_runner(workers: int | None, address: str | None):
    """Prefect's DaskTaskRunner on an existing cluster (``address``) or on a
    LocalCluster of ``workers`` single-threaded processes."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError(
            '--workers and --dask-address need prefect-dask: pip install -e ".[dask]"'
        ) from None
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        },
    )


def add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", metavar="IN", help="folder of noisy images (never written to)")
    parser.add_argument("output_dir", metavar="OUT", help="where the cleaned images go (same tree)")
    parser.add_argument(
        "--model",
        help="model version, folder or .keras file (default: the production "
        "model for the images' domain, photographs or digits)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="redo files whose output is up to date"
    )
    parser.add_argument(
        "--pattern", default="*", help="only file names matching this glob (default: *)"
    )
    parser.add_argument(
        "--format",
        choices=["same", "png"],
        default="same",
        help="output format: the input's (default) or PNG",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="denoise in chunks on a local Dask cluster of N processes",
    )
    parser.add_argument(
        "--dask-address",
        default=os.environ.get(DASK_ENV),
        metavar="tcp://HOST:PORT",
        help=f"denoise in chunks on an existing Dask cluster (default: ${DASK_ENV}); "
        "needs PREFECT_API_URL set to a server the workers reach",
    )
    parser.add_argument(
        "--chunk-files",
        type=int,
        default=DEFAULT_CHUNK_FILES,
        metavar="K",
        help=f"files per chunk task with --workers or --dask-address (default: {DEFAULT_CHUNK_FILES})",
    )


def check_dask_options(workers: int | None, address: str | None, chunk_files: int) -> None:
    """Every bound of the Dask options, and a cluster that answers, before any work."""
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be between 1 and {MAX_WORKERS}, not {workers}")
    if workers and address:
        raise ConfigError(
            "--workers starts a local cluster and --dask-address uses an existing one; give one"
        )
    if chunk_files < 1:
        raise ConfigError(f"--chunk-files must be at least 1, not {chunk_files}")
    if not address:
        return
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(
            "--dask-address: the Dask workers report to Prefect; set PREFECT_API_URL to a "
            "Prefect server they can reach (a temporary server of this command is not)"
        )
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--dask-address {address}: expected tcp://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(
            f"--dask-address {address}: no Dask scheduler answers ({exc.strerror or exc})"
        ) from None


def run_folder_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from artifacts.registry import resolve_model
    from artifacts.store import Store
    from denoiser.folder import check_folders

    # usage errors and a missing model fail fast, before a Prefect server starts
    check_folders(args.input_dir, args.output_dir)
    check_dask_options(args.workers, args.dask_address, args.chunk_files)
    Store.at(args.store).check()
    resolve_model(args.store, args.model)
    from flows.cli import import_tensorflow_quietly
    from flows.session import ensure_api, finished_despite_api

    import_tensorflow_quietly(args.debug)
    # worker processes inherit the environment: one server for all, not one each
    os.environ["PREFECT_API_URL"] = ensure_api()
    with finished_despite_api("denoise_images") as outcome:
        outcome.value = denoise_folder(
            args.input_dir,
            args.output_dir,
            model=args.model,
            overwrite=args.overwrite,
            pattern=args.pattern,
            format=args.format,
            store=args.store,
            workers=args.workers,
            dask_address=args.dask_address,
            chunk_files=args.chunk_files,
        )
    summary = outcome.value
    c = summary["counts"]
    console = Console(stderr=False)
    console.print(
        f"{c['denoised']} denoised, {c['skipped']} skipped, {c['failed']} failed "
        f"in {summary['seconds']:.1f} s with model {summary['model']['version']}"
    )
    if summary.get("warning"):
        console.print(f"[yellow]warning:[/] {summary['warning']}", soft_wrap=True)
    console.print(f"output: {summary['output_dir']}")
    console.print(f"report: {summary['report']}")
    if c["failed"]:
        console.print(f"[red]{c['failed']} file(s) failed[/]; see the report for why")
        return 1
    return 0
