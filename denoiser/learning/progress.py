"""What a person watching a training or a folder run sees: on a terminal, a
bar that moves within each epoch (or over the files), with its rate and the
time left; and after each epoch, one line that scores the model as the
evaluation does (validation PSNR and SSIM), not only by its loss, whose
value means little to anyone but the optimiser.

The bars are drawn with rich on stderr; the caller shows them only when
stderr is a terminal, so logs never receive them.
"""

from __future__ import annotations

import time

import numpy as np

from denoiser.core.metrics import psnr, ssim

#: each epoch is scored on this many validation pairs: the first of the split, the same each epoch
SCORED_IMAGES = 256


def validation_sample(val_ds, images: int = SCORED_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """The first ``images`` (noisy, clean) pairs of the validation dataset that
    ``fit`` evaluates, as float32 arrays (none for an empty split); its noise
    is drawn from a fixed seed, so these are the same pairs every epoch."""
    noisy: list[np.ndarray] = []
    clean: list[np.ndarray] = []
    held = 0
    for x, y in val_ds:
        noisy.append(np.asarray(x, np.float32))
        clean.append(np.asarray(y, np.float32))
        held += len(noisy[-1])
        if held >= images:
            break
    if not noisy:
        return np.zeros((0, 1, 1, 1), np.float32), np.zeros((0, 1, 1, 1), np.float32)
    return np.concatenate(noisy)[:images], np.concatenate(clean)[:images]


def denoise_sample(model, noisy: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's outputs for ``noisy``, through the evaluation's own
    :func:`denoiser.runtimes.inference.predict_array` (fixed-size batches, so one trace
    for the whole run), clipped to [0, 1] as the evaluation scores them."""
    from denoiser.runtimes.inference import predict_array

    return np.clip(predict_array(model, noisy, batch_size), 0.0, 1.0)


def scores(clean: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Per-image mean PSNR (dB) and SSIM of ``test`` against ``clean``, by
    :mod:`denoiser.core.metrics`, the evaluation's own functions."""
    return {"psnr": float(psnr(clean, test).mean()), "ssim": float(ssim(clean, test).mean())}


def validation_scores(noisy: np.ndarray, clean: np.ndarray, batch_size: int):
    """A Keras callback that adds ``val_psnr`` and ``val_ssim`` (the model on
    ``noisy``, scored against ``clean``) to each epoch's logs (none when there
    are no pairs). Put it first: the callbacks after it (the epoch's record and
    line, TensorBoard, Keras' history) see them."""
    import keras

    class ValidationScores(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is None or not len(clean):
                return
            got = scores(clean, denoise_sample(self.model, noisy, batch_size))
            logs["val_psnr"], logs["val_ssim"] = got["psnr"], got["ssim"]

    return ValidationScores()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def epoch_line(
    epoch: int, epochs: int, record: dict, elapsed: float | None = None, images: int | None = None
) -> str:
    """The line that closes an epoch: validation PSNR and SSIM first (on
    ``images`` validation pairs), the epoch's time and the run's so far, then
    the losses, named as such (lower is better; their scale is the loss's own)."""
    parts = [f"epoch {epoch}/{epochs}:"]
    if "val_psnr" in record:
        on = f" ({images} images)" if images else ""
        parts.append(
            f"validation PSNR {record['val_psnr']:.2f} dB, SSIM {record['val_ssim']:.3f}{on};"
        )
    timing = f"{record.get('seconds', 0.0):.1f} s"
    if elapsed is not None:
        timing += f", {_clock(elapsed)} so far"
    parts.append(timing + ";")
    loss = f"training loss {record.get('loss', float('nan')):.4f}"
    if "val_loss" in record:
        loss += f", validation {record['val_loss']:.4f}"
    parts.append(loss + " (lower is better)")
    return " ".join(parts)


# --------------------------------------------------------------------------- bars


def _columns():
    """The bars' columns: what, bar, done/total, rate, elapsed, time left.
    A task's fields name its ``unit`` (steps, files), what its rate counts
    (``rate_unit``) and how many of those one unit holds (``per_unit``); a
    ``rate``, ``elapsed`` or ``left`` field, when set, replaces rich's own."""
    from rich.progress import BarColumn, ProgressColumn, TextColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            unit = task.fields.get("rate_unit", "")
            if task.fields.get("rate") is not None:
                rate = task.fields["rate"]
            else:
                speed = task.finished_speed or task.speed
                rate = speed * task.fields.get("per_unit", 1) if speed else None
            if rate is None:
                return Text(f"-- {unit}/s", style="progress.data.speed")
            shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.1f}"  # large photographs: < 1/s
            return Text(f"{shown} {unit}/s", style="progress.data.speed")

    class Elapsed(ProgressColumn):
        def render(self, task) -> Text:
            spent = task.fields.get("elapsed", task.finished_time or task.elapsed or 0)
            return Text(_clock(spent), style="progress.elapsed")

    class Left(ProgressColumn):
        max_refresh = 0.5  # as rich's own: a remaining time that does not flicker

        def render(self, task) -> Text:
            if task.finished:
                return Text("done", style="progress.remaining")
            left = task.fields["left"] if "left" in task.fields else task.time_remaining
            return Text(
                f"{_clock(left)} left" if left is not None else "-:-- left",
                style="progress.remaining",
            )

    return (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}/{task.total:,.0f} {task.fields[unit]}"),
        Rate(),
        Elapsed(),
        Left(),
    )


def progress_bar(transient: bool, console=None):
    """A rich Progress with the bars' columns, on stderr unless ``console``
    is given, redrawn four times a second (a small cost on two cores)."""
    from rich.console import Console
    from rich.progress import Progress

    return Progress(
        *_columns(),
        console=console or Console(stderr=True),
        transient=transient,
        refresh_per_second=4,
    )


def epoch_bar(epochs: int, steps: int, val_steps: int, batch_size: int, console=None):
    """A Keras callback drawing a bar within each epoch: training steps, then
    the validation steps; samples per second and the time left. Each epoch's
    bar is removed when the epoch ends, before its line is printed. Call its
    ``close()`` when ``fit`` ends however it ends (an error included)."""
    import keras

    class EpochBar(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.bar = None
            self.task = None

        def on_epoch_begin(self, epoch, logs=None):
            self.close()
            self.label = f"epoch {epoch + 1}/{epochs}"
            self.bar = progress_bar(transient=True, console=console)
            self.task = self.bar.add_task(
                self.label, total=steps, unit="steps", rate_unit="samples", per_unit=batch_size
            )
            self.bar.start()

        def on_train_batch_end(self, batch, logs=None):
            if self.bar is not None:
                self.bar.update(self.task, completed=batch + 1)

        def on_test_begin(self, logs=None):
            if self.bar is not None:  # the validation pass of an epoch (not a lone evaluate)
                self.bar.reset(self.task, total=val_steps, description=f"{self.label} validation")

        def on_test_batch_end(self, batch, logs=None):
            if self.bar is not None:
                self.bar.update(self.task, completed=batch + 1)

        def on_epoch_end(self, epoch, logs=None):
            self.close()

        def close(self):
            if self.bar is not None:
                self.bar.stop()
                self.bar = None

    return EpochBar()


class FilesBar:
    """A bar over a folder run: files done of the total, images denoised per
    second, time left. ``done``: files already decided when the bar starts
    (the scan's verdicts arrive at once, before any file is read): they count
    as done, not toward the rate. ``started``: when the run began (a
    ``time.monotonic()``), since the bar itself appears only once the first
    batch is done. Rate and time left are averages since then: files finish
    in bursts (a batch of tiles at a time), which rich's own windowed speed
    would read as thousands a second."""

    def __init__(self, total: int, done: int = 0, started: float | None = None, console=None):
        self.bar = progress_bar(transient=False, console=console)
        self.task = self.bar.add_task(
            "denoising", total=total, completed=done, unit="files", rate_unit="images"
        )
        self.total, self.first, self.denoised = total, done, 0
        self.started = time.monotonic() if started is None else started
        self.bar.start()

    def update(self, done: int, denoised: int = 1) -> None:
        """``done`` files finished in all; ``denoised`` of those finished since
        the last update were denoised (not skipped, not failed): a bool for
        one file, a count for a chunk of them."""
        self.denoised += int(denoised)
        spent = max(time.monotonic() - self.started, 1e-6)
        files_per_second = (done - self.first) / spent
        self.bar.update(
            self.task,
            completed=done,
            rate=self.denoised / spent,
            left=(self.total - done) / files_per_second if files_per_second > 0 else None,
            elapsed=spent,
        )

    def close(self) -> None:
        self.bar.stop()
