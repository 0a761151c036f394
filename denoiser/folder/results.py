"""What a folder run says about each file: its row of the report
(:class:`FileResult`), the reasons a file was done or skipped, the counts,
and the report written as CSV.

Imports nothing of this package; of the project only :mod:`denoiser.imaging.images`
(the atomic write).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from denoiser.imaging.images import write_atomic

UP_TO_DATE = "output is up to date"
WHY_SKIPPED = "input and output match their record"
WHY_NEW = "no output yet"
WHY_OVERWRITE = "overwrite requested"
WHY_NO_RECORD = "output exists but there is no record of it being made from this input"
WHY_INTERRUPTED = "output written by an interrupted run before its record"
NOT_OURS = "its output exists and was not made by denoise: kept; --overwrite replaces it"
WHY_INPUT_CHANGED = "input changed since its output was made"
WHY_OUTPUT_CHANGED = "output does not match its record (changed or damaged since it was made)"


def display_path(rel: str) -> str:
    """File names that are not valid UTF-8 shown with escapes, safe for CSV/JSON."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


@dataclass
class FileResult:
    path: str  # relative to the input folder, display-safe
    status: str  # denoised | skipped | failed
    error: str = ""
    bytes: int | None = None
    mode: str = ""
    width: int | None = None
    height: int | None = None
    ms: float | None = None
    output: str = ""
    reason: str = ""  # why it was (re)done or skipped
    model: str = ""  # the version of the model that made the output
    route: str = ""  # how the image went through it (denoiser.folder.routing.ROUTES)


REPORT_FIELDS = [f for f in FileResult.__dataclass_fields__]


def write_report(results: list[FileResult], path: Path) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_FIELDS)
    writer.writeheader()
    for r in results:
        writer.writerow(asdict(r))
    write_atomic(path, buf.getvalue().encode("utf-8"))
    return path


def count(results: list[FileResult]) -> dict[str, int]:
    out = {"denoised": 0, "skipped": 0, "failed": 0}
    for r in results:
        out[r.status] = out.get(r.status, 0) + 1
    out["total"] = len(results)
    return out
