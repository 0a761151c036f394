"""Judging a trained model: its domain's evaluator on the shard set's test
split, its OpenVINO export scored beside Keras, the quality gate, and the
files the verdict leaves in the model's folder (``samples.png``,
``metrics.json``, the card with ``metrics`` and ``quality_gate``).

Works on a local model folder (a remote store's is staged by the caller);
every file is written atomically, the card last.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from denoiser.config import EvalConfig
from denoiser.core.cards import CARD_FILE, CardMetrics, ModelCard, load_card
from denoiser.core.faults import failpoint
from denoiser.core.files import write_bytes_atomic, write_text_atomic
from denoiser.data.shards import read_manifest
from denoiser.domains import domain_of_manifest
from denoiser.learning.quality import judge_quality
from denoiser.nets.models import load_model
from denoiser.runtimes.openvino_runtime import BIN_FILE, XML_FILE, load_openvino, precision_to_run
from denoiser.runtimes.runtime import openvino_available

logger = logging.getLogger(__name__)

#: how the figures are computed, for every report
CONVENTION = (
    "PSNR is the per-image mean on [0, 1] floats (10·log10(1/MSE) per image, then the "
    "mean; outputs clipped to [0, 1]); SSIM uses scikit-image's defaults (7x7 uniform window), "
    "data range 1."
)
#: the files a model folder needs to be evaluated (what a remote store's stage pulls)
MODEL_FILES = (CARD_FILE, "model.keras", XML_FILE, BIN_FILE)
PER_SIGMA_KEYS = (
    "sigma",
    "psnr_noisy",
    "psnr_denoised",
    "psnr_gain",
    "ssim_noisy",
    "ssim_denoised",
)


@dataclass(frozen=True)
class Evaluation:
    """A model's verdict: the summary a caller gets (figures, ``passed``,
    ``version``), the card as rewritten, the metrics, the metrics table's
    rows, the report's table and caption, and the sample grid (PNG bytes)."""

    summary: dict
    card: ModelCard
    metrics: dict
    rows: list[dict]
    table: list[dict]
    caption: str
    samples: bytes


def evaluate_model(
    folder: str | Path,
    shards_dir: str,
    evaluation: EvalConfig,
    log: logging.Logger | logging.LoggerAdapter = logger,
) -> Evaluation:
    """Score the model in ``folder`` on ``shards_dir``'s test split with its
    domain's evaluator, score its OpenVINO export beside it, judge the gate,
    and write ``samples.png``, ``metrics.json`` and the card (last)."""
    folder = Path(folder)
    evaluation = EvalConfig.model_validate(evaluation)
    card = load_card(folder)
    # the model file the card describes, or a one-line ModelError
    model = load_model(folder / "model.keras", expected_sha256=card.model_sha256)
    domain = domain_of_manifest(read_manifest(shards_dir))
    metrics, samples, rows, table, caption = domain.evaluate(model, card, shards_dir, evaluation)
    overall = metrics["overall"]
    exported = score_openvino(folder, card, shards_dir, evaluation, overall["psnr_denoised"], log)
    gate = judge_quality(metrics, evaluation.min_psnr_gain)

    write_bytes_atomic(folder / "samples.png", samples)
    write_text_atomic(
        folder / "metrics.json", json.dumps({**metrics, "quality_gate": gate.to_dict()}, indent=2)
    )
    failpoint("evaluate.before_card")
    card = load_card(folder).model_copy(
        update={"metrics": CardMetrics.model_validate(overall), "quality_gate": gate, **exported}
    )
    write_text_atomic(folder / CARD_FILE, card.to_json())  # model_sha256 and the rest as read
    log_verdict(card.version, metrics, gate.passed, log)
    summary = {
        **{k: overall[k] for k in ("psnr_noisy", "psnr_denoised", "psnr_gain")},
        **{k: overall[k] for k in ("ssim_noisy", "ssim_denoised", "mse_denoised")},
        "bce_denoised": overall.get("bce_denoised"),
        "passed": gate.passed,
        "version": card.version,
        "min_psnr_gain": evaluation.min_psnr_gain,
        "test_images": overall["count"],
        "per_sigma": [{k: r[k] for k in PER_SIGMA_KEYS} for r in metrics.get("per_sigma", [])],
    }
    return Evaluation(summary, card, metrics, rows, table, caption, samples)


def log_verdict(version: str, metrics: dict, passed: bool, log) -> None:
    """The verdict in the log: the overall figures, then a line per sigma."""
    overall = metrics["overall"]
    (log.info if passed else log.warning)(
        "%s: PSNR %.2f dB (noisy %.2f dB), SSIM %.3f; quality gate %s",
        version,
        overall["psnr_denoised"],
        overall["psnr_noisy"],
        overall["ssim_denoised"],
        "PASSED" if passed else "FAILED",
    )
    for row in metrics.get("per_sigma", []):
        log.info(
            "sigma %g: PSNR %.2f dB (noisy %.2f dB), SSIM %.3f",
            row["sigma"],
            row["psnr_denoised"],
            row["psnr_noisy"],
            row["ssim_denoised"],
        )


def score_openvino(
    folder: Path,
    card: ModelCard,
    shards_dir: str,
    evaluation: EvalConfig,
    keras_psnr: float,
    log: logging.Logger | logging.LoggerAdapter = logger,
) -> dict:
    """The OpenVINO export scored at bf16 (where the CPU has it) on the same
    noisy test images as Keras, by the domain's own evaluator: the card's
    ``openvino_psnr``, ``keras_psnr``, ``openvino_scored_at`` and the
    ``openvino_precision`` it is to run at (f32 when bf16 loses too much).
    ``{}`` without an export or OpenVINO."""
    if not (card.openvino_xml_sha256 and card.openvino_bin_sha256) or not openvino_available():
        return {}
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
    (log.info if precision == "bf16" else log.warning)(
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
