"""Reading the inputs: each read once, hashed, checked against its record
(up to date: nothing more to do), else decoded within the run's budget of
decoded pixels (:class:`PixelBudget`) and cut into the tiles of its model.

Imports :mod:`~denoiser.folder.results` and :mod:`~denoiser.folder.scan` of
this package.
"""

from __future__ import annotations

import hashlib
import threading
import time

from denoiser.core.errors import DenoiseError, ImageError
from denoiser.folder.results import WHY_INPUT_CHANGED, WHY_OUTPUT_CHANGED
from denoiser.folder.routing import Router
from denoiser.folder.scan import Job
from denoiser.folder.trees import Tree
from denoiser.imaging.images import decode_image, image_pixels, read_error


def _read(tree: Tree, path) -> bytes:
    """An input's bytes; an ImageError saying why they cannot be read."""
    try:
        return tree.read(path)
    except FileNotFoundError:
        raise ImageError("cannot read: no such file (gone since the scan)") from None
    except OSError as exc:
        raise read_error(exc) from None


class PixelBudget:
    """Decoded pixels in flight, from an image's decode until its output is
    written: a reader waits before decoding while the images in flight and
    its own would pass ``limit`` (one image is always let through, however
    large). What bounds a run's memory whatever the number and size of its
    images; the encoded bytes read ahead are bounded apart."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.waiting = 0
        self._cond = threading.Condition()

    def acquire(self, pixels: int, own: int = 0) -> None:
        """Wait for room for ``pixels``; ``own``: pixels the caller already
        holds (a reader's task, handed over only when the whole task is
        read): they never make it wait for itself."""
        with self._cond:
            self.waiting += 1
            try:
                while self.used > own and self.used + pixels > self.limit:
                    self._cond.wait()
            finally:
                self.waiting -= 1
            self.used += pixels
            self.peak = max(self.peak, self.used)

    def release(self, pixels: int) -> None:
        if pixels:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


def _load(job: Job, router: Router, src: Tree, dst: Tree, budget: PixelBudget, own: int = 0) -> Job:
    """Read the input once: hash it, decide whether its output is up to date,
    else decode it from memory (within the pixel budget) and cut it into tiles
    for the model ``router`` picks for it."""
    job.started = time.perf_counter()
    data = _read(src, job.source)
    job.bytes = job.input_size = len(data)
    job.input_sha256 = hashlib.sha256(data).hexdigest()
    record = job.record
    if record is not None:
        if (job.input_size, job.input_sha256) != (record.input_size, record.input_sha256):
            job.reason = WHY_INPUT_CHANGED
        elif dst.matches(job.target, record.output_size, record.output_sha256):
            job.up_to_date = True
            return job
        else:
            job.reason = WHY_OUTPUT_CHANGED
    pixels = image_pixels(data)
    budget.acquire(pixels, own)
    job.pixels = pixels
    try:
        job.loaded = decode_image(data)
        del data
        job.work = router.tiles(job.loaded)
    except BaseException:
        job.loaded = job.work = None
        budget.release(job.pixels)
        job.pixels = 0
        raise
    return job


def load_all(
    jobs: list[Job], router: Router, src: Tree, dst: Tree, budget: PixelBudget
) -> list[Exception | None]:
    """:func:`_load` each job in turn; what each raised (None: it was read)."""
    errors: list[Exception | None] = []
    for job in jobs:
        try:
            _load(job, router, src, dst, budget, sum(j.pixels for j in jobs))
        except (DenoiseError, OSError, ValueError, MemoryError) as exc:
            errors.append(exc)
        else:
            errors.append(None)
    return errors
