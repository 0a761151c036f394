"""Tasks: pick the model, then denoise a folder with it, reporting every file."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from artifacts.render import markdown_image, markdown_table, table_rows
from artifacts.resolution import resolve_model
from artifacts.routes import (
    models_by_domain,
    one_pass_warnings,
    primary_domain,
    route_warnings,
)
from artifacts.store import Store, local_copy
from denoiser.core.errors import ConfigError, DenoiseError, first_line
from denoiser.domains import DOMAINS, by_domain, survey_folder
from denoiser.folder import (
    BatchPredictor,
    ChunkFiles,
    FileResult,
    OutputRecord,
    SelfEnsemble,
    compact_journal,
    count,
    denoise_chunk_files,
    denoise_tree,
    display_path,
    plan_folder,
    prepare_output,
)
from denoiser.folder.routing import Denoiser, Router
from denoiser.folder.run_report import SUMMARY_JSON, report_folder_name, write_run_report
from denoiser.folder.trees import open_tree
from denoiser.imaging.plots import grid_png
from denoiser.nets.models import import_tensorflow_quietly, load_model
from denoiser.runtimes.inference import check_fits, tile_spec_for_model
from denoiser.runtimes.openvino_runtime import DEFAULT_PRECISION, load_openvino
from denoiser.runtimes.runtime import check_runtime, choose_runtime
from tasks.events import emit_files_failed
from tasks.publish import ProgressArtifact, Publisher, remember_outcome

REPORT_ROWS_IN_UI = 500


@task(name="resolve_denoiser", cache_policy=NO_CACHE)
def resolve_denoiser(
    model: str | None,
    store_root: str,
    input_dir: str | None = None,
    pattern: str = "*",
    runtime: str = "auto",
    self_ensemble: bool = False,
) -> dict:
    """The models to use, traceable: for each domain of images (colour or
    grey photographs, digits) the model that denoises them
    (:func:`artifacts.routes.models_by_domain`; ``model`` forces one for
    all), each with its version, card facts, data manifest hash and runtime
    (``routes``); ``needed``: the domains ``input_dir``'s images were seen
    to need (their models are loaded first); the top-level facts are those of
    the first of them (the report's model). ``warning``: one line per domain
    whose model learned other images, and the models that run one pass
    though a self-ensemble was asked for. ``runtime``: what runs each model,
    Keras or its OpenVINO export (``auto``: OpenVINO on a CPU when the model
    has its export, else Keras; see :func:`denoiser.runtimes.runtime.choose_runtime`).
    ``self_ensemble``: each model of a domain without an up or a left
    (photographs) runs on the eight flips and rotations of its input
    (``self_ensemble`` in its facts)."""
    logger = get_run_logger()
    check_runtime(runtime)  # asked for a runtime that is not one: refused for every model
    domains = survey_folder(input_dir, pattern) if input_dir else None
    refs = models_by_domain(store_root, model)
    first = primary_domain(domains)
    routes = {
        d: _model_facts(ref, runtime, d in (domains or ()), self_ensemble)
        for d, ref in refs.items()
    }
    for d in sorted(domains or ()):
        facts = routes[d]
        logger.info(
            "%s: model %s (%s, %s), run by %s%s",
            d,
            facts["version"],
            facts["status"],
            facts["domain"],
            facts["runtime"],
            ", eight orientations averaged" if facts["self_ensemble"] else "",
        )
    warnings = route_warnings(store_root, refs, domains)
    warnings += one_pass_warnings(routes, domains) if self_ensemble else []
    warning = "; ".join(warnings) or None
    if warning:
        logger.warning(warning)
    top = (
        routes[first]
        if first
        else _model_facts(resolve_model(store_root, model), runtime, True, self_ensemble)
    )
    return {
        **top,
        "images_domain": first,
        "warning": warning,
        "routes": routes,
        "needed": sorted(domains or ()),
        "forced": model is not None,
    }


def _model_facts(ref, runtime: str, needed: bool, self_ensemble: bool = False) -> dict:
    """A model's summary with the runtime chosen for it (one not seen to be
    needed falls back to Keras when the runtime asked for does not fit it)
    and whether it runs as a self-ensemble (asked for, and its domain's
    images have no up or left)."""
    try:
        chosen = choose_runtime(
            runtime,
            ref.card.openvino_xml_sha256 is not None and ref.card.openvino_bin_sha256 is not None,
        )
    except ConfigError:
        if needed:
            raise
        chosen = "keras"
    ensemble = self_ensemble and DOMAINS[ref.domain].orientation_free
    return {**ref.summary(), "runtime": chosen, "self_ensemble": ensemble}


class _Progress:
    """Progress artifact (throttled: one update a second, sent in the background)
    and, on a terminal, a rich bar (:class:`denoiser.learning.progress.FilesBar`)."""

    def __init__(self, total: int, done: int, started: float, publisher: Publisher):
        self.artifact = ProgressArtifact(publisher, "denoise-progress", "Files processed")
        self.artifact.update(0.0)
        self.last = 0.0
        self.bar = None
        if sys.stderr.isatty() and total:
            from denoiser.learning.progress import FilesBar

            # the files before this one were decided by the scan, all at once: not in the rate
            self.bar = FilesBar(total, done=max(done - 1, 0), started=started)

    def __call__(self, result: FileResult, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(done, denoised=result.status == "denoised")
        now = time.monotonic()
        if now - self.last > 1.0 or done == total:
            self.last = now
            self.artifact.update(100.0 * done / max(total, 1))

    def chunk(self, done: int, total: int, denoised: int) -> None:
        """A chunk of files finished, ``denoised`` of them denoised."""
        if self.bar is not None:
            self.bar.update(done, denoised=denoised)
        self.artifact.update(100.0 * done / max(total, 1))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _thumbnails(results: list[FileResult], input_dir: str, output_dir: str, k: int = 4) -> str:
    """Before and after of the first ``k`` denoised files, colour images in colour."""
    from denoiser.folder.trees import open_tree
    from denoiser.imaging.images import decode_image

    before, after = [], []
    try:
        src = open_tree(input_dir, "input", must_exist=True)
        dst = open_tree(output_dir, "output", must_exist=False)
    except (DenoiseError, OSError):
        return ""
    for r in results:
        if r.status != "denoised" or len(before) == k:
            continue
        try:
            a = decode_image(src.read(src.path(r.path)))
            b = decode_image(dst.read(dst.path(dst.rel_of_shown(r.output))))
        except (DenoiseError, OSError):
            continue
        before.append(_thumbnail(a))
        after.append(_thumbnail(b))
    if not before:
        return ""
    if any(t.ndim == 3 for t in before + after):  # one colour image: the rows in colour
        before, after = ([_as_rgb(t) for t in row] for row in (before, after))
    return "Top: input, bottom: denoised.\n\n" + markdown_image(
        grid_png([np.stack(before), np.stack(after)]), "before and after"
    )


def _thumbnail(image) -> np.ndarray:
    """A 64x64 uint8 thumbnail: (64, 64, 3) RGB for a colour image, else grey."""
    from PIL import Image

    from denoiser.imaging.images import is_colour, rgb_pixels

    pixels = rgb_pixels(image) if is_colour(image) else image.luma
    img = Image.fromarray(np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    return np.asarray(img.resize((64, 64)))


def _as_rgb(thumbnail: np.ndarray) -> np.ndarray:
    return thumbnail if thumbnail.ndim == 3 else np.repeat(thumbnail[..., None], 3, axis=-1)


_LOADED: dict[tuple, tuple] = {}  # per process: a Dask worker loads each model once


def _predictor(model: dict):
    """The model's predictor and tile spec, loaded once per process and kept:
    the Keras model, or its OpenVINO export when ``model["runtime"]``
    says so (then nothing of TensorFlow is imported). Each file is checked
    against the card's checksum when the card has one."""
    runtime = model.get("runtime", "keras")
    ensemble = bool(model.get("self_ensemble"))
    key = (str(model["model_path"]), model.get("model_sha256"), runtime, ensemble)
    if key not in _LOADED:
        if runtime == "openvino":
            loaded = load_openvino(
                local_copy(model["openvino_xml_path"], model.get("openvino_xml_sha256")),
                local_copy(model["openvino_bin_path"], model.get("openvino_bin_sha256")),
                model.get("openvino_xml_sha256"),
                model.get("openvino_bin_sha256"),
                model.get("openvino_precision") or DEFAULT_PRECISION,
            )
        else:
            import_tensorflow_quietly()  # its C++ start-up lines only with --debug
            loaded = load_model(
                local_copy(model["model_path"], model.get("model_sha256")),
                expected_sha256=model.get("model_sha256"),
            )
        spec = tile_spec_for_model(loaded, model.get("architecture"))
        name = model.get("version") or str(model["model_path"])
        check_fits(loaded, spec, name, card_channels(model))
        _LOADED[key] = (BatchPredictor(SelfEnsemble(loaded) if ensemble else loaded), spec)
    return _LOADED[key]


