"""The folder flow and the ``denoise folder IN OUT`` command."""

from __future__ import annotations

import argparse
from typing import Literal

from prefect import flow

from artifacts.store import resolve_store_root
from flows.session import STATE_HOOKS
from tasks.denoise import denoise_images, resolve_denoiser


@flow(name="denoise-folder", log_prints=True, validate_parameters=True, **STATE_HOOKS)
def denoise_folder(
    input_dir: str,
    output_dir: str,
    model: str | None = None,
    overwrite: bool = False,
    pattern: str = "*",
    format: Literal["same", "png"] = "same",
    store: str | None = None,
) -> dict:
    """Denoise every image under ``input_dir`` into ``output_dir`` (same tree).
    ``model``: a version, a model folder or a .keras file; default: the
    production model of the images' domain (photographs or digits)."""
    store_root = str(resolve_store_root(store))
    chosen = resolve_denoiser(model, store_root, input_dir, pattern)
    return denoise_images(input_dir, output_dir, chosen, overwrite, pattern, format, store_root)


def add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input_dir", metavar="IN", help="folder of noisy images (never written to)")
    parser.add_argument("output_dir", metavar="OUT", help="where the cleaned images go (same tree)")
    parser.add_argument("--model", help="model version, folder or .keras file (default: the production "
                        "model for the images' domain, photographs or digits)")
    parser.add_argument("--overwrite", action="store_true", help="redo files whose output is up to date")
    parser.add_argument("--pattern", default="*", help="only file names matching this glob (default: *)")
    parser.add_argument("--format", choices=["same", "png"], default="same",
                        help="output format: the input's (default) or PNG")


def run_folder_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from artifacts.registry import resolve_model
    from artifacts.store import Store
    from denoiser.folder import check_folders

    # usage errors and a missing model fail fast, before a Prefect server starts
    check_folders(args.input_dir, args.output_dir)
    Store.at(args.store).check()
    resolve_model(args.store, args.model)
    from flows.cli import import_tensorflow_quietly
    from flows.session import ensure_api, finished_despite_api

    import_tensorflow_quietly(args.debug)
    ensure_api()
    with finished_despite_api("denoise_images") as outcome:
        outcome.value = denoise_folder(args.input_dir, args.output_dir, model=args.model,
                                       overwrite=args.overwrite, pattern=args.pattern, format=args.format,
                                       store=args.store)
    summary = outcome.value
    c = summary["counts"]
    console = Console(stderr=False)
    console.print(f"{c['denoised']} denoised, {c['skipped']} skipped, {c['failed']} failed "
                  f"in {summary['seconds']:.1f} s with model {summary['model']['version']}")
    if summary.get("warning"):
        console.print(f"[yellow]warning:[/] {summary['warning']}", soft_wrap=True)
    console.print(f"output: {summary['output_dir']}")
    console.print(f"report: {summary['report']}")
    if c["failed"]:
        console.print(f"[red]{c['failed']} file(s) failed[/]; see the report for why")
        return 1
    return 0
