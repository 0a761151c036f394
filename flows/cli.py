"""The ``denoise`` command line: ``train``, ``folder``, ``models``, ``serve``, ``server``.

Every expected failure (bad option, missing file, checksum mismatch...) ends as
one line on stderr and an exit code: 0 success, 1 the work failed, 2 a usage
error. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import get_args

from denoiser.config import (
    LevelDensity,
    LossName,
    LrSchedule,
    NoiseConfig,
    NoiseKind,
    TrainConfig,
)
from flows.folder_options import (  # noqa: F401 - denoise folder's options, read by tests too
    DASK_ENV,
    MAX_WORKERS,
    add_folder_arguments,
    check_dask_options,
    folder_options,
)

QUICK = {"train_limit": 6000, "test_limit": 1000, "epochs": 3}
# photographs: every training image, fewer patches of each, the first test images; a few minutes
QUICK_PHOTOS = {"patches_per_image": 8, "test_limit": 6, "epochs": 3}
QUICK_BY_SHARDS = {"pairs": QUICK, "patches": QUICK_PHOTOS}


def _quiet_environment(debug: bool = False) -> None:
    """Set before Prefect and TensorFlow are imported: both read these once."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # TensorFlow's C++ start-up lines (oneDNN, CUDA probing on CPU-only machines) only with --debug
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if debug else "3")
    # a lost API is given up on in seconds, not minutes: the data work never waits for it
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "2")
    # a temporary server on a busy two-core machine can need more than Prefect's 20 s
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # Dask's lifecycle lines (dozens per run), and the warnings of workers stopped
    # mid-task by Ctrl-C, only with --debug
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if debug else "error")


