"""Task: record a trained model as a version; promote it if it earns it."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run

from artifacts.registry import list_models, register_model
from artifacts.render import artifact_key, markdown_table, table_rows
from denoiser.learning.checkpoints import finish_run
from tasks.publish import Publisher


@task(name="register_model_version", cache_policy=NO_CACHE)
def register_model_version(
    model_dir: str, metrics: dict, store_root: str, checkpoint: str | None = None
) -> dict:
    """Record the version; then its training run's checkpoint can go."""
    logger = get_run_logger()
    run_id = str(flow_run.id) if flow_run.id else None
    decision = register_model(store_root, model_dir, metrics, run_id)
    finish_run(checkpoint)
    if decision["status"] == "production":
        logger.info("%s is the production model: %s", decision["version"], decision["reason"])
    else:
        logger.warning("%s stays a candidate: %s", decision["version"], decision["reason"])

    models = list_models(store_root)
    this = next(m for m in models if m.version == decision["version"])
    s = this.summary()
    facts = [
        {"field": k, "value": v}
        for k, v in {
            "status": decision["status"],
            "domain": s["domain"],
            "dataset": s["dataset"],
            "why": decision["reason"],
            "architecture": s["architecture"],
            "parameters": f"{s['params']:,}" if s["params"] else "",
            "test PSNR (dB)": s["psnr"],
            "test SSIM": s["ssim"],
            "quality gate": "passed" if s["passed"] else "failed",
            "data manifest sha256": s["data_manifest_sha256"],
            "flow run": run_id,
            "model file": s["model_path"],
        }.items()
    ]
    publisher = Publisher(logger)
    publisher.publish(
        create_markdown_artifact,
        key=artifact_key("model", decision["version"]),
        markdown=f"# Model {decision['version']}\n\n{markdown_table(facts)}\n",
        description=f"Model version {decision['version']} ({decision['status']})",
    )
    rows = [
        {
            k: m.summary()[k]
            for k in ("version", "status", "domain", "architecture", "psnr", "ssim", "passed")
        }
        for m in models[:50]
    ]
    publisher.publish(
        create_table_artifact,
        key="model-registry",
        table=table_rows(rows),
        description="Model versions in the store, newest first",
    )
    publisher.close()
    return decision