def card_channels(model: dict) -> int:
    """The channels a model takes by its card: its domain's (a model without
    a card counts as grey); :func:`_predictor` refuses one whose shape says otherwise."""
    domain = DOMAINS.get(model.get("domain") or "")
    return domain.channels if domain is not None else 1


def _denoiser(model: dict) -> Denoiser:
    """A model (its summary) loaded once per process, as the folder pipeline runs it."""
    predictor, spec = _predictor(model)
    return Denoiser(model["version"], predictor, spec, card_channels(model))


def needed_models(chosen: dict) -> list[dict]:
    """The models the folder's images were seen to need (each once): what is
    loaded before any image is read (on every worker for chunks)."""
    routes = chosen.get("routes") or {}
    found = {routes[d]["model_path"]: routes[d] for d in chosen.get("needed", []) if d in routes}
    return list(found.values()) or [chosen]


def _router(chosen: dict) -> Router:
    """Each image to its domain's model (loaded when first needed), or,
    forced, every image to the one model; the needed ones loaded now."""
    for model in needed_models(chosen):
        _denoiser(model)
    routes = chosen.get("routes")
    if not routes or chosen.get("forced"):
        one = _denoiser(chosen)
        return Router(lambda image: one)
    return by_domain(lambda domain: _denoiser(routes[domain]))


