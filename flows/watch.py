"""``denoise watch IN OUT``: an inbox. Files landing in IN are denoised into
OUT, one folder run (the ``denoise-folder`` flow) per burst of arrivals.

- A burst is taken once it has settled: nothing under IN changed for
  ``--settle`` seconds and every file that changed still has the size and
  modification time it had then. The run itself leaves any file modified
  more recently (``denoise_folder(settle=...)``), so a file still being
  written when the run starts (the next burst) is not read half-written; the
  next run takes it.
- Runs into OUT never overlap: ``denoise_folder`` holds a concurrency limit
  keyed by OUT (:mod:`flows.limits`), so a watcher, a deployment triggered by
  its events and a hand-run ``denoise folder`` take turns.
- At start, a run does what was left (a watcher killed mid-run, files that
  landed while none watched); the journal makes it cheap.
- Each burst emits ``denoise.inbox.files-landed`` (count, folders). With
  ``--emit-only`` the watcher only emits, labelled for the
  ``inbox-on-arrival`` deployment of prefect.yaml, whose trigger runs the folder
  where a worker (or ``denoise serve``) serves it.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from denoiser.core.errors import ConfigError, DenoiseError
from denoiser.runtimes.runtime import check_runtime
from flows.folder_options import add_folder_arguments, check_dask_options, folder_options

#: how long a quiet inbox waits before the burst is taken (seconds)
DEFAULT_SETTLE = 2.0


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _files(root: Path, newer_than: float = 0.0) -> Iterator[str]:
    """Files under ``root`` (symlinked folders not followed) modified after ``newer_than``."""
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            st = _stat(path)
            if st is not None and st[1] / 1e9 > newer_than:
                yield path


def _inside(path: str, folder: Path) -> bool:
    return Path(path) == folder or folder in Path(path).parents


def watch_inbox(
    input_dir: str,
    output_dir: str,
    settle: float,
    on_burst: Callable[[int], None],
    stop=None,
) -> None:
    """Call ``on_burst(count)`` once at start when ``input_dir`` holds files,
    then once per settled burst of arrivals: nothing changed under
    ``input_dir`` for ``settle`` seconds, and the files that changed still
    have the size and mtime they had then. Changes under ``output_dir`` (an
    output inside the input) are not arrivals; changes made during a run are
    kept by watchfiles for the next burst, and files modified within
    ``settle`` before a run began (which the run may have left) are retaken."""
    import watchfiles

    src, dst = Path(input_dir).resolve(), Path(output_dir).resolve()
    if next((p for p in _files(src) if not _inside(p, dst)), None):
        on_burst(0)
    pending: dict[str, tuple[int, int] | None] = {}
    last_change = time.monotonic()
    tick = max(50, int(settle * 250))  # ms: a quarter of the settle interval
    for changes in watchfiles.watch(
        src,
        debounce=tick,
        step=min(50, tick),
        rust_timeout=tick,
        yield_on_timeout=True,
        stop_event=stop,
        ignore_permission_denied=True,
    ):
        now = time.monotonic()
        for _, path in changes:
            if not _inside(path, dst):
                pending[path] = _stat(path)
                last_change = now
        if not pending or now - last_change < settle:
            continue
        current = {path: _stat(path) for path in pending}
        if current != pending:  # written to without an event seen yet: not settled
            pending, last_change = current, now
            continue
        started = time.time()
        on_burst(sum(1 for s in current.values() if s is not None))
        pending = {p: _stat(p) for p in _files(src, started - settle) if not _inside(p, dst)}
        last_change = time.monotonic()


def emit_files_landed(input_dir: str, output_dir: str, count: int, run_by: str) -> None:
    """One event per burst: a deployment trigger (prefect.yaml's ``inbox-on-arrival``) can run it."""
    from tasks.events import FILES_LANDED, emit_denoise_event

    emit_denoise_event(
        FILES_LANDED,
        {
            "prefect.resource.id": f"denoise.inbox.{input_dir}",
            "prefect.resource.name": input_dir,
            "denoise.inbox.run-by": run_by,
        },
        {
            "count": count,
            "input_dir": input_dir,
            "output_dir": output_dir,
            "summary": f"{count} file(s) landed in {input_dir}",
        },
    )


def add_watch_arguments(parser: argparse.ArgumentParser) -> None:
    add_folder_arguments(parser)
    parser.add_argument(
        "--settle",
        type=float,
        default=DEFAULT_SETTLE,
        metavar="SECONDS",
        help="a burst is taken once nothing changed in IN for this long, and a file once "
        f"its size and modification time stopped changing (default: {DEFAULT_SETTLE:g})",
    )
    parser.add_argument(
        "--emit-only",
        action="store_true",
        help="only emit denoise.inbox.files-landed per burst: the inbox-on-arrival "
        "deployment's trigger runs the folder (served by a worker or `denoise serve`)",
    )


def run_watch_command(args: argparse.Namespace) -> int:
    """Checks as ``denoise folder`` does, then watches until Ctrl-C or SIGTERM."""
    from artifacts.resolution import resolve_model
    from artifacts.store import Store
    from denoiser.folder import check_folders
    from denoiser.folder.trees import resolve_location
    from flows.server import ensure_api

    if not 0 < args.settle <= 3600:
        raise ConfigError(f"--settle must be between 0 and 3600 seconds, not {args.settle}")
    if args.emit_only:
        refuse_deployment_options(args)
    src, dst = check_folders(args.input_dir, args.output_dir)
    if not isinstance(src.root, Path):
        raise ConfigError(f"watch: IN must be a local folder, not {args.input_dir}")
    check_dask_options(args.workers, args.dask_address, args.chunk_files)
    check_runtime(args.runtime)
    input_dir, output_dir = resolve_location(args.input_dir), resolve_location(args.output_dir)
    if not args.emit_only:
        Store(args.store).check()
        resolve_model(args.store, args.model)
    os.environ["PREFECT_API_URL"] = ensure_api()
    how = "emitting events for the inbox-on-arrival deployment" if args.emit_only else "denoising"
    print(f"watching {input_dir} -> {output_dir} ({how}; settle {args.settle:g} s); Ctrl-C to stop")

    def on_burst(count: int) -> None:
        emit_files_landed(
            input_dir, output_dir, count, "deployment" if args.emit_only else "watcher"
        )
        if args.emit_only:
            print(f"{count} file(s) landed; event emitted", flush=True)
            return
        print(f"{count or 'files left from before:'} file(s) landed; denoising", flush=True)
        _run_folder(args, input_dir, output_dir)

    watch_inbox(input_dir, output_dir, args.settle, on_burst)
    return 0


#: the folder options the inbox-on-arrival deployment takes from its own parameters
#: (prefect.yaml), with their defaults: given to ``--emit-only``, they would be dropped
DEPLOYMENT_DECIDES = {
    "model": ("--model", None),
    "overwrite": ("--overwrite", False),
    "pattern": ("--pattern", "*"),
    "format": ("--format", "same"),
    "workers": ("--workers", None),
    "chunk_files": ("--chunk-files", None),
    "runtime": ("--runtime", "auto"),
    "self_ensemble": ("--self-ensemble", False),
}


def refuse_deployment_options(args: argparse.Namespace) -> None:
    """``--emit-only`` with a folder option the deployment decides: refused in one line."""
    for name, (flag, default) in DEPLOYMENT_DECIDES.items():
        if getattr(args, name) != default:
            raise ConfigError(
                f"--emit-only: {flag} is the inbox-on-arrival deployment's to decide (its "
                "parameters in prefect.yaml); give it there, or watch without --emit-only"
            )


def _run_folder(args: argparse.Namespace, input_dir: str, output_dir: str) -> None:
    """One folder run; a failed run is one line, and the watcher goes on."""
    from flows.denoising import denoise_folder
    from flows.server import finished_despite_api

    try:
        with finished_despite_api("denoise_images") as outcome:
            outcome.value = denoise_folder(
                input_dir, output_dir, **folder_options(args), settle=args.settle
            )
    except (DenoiseError, OSError, RuntimeError) as exc:
        print(f"denoise watch: the run failed: {type(exc).__name__}: {exc}", flush=True)
        return
    c = outcome.value["counts"]
    print(
        f"{c['denoised']} denoised, {c['skipped']} skipped, {c['failed']} failed "
        f"in {outcome.value['seconds']:.1f} s; report {outcome.value['report']}",
        flush=True,
    )
