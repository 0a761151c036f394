"""The report of a folder run (denoiser/folder/run_report.py), on a few made-up results."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime

from denoiser.folder import FileResult
from denoiser.folder.run_report import report_folder_name, write_run_report

RESULTS = [
    FileResult("a.png", "denoised", bytes=10, mode="L", width=4, height=3, ms=1.5),
    FileResult("b/c.png", "skipped", reason="up to date"),
    FileResult("d.png", "failed", error="not an image"),
]


def test_the_report_folder_is_named_by_time_then_flow_run():
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert report_folder_name("brave-fox", when) == "20260102-030405-brave-fox"
    assert report_folder_name(None, when) == "20260102-030405-local"


def test_a_run_report_has_a_row_per_file_and_a_summary(tmp_path):
    model = {"version": "v1", "warning": "trained on digits"}
    summary = write_run_report(
        tmp_path / "reports" / "r1",
        "s3://bucket/reports/r1",
        RESULTS,
        tmp_path / "in",
        tmp_path / "out",
        model,
        1.2345,
        "run-1",
    )
    assert summary == {
        "input_dir": str(tmp_path / "in"),
        "output_dir": str(tmp_path / "out"),
        "counts": {"denoised": 1, "skipped": 1, "failed": 1, "total": 3},
        "seconds": 1.23,
        "report": "s3://bucket/reports/r1/report.csv",
        "model": model,
        "warning": "trained on digits",
        "flow_run_id": "run-1",
    }
    assert json.loads((tmp_path / "reports" / "r1" / "summary.json").read_text()) == summary
    with open(tmp_path / "reports" / "r1" / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == ["a.png", "b/c.png", "d.png"]
    assert rows[0]["width"] == "4" and rows[2]["error"] == "not an image"
    assert rows[1]["reason"] == "up to date"
