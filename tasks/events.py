"""Events this project emits, for automations (flows/alerts.py) and deployment
triggers (prefect.yaml) to react to. Each carries its figures in the payload
and a one-line ``summary``; inside a run, Prefect relates the event to the
flow run (and task run) that emitted it, so the UI lists it on the run's page
and an automation's template can name the run and link to it.

Best-effort like every other API call of a run (:mod:`tasks.publish`):
events are queued and sent in the background, and never fail the work."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("denoise.events")

GATE_FAILED = "denoise.quality-gate.failed"
FILES_FAILED = "denoise.folder.files-failed"
FILES_LANDED = "denoise.inbox.files-landed"


def _run_facts() -> dict[str, Any]:
    """The current flow run's name, id, flow and UI link (empty outside a run)."""
    from prefect.runtime import flow_run
    from prefect.utilities.urls import url_for

    if not flow_run.id:
        return {}
    return {
        "flow": flow_run.flow_name,
        "flow_run": flow_run.name,
        "flow_run_id": str(flow_run.id),
        # the link the UI's own pages use (runs/flow-run/<id>), as the server's templates give
        "flow_run_url": url_for("flow-run", obj_id=flow_run.id),
    }


def emit_denoise_event(event: str, resource: dict[str, str], payload: dict[str, Any]) -> None:
    """Emit ``event`` about ``resource`` with ``payload`` and the run's facts; never raises."""
    from prefect.events import emit_event

    try:
        emit_event(event, resource=resource, payload={**payload, **_run_facts()})
    except Exception as exc:  # noqa: BLE001 - an event is for watchers, the work goes on
        logger.warning("could not emit %s: %s: %s", event, type(exc).__name__, exc)


def emit_gate_failed(version: str, figures: dict[str, Any], summary: str) -> None:
    """A trained model failed its quality gate: its figures and why, in one line."""
    emit_denoise_event(
        GATE_FAILED,
        {"prefect.resource.id": f"denoise.model.{version}", "prefect.resource.name": version},
        {"version": version, **figures, "summary": summary},
    )


def emit_files_failed(summary: dict[str, Any]) -> None:
    """A folder run finished with failed files: the counts and the first few failures."""
    counts = summary["counts"]
    output_dir = str(summary["output_dir"])
    line = (
        f"{counts['failed']} of {counts['total']} file(s) failed in {summary['input_dir']} "
        f"({counts['denoised']} denoised, {counts['skipped']} skipped); report {summary['report']}"
    )
    emit_denoise_event(
        FILES_FAILED,
        {
            "prefect.resource.id": f"denoise.folder.{output_dir}",
            "prefect.resource.name": output_dir,
        },
        {
            "failed": counts["failed"],
            "denoised": counts["denoised"],
            "skipped": counts["skipped"],
            "input_dir": str(summary["input_dir"]),
            "output_dir": output_dir,
            "report": str(summary["report"]),
            "summary": line,
        },
    )
