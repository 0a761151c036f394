"""Writing the outputs: the output folder made ready (temporary files of
killed runs removed), and each finished image encoded, written atomically
(the fault point ``folder.after_output`` sits between its write and its
record) and recorded in the journal, its pixels given back to the budget.

Imports the results, the journal, the scan's :class:`Job` and the reader's
:class:`PixelBudget` of this package.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

from denoiser.core.errors import DenoiseError
from denoiser.core.faults import failpoint
from denoiser.core.files import host_tag, pid_alive
from denoiser.folder.journal import JournalWriter, OutputRecord
from denoiser.folder.reader import PixelBudget
from denoiser.folder.results import FileResult, display_path
from denoiser.folder.scan import Job
from denoiser.folder.trees import RemoteTree, Tree
from denoiser.imaging.images import (
    LoadedImage,
    encode_output,
    encode_rgb_output,
    output_format,
    temp_owner,
)

FOREIGN_TEMP_AGE = 86400.0  # seconds before another host's temporary file counts as abandoned


def prepare_output(dst: Tree) -> int:
    """Make the output folder (local) and remove the temporary files killed
    writers left in it; how many. Objects have no temporary names."""
    if isinstance(dst, RemoteTree):
        return 0
    dst.root.mkdir(parents=True, exist_ok=True)
    return remove_stale_parts(dst.root)


def temp_abandoned(name: str, mtime: float, now: float) -> bool:
    """Whether a file is one of our temporary files whose writer is gone: its
    pid is not alive on this host, or it comes from another host and is older
    than FOREIGN_TEMP_AGE. Any other name is never ours to remove."""
    owner = temp_owner(name)
    if owner is None:
        return False
    host, pid = owner
    if host != host_tag():
        return now - mtime > FOREIGN_TEMP_AGE
    return not pid_alive(pid)


def remove_stale_parts(dst: Path) -> int:
    """Temporary files that killed runs left behind (they never got final names);
    a live run's, and every file that is not ours, are left alone."""
    removed = 0
    now = time.time()
    for dirpath, _, filenames in os.walk(dst):  # symlinked folders are not followed
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                if temp_abandoned(name, os.lstat(path).st_mtime, now):
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


def _save(job: Job, fmt: str, dst: Tree, writer: JournalWriter) -> FileResult:
    loaded, work = job.loaded, job.work
    data = _encode(loaded, work.result(), output_format(job.rel, loaded.format, fmt))
    dst.write(job.target, data)
    failpoint("folder.after_output")
    writer.add(
        OutputRecord(
            job.target_rel,
            job.rel,
            job.input_size,
            job.input_sha256,
            len(data),
            hashlib.sha256(data).hexdigest(),
            work.denoiser.name,
            work.route,
        )
    )
    w, h = loaded.size
    result = FileResult(
        display_path(job.rel),
        "denoised",
        "",
        job.bytes,
        loaded.mode,
        w,
        h,
        round((time.perf_counter() - job.started) * 1000, 1),
        display_path(dst.show(job.target)),
        job.reason,
        work.denoiser.name,
        work.route,
    )
    job.loaded = job.work = None  # free the pixels now
    return result


def _encode(loaded: LoadedImage, denoised: np.ndarray, fmt: str) -> bytes:
    """The output's bytes from a denoised luminance (H, W) or RGB (H, W, 3)."""
    if denoised.ndim == 3:
        return encode_rgb_output(loaded, denoised, fmt)
    return encode_output(loaded, denoised, fmt)


def save_all(
    jobs: list[Job], fmt: str, dst: Tree, writer: JournalWriter, budget: PixelBudget
) -> list[FileResult]:
    """:func:`_save` each job in turn, giving its pixels back to the budget;
    the result of each, failed or not."""
    results = []
    for job in jobs:
        try:
            results.append(_save(job, fmt, dst, writer))
        except (DenoiseError, OSError, ValueError) as exc:
            results.append(
                FileResult(
                    display_path(job.rel), "failed", f"cannot write output: {exc}", job.bytes
                )
            )
        finally:
            job.loaded = job.work = None
            budget.release(job.pixels)
            job.pixels = 0
    return results
