"""``denoise alerts``: messages to a webhook when a run calls for attention.

An alert is a Prefect notification block (a custom webhook) and one
automation per kind of trouble, all on the server the command talks to
(``PREFECT_API_URL``, else the one ``denoise server start`` keeps):

- ``failed`` / ``crashed``: a flow run of this project ends Failed / Crashed
  (Prefect's own ``prefect.flow-run.Failed`` and ``...Crashed`` events);
- ``gate``: a trained model fails its quality gate (``denoise.quality-gate.failed``,
  emitted by the evaluation task, :mod:`tasks.events`);
- ``files``: a folder run ends with failed files (``denoise.folder.files-failed``).

Each sends one message: a subject, and a body naming the flow, the run, what
happened in one line and the run's UI link. Names start with
``denoise-alerts-<name>``, so ``list`` and ``remove`` find only these, and
adding an alert again replaces it (``apply`` is idempotent: ``denoise serve``
applies ``alerts.yaml`` at every start).
"""

from __future__ import annotations

import argparse
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from denoiser.core.errors import ConfigError

PREFIX = "denoise-alerts"
KINDS = ("failed", "crashed", "gate", "files")
#: this project's flows; a subflow that fails also fails its parent, which is reported too
PROJECT_FLOWS = ["train-denoiser", "denoise-folder", "denoise-folder-chunks"]
ALERTS_YAML = Path(__file__).resolve().parent.parent / "alerts.yaml"
WEBHOOK_TIMEOUT = 10

_STATE_SUBJECT = "denoise: {{ flow.name }} run {{ flow_run.name }} ended {{ flow_run.state.name }}"
_STATE_BODY = (
    "flow: {{ flow.name }}\n"
    "run: {{ flow_run.name }}\n"
    "what: ended {{ flow_run.state.name }}: "
    "{{ (flow_run.state.message or 'no message') | replace('\\n', ' ') | truncate(300) }}\n"
    "link: {{ flow_run|ui_url }}"
)
_EVENT_BODY = (
    "flow: {{ event.payload.flow }}\n"
    "run: {{ event.payload.flow_run }}\n"
    "what: {{ event.payload.summary }}\n"
    "link: {{ event.payload.flow_run_url }}"
)
_EVENT_SUBJECT = "denoise: {{ event.payload.flow }} run {{ event.payload.flow_run }}: "


@dataclass(frozen=True)
class Alert:
    """One alert: where messages go and which kinds of trouble send one."""

    name: str
    webhook: str
    kinds: tuple[str, ...] = KINDS

    def block_name(self) -> str:
        return f"{PREFIX}-{self.name}"

    def automation_name(self, kind: str) -> str:
        return f"{PREFIX}-{self.name}: {kind}"


def check_name(name: str) -> str:
    """An alert's name: lowercase letters, digits and dashes (Prefect's block name rules)."""
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?", name or ""):
        raise ConfigError(
            f"alert name {name!r}: use lowercase letters, digits and dashes (at most 40)"
        )
    return name


def check_webhook(url: str) -> str:
    """An http(s) URL with a host, or a one-line ConfigError."""
    parts = urllib.parse.urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--webhook {url!r}: expected an http:// or https:// URL with a host")
    return url


