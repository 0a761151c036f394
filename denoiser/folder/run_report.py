"""The report of a folder run, in a folder of its own under the store's
``reports/``: ``report.csv``, what happened to every file (a row each, in the
order given: by path, however the work was split), and ``summary.json``, the
counts, the time, the model used and where the CSV is. The summary is
written last, so a report folder with a summary is complete.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from denoiser.folder import FileResult, count, write_report
from denoiser.folder.routing import count_by_model
from denoiser.folder.trees import resolve_location
from denoiser.imaging.images import write_atomic

REPORT_CSV = "report.csv"
SUMMARY_JSON = "summary.json"


def report_folder_name(run_name: str | None, now: datetime | None = None) -> str:
    """A run's report folder: when it ended, then the flow run's name
    (``local`` outside a flow run), so the folders sort by time."""
    return f"{now or datetime.now(UTC):%Y%m%d-%H%M%S}-{run_name or 'local'}"


def write_run_report(
    report_dir: Path,
    location: str,
    results: list[FileResult],
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    model: dict,
    seconds: float,
    flow_run_id: str | None = None,
) -> dict:
    """Write ``report.csv`` and then ``summary.json`` into ``report_dir``;
    returns the summary. ``location``: where ``report_dir`` will be read
    (its URL in a remote store), recorded as the report's place; ``model``:
    the summary of the model used (with its domain ``warning``, if any)."""
    write_report(results, Path(report_dir) / REPORT_CSV)
    summary = {
        "input_dir": resolve_location(input_dir),
        "output_dir": resolve_location(output_dir),
        "counts": count(results),
        "seconds": round(seconds, 2),
        "report": f"{location}/{REPORT_CSV}",
        "model": model,
        "warning": model.get("warning"),
        "flow_run_id": flow_run_id,
    }
    if by_model := count_by_model(results):  # results that name their model
        summary["by_model"] = by_model
    write_atomic(Path(report_dir) / SUMMARY_JSON, json.dumps(summary, indent=2).encode())
    return summary
