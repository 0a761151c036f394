"""Task: judge a trained model on the test split; the card records the verdict."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.states import Completed, State

from artifacts.render import markdown_image, markdown_table, table_rows
from artifacts.store import Store
from denoiser.cards import CARD_FILE, CardMetrics, ModelCard, load_card
from denoiser.config import EvalConfig
from denoiser.domains import domain_of_manifest
from denoiser.faults import failpoint
from denoiser.files import is_url
from denoiser.models import load_model
from denoiser.openvino_runtime import BIN_FILE, XML_FILE, load_openvino, precision_to_run
from denoiser.quality import judge_quality
from denoiser.runtime import openvino_available
from denoiser.shards import read_manifest
from tasks.events import emit_gate_failed
from tasks.publish import Publisher

CONVENTION = (
    "PSNR is the per-image mean on [0, 1] floats (10·log10(1/MSE) per image, then the "
    "mean; outputs clipped to [0, 1]); SSIM uses scikit-image's defaults (7x7 uniform window), "
    "data range 1."
)


def _write(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data if isinstance(data, bytes) else data.encode())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@task(name="evaluate_denoiser", cache_policy=NO_CACHE)
def evaluate_denoiser(model_dir: str, shards_dir: str, evaluation: EvalConfig) -> State:
    """Scores the model on the shard set's test split: MNIST-style pairs as
    stored, a patch set's whole test images with awgn at each of
    ``evaluation.sigmas``; writes metrics.json, samples.png, report.md and the
    verdict into the card, and publishes the table and the report. ``model_dir``
    may be in a remote store: its files are staged and the new ones pushed, the
    card last. Returns the metrics in a COMPLETED state, named "Gate failed"
    (with the figures as its message, and a ``denoise.quality-gate.failed``
    event) when the model failed its gate: the UI shows the verdict on the
    task run; callers take ``return_state=True`` and ``.result()``."""
    store = Store.at(model_dir.rsplit("/models/", 1)[0] if is_url(model_dir) else model_dir)
    with store.stage() as stage:
        folder = stage.pull(model_dir, files=("model.json", "model.keras", XML_FILE, BIN_FILE))
        result = _evaluate(folder, shards_dir, EvalConfig.model_validate(evaluation))
        where = stage.push(folder, last=("model.json",))
    result = {
        **result,
        "report": f"{where}/report.md",
        "samples": f"{where}/samples.png",
        "model_dir": where,
    }
    if result["passed"]:
        return Completed(data=result)
    summary = gate_summary(result)
    emit_gate_failed(result["version"], gate_figures(result), summary)
    return Completed(data=result, name="Gate failed", message=summary)


def gate_figures(result: dict) -> dict:
    """The figures a gate verdict is made of, for an event's payload."""
    keys = ("psnr_gain", "min_psnr_gain", "psnr_denoised", "psnr_noisy", "ssim_denoised")
    return {k: round(float(result[k]), 4) for k in keys} | {"test_images": result["test_images"]}


def gate_summary(result: dict) -> str:
    """A failed gate in one line, with its figures."""
    return (
        f"model {result['version']} failed its quality gate: PSNR gain "
        f"{result['psnr_gain']:.2f} dB < {result['min_psnr_gain']:.2f} dB required "
        f"(PSNR {result['psnr_denoised']:.2f} dB denoised, {result['psnr_noisy']:.2f} dB noisy, "
        f"SSIM {result['ssim_denoised']:.3f}, {result['test_images']:,} test images)"
    )


