"""Task: judge a trained model on the test split; the card records the verdict.
The work is :func:`denoiser.learning.evaluation.evaluate_model`; here: staging a remote
store's model folder, the report and the UI's artifacts, the verdict as the
task run's state."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.states import Completed, State

from artifacts.render import markdown_image, markdown_table, table_rows
from artifacts.store import Store, StoreError
from denoiser.config import EvalConfig
from denoiser.core.files import is_url, write_text_atomic
from denoiser.learning.evaluation import (
    CONVENTION,
    MODEL_FILES,
    Evaluation,
    evaluate_model,
    gate_figures,
    gate_summary,
)
from tasks.events import emit_gate_failed
from tasks.publish import Publisher

__all__ = ["evaluate_denoiser", "gate_figures", "gate_summary"]


@task(name="evaluate_denoiser", cache_policy=NO_CACHE)
def evaluate_denoiser(
    model_dir: str, shards_dir: str, evaluation: EvalConfig, store: Store | str | None = None
) -> State:
    """Scores the model on the shard set's test split (see
    :func:`denoiser.learning.evaluation.evaluate_model`); writes metrics.json,
    samples.png, report.md and the verdict into the card, and publishes the
    table and the report. ``model_dir`` is a folder of ``store`` (a remote
    store's is staged and the new files pushed, the card last), or without
    ``store`` a local folder. Returns the metrics in a COMPLETED state, named
    "Gate failed" (with the figures as its message, and a
    ``denoise.quality-gate.failed`` event) when the model failed its gate: the
    UI shows the verdict on the task run; callers take ``return_state=True``
    and ``.result()``."""
    if store is None and is_url(model_dir):
        raise StoreError(f"{model_dir}: a model of a remote store is evaluated with its store")
    logger = get_run_logger()
    evaluation = EvalConfig.model_validate(evaluation)
    # a remote store's model folder is staged; the new files are pushed, the card last
    with Store.at(store or model_dir).staged(
        model_dir, MODEL_FILES, last=("model.json",)
    ) as folder:
        judged = evaluate_model(folder, shards_dir, evaluation, logger)
        _report(folder, judged, evaluation)
    where = str(model_dir)
    result = {
        **judged.summary,
        "report": f"{where}/report.md",
        "samples": f"{where}/samples.png",
        "model_dir": where,
    }
    if result["passed"]:
        return Completed(data=result)
    summary = gate_summary(result)
    emit_gate_failed(result["version"], gate_figures(result), summary)
    return Completed(data=result, name="Gate failed", message=summary)


def _report(folder: Path, judged: Evaluation, evaluation: EvalConfig) -> None:
    """report.md beside the model, and the metrics table and the report in the UI."""
    card, metrics, overall = judged.card, judged.metrics, judged.metrics["overall"]
    verdict = "PASSED" if judged.summary["passed"] else "FAILED"
    cols = list(dict.fromkeys(c for r in judged.rows for c in r))
    publisher = Publisher(get_run_logger())
    publisher.publish(
        create_table_artifact,
        key="evaluation-metrics",
        table=table_rows([{c: r.get(c) for c in cols} for r in judged.rows]),
        description=f"Test-set metrics of {card.version}",
    )
    gain_text = "mean PSNR gain over the sigmas" if "per_sigma" in metrics else "PSNR gain"
    report = (
        f"# Evaluation of {card.version} ({card.architecture}, {card.params:,} parameters)\n\n"
        f"Quality gate **{verdict}**: {gain_text} {overall['psnr_gain']:.2f} dB "
        f"(minimum {evaluation.min_psnr_gain:.2f} dB).\n\n"
        + markdown_table(judged.table)
        + f"\n\n{overall['count']:,} test images. {CONVENTION}\n\n{judged.caption}\n\n"
    )
    # report.md links the PNG beside it; the artifact inlines it (the PNG encoded once, here)
    write_text_atomic(folder / "report.md", report + "![clean, noisy and denoised](samples.png)\n")
    publisher.publish(
        create_markdown_artifact,
        key="evaluation-report",
        markdown=report
        + markdown_image(judged.samples, "clean, noisy and denoised test images")
        + "\n",
        description=f"Evaluation report of {card.version}",
    )
    publisher.close()