def parse_kinds(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``failed,crashed`` (or a list) as known kinds, in their usual order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    kinds = {str(k).strip() for k in items if str(k).strip()}
    if unknown := sorted(kinds - set(KINDS)):
        raise ConfigError(f"unknown alert kind {unknown[0]!r}: choose from {', '.join(KINDS)}")
    if not kinds:
        raise ConfigError(f"--on: name at least one of {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in kinds)


def build_automation(alert: Alert, kind: str, block_id):
    """The automation of ``kind`` for ``alert``: its trigger and its one message."""
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    from tasks.events import FILES_FAILED, GATE_FAILED

    if kind in ("failed", "crashed"):
        state = kind.capitalize()
        trigger = EventTrigger(
            expect={f"prefect.flow-run.{state}"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": PROJECT_FLOWS},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        )
        subject, body = _STATE_SUBJECT, _STATE_BODY
        description = f"a run of {', '.join(PROJECT_FLOWS)} ends {state}"
    else:
        event, what, resource = {
            "gate": (GATE_FAILED, "model failed its quality gate", "denoise.model.*"),
            "files": (FILES_FAILED, "files failed", "denoise.folder.*"),
        }[kind]
        trigger = EventTrigger(
            expect={event},
            match={"prefect.resource.id": resource},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        )
        subject, body = _EVENT_SUBJECT + what, _EVENT_BODY
        description = f"{event}: {what}"
    return AutomationCore(
        name=alert.automation_name(kind),
        description=f"denoise alert {alert.name}: {description}; messages to its webhook",
        enabled=True,
        trigger=trigger,
        actions=[SendNotification(block_document_id=block_id, subject=subject, body=body)],
    )


def _webhook_block(url: str):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    return CustomWebhookNotificationBlock(
        name="denoise-flow",
        url=url,
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "text": "{{subject}}\n{{body}}"},
        timeout=WEBHOOK_TIMEOUT,
    )


def _ours(automation, name: str | None) -> bool:
    prefix = f"{PREFIX}-{name}: " if name else f"{PREFIX}-"
    return automation.name.startswith(prefix)


def add_alert(alert: Alert) -> list[str]:
    """Create (or replace) the alert's block and automations; their names."""
    from prefect.client.orchestration import get_client

    block_id = _webhook_block(alert.webhook).save(alert.block_name(), overwrite=True)
    names = []
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            if _ours(automation, alert.name):
                client.delete_automation(automation.id)
        for kind in alert.kinds:
            client.create_automation(build_automation(alert, kind, block_id))
            names.append(alert.automation_name(kind))
    return names


def list_alerts() -> list[dict]:
    """Each alert of ours: name, webhook, kinds, whether its automations are enabled."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client

    alerts: dict[str, dict] = {}
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            if not _ours(automation, None):
                continue
            name, _, kind = automation.name.removeprefix(f"{PREFIX}-").partition(": ")
            entry = alerts.setdefault(name, {"name": name, "kinds": [], "enabled": True})
            entry["kinds"].append(kind)
            entry["enabled"] = entry["enabled"] and automation.enabled
    for name, entry in alerts.items():
        entry["kinds"] = [k for k in KINDS if k in entry["kinds"]]
        try:
            entry["webhook"] = CustomWebhookNotificationBlock.load(f"{PREFIX}-{name}").url
        except ValueError:
            entry["webhook"] = "(its block is gone)"
    return sorted(alerts.values(), key=lambda a: a["name"])


def remove_alerts(name: str | None) -> list[str]:
    """Delete the automations and block of alert ``name`` (every alert of ours
    when None); the names of the alerts removed."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    removed = set()
    with get_client(sync_client=True) as client:
        for automation in client.read_automations():
            if _ours(automation, name):
                client.delete_automation(automation.id)
                removed.add(automation.name.removeprefix(f"{PREFIX}-").partition(": ")[0])
        for alert in removed | ({name} if name else set()):
            try:
                block = client.read_block_document_by_name(f"{PREFIX}-{alert}", "custom-webhook")
            except ObjectNotFound:
                continue
            client.delete_block_document(block.id)
            removed.add(alert)
    return sorted(removed)


# --------------------------------------------------------------------------- alerts.yaml


def read_alerts_file(path: str | os.PathLike) -> tuple[list[Alert], list[str]]:
    """The alerts a file declares, and one line per alert left out because its
    webhook is an environment variable that is not set (``${VAR}``)."""
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({type(exc).__name__})") from None
    entries = spec.get("alerts") if isinstance(spec, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected a list under `alerts:`")
    alerts, skipped = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"name", "webhook"} <= set(entry):
            raise ConfigError(f"{path}: alert {i + 1} needs a name and a webhook")
        name = check_name(str(entry["name"]))
        webhook = os.path.expandvars(str(entry["webhook"]))
        if not webhook or "$" in webhook:
            skipped.append(f"alert {name} left out: its webhook {entry['webhook']} is not set")
            continue
        kinds = parse_kinds(entry.get("on", list(KINDS)))
        alerts.append(Alert(name, check_webhook(webhook), kinds))
    return alerts, skipped


def apply_alerts_file(path: str | os.PathLike) -> list[str]:
    """Set up every alert ``path`` declares; one line per alert, applied or left out."""
    alerts, lines = read_alerts_file(path)
    for alert in alerts:
        add_alert(alert)
        lines.append(f"alert {alert.name}: {', '.join(alert.kinds)} -> {alert.webhook}")
    return lines


def apply_serve_alerts(path: Path = ALERTS_YAML) -> None:
    """``denoise serve`` brings the project's alerts along: alerts.yaml, applied at start."""
    if path.is_file():
        for line in apply_alerts_file(path):
            print(line)


# --------------------------------------------------------------------------- the command


def use_server() -> str:
    """The server alerts are set up on: ``PREFECT_API_URL``, else the kept one.
    Set before Prefect is imported; a server that does not answer is a usage
    error (alerts on a temporary server would vanish with it)."""
    from flows.server import api_answers, kept_server_url

    url = os.environ.get("PREFECT_API_URL") or kept_server_url()
    if not url:
        raise ConfigError(
            "no Prefect server: start one with `denoise server start` or set PREFECT_API_URL"
        )
    if not api_answers(url, timeout=5):
        raise ConfigError(f"the Prefect server at {url} does not answer")
    os.environ["PREFECT_API_URL"] = url
    return url


def add_alerts_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="alerts_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="send messages to a webhook when runs call for attention")
    add.add_argument("--webhook", required=True, metavar="URL", help="where messages are POSTed")
    add.add_argument(
        "--on",
        default=",".join(KINDS),
        metavar="KINDS",
        help=f"comma-separated, of {', '.join(KINDS)} (default: all)",
    )
    add.add_argument("--name", default="default", help="the alert's name (default: default)")
    sub.add_parser("list", help="the alerts set up on the server")
    remove = sub.add_parser("remove", help="remove an alert (or --all)")
    remove.add_argument("name", nargs="?", metavar="NAME")
    remove.add_argument("--all", action="store_true", help="remove every denoise alert")
    apply = sub.add_parser("apply", help="set up the alerts a file declares (alerts.yaml)")
    apply.add_argument("file", metavar="FILE")


def run_alerts_command(args: argparse.Namespace) -> int:
    """``denoise alerts add|list|remove|apply``: checks first, then the server."""
    action = args.alerts_command
    if action == "add":
        alert = Alert(check_name(args.name), check_webhook(args.webhook), parse_kinds(args.on))
    elif action == "remove" and bool(args.name) == bool(args.all):
        raise ConfigError("alerts remove: give an alert's NAME or --all")
    elif action == "apply":
        read_alerts_file(args.file)  # a bad file is reported before the server is asked
    url = use_server().removesuffix("/api")
    if action == "add":
        names = add_alert(alert)
        print(f"alert {alert.name} on {url}: {', '.join(alert.kinds)} -> {alert.webhook}")
        print(f"automations: {', '.join(names)}")
    elif action == "list":
        alerts = list_alerts()
        for a in alerts:
            state = "" if a["enabled"] else " (paused)"
            print(f"{a['name']}: {', '.join(a['kinds'])} -> {a['webhook']}{state}")
        if not alerts:
            print(f"no denoise alerts on {url}")
    elif action == "remove":
        removed = remove_alerts(None if args.all else check_name(args.name))
        if not removed and not args.all:
            raise ConfigError(f"no alert named {args.name} on {url}")
        print(f"removed: {', '.join(removed)}" if removed else "no denoise alerts to remove")
    else:
        for line in apply_alerts_file(args.file):
            print(line)
    return 0
