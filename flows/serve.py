"""``denoise serve``: the deployments of prefect.yaml from one process, for
users without a work pool (nightly training, its photographs variant, whose
schedule is off until switched on, and the inbox). Schedules and parameters come from prefect.yaml so the
two ways of running cannot drift apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    import yaml

    return yaml.safe_load(path.read_text())["deployments"]


def _schedules(spec: dict) -> list:
    from prefect.schedules import Cron, Interval

    out = []
    for s in spec.get("schedules") or []:
        active = bool(
            s.get("active", True)
        )  # an inactive one is kept, off, to be switched on in the UI
        if "cron" in s:
            out.append(Cron(s["cron"], timezone=s.get("timezone"), active=active))
        elif "interval" in s:
            out.append(Interval(s["interval"], active=active))
    return out


def _triggers(spec: dict) -> list:
    """A deployment's event triggers (prefect.yaml's ``triggers:``), as ``prefect deploy`` reads them."""
    from prefect.events import DeploymentEventTrigger

    return [DeploymentEventTrigger(**t) for t in spec.get("triggers") or []]


def build_deployments(path: Path = PREFECT_YAML, store: str | None = None) -> list:
    """prefect.yaml's deployments; with ``store``, each run's store where the
    deployment does not name its own (``denoise serve --store``)."""
    from flows.denoising import denoise_folder
    from flows.training import train_pipeline

    flows = {
        "flows.training.train_pipeline": train_pipeline,
        "flows.denoising.denoise_folder": denoise_folder,
    }
    deployments = []
    for spec in deployment_specs(path):
        flow = flows[spec["entrypoint"]]
        deployments.append(
            flow.to_deployment(
                name=spec["name"],
                schedules=_schedules(spec),
                parameters=({"store": store} if store else {}) | (spec.get("parameters") or {}),
                description=spec.get("description"),
                tags=spec.get("tags"),
                concurrency_limit=spec.get("concurrency_limit"),
                triggers=_triggers(spec),
                enforce_parameter_schema=spec.get("enforce_parameter_schema", True),
            )
        )
    return deployments
