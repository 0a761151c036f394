"""A model's OpenVINO export: made at training time and by `denoise models
export`, the same outputs as Keras at f32, refused when damaged, and a folder
denoised by `denoise folder` with it without importing TensorFlow (a real
Prefect server, a real command in its own process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from denoiser.core.errors import ConfigError, ModelError
from denoiser.folder import BatchPredictor, SelfEnsemble
from denoiser.learning.training import probe_shape
from denoiser.runtimes.openvino_runtime import (
    BIN_FILE,
    MAX_BF16_LOSS_DB,
    XML_FILE,
    export_openvino,
    load_openvino,
    precision_on_cpu,
    precision_to_run,
)
from denoiser.runtimes.runtime import EXPORT_TOLERANCE, choose_runtime, openvino_available
from tests.faults.harness import denoise_env

# openvino is a dependency: a missing one fails here (under CI=true), it is not skipped
pytestmark = pytest.mark.skipif(
    not openvino_available() and os.environ.get("CI") != "true", reason="pip install openvino"
)

VERSION = "20260101-000000-unet-0001"


def unet(seed: int = 0):
    import keras

    from denoiser.nets.models import build_model

    keras.utils.set_random_seed(seed)
    return build_model("unet")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Compiled models go to a test's own cache, not the user's."""
    monkeypatch.setenv("DENOISE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An untrained unet (random weights) in a store's model folder, with its
    OpenVINO export and a card that names every file."""
    from denoiser.core.files import file_sha256

    store = tmp_path_factory.mktemp("store")
    folder = store / "models" / VERSION
    folder.mkdir(parents=True)
    model = unet()
    model.save(folder / "model.keras")
    facts = export_openvino(model, folder, probe_shape(model))
    card = {
        "version": folder.name,
        "architecture": "unet",
        "params": model.count_params(),
        "quality_gate": {"passed": True},
        "data": {"domain": "digits"},
        "model_sha256": file_sha256(folder / "model.keras"),
        **facts,
    }
    (folder / "model.json").write_text(json.dumps(card))
    return model, folder, facts


def test_the_export_gives_keras_outputs_at_f32_for_any_batch_shape(exported):
    from denoiser.core.files import file_sha256

    model, folder, facts = exported
    assert facts["openvino_xml_sha256"] == file_sha256(folder / XML_FILE)
    assert facts["openvino_bin_sha256"] == file_sha256(folder / BIN_FILE)
    assert facts["openvino_bytes"] == sum((folder / f).stat().st_size for f in (XML_FILE, BIN_FILE))
    assert facts["openvino_precision"] == "bf16"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    ov = load_openvino(
        folder / XML_FILE,
        folder / BIN_FILE,
        facts["openvino_xml_sha256"],
        facts["openvino_bin_sha256"],
        precision="f32",
    )
    assert ov.input_shape == (None, None, None, 1)
    assert ov.precision == "f32"
    rng = np.random.default_rng(1)
    for shape in [(3, 32, 48, 1), (1, 64, 64, 1), (5, 24, 24, 1), (3, 32, 48, 1), (1, 200, 136, 1)]:
        x = rng.random(shape, dtype=np.float32)
        want = np.asarray(model.predict_on_batch(x))
        got = ov.predict_on_batch(x)
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) < EXPORT_TOLERANCE


def test_the_export_forks_no_process(tmp_path):
    """OpenVINO's converter reported usage from forked children which, offline,
    never ended: a training was held at its exit. The export forks nothing."""
    import os

    forks = []
    os.register_at_fork(before=lambda: forks.append(1))
    model = unet(seed=1)
    assert export_openvino(model, tmp_path, probe_shape(model))
    assert forks == []


def test_bf16_outputs_are_close_and_batches_run_at_their_own_size(exported):
    """bf16 where the CPU has it (OpenVINO runs f32 elsewhere): a few 8-bit
    levels at most; batches are not padded."""
    model, folder, facts = exported
    ov = load_openvino(folder / XML_FILE, folder / BIN_FILE, precision="bf16")
    assert ov.precision in ("bf16", "f32")
    seen = []

    class Recording:
        pads_batches = False

        def predict_on_batch(self, x):
            seen.append(x.shape[0])
            return ov.predict_on_batch(x)

    tiles = np.random.default_rng(2).random((10, 32, 32, 1), dtype=np.float32)
    out = BatchPredictor(Recording(), batch_size=4)(tiles)
    assert seen == [4, 4, 2]
    assert np.max(np.abs(out - np.asarray(model.predict_on_batch(tiles)))) < 2e-2


def test_an_openvino_model_gets_batches_of_one_512x512_image_at_most(exported):
    """OpenVINO runs a photo model fastest a pixel at batch 1 on the CPU: its
    batches hold at most 512x512 pixels (Keras' 1 MP), and a self-ensemble
    of it keeps that."""
    _, folder, _ = exported
    ov = load_openvino(folder / XML_FILE, folder / BIN_FILE)
    for model in (ov, SelfEnsemble(ov)):
        predictor = BatchPredictor(model)
        assert predictor.batch_for((512, 512)) == 1
        assert predictor.batch_for((256, 256)) == 4
        assert predictor.batch_for((704, 704)) == 1
        assert predictor.at_most(2).batch_for((128, 128)) == 2
    assert BatchPredictor(object()).batch_for((512, 512)) == 4  # Keras: 1 MP a batch


def test_bf16_losing_too_much_runs_at_f32():
    assert precision_to_run(30.0, 30.0 - MAX_BF16_LOSS_DB / 2, "bf16") == "bf16"
    assert precision_to_run(30.0, 30.0 - 2 * MAX_BF16_LOSS_DB, "bf16") == "f32"
    # scored on a CPU without bf16: nothing was lost, nothing to decide on
    assert precision_to_run(30.0, 30.0, "f32") == "bf16"


def test_an_export_runs_at_bf16_only_where_the_cpu_computes_it():
    assert precision_on_cpu("bf16", frozenset({"avx2", "amx_bf16"})) == "bf16"
    assert precision_on_cpu("bf16", frozenset({"avx512f", "avx512_bf16"})) == "bf16"
    assert precision_on_cpu(None, frozenset({"amx_bf16"})) == "bf16"  # a card without one
    assert precision_on_cpu("bf16", frozenset({"avx2", "avx512f"})) == "f32"  # emulated: f32
    assert precision_on_cpu("f32", frozenset({"amx_bf16"})) == "f32"


def test_models_shows_the_precision_this_cpu_runs_the_export_at(exported, tmp_path, capsys):
    """The card asks for bf16; `denoise models` shows what OpenVINO really
    compiles the export to on this CPU (f32 where it has no bf16 units)."""
    from flows.cli import main

    _, folder, facts = exported
    store = tmp_path / "store"
    shutil.copytree(folder, store / "models" / VERSION)
    ran = load_openvino(
        folder / XML_FILE, folder / BIN_FILE, precision=facts["openvino_precision"]
    ).precision

    assert main(["--store", str(store), "models"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if VERSION in ln)
    cells = [c.strip() for c in row.replace("│", "|").split("|")]
    assert ran in cells and ({"bf16", "f32"} - {ran}).isdisjoint(cells), (ran, row)


def test_a_damaged_export_is_refused_with_one_line(exported, tmp_path):
    _, folder, facts = exported
    shutil.copy(folder / XML_FILE, tmp_path / XML_FILE)
    blob = bytearray((folder / BIN_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / BIN_FILE).write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="corrupt OpenVINO model") as err:
        load_openvino(
            tmp_path / XML_FILE,
            tmp_path / BIN_FILE,
            facts["openvino_xml_sha256"],
            facts["openvino_bin_sha256"],
        )
    assert str(err.value).startswith(str(tmp_path / BIN_FILE))
    (tmp_path / "junk.xml").write_text("<net>not a model")
    with pytest.raises(ModelError, match="cannot load OpenVINO model") as err:
        load_openvino(tmp_path / "junk.xml", tmp_path / BIN_FILE)
    assert "\n" not in str(err.value)


def test_auto_runs_openvino_on_a_cpu_when_the_model_has_its_export(monkeypatch):
    import denoiser.runtimes.runtime as runtime

    monkeypatch.setattr(runtime, "gpu_present", lambda: False)
    assert choose_runtime("auto", has_openvino=True) == "openvino"  # any folder, in chunks too
    assert choose_runtime("auto", has_openvino=False) == "keras"
    assert choose_runtime("keras", has_openvino=True) == "keras"
    with pytest.raises(ConfigError, match="no OpenVINO export"):
        choose_runtime("openvino", has_openvino=False)
    monkeypatch.setattr(runtime, "gpu_present", lambda: True)  # Keras on a GPU
    assert choose_runtime("auto", has_openvino=True) == "keras"
    assert choose_runtime("openvino", has_openvino=True) == "openvino"
    monkeypatch.setattr(runtime, "gpu_present", lambda: False)
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    assert choose_runtime("auto", has_openvino=True) == "keras"
    with pytest.raises(ConfigError, match="pip install openvino"):
        choose_runtime("openvino", has_openvino=True)


def _folder_run(tmp: Path, store: Path, api: str, src: Path, out: Path, *extra: str):
    """`denoise folder` in its own process; prints whether TensorFlow got imported."""
    env = denoise_env(store, tmp / "prefect-home", api, None, None)
    env["DENOISE_CACHE"] = str(tmp / "cache")
    code = (
        "import sys\nfrom flows.cli import main\n"
        f"rc = main({['folder', str(src), str(out), *extra]!r})\n"
        "print('tensorflow imported:', 'tensorflow' in sys.modules)\nsys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp, env=env, text=True, capture_output=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = next(
        line.split("report: ", 1)[1].strip()
        for line in proc.stdout.splitlines()
        if line.startswith("report: ")
    )
    return proc.stdout, json.loads((Path(report).parent / "summary.json").read_text())


def test_a_folder_is_denoised_by_openvino_without_tensorflow(exported, prefect_api, tmp_path):
    _, folder, _ = exported
    store = folder.parent.parent
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(src / f"{i:02}.png")

    out, summary = _folder_run(tmp_path, store, prefect_api, src, tmp_path / "ov")
    assert "tensorflow imported: False" in out
    assert summary["model"]["runtime"] == "openvino"
    assert summary["model"]["openvino_xml_path"] == str(folder / XML_FILE)
    assert summary["counts"]["denoised"] == 12
    assert any((tmp_path / "cache" / "openvino").iterdir())  # the next command skips compiling

    # in chunks on Dask: the choice travels to the workers in the model summary
    out, summary = _folder_run(
        tmp_path, store, prefect_api, src, tmp_path / "chunks", "--workers", "2"
    )
    assert summary["model"]["runtime"] == "openvino"
    assert summary["counts"]["denoised"] == 12

    out, summary = _folder_run(
        tmp_path, store, prefect_api, src, tmp_path / "keras", "--runtime", "keras"
    )
    assert "tensorflow imported: True" in out
    for other in ("chunks", "keras"):
        levels = [
            np.abs(
                np.asarray(Image.open(tmp_path / "ov" / p.name), int)
                - np.asarray(Image.open(tmp_path / other / p.name), int)
            )
            for p in sorted(src.iterdir())
        ]
        assert max(d.max() for d in levels) <= 1  # the same images, up to float rounding


def test_models_export_adds_the_export_to_a_model_without_one(exported, tmp_path, capsys):
    from denoiser.core.files import file_sha256
    from flows.cli import main

    _, folder, _ = exported
    plain = tmp_path / "store" / "models" / VERSION
    plain.mkdir(parents=True)
    shutil.copy(folder / "model.keras", plain / "model.keras")
    card = json.loads((folder / "model.json").read_text())
    card = {k: v for k, v in card.items() if not k.startswith("openvino")}
    (plain / "model.json").write_text(json.dumps(card))
    store = str(tmp_path / "store")

    assert main(["--store", store, "models"]) == 0
    assert "OpenVINO" in capsys.readouterr().out
    assert main(["--store", store, "models", "export", VERSION]) == 0
    assert "OpenVINO export made" in capsys.readouterr().out
    card = json.loads((plain / "model.json").read_text())
    assert card["openvino_xml_sha256"] == file_sha256(plain / XML_FILE)
    assert card["openvino_bin_sha256"] == file_sha256(plain / BIN_FILE)
    assert card["openvino_precision"] == "bf16"
    assert card["model_sha256"] == file_sha256(plain / "model.keras")  # the rest kept
    assert not [p for p in plain.iterdir() if p.name.startswith(".")]
    assert main(["--store", store, "models", "export", VERSION]) == 0
    assert "already has an OpenVINO export" in capsys.readouterr().out

    for bad in ("../models", "nope", f"{VERSION}/..", "/etc"):
        assert main(["--store", store, "models", "export", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("unknown model version" in err or "not a version" in err)


def test_models_export_in_a_bucket_pushes_both_files_and_the_card_last(exported, s3, capsys):
    import hashlib

    from flows.cli import main

    _, folder, _ = exported
    fs = s3.fs()
    store = f"s3://{s3.bucket('ov-store')}/team"
    where = f"{store}/models/{VERSION}"
    card = json.loads((folder / "model.json").read_text())
    card = {k: v for k, v in card.items() if not k.startswith("openvino")}
    fs.put_file(str(folder / "model.keras"), f"{where}/model.keras")
    fs.pipe_file(f"{where}/model.json", json.dumps(card).encode())

    assert main(["--store", store, "models", "export", VERSION]) == 0, capsys.readouterr().err
    fs.invalidate_cache()
    card = json.loads(fs.cat_file(f"{where}/model.json"))
    for name, field in ((XML_FILE, "openvino_xml_sha256"), (BIN_FILE, "openvino_bin_sha256")):
        assert hashlib.sha256(fs.cat_file(f"{where}/{name}")).hexdigest() == card[field]
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(where, detail=False))
    assert names == sorted(["model.keras", "model.json", XML_FILE, BIN_FILE])
