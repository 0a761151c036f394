"""What training and folder runs show: the epoch line's validation scores,
the bars (on a terminal only). Tiny models and arrays; no Prefect."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from rich.console import Console

from denoiser.config import TrainConfig
from denoiser.core.metrics import psnr, ssim
from denoiser.learning.progress import (
    FilesBar,
    epoch_bar,
    epoch_line,
    validation_sample,
    validation_scores,
)
from denoiser.nets.models import build_model, load_model


def _pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    clean = (rng.random((n, 28, 28, 1)) < 0.2).astype(np.float32)
    noisy = np.clip(clean + rng.normal(0, 0.3, clean.shape), 0, 1).astype(np.float32)
    return noisy, clean


def _expected(model, noisy, clean) -> tuple[float, float]:
    """The model scored by denoiser.core.metrics on its clipped outputs, computed apart."""
    out = np.clip(model.predict(noisy, batch_size=len(noisy), verbose=0), 0, 1)
    return float(psnr(clean, out).mean()), float(ssim(clean, out).mean())


def _terminal() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=160, color_system=None), buf


def test_epoch_line_shows_validation_psnr_and_ssim_of_denoiser_metrics():
    import keras

    noisy, clean = _pairs(12, 0)
    val_noisy, val_clean = _pairs(10, 1)
    model = build_model("unet-small")
    model.compile(keras.optimizers.Adam(1e-3), loss="mse")
    records = []

    class Keep(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            records.append(dict(logs))

    model.fit(
        noisy,
        clean,
        batch_size=4,
        epochs=1,
        validation_data=(val_noisy, val_clean),
        callbacks=[validation_scores(val_noisy, val_clean, batch_size=4), Keep()],
        verbose=0,
    )
    want_psnr, want_ssim = _expected(model, val_noisy, val_clean)
    record = {**records[0], "seconds": 3.25}
    assert record["val_psnr"] == pytest.approx(want_psnr, abs=1e-4)
    assert record["val_ssim"] == pytest.approx(want_ssim, abs=1e-5)

    line = epoch_line(1, 3, record, elapsed=75.0, images=10)
    assert line.startswith(
        f"epoch 1/3: validation PSNR {want_psnr:.2f} dB, SSIM {want_ssim:.3f} (10 images);"
    )
    assert "3.2 s, 1:15 so far" in line
    # the loss is there, after the scores, and named as a loss
    assert f"training loss {record['loss']:.4f}, validation {record['val_loss']:.4f}" in line
    assert line.index("PSNR") < line.index("loss")


def test_epoch_line_without_scores_or_elapsed_time():
    line = epoch_line(2, 2, {"loss": -1.5, "seconds": 40.0})
    assert line == "epoch 2/2: 40.0 s; training loss -1.5000 (lower is better)"


def test_training_records_and_logs_the_scores_of_the_validation_sample(
    tiny_shards, tmp_path, capfd
):
    """train_model's records hold the scores of the saved model on the first
    validation pairs, by denoiser.core.metrics; without show_progress no bar is drawn."""
    from denoiser.learning.training import make_dataset, train_model

    seen, lines = [], []
    # float32 on every CPU: in mixed bfloat16 ("auto" where the CPU has it) the epoch's
    # scores come from bfloat16 arithmetic, the saved model's from float32
    config = TrainConfig(
        architecture="unet-small", epochs=1, batch_size=16, patience=10, precision="float32"
    )
    train_model(
        tiny_shards,
        config,
        tmp_path / "m",
        tmp_path / "b",
        on_epoch_end=lambda e, n, rec: seen.append(rec),
        log=lambda msg, *args: lines.append(msg % args),
    )
    model = load_model(tmp_path / "m" / "model.keras")
    noisy, clean = validation_sample(make_dataset(tiny_shards, "validation", 16, training=False))
    assert len(clean) == 8  # the whole validation split of the tiny set
    want_psnr, want_ssim = _expected(model, noisy, clean)
    assert seen[0]["val_psnr"] == pytest.approx(want_psnr, abs=1e-4)
    assert seen[0]["val_ssim"] == pytest.approx(want_ssim, abs=1e-5)
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["history"][0]["val_psnr"] == seen[0]["val_psnr"]
    assert (tmp_path / "m" / "history.csv").read_text().splitlines()[0].count("val_psnr") == 1
    # what is trained, and what the epochs are scored on, said before the first epoch
    assert lines[0].startswith("training unet-small (")
    noisy_psnr = float(psnr(clean, noisy).mean())
    assert lines[1].startswith("each epoch is scored on the first 8 validation images")
    assert f"noisy inputs: PSNR {noisy_psnr:.2f} dB" in lines[1]
    assert "samples/s" not in capfd.readouterr().err


def _shown(progress) -> str:
    """What a bar shows now (its own redraws come only a few times a second)."""
    console = Console(file=io.StringIO(), record=True, width=160, color_system=None)
    console.print(progress.get_renderable())
    return console.export_text()


def test_epoch_bar_moves_within_the_epoch_and_is_gone_before_its_line():
    import keras

    noisy, clean = _pairs(12, 2)
    model = build_model("unet-small")
    model.compile(keras.optimizers.Adam(1e-3), loss="mse")
    console, buf = _terminal()
    bar = epoch_bar(epochs=2, steps=3, val_steps=2, batch_size=4, console=console)
    shown, bar_at_epoch_end = [], []

    class After(keras.callbacks.Callback):  # as the callback printing the epoch line
        def on_train_batch_end(self, batch, logs=None):
            shown.append(_shown(bar.bar))

        def on_test_batch_end(self, batch, logs=None):
            shown.append(_shown(bar.bar))

        def on_epoch_end(self, epoch, logs=None):
            bar_at_epoch_end.append(bar.bar)

    model.fit(
        noisy,
        clean,
        batch_size=4,
        epochs=2,
        validation_data=(noisy[:8], clean[:8]),
        callbacks=[bar, After()],
        verbose=0,
    )
    bar.close()
    assert bar_at_epoch_end == [None, None]  # each epoch's bar gone before its line
    assert len(shown) == 2 * (3 + 2)
    assert shown[0].startswith("epoch 1/2 ") and "1/3 steps" in shown[0]
    assert "3/3 steps" in shown[2] and re.search(r"[\d,]+ samples/s", shown[2])
    assert shown[3].startswith("epoch 1/2 validation ") and "1/2 steps" in shown[3]
    assert shown[5].startswith("epoch 2/2 ") and " left" in shown[5]
    assert buf.getvalue()  # drawn on the (terminal) console it was given


def test_files_bar_rates_the_denoised_images_not_the_scan_s_verdicts(monkeypatch):
    import denoiser.learning.progress as progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    console, buf = _terminal()
    bar = FilesBar(total=40, done=30, console=console)  # 30 decided by the scan, at once
    shown = []
    for done in range(31, 41):  # then one file a second, every other one skipped
        now[0] += 1.0
        bar.update(done, denoised=done % 2 == 1)
        shown.append(_shown(bar.bar))
    bar.close()
    # after 4 s: 4 files read, 2 denoised (0.5 images/s); 6 to go at a file a second
    assert "34/40 files" in shown[3] and " 0.5 images/s 0:04 0:06 left" in shown[3]
    task = bar.bar.tasks[0]
    assert task.fields["rate"] == pytest.approx(5 / 10)
    assert "40/40 files" in shown[-1] and shown[-1].rstrip().endswith("done")
    assert "denoising" in buf.getvalue()