def one_line(exc: BaseException) -> str:
    """An exception as ``Class: first line of its message``."""
    name = type(exc).__name__
    return f"{name}: {first_line(exc)}" if str(exc).strip() else name


@task(name="denoise_images", cache_policy=NO_CACHE)
def denoise_images(
    input_dir: str,
    output_dir: str,
    model: dict,
    overwrite: bool,
    pattern: str,
    format: str,
    store_root: str,
    settle: float = 0.0,
) -> dict:
    """The whole folder in this process, with a live progress bar and artifact."""
    logger = get_run_logger()
    router = _router(model)
    started = time.perf_counter()
    publisher = Publisher(logger)
    progress = None
    began = time.monotonic()  # the bar's clock: it appears only with the first finished file

    def on_result(result: FileResult, done: int, total: int) -> None:
        nonlocal progress
        if progress is None:
            progress = _Progress(total, done, began, publisher)
        if result.status == "failed":
            logger.warning("%s: %s", result.path, result.error)
        progress(result, done, total)

    try:
        results = denoise_tree(
            input_dir,
            output_dir,
            router,
            pattern=pattern,
            fmt=format,
            overwrite=overwrite,
            on_result=on_result,
            settle=settle,
        )
    except BaseException:
        publisher.close(timeout=1)  # its thread ends with the task, whatever ended it
        raise
    finally:
        if progress is not None:
            progress.close()
    return _report(
        results,
        input_dir,
        output_dir,
        model,
        time.perf_counter() - started,
        store_root,
        logger,
        publisher,
    )