def _evaluate(folder: Path, shards_dir: str, evaluation: EvalConfig) -> dict:
    logger = get_run_logger()
    card = load_card(folder)
    # the model file the card describes, or a one-line ModelError
    model = load_model(folder / "model.keras", expected_sha256=card.model_sha256)
    domain = domain_of_manifest(read_manifest(shards_dir))
    metrics, samples, rows, table, caption = domain.evaluate(model, card, shards_dir, evaluation)
    overall = metrics["overall"]
    exported = _score_openvino(folder, card, shards_dir, evaluation, overall["psnr_denoised"])
    gate = judge_quality(metrics, evaluation.min_psnr_gain)
    passed = gate.passed

    _write(folder / "samples.png", samples)
    _write(
        folder / "metrics.json", json.dumps({**metrics, "quality_gate": gate.to_dict()}, indent=2)
    )
    failpoint("evaluate.before_card")
    card = load_card(folder).model_copy(
        update={"metrics": CardMetrics.model_validate(overall), "quality_gate": gate, **exported}
    )
    _write(folder / CARD_FILE, card.to_json())  # model_sha256 and the rest kept as read

    verdict = "PASSED" if passed else "FAILED"
    cols = list(dict.fromkeys(c for r in rows for c in r))
    publisher = Publisher(logger)
    publisher.publish(
        create_table_artifact,
        key="evaluation-metrics",
        table=table_rows([{c: r.get(c) for c in cols} for r in rows]),
        description=f"Test-set metrics of {card.version}",
    )
    gain_text = "mean PSNR gain over the sigmas" if "per_sigma" in metrics else "PSNR gain"
    report = (
        f"# Evaluation of {card.version} ({card.architecture}, {card.params:,} parameters)\n\n"
        f"Quality gate **{verdict}**: {gain_text} {overall['psnr_gain']:.2f} dB "
        f"(minimum {evaluation.min_psnr_gain:.2f} dB).\n\n"
        + markdown_table(table)
        + f"\n\n{overall['count']:,} test images. {CONVENTION}\n\n{caption}\n\n"
    )
    # report.md links the PNG beside it; the artifact inlines it (the PNG encoded once, here)
    _write(folder / "report.md", report + "![clean, noisy and denoised](samples.png)\n")
    publisher.publish(
        create_markdown_artifact,
        key="evaluation-report",
        markdown=report + markdown_image(samples, "clean, noisy and denoised test images") + "\n",
        description=f"Evaluation report of {card.version}",
    )
    publisher.close()
    log = logger.info if passed else logger.warning
    log(
        "%s: PSNR %.2f dB (noisy %.2f dB), SSIM %.3f; quality gate %s",
        card.version,
        overall["psnr_denoised"],
        overall["psnr_noisy"],
        overall["ssim_denoised"],
        verdict,
    )
    for row in metrics.get("per_sigma", []):
        logger.info(
            "sigma %g: PSNR %.2f dB (noisy %.2f dB), SSIM %.3f",
            row["sigma"],
            row["psnr_denoised"],
            row["psnr_noisy"],
            row["ssim_denoised"],
        )
    return {
        "psnr_noisy": overall["psnr_noisy"],
        "psnr_denoised": overall["psnr_denoised"],
        "psnr_gain": overall["psnr_gain"],
        "ssim_noisy": overall["ssim_noisy"],
        "ssim_denoised": overall["ssim_denoised"],
        "mse_denoised": overall["mse_denoised"],
        "bce_denoised": overall.get("bce_denoised"),
        "passed": passed,
        "version": card.version,
        "min_psnr_gain": evaluation.min_psnr_gain,
        "test_images": overall["count"],
        "per_sigma": [
            {
                k: r[k]
                for k in (
                    "sigma",
                    "psnr_noisy",
                    "psnr_denoised",
                    "psnr_gain",
                    "ssim_noisy",
                    "ssim_denoised",
                )
            }
            for r in metrics.get("per_sigma", [])
        ],
    }


def _score_openvino(
    folder: Path, card: ModelCard, shards_dir: str, evaluation: EvalConfig, keras_psnr: float
) -> dict:
    """The OpenVINO export scored at bf16 (where the CPU has it) on the same
    noisy test images as Keras, by the domain's own evaluator: the card's
    ``openvino_psnr``, ``keras_psnr``, ``openvino_scored_at`` and the
    ``openvino_precision`` it is to run at (f32 when bf16 loses too much).
    ``{}`` without an export or OpenVINO."""
    if not (card.openvino_xml_sha256 and card.openvino_bin_sha256) or not openvino_available():
        return {}
    logger = get_run_logger()
    model = load_openvino(
        folder / XML_FILE,
        folder / BIN_FILE,
        card.openvino_xml_sha256,
        card.openvino_bin_sha256,
        precision="bf16",
    )
    domain = domain_of_manifest(read_manifest(shards_dir))
    got = domain.evaluate(model, card, shards_dir, evaluation)[0]["overall"]["psnr_denoised"]
    precision = precision_to_run(keras_psnr, got, model.precision)
    (logger.info if precision == "bf16" else logger.warning)(
        "OpenVINO export at %s: PSNR %.3f dB, Keras fp32 %.3f dB; it runs at %s",
        model.precision,
        got,
        keras_psnr,
        precision,
    )
    return {
        "openvino_psnr": round(float(got), 4),
        "keras_psnr": round(float(keras_psnr), 4),
        "openvino_scored_at": model.precision,
        "openvino_precision": precision,
    }
