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

from artifacts.render import markdown_image, markdown_table, table_rows
from denoiser.config import EvalConfig
from denoiser.faults import failpoint
from denoiser.inference import predict_array
from denoiser.metrics import evaluate_arrays
from denoiser.models import architecture_recipe, load_model
from denoiser.plots import grid_png
from denoiser.shards import load_split
from tasks.publish import Publisher

CONVENTION = ("PSNR is the per-image mean on [0, 1] floats (10·log10(1/MSE) per image, then the "
              "mean); SSIM uses scikit-image's defaults (7x7 uniform window), data range 1.")


def _write(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data if isinstance(data, bytes) else data.encode())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@task(name="evaluate_denoiser", cache_policy=NO_CACHE)
def evaluate_denoiser(model_dir: str, shards_dir: str, evaluation: EvalConfig) -> dict:
    logger = get_run_logger()
    evaluation = EvalConfig.model_validate(evaluation)
    folder = Path(model_dir)
    card = json.loads((folder / "model.json").read_text())
    # the model file the card describes, or a one-line ModelError
    model = load_model(folder / "model.keras", expected_sha256=card.get("model_sha256"))
    recipe = architecture_recipe(card["architecture"])
    test = load_split(shards_dir, "test")
    clean, noisy = test["clean"] / 255.0, test["noisy"] / 255.0
    denoised = predict_array(model, noisy, evaluation.batch_size,
                             recipe.get("size_multiple", 1) if recipe.get("fully_convolutional") else 1)
    metrics = evaluate_arrays(clean, noisy, denoised, test.get("noise_level"), test.get("label"))
    overall = metrics["overall"]
    passed = overall["psnr_gain"] >= evaluation.min_psnr_gain
    gate = {"min_psnr_gain": evaluation.min_psnr_gain, "psnr_gain": overall["psnr_gain"], "passed": passed}

    k = evaluation.sample_count
    samples = grid_png([clean[:k], noisy[:k], denoised[:k]], scale=3)
    _write(folder / "samples.png", samples)
    _write(folder / "metrics.json", json.dumps({**metrics, "quality_gate": gate}, indent=2))
    failpoint("evaluate.before_card")
    card = {**json.loads((folder / "model.json").read_text()), "metrics": overall, "quality_gate": gate}
    _write(folder / "model.json", json.dumps(card, indent=2))  # model_sha256 and the rest kept as read

    verdict = "PASSED" if passed else "FAILED"
    rows = [{"group": "overall", **overall}]
    rows += [{"group": f"noise level {r['level']}", **{k2: v for k2, v in r.items() if k2 != "level"}}
             for r in metrics["per_level"]]
    rows += [{"group": f"class {r['label']}", **{k2: v for k2, v in r.items() if k2 != "label"}}
             for r in metrics["per_class"]]
    cols = ["group", "count", "psnr_noisy", "psnr_denoised", "psnr_gain", "ssim_noisy", "ssim_denoised",
            "mse_noisy", "mse_denoised", "bce_noisy", "bce_denoised"]
    publisher = Publisher(logger)
    publisher.publish(create_table_artifact, key="evaluation-metrics", table=table_rows([{c: r.get(c) for c in cols} for r in rows]),
                      description=f"Test-set metrics of {card['version']}")
    report = (
        f"# Evaluation of {card['version']} ({card['architecture']}, {card['params']:,} parameters)\n\n"
        f"Quality gate **{verdict}**: PSNR gain {overall['psnr_gain']:.2f} dB "
        f"(minimum {evaluation.min_psnr_gain:.2f} dB).\n\n"
        + markdown_table([
            {"": "noisy input", "PSNR (dB)": overall["psnr_noisy"], "SSIM": overall["ssim_noisy"]},
            {"": "denoised", "PSNR (dB)": overall["psnr_denoised"], "SSIM": overall["ssim_denoised"]},
        ])
        + f"\n\n{overall['count']:,} test images. {CONVENTION}\n\n"
        "Rows: clean, noisy, denoised.\n\n"
    )
    # report.md links the PNG beside it; the artifact inlines it (the PNG encoded once, here)
    _write(folder / "report.md", report + "![clean, noisy and denoised](samples.png)\n")
    publisher.publish(create_markdown_artifact, key="evaluation-report",
                      markdown=report + markdown_image(samples, "clean, noisy and denoised test images") + "\n",
                      description=f"Evaluation report of {card['version']}")
    publisher.close()
    log = logger.info if passed else logger.warning
    log("%s: PSNR %.2f dB (noisy %.2f dB), SSIM %.3f; quality gate %s", card["version"],
        overall["psnr_denoised"], overall["psnr_noisy"], overall["ssim_denoised"], verdict)
    return {"psnr_noisy": overall["psnr_noisy"], "psnr_denoised": overall["psnr_denoised"],
            "psnr_gain": overall["psnr_gain"], "ssim_noisy": overall["ssim_noisy"],
            "ssim_denoised": overall["ssim_denoised"], "mse_denoised": overall["mse_denoised"],
            "bce_denoised": overall["bce_denoised"], "passed": passed, "min_psnr_gain": evaluation.min_psnr_gain,
            "test_images": overall["count"], "report": str(folder / "report.md"),
            "samples": str(folder / "samples.png"), "model_dir": str(folder)}
