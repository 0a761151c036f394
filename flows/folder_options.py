"""The options of ``denoise folder``, which ``denoise watch`` takes too: the
arguments, their checks before any work, and the folder flow's parameters
made from them."""

from __future__ import annotations

import argparse
import os

from denoiser.runtimes.runtime import RETIRED_RUNTIME, RUNTIMES

DASK_ENV = "DENOISE_DASK_ADDRESS"
MAX_WORKERS = 256


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
        default=None,
        metavar="K",
        help="files per chunk task with --workers or --dask-address "
        "(default: about four chunks per worker, 64 to 1,024 files each)",
    )
    parser.add_argument(
        "--runtime",
        # the retired runtime is accepted here to be refused with one line saying what to use
        choices=[*RUNTIMES, RETIRED_RUNTIME],
        metavar="{" + ",".join(RUNTIMES) + "}",
        default="auto",
        help="what runs the model: Keras, or its OpenVINO export (starts in a fraction of "
        "the time, no TensorFlow); auto (default): OpenVINO on a CPU when the model has "
        "its export and OpenVINO is installed, else Keras",
    )
    parser.add_argument(
        "--self-ensemble",
        action="store_true",
        help="each image as the mean of the photo model's outputs for its eight flips and "
        "rotations: about 0.1 dB cleaner, eight times the time (a digits model: one pass)",
    )


def check_dask_options(workers: int | None, address: str | None, chunk_files: int | None) -> None:
    """Every bound of the Dask options, and a cluster that answers, before any work."""
    import socket

    from denoiser.core.errors import ConfigError

    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be between 1 and {MAX_WORKERS}, not {workers}")
    if workers and address:
        raise ConfigError(
            "--workers starts a local cluster and --dask-address uses an existing one; give one"
        )
    if chunk_files is not None and chunk_files < 1:
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


def folder_options(args: argparse.Namespace) -> dict:
    """The folder flow's parameters from the options of :func:`add_folder_arguments`."""
    return {
        "model": args.model,
        "overwrite": args.overwrite,
        "pattern": args.pattern,
        "format": args.format,
        "store": args.store,
        "workers": args.workers,
        "dask_address": args.dask_address,
        "chunk_files": args.chunk_files,
        "runtime": args.runtime,
        "self_ensemble": args.self_ensemble,
    }