def _noise_level(text: str) -> float | tuple[float, float]:
    try:
        parts = [float(p) for p in text.replace(":", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or a LO,HI range: {text!r}") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"give one level or a LO,HI range, not {text!r}")


def _sigmas(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    _add_data_arguments(p)
    _add_noise_arguments(p)
    _add_recipe_arguments(p)


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The dataset, its photographs' options and the quick subset."""
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small subset and few epochs (digits: {QUICK}; photographs: {QUICK_PHOTOS}); "
        "a few minutes on 2 CPU cores",
    )
    p.add_argument(
        "--dataset",
        default="mnist",
        metavar="NAME_OR_PATH_OR_URL",
        help="mnist, fashion-mnist, train400, bsd432 (photographs), cbsd432 (colour photographs), "
        "or a folder of your own images: "
        "a path, file:// or http(s):// URL (default: mnist)",
    )
    p.add_argument(
        "--test-dataset",
        metavar="NAME_OR_PATH_OR_URL",
        help="photographs only: images to test on (default: the dataset's own, train400: set12; "
        "a folder of yours: a held-out share of it)",
    )
    p.add_argument(
        "--patch-size",
        type=int,
        help="photographs only: side of the square training patches (default: 40)",
    )
    p.add_argument(
        "--patches-per-image",
        type=int,
        help="photographs only: patches cut from each training image per epoch (default: 64)",
    )
    p.add_argument(
        "--sigmas",
        type=_sigmas,
        help="photographs only: awgn sigmas (0-255) the test images are "
        "scored at, e.g. 15,25,50 (the default)",
    )
    p.add_argument(
        "--source",
        help="mirror: http(s) URL, file:// URL or folder "
        "(default: $DENOISE_DATA_SOURCE, then the dataset's origin)",
    )
    p.add_argument("--train-limit", type=int, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, help="use only the first N test images")


def _add_noise_arguments(p: argparse.ArgumentParser) -> None:
    """The noise; no defaults here: an option left out leaves the config's own
    default (shown in the help)."""
    noise = NoiseConfig.model_fields
    p.add_argument(
        "--noise-kind",
        choices=get_args(NoiseKind),
        help=f"noise model (default: {noise['kind'].default})",
    )
    p.add_argument(
        "--noise-level",
        type=_noise_level,
        help=f"a level or a range drawn per image, e.g. 0.1,0.7 (default: {noise['level'].default})",
    )
    p.add_argument(
        "--level-density",
        choices=get_args(LevelDensity),
        help="how a range is drawn: rising (more heavy noise) or uniform "
        f"(default: {noise['level_density'].default})",
    )
    p.add_argument(
        "--copies",
        type=int,
        help=f"noisy draws per clean image (default: {noise['copies'].default})",
    )


def _add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The model, its training recipe and the quality gate."""
    p.add_argument("--architecture", help="model architecture (default: the best one)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--loss", choices=get_args(LossName))
    p.add_argument("--lr-schedule", choices=get_args(LrSchedule))
    p.add_argument(
        "--reframe",
        type=float,
        help="share of training pairs recut from mosaics "
        "(default: the architecture's recipe; 0 trains on the frames as they are)",
    )
    p.add_argument(
        "--colour-gains",
        type=float,
        help="share of colour training patches given a random colour cast, so that the colour "
        "differences carry detail (default: 0)",
    )
    p.add_argument(
        "--colour-gains-low",
        type=float,
        metavar="LOW",
        help="a colour cast scales R, G and B by gains from [LOW, 1] "
        f"(default: {TrainConfig.model_fields['colour_gains_low'].default})",
    )
    p.add_argument(
        "--colour-gains-balanced",
        action="store_true",
        default=None,
        help="divide a colour cast's gains by their mean, keeping the patch's brightness",
    )
    p.add_argument(
        "--seed",
        type=int,
        help=f"seed for noise and training (default: {TrainConfig.model_fields['seed'].default})",
    )
    p.add_argument(
        "--warm-start",
        metavar="MODEL",
        help="start from this model's weights (a version, built-in or in the store, a folder or "
        "a .keras file): train on from it, e.g. the built-in photo model on your own photos",
    )
    p.add_argument("--min-psnr-gain", type=float, help="quality gate in dB over the noisy input")
    p.add_argument(
        "--precision",
        choices=get_args(TrainConfig.model_fields["precision"].annotation),
        help="CPU training precision: auto (mixed bfloat16 where the CPU has it in hardware, "
        "AMX or AVX512-BF16; float32 elsewhere), float32 or bfloat16",
    )


#: the training options named as TrainConfig's fields (epochs: --quick may give it)
TRAIN_OPTIONS = (
    "architecture",
    "batch_size",
    "learning_rate",
    "loss",
    "lr_schedule",
    "reframe",
    "colour_gains",
    "colour_gains_low",
    "colour_gains_balanced",
    "seed",
    "precision",
    "warm_start",
)


def given(args: argparse.Namespace, *names: str, **options) -> dict:
    """The options the user gave, the options named as the config's fields
    (``names``) and the others (``options``): what is left out keeps the
    config's own default, written down once, in denoiser.config."""
    named = {name: getattr(args, name) for name in names}
    return {k: v for k, v in {**named, **options}.items() if v is not None}


def _train_configs(args: argparse.Namespace) -> dict:
    """The flow's configs from the options, as given: what is left out keeps
    the config's default, noise options start from the dataset's domain's
    own noise (photographs: blind awgn). The checks and the recipe's
    defaults come after, from :func:`denoiser.request.resolve_request`."""
    from denoiser.config import DataConfig, EvalConfig
    from denoiser.domains import domain_for_dataset

    domain = domain_for_dataset(args.dataset)
    quick = QUICK_BY_SHARDS[domain.shard_kind] if args.quick else {}

    def pick(name: str):
        value = getattr(args, name)
        return value if value is not None else quick.get(name)

    training = given(args, *TRAIN_OPTIONS, epochs=pick("epochs"))
    data = DataConfig(
        **given(
            args,
            "dataset",
            "source",
            "test_dataset",
            train_limit=pick("train_limit"),
            test_limit=pick("test_limit"),
        )
    )
    noise = domain.noise_from(
        given(
            args,
            "copies",
            "seed",
            "patch_size",
            kind=args.noise_kind,
            level=args.noise_level,
            level_density=args.level_density,
            patches_per_image=pick("patches_per_image"),
        )
    )
    return {
        "data": data,
        "noise": noise,
        "training": TrainConfig(**training),
        "evaluation": EvalConfig(**given(args, "min_psnr_gain", "sigmas")),
    }


def _run_train(args: argparse.Namespace) -> int:
    from artifacts.registry import open_store
    from artifacts.resolution import resolve_model, with_seed_architecture
    from denoiser.request import resolve_request

    # every check before a server starts (the flow makes the same calls): a bad option, a
    # missing bucket, refused credentials, a broken registry or no model to start from is
    # one line, nothing written; a warm start of the dataset's domain gives its architecture
    configs = _train_configs(args)
    configs["training"] = with_seed_architecture(args.store, configs["data"], configs["training"])
    request = resolve_request(**configs, store=args.store)
    open_store(request.store)
    if request.training.warm_start:  # the model to start from is there (its layout: at training)
        resolve_model(request.store, request.training.warm_start)
    from flows.server import start_api
    from flows.training import train_pipeline
    from tasks.terminal import quiet_run_failures

    quiet_run_failures(args.debug)
    from denoiser.nets.models import import_tensorflow_quietly

    api = start_api()  # a temporary server boots while TensorFlow is imported
    import_tensorflow_quietly(args.debug)
    api()

    result = train_pipeline(
        data=request.data,
        noise=request.noise,
        training=request.training,
        evaluation=request.evaluation,
        store=request.store,
    )
    _print_train_summary(result)
    return 0 if result["metrics"]["passed"] else 1


def _print_train_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m, model = result["metrics"], result["model"]
    console = Console()
    console.print(
        f"model [bold]{model['version']}[/] ({model['architecture']}, "
        f"{model['params']:,} parameters, trained on {model['device']} in {model['seconds']:.0f} s)"
    )
    table = Table()
    if m.get("per_sigma"):  # photographs: a row per sigma, then their mean
        for col in (
            "sigma",
            "PSNR noisy (dB)",
            "PSNR denoised (dB)",
            "SSIM noisy",
            "SSIM denoised",
        ):
            table.add_column(col)
        for r in [*m["per_sigma"], {**m, "sigma": "mean"}]:
            sigma = r["sigma"] if isinstance(r["sigma"], str) else f"{r['sigma']:g}"
            table.add_row(
                sigma,
                f"{r['psnr_noisy']:.2f}",
                f"{r['psnr_denoised']:.2f}",
                f"{r['ssim_noisy']:.3f}",
                f"{r['ssim_denoised']:.3f}",
            )
    else:
        for col in ("", "PSNR (dB)", "SSIM"):
            table.add_column(col)
        table.add_row("noisy input", f"{m['psnr_noisy']:.2f}", f"{m['ssim_noisy']:.3f}")
        table.add_row("denoised", f"{m['psnr_denoised']:.2f}", f"{m['ssim_denoised']:.3f}")
    console.print(table)
    verdict = "[green]PASSED[/]" if m["passed"] else "[red]FAILED[/]"
    over = " (mean over the sigmas)" if m.get("per_sigma") else ""
    console.print(f"quality gate {verdict}: PSNR gain {m['psnr_gain']:.2f} dB{over}")
    console.print(f"model:  {model['dir']}")
    console.print(f"shards: {result['shards']}")
    console.print(f"store:  {result['store']}")


def _add_global_arguments(parser: argparse.ArgumentParser, top: bool) -> None:
    """--store and --debug, accepted before or after the sub-command (as git
    and pip accept theirs); a sub-command's copy never resets the top one."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--store", default=default, help="output store root (default: $DENOISE_STORE, then ./store)"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="show tracebacks and TensorFlow's own logs",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="denoise", description="Learn to remove noise from images, then clean folders of them."
    )
    _add_global_arguments(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", help="download, corrupt, train and evaluate a denoiser")
    _add_global_arguments(train, top=False)
    _add_train_arguments(train)
    train.set_defaults(handler=_run_train)

    for name, help_text, add, run in (
        ("folder", "denoise every image in a folder", add_folder_arguments, run_folder_command),
        (
            "models",
            "list model versions; promote one; export one to OpenVINO",
            add_models_arguments,
            run_models_command,
        ),
        (
            "serve",
            "serve the scheduled deployments from this process",
            add_serve_arguments,
            run_serve_command,
        ),
        (
            "server",
            "keep a local Prefect server for later commands (start, stop, status)",
            add_server_arguments,
            run_server_command,
        ),
        *_commands_of_their_own(),
    ):
        command = sub.add_parser(name, help=help_text)
        _add_global_arguments(command, top=False)
        add(command)
        command.set_defaults(handler=run)
    return parser


def _commands_of_their_own() -> tuple:
    """Commands whose arguments and handler live in their own modules."""
    from flows.alerts import add_alerts_arguments, run_alerts_command
    from flows.watch import add_watch_arguments, run_watch_command

    return (
        (
            "alerts",
            "messages to a webhook when runs call for attention (add, list, remove, apply)",
            add_alerts_arguments,
            run_alerts_command,
        ),
        (
            "watch",
            "an inbox: denoise files as they land in a folder",
            add_watch_arguments,
            run_watch_command,
        ),
    )


# --------------------------------------------------------------------------- denoise folder


def run_folder_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from artifacts.resolution import resolve_model
    from artifacts.store import Store
    from denoiser.folder import check_folders
    from denoiser.runtimes.runtime import check_runtime, gpu_present, openvino_available
    from flows.denoising import denoise_folder
    from tasks.terminal import quiet_run_failures

    quiet_run_failures(args.debug)
    # usage errors and a missing model fail fast, before a Prefect server starts
    check_folders(args.input_dir, args.output_dir, args.store)
    check_dask_options(args.workers, args.dask_address, args.chunk_files)
    check_runtime(args.runtime)
    Store(args.store).check()
    ref = resolve_model(args.store, args.model)
    from denoiser.nets.models import import_tensorflow_quietly
    from flows.server import finished_despite_api, start_api

    api = start_api()  # a temporary server boots while TensorFlow is imported
    # only the workers run the model in chunks; the export, when it may be chosen, needs no
    # TensorFlow
    in_chunks = args.workers or args.dask_address
    may_use_openvino = (
        args.runtime in ("auto", "openvino")
        and ref.card.openvino_xml_sha256
        and openvino_available()
        and (args.runtime == "openvino" or not gpu_present())
    )
    if not in_chunks and not may_use_openvino:
        import_tensorflow_quietly(args.debug)
    # worker processes inherit the environment: one server for all, not one each
    os.environ["PREFECT_API_URL"] = api()
    with finished_despite_api("denoise_images") as outcome:
        outcome.value = denoise_folder(args.input_dir, args.output_dir, **folder_options(args))
    summary = outcome.value
    c = summary["counts"]
    console = Console(stderr=False)
    model, by_model = summary["model"], summary.get("by_model", {})
    known = {m["version"]: m for m in [model, *(model.get("routes") or {}).values()]}

    def named(version: str) -> str:
        built_in = known.get(version, {}).get("status") == "built in"
        return version + (" (built in)" if built_in else "")

    used = f"{len(by_model)} models" if len(by_model) > 1 else f"model {named(model['version'])}"
    console.print(
        f"{c['denoised']} denoised, {c['skipped']} skipped, {c['failed']} failed "
        f"in {summary['seconds']:.1f} s with {used}"
    )
    for version, routes in by_model.items():
        made = ", ".join(f"{n} {route}" for route, n in routes.items())
        averaged = known.get(version, {}).get("self_ensemble")
        console.print(
            f"  model {named(version)}: {made}"
            + ("; the mean of eight orientations" if averaged else "")
        )
    if summary.get("warning"):
        console.print(f"[yellow]warning:[/] {summary['warning']}", soft_wrap=True)
    console.print(f"output: {summary['output_dir']}")
    console.print(f"report: {summary['report']}")
    if c["failed"]:
        console.print(f"[red]{c['failed']} file(s) failed[/]; see the report for why")
        return 1
    return 0


# --------------------------------------------------------------------------- denoise server


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument(
        "--port", type=int, default=4200, help="the server's port on 127.0.0.1 (default: 4200)"
    )


def run_server_command(args: argparse.Namespace) -> int:
    """A Prefect server kept in the background for this PREFECT_HOME: later
    commands without PREFECT_API_URL use it instead of starting a temporary
    one each, and their runs stay visible in its UI."""
    from denoiser.core.errors import ConfigError
    from flows.server import kept_server_url, start_kept_server, stop_kept_server

    if args.action == "start":
        if not 1 <= args.port <= 65535:
            raise ConfigError(f"--port must be between 1 and 65535, not {args.port}")
        url, started = start_kept_server(args.port)
        ui = url.removesuffix("/api")
        print(
            f"Prefect server {'started' if started else 'already running'} at {ui} (UI); "
            "denoise commands without PREFECT_API_URL use it; stop it with `denoise server stop`"
        )
        return 0
    if args.action == "stop":
        print("Prefect server stopped" if stop_kept_server() else "no kept Prefect server running")
        return 0
    url = kept_server_url()
    print(f"Prefect server at {url.removesuffix('/api')}" if url else "no kept Prefect server")
    return 0 if url else 1


# --------------------------------------------------------------------------- denoise models


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    sub.add_parser("list", help="list model versions (the default)")
    promote_parser = sub.add_parser("promote", help="make VERSION the production model")
    promote_parser.add_argument("version")
    export_parser = sub.add_parser(
        "export", help="make the OpenVINO export of VERSION (trained before exports)"
    )
    export_parser.add_argument("version")
    show_parser = sub.add_parser("show", help="the card of VERSION (a store's or a built-in one)")
    show_parser.add_argument("version")
    build_parser_ = sub.add_parser(
        "build-in",
        help="make the store's VERSION the built-in model of its domain, in the package "
        "(maintainers; $DENOISE_BUILTIN_DIR: another folder)",
    )
    build_parser_.add_argument("version")


def _run_build_in(args: argparse.Namespace, console) -> int:
    from artifacts.builtin import build_in_model
    from artifacts.store import Store
    from denoiser.nets.models import import_tensorflow_quietly

    Store.at(args.store).check()
    import_tensorflow_quietly(args.debug)
    done = build_in_model(args.store, args.version)
    if not done["made"]:
        console.print(f"{args.version} is already the built-in model for {done['domain']}")
        return 0
    console.print(
        f"[green]{args.version}[/] is now the built-in model for {done['domain']}: "
        f"{done['folder']} (OpenVINO export {done['openvino_export']})"
    )
    return 0


def _run_show(args: argparse.Namespace, console) -> int:
    from artifacts.resolution import resolve_model

    ref = resolve_model(args.store, args.version)
    console.print(f"{ref.version}: {ref.status}, {ref.domain}, in {ref.dir}", soft_wrap=True)
    console.print_json(ref.card.to_json())
    return 0


def _run_promote(args: argparse.Namespace, console) -> int:
    from artifacts.builtin import refuse_builtin_change
    from artifacts.registry import promote
    from denoiser.core.errors import ModelNotFound

    try:
        ref = promote(args.store, args.version)
    except ModelNotFound:
        refuse_builtin_change(args.version, "promote")  # a built-in version: say so
        raise
    console.print(f"[green]{ref.version}[/] is now the production model for {ref.domain}")
    return 0


def _run_export(args: argparse.Namespace, console) -> int:
    from artifacts.exports import export_model_version
    from artifacts.store import Store
    from denoiser.nets.models import import_tensorflow_quietly

    Store(args.store).check()
    import_tensorflow_quietly(args.debug)
    facts = export_model_version(args.store, args.version)
    if facts is None:
        console.print(f"{args.version} already has an OpenVINO export")
    else:
        console.print(
            f"[green]{args.version}[/]: OpenVINO export made "
            f"({facts['openvino_bytes']:,} bytes, runs at {facts['openvino_precision']})"
        )
    return 0


def run_models_command(args: argparse.Namespace) -> int:
    import sys

    from rich.console import Console
    from rich.table import Table

    from artifacts.builtin import builtin_root, list_builtins
    from artifacts.registry import list_models
    from artifacts.store import Store
    from denoiser.runtimes.openvino_runtime import precision_on_cpu

    # piped output (scripts, tests) gets whole lines rather than truncated cells
    console = Console() if sys.stdout.isatty() else Console(width=200)
    if getattr(args, "models_command", None) == "promote":
        return _run_promote(args, console)
    if getattr(args, "models_command", None) == "build-in":
        return _run_build_in(args, console)
    if getattr(args, "models_command", None) == "show":
        return _run_show(args, console)
    if getattr(args, "models_command", None) == "export":
        return _run_export(args, console)
    store = Store(args.store)
    store.check()
    models = list_models(store.url)
    builtins = list_builtins()
    if not models and not builtins:
        console.print(f"no models in {store.url}; run `denoise train` first")
        return 0
    table = Table(
        title=f"models in {store.join('models')}"
        + (f" and built in ({builtin_root()})" if builtins else "")
    )
    for col in (
        "version",
        "status",
        "domain",
        "architecture",
        "params",
        "PSNR (dB)",
        "SSIM",
        "gate",
        "OpenVINO",
        "created",
    ):
        table.add_column(col)
    shadowed = {m.domain for m in models if m.status == "production"}
    status = {"production": "[bold green]production[/]", "candidate": "candidate"}
    for m in [*models, *builtins]:
        s = m.summary()
        table.add_row(
            m.version,
            status.get(m.status)
            or ("built in (the store's model first)" if m.domain in shadowed else "built in"),
            m.domain,
            str(s["architecture"]),
            f"{s['params']:,}" if s["params"] else "",
            f"{s['psnr']:.2f}" if s["psnr"] is not None else "",
            f"{s['ssim']:.3f}" if s["ssim"] is not None else "",
            ("passed" if m.passed else "failed") if m.card.quality_gate else "not evaluated",
            # what this CPU will run the export at (a bf16 card runs f32 without bf16 units)
            precision_on_cpu(s["openvino_precision"]) if s["openvino_xml_sha256"] else "no",
            str(s["created"] or ""),
        )
    console.print(table)
    return 0


# --------------------------------------------------------------------------- denoise serve


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit", type=int, default=1, help="flow runs at a time in this process (default 1)"
    )


def run_serve_command(args: argparse.Namespace) -> int:
    from prefect import serve

    from flows.alerts import apply_serve_alerts
    from flows.serve import build_deployments

    deployments = build_deployments(store=args.store)
    apply_serve_alerts()
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
    print(f"serving {names}; Ctrl-C to stop")
    serve(*deployments, limit=args.limit)
    return 0


#: config fields whose flag is not simply --field-name
_FLAGS = {"kind": "--noise-kind", "level": "--noise-level", "dataset": "--dataset"}


def _flag(field: str) -> str:
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    from denoiser.core.errors import first_line

    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        # a check across fields (a model validator) names no field
        return f"invalid {_flag(field)}: {msg}" if field else f"invalid options: {msg}"
    text = first_line(exc)
    field = getattr(exc, "field", None)  # a ConfigError names its field: the CLI adds the flag
    if field and text.startswith(f"invalid {field}: "):
        return text.replace(
            f"invalid {field}: ", f"invalid {field} ({_flag(field.rsplit('.', 1)[-1])}): ", 1
        )
    return text


def _prepare_environment(args: argparse.Namespace) -> None:
    """What the command's processes read from the environment once, set before
    Prefect is imported: --debug for the Dask workers, the kept server's URL."""
    if args.debug:
        os.environ["DENOISE_DEBUG"] = "1"  # Dask workers show their tracebacks too
    if args.command in ("train", "folder", "serve") and not os.environ.get("PREFECT_API_URL"):
        from flows.server import kept_server_url

        # set before Prefect is imported: it reads its settings once
        if url := kept_server_url():
            os.environ["PREFECT_API_URL"] = url


def _remember_ctrl_c() -> list[int]:
    """Ctrl-C raises KeyboardInterrupt as always, and is remembered: a library
    may turn it into another exception (pydantic's serializer makes it a
    PydanticSerializationError) or swallow it, and the command must still end
    as Ctrl-C (130, one line)."""
    seen: list[int] = []

    def interrupt(signum, frame):
        seen.append(signum)
        signal.default_int_handler(signum, frame)

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt)
    return seen


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_environment(debug="--debug" in argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.store is not None and not args.store.strip():
        print("denoise: error: --store is an empty string; give a folder or a URL", file=sys.stderr)
        return 2
    _prepare_environment(args)
    import httpx
    from pydantic import ValidationError

    from denoiser.core.errors import DenoiseError
    from denoiser.core.interrupts import Terminated
    from flows.signals import install_signal_handlers

    install_signal_handlers()
    ctrl_c = _remember_ctrl_c()
    try:
        if args.command != "server":
            from denoiser.core.files import resolve_store_root

            # where the store is, decided once here and passed on as an argument
            args.store = resolve_store_root(args.store)
        code = int(args.handler(args) or 0)
        if ctrl_c:  # a library caught the KeyboardInterrupt: the user's Ctrl-C still ends it
            raise KeyboardInterrupt
        return code
    except Terminated:
        print("denoise: terminated; finished files are kept, rerun to finish", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("denoise: interrupted; finished files are kept, rerun to finish", file=sys.stderr)
        return 130
    except httpx.TransportError as exc:
        if args.debug:
            raise
        print(
            f"denoise: error: lost the Prefect API ({type(exc).__name__}: {_one_line(exc)}); "
            "finished files are kept, rerun to finish",
            file=sys.stderr,
        )
        return 1
    except ValidationError as exc:
        if args.debug:
            raise
        print(f"denoise: {_one_line(exc)}", file=sys.stderr)
        return 2
    except DenoiseError as exc:
        if args.debug:
            raise
        print(f"denoise: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            raise
        if ctrl_c:
            print("denoise: interrupted; finished files are kept, rerun to finish", file=sys.stderr)
            return 130
        print(
            f"denoise: unexpected error: {type(exc).__name__}: {_one_line(exc)} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
