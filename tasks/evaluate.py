"""Task: judge a trained model on the test split; the card records the verdict."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.states import Completed, State

from artifacts.render import markdown_image, markdown_table, table_rows
from artifacts.store import Store
from denoiser.cards import CARD_FILE, CardMetrics, ModelCard, load_card
from denoiser.config import EvalConfig
from denoiser.faults import failpoint
from denoiser.files import is_url
from denoiser.inference import EVAL_NOISE_SEED, centre_crop, evaluate_planes, predict_array
from denoiser.metrics import evaluate_arrays
from denoiser.models import architecture_recipe, load_model
from denoiser.openvino_runtime import BIN_FILE, XML_FILE, load_openvino, precision_to_run
from denoiser.plots import grid_png
from denoiser.quality import judge_quality
from denoiser.runtime import openvino_available
from denoiser.shards import load_split, read_manifest
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
    if read_manifest(shards_dir).get("kind") == "patches":
        judged = _judge_photos(model, card, shards_dir, evaluation)
    else:
        judged = _judge_pairs(model, card, shards_dir, evaluation)
    metrics, samples, rows, table, caption = judged
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
    noisy test images as Keras: the card's ``openvino_psnr``, ``keras_psnr``,
    ``openvino_scored_at`` and the ``openvino_precision`` it is to run at
    (f32 when bf16 loses too much). ``{}`` without an export or OpenVINO."""
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
    if read_manifest(shards_dir).get("kind") == "patches":
        got = _judge_photos(model, card, shards_dir, evaluation)[0]["overall"]["psnr_denoised"]
    else:
        got = _judge_pairs(model, card, shards_dir, evaluation)[0]["overall"]["psnr_denoised"]
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


def _judge_pairs(model, card: ModelCard, shards_dir: str, evaluation: EvalConfig):
    """MNIST-style test pairs as stored: metrics, the sample grid, the table's
    rows, the report's table and the grid's caption."""
    recipe = architecture_recipe(card.architecture)
    test = load_split(shards_dir, "test")
    clean, noisy = test["clean"] / 255.0, test["noisy"] / 255.0
    denoised = predict_array(
        model,
        noisy,
        evaluation.batch_size,
        recipe.size_multiple if recipe.fully_convolutional else 1,
    )
    metrics = evaluate_arrays(clean, noisy, denoised, test.get("noise_level"), test.get("label"))
    overall = metrics["overall"]
    k = evaluation.sample_count
    samples = grid_png([clean[:k], noisy[:k], denoised[:k]], scale=3)
    rows = [{"group": "overall", **overall}]
    rows += [
        {"group": f"noise level {r['level']}", **{k2: v for k2, v in r.items() if k2 != "level"}}
        for r in metrics["per_level"]
    ]
    rows += [
        {"group": f"class {r['label']}", **{k2: v for k2, v in r.items() if k2 != "label"}}
        for r in metrics["per_class"]
    ]
    cols = [
        "group",
        "count",
        "psnr_noisy",
        "psnr_denoised",
        "psnr_gain",
        "ssim_noisy",
        "ssim_denoised",
        "mse_noisy",
        "mse_denoised",
        "bce_noisy",
        "bce_denoised",
    ]
    table = [
        {"": "noisy input", "PSNR (dB)": overall["psnr_noisy"], "SSIM": overall["ssim_noisy"]},
        {"": "denoised", "PSNR (dB)": overall["psnr_denoised"], "SSIM": overall["ssim_denoised"]},
    ]
    return (
        metrics,
        samples,
        [{c: r.get(c) for c in cols} for r in rows],
        table,
        "Rows: clean, noisy, denoised.",
    )


CROP = 128  # side of the report's crops, shown at 1:1
CROP_SIGMA = 25.0  # the report's crops are at this sigma (or the nearest one evaluated)
CROP_IMAGES = 4


def _judge_photos(model, card: ModelCard, shards_dir: str, evaluation: EvalConfig):
    """A patch set's whole test images at every sigma of ``evaluation.sigmas``,
    through the folder denoiser's tiling: metrics per image and per sigma, 1:1
    crops of a few images, the table's rows, the report's table and the caption."""
    manifest = read_manifest(shards_dir)
    test = load_split(shards_dir, "test")
    clean = [np.asarray(x[..., 0], np.float32) / 255.0 for x in test["clean"]]
    entries = manifest.get("images") or []
    names = [entries[int(i)]["name"] if int(i) < len(entries) else str(i) for i in test["index"]]
    metrics, noisy, denoised = evaluate_planes(
        model, card.architecture, clean, evaluation.sigmas, evaluation.batch_size, names
    )
    sigma = min(noisy, key=lambda s: abs(s - CROP_SIGMA))
    k = min(evaluation.sample_count, CROP_IMAGES, len(clean))
    side = min(CROP, *(min(c.shape) for c in clean[:k]))
    crops = [
        np.stack([centre_crop(np.clip(p, 0.0, 1.0), side) for p in planes[:k]])
        for planes in (clean, noisy[sigma], denoised[sigma])
    ]
    samples = grid_png(crops, scale=1)
    rows = [
        {"group": f"sigma {r['sigma']:g}", **{c: v for c, v in r.items() if c != "sigma"}}
        for r in metrics["per_sigma"]
    ]
    rows.append(
        {
            "group": "mean over sigmas",
            **{c: v for c, v in metrics["overall"].items() if c != "sigmas"},
        }
    )
    rows += [
        {
            "group": f"{r['image']} sigma {r['sigma']:g}",
            "count": 1,
            **{c: v for c, v in r.items() if c not in ("image", "sigma", "height", "width")},
        }
        for r in metrics["per_image"]
    ]
    table = [
        {
            "sigma": f"{r['sigma']:g}",
            "PSNR noisy (dB)": r["psnr_noisy"],
            "PSNR denoised (dB)": r["psnr_denoised"],
            "gain (dB)": r["psnr_gain"],
            "SSIM noisy": r["ssim_noisy"],
            "SSIM denoised": r["ssim_denoised"],
        }
        for r in metrics["per_sigma"]
    ]
    o = metrics["overall"]
    table.append(
        {
            "sigma": "mean",
            "PSNR noisy (dB)": o["psnr_noisy"],
            "PSNR denoised (dB)": o["psnr_denoised"],
            "gain (dB)": o["psnr_gain"],
            "SSIM noisy": o["ssim_noisy"],
            "SSIM denoised": o["ssim_denoised"],
        }
    )
    caption = (
        f"Noise: awgn at each sigma (0-255 units), unclipped, one fixed draw (seed {EVAL_NOISE_SEED}); "
        f"whole images through the folder denoiser's tiling. Rows: clean, noisy, denoised; "
        f"central {side}x{side} crops at 1:1 of {k} test image(s) at sigma {sigma:g}."
    )
    return metrics, samples, rows, table, caption