@task(name="plan_denoise_chunks", cache_policy=NO_CACHE)
def plan_denoise_chunks(
    input_dir: str,
    output_dir: str,
    pattern: str,
    format: str,
    overwrite: bool,
    chunk_files: int | None,
    workers: int,
    settle: float = 0.0,
) -> dict:
    """Scan the folder once; the chunks (relative paths) each become a task."""
    plan = plan_folder(
        input_dir,
        output_dir,
        pattern=pattern,
        fmt=format,
        overwrite=overwrite,
        chunk_files=chunk_files,
        workers=workers,
        settle=settle,
    )
    get_run_logger().info(
        "%d files to look at in %d chunks of up to %d (for %d workers); %d decided by the scan",
        sum(map(len, plan.chunks)),
        len(plan.chunks),
        max(map(len, plan.chunks), default=0),
        workers,
        len(plan.verdicts),
    )
    return {
        "verdicts": [asdict(r) for r in plan.verdicts],
        "chunks": plan.chunks,
        "records": [[asdict(r) for r in part] for part in plan.records],
        "total": plan.total,
        "started": time.time(),
    }


# a worker that dies mid-chunk makes Dask run the chunk again elsewhere; a failure
# inside it is retried here; either way a rerun redoes only what is not finished
@task(name="denoise_chunk", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def denoise_chunk(
    input_dir: str,
    output_dir: str,
    files: ChunkFiles,
    model: dict,
    overwrite: bool,
    format: str,
) -> list[dict]:
    logger = get_run_logger()
    results = denoise_chunk_files(
        input_dir,
        output_dir,
        files.rels,
        _router(model),
        fmt=format,
        overwrite=overwrite,
        records=[OutputRecord(**r) for r in files.records],
    )
    for r in results:
        if r.status == "failed":
            logger.warning("%s: %s", r.path, r.error)
    c = count(results)
    logger.info("%d denoised, %d skipped, %d failed", c["denoised"], c["skipped"], c["failed"])
    return [asdict(r) for r in results]


def chunk_files_of(plan: dict) -> list[ChunkFiles]:
    """The plan's chunks, each one object for its task (see :class:`ChunkFiles`)."""
    return [
        ChunkFiles(rels, records)
        for rels, records in zip(plan["chunks"], plan["records"], strict=True)
    ]


def collect_chunks(futures: list, plan: dict) -> list[list[dict] | str]:
    """Every chunk's outcome (:func:`chunk_outcome`), in the plan's order,
    gathered as chunks finish: the run's progress artifact and, on a
    terminal, a bar over the files move with each one."""
    from prefect.futures import as_completed

    sizes = {id(f): len(rels) for f, rels in zip(futures, plan["chunks"], strict=True)}
    decided = len(plan["verdicts"])
    publisher = Publisher(get_run_logger())
    progress = _Progress(plan["total"], decided + 1, time.monotonic(), publisher)
    outcomes: dict[int, list[dict] | str] = {}
    done = decided
    try:
        for future in as_completed(futures):
            outcome = outcomes[id(future)] = chunk_outcome(future)
            denoised = (
                sum(r["status"] == "denoised" for r in outcome) if isinstance(outcome, list) else 0
            )
            done += sizes[id(future)]
            progress.chunk(done, plan["total"], denoised)
    finally:
        progress.close()
        publisher.close(timeout=5)
    return [outcomes[id(f)] for f in futures]


def chunk_outcome(future) -> list[dict] | str:
    """A chunk task's file results, or, when it failed for good (its worker
    died once too often, the model did not load there), why, in one line: the
    report then lists its files as failed instead of the run losing its report."""
    outcome = future.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        return one_line(outcome)
    return outcome


@task(name="report_folder_run", cache_policy=NO_CACHE)
def report_folder_run(
    input_dir: str,
    output_dir: str,
    plan: dict,
    chunks: list[list[dict] | str],
    model: dict,
    store_root: str,
) -> dict:
    """Merge the chunks' results into the run's report, summary and artifacts."""
    logger = get_run_logger()
    compact_journal(output_dir)
    # temporary files of a worker killed mid-file
    if stale := prepare_output(open_tree(output_dir, "output", must_exist=False)):
        logger.info("removed %d temporary files of writers that died", stale)
    results = [FileResult(**r) for r in plan["verdicts"]]
    for rels, part in zip(plan["chunks"], chunks, strict=True):
        if isinstance(part, str):  # the chunk failed for good: its files are reported, not lost
            logger.error("a chunk of %d files failed: %s", len(rels), part)
            results += [
                FileResult(display_path(rel), "failed", f"chunk failed: {part}") for rel in rels
            ]
        else:
            results += [FileResult(**r) for r in part]
    return _report(
        results,
        input_dir,
        output_dir,
        model,
        time.time() - plan["started"],
        store_root,
        logger,
        Publisher(logger),
    )


def _model_rows(model: dict, by_model: dict[str, dict[str, int]]) -> list[dict]:
    """The summary's table of models: each model that made outputs (else the
    report's model), with how many it made by each route."""
    known = {m["version"]: m for m in [model, *(model.get("routes") or {}).values()]}
    rows = []
    for version in by_model or {model["version"]: {}}:
        m = known.get(version, {"version": version})
        rows.append(
            {
                "model": version,
                "status": m.get("status"),
                "domain": m.get("domain"),
                "architecture": m.get("architecture"),
                "test PSNR": m.get("psnr"),
                "run by": m.get("runtime", "")
                + (", mean of eight orientations" if m.get("self_ensemble") else ""),
                "data manifest sha256": (m.get("data_manifest_sha256") or "")[:16],
                "outputs": ", ".join(
                    f"{n} {route}" for route, n in by_model.get(version, {}).items()
                ),
            }
        )
    return rows


def _report(
    results: list[FileResult],
    input_dir: str,
    output_dir: str,
    model: dict,
    seconds: float,
    store_root: str,
    logger,
    publisher: Publisher,
) -> dict:
    """The per-file CSV (by path, however the work was split) and summary.json
    in the store's reports, and the artifacts."""
    results = sorted(results, key=lambda r: r.path)
    # a remote store's report is written on a local stage, then pushed, the summary last
    store = Store.at(store_root)
    location = store.report(report_folder_name(flow_run.name))
    with store.staged(location, last=(SUMMARY_JSON,)) as report_dir:
        summary = write_run_report(
            report_dir,
            location,
            results,
            input_dir,
            output_dir,
            model,
            seconds,
            str(flow_run.id) if flow_run.id else None,
        )
    counts, report = summary["counts"], summary["report"]

    rows = [
        {
            "path": r.path,
            "bytes": r.bytes,
            "mode": r.mode,
            "size": f"{r.width}x{r.height}" if r.width else "",
            "status": r.status,
            "error": r.error,
            "reason": r.reason,
            "model": r.model,
            "route": r.route,
            "ms": r.ms,
        }
        for r in results
    ]
    publisher.publish(
        create_table_artifact,
        key="denoise-report",
        table=table_rows(rows[:REPORT_ROWS_IN_UI]),
        description=f"Per-file report ({len(rows)} files; all in {report})",
    )
    facts = [{"": k, "files": v} for k, v in counts.items()]
    model_facts = markdown_table(_model_rows(model, summary.get("by_model", {})))
    publisher.publish(
        create_markdown_artifact,
        key="denoise-summary",
        markdown=(
            f"# Denoised {summary['input_dir']}\n\ninto `{summary['output_dir']}` in {seconds:.1f} s\n\n"
            + (f"**Warning:** {summary['warning']}\n\n" if summary["warning"] else "")
            + f"{markdown_table(facts)}\n\n## Model\n\n{model_facts}\n\nModel file `{model['model_path']}`"
            f" (its card: `model.json` beside it).\n\nFull report: `{report}`\n\n"
            f"{_thumbnails(results, input_dir, output_dir)}\n"
        ),
        description="Folder denoising summary",
    )
    logger.info(
        "%d denoised, %d skipped, %d failed in %.1f s; report %s",
        counts["denoised"],
        counts["skipped"],
        counts["failed"],
        seconds,
        report,
    )
    if counts["failed"]:
        emit_files_failed(summary)  # what an alert (flows/alerts.py) tells
    remember_outcome("denoise_images", summary)
    publisher.close()
    return summary
