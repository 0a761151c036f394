"""A model's LiteRT export: made at training time when the model converts, the
same outputs as Keras within float rounding, and a small folder denoised by
`denoise folder` without importing TensorFlow (a real Prefect server, a real
command in its own process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from denoiser.core.errors import ConfigError, ModelError
from denoiser.folder import BatchPredictor
from denoiser.learning.training import probe_shape
from denoiser.runtimes.runtime import (
    LITERT_FILE,
    SMALL_JOB_BYTES,
    choose_runtime,
    export_litert,
    litert_available,
    load_litert,
)
from tests.faults.harness import denoise_env

pytestmark = pytest.mark.skipif(
    not litert_available(), reason="ai-edge-litert is a dependency: pip install -e ."
)


def unet(seed: int = 0):
    import keras

    from denoiser.nets.models import build_model

    keras.utils.set_random_seed(seed)
    return build_model("unet")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An untrained unet (random weights) in a store's model folder, with its
    export and a card that names both files."""
    from denoiser.core.files import file_sha256

    store = tmp_path_factory.mktemp("store")
    folder = store / "models" / "20260101-000000-unet-0001"
    folder.mkdir(parents=True)
    model = unet()
    model.save(folder / "model.keras")
    facts = export_litert(model, folder / LITERT_FILE, probe_shape(model))
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


def test_the_export_gives_keras_outputs_for_any_batch_shape(exported):
    model, folder, facts = exported
    from denoiser.core.files import file_sha256

    assert facts["litert_sha256"] == file_sha256(folder / LITERT_FILE)
    assert facts["litert_bytes"] == (folder / LITERT_FILE).stat().st_size
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    lite = load_litert(folder / LITERT_FILE, facts["litert_sha256"])
    assert lite.input_shape == (None, None, None, 1)
    rng = np.random.default_rng(1)
    for shape in [(3, 32, 48, 1), (1, 64, 64, 1), (5, 24, 24, 1), (3, 32, 48, 1)]:
        x = rng.random(shape, dtype=np.float32)
        want = np.asarray(model.predict_on_batch(x))
        got = lite.predict_on_batch(x)
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) < 1e-4
        # as 8-bit pixels: at most one level apart, and rarely
        diff = np.abs(np.rint(got * 255).astype(int) - np.rint(want * 255).astype(int))
        assert diff.max() <= 1 and diff.mean() < 1e-3


def test_batches_run_at_their_own_size_not_padded(exported):
    _, folder, facts = exported
    lite = load_litert(folder / LITERT_FILE, facts["litert_sha256"])
    seen = []

    class Recording:
        pads_batches = False

        def predict_on_batch(self, x):
            seen.append(x.shape[0])
            return lite.predict_on_batch(x)

    tiles = np.random.default_rng(2).random((10, 32, 32, 1), dtype=np.float32)
    out = BatchPredictor(Recording(), batch_size=4)(tiles)
    assert seen == [4, 4, 2]
    assert np.allclose(out, lite.predict_on_batch(tiles), atol=1e-5)


def test_a_model_outside_litert_builtins_gets_no_export(tmp_path):
    """unet-small needs a TensorFlow-only convolution in LiteRT: no file, no
    card facts, and the model is run by Keras."""
    import keras

    from denoiser.nets.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model("unet-small")
    assert export_litert(model, tmp_path / LITERT_FILE, probe_shape(model)) == {}
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_export_is_refused_with_one_line(exported, tmp_path):
    _, folder, facts = exported
    blob = bytearray((folder / LITERT_FILE).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / LITERT_FILE).write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="corrupt LiteRT model"):
        load_litert(tmp_path / LITERT_FILE, facts["litert_sha256"])
    (tmp_path / "junk.tflite").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot load LiteRT model") as err:
        load_litert(tmp_path / "junk.tflite")
    assert "\n" not in str(err.value)


def test_auto_runs_litert_for_small_folders_of_models_with_an_export():
    assert choose_runtime("auto", True, 20 * 700) == "litert"
    assert choose_runtime("auto", True, SMALL_JOB_BYTES) == "litert"
    assert choose_runtime("auto", True, SMALL_JOB_BYTES + 1) == "keras"
    assert choose_runtime("auto", False, 100) == "keras"
    assert choose_runtime("auto", True, None) == "keras"  # the folder could not be sized
    assert choose_runtime("keras", True, 100) == "keras"
    assert choose_runtime("litert", True, 10 * SMALL_JOB_BYTES) == "litert"
    with pytest.raises(ConfigError, match="no LiteRT export"):
        choose_runtime("litert", False, 100)
    with pytest.raises(ConfigError, match="--runtime must be one of"):
        choose_runtime("onnx", True, 100)


def _folder_run(tmp: Path, store: Path | str, api: str, src: Path, out: Path, *extra: str):
    """`denoise folder` in its own process; prints whether TensorFlow got imported."""
    env = denoise_env(store, tmp / "prefect-home", api, None, None)
    code = (
        "import sys\nfrom flows.cli import main\n"
        f"rc = main({['folder', str(src), str(out), *extra]!r})\n"
        "print('tensorflow imported:', 'tensorflow' in sys.modules)\nsys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp, env=env, text=True, capture_output=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "XNNPACK" not in proc.stderr  # LiteRT's start-up line only with --debug
    summary_path = next(
        line.split("report: ", 1)[1].strip()
        for line in proc.stdout.splitlines()
        if line.startswith("report: ")
    )
    summary_path = summary_path.rsplit("/", 1)[0] + "/summary.json"
    if summary_path.startswith("s3://"):
        import s3fs

        return proc.stdout, json.loads(s3fs.S3FileSystem().cat_file(summary_path))
    return proc.stdout, json.loads(Path(summary_path).read_text())


def test_a_small_folder_is_denoised_without_tensorflow(exported, prefect_api, tmp_path):
    _, folder, facts = exported
    store = folder.parent.parent
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(src / f"{i:02}.png")

    out, summary = _folder_run(tmp_path, store, prefect_api, src, tmp_path / "lite")
    assert "tensorflow imported: False" in out
    assert summary["model"]["runtime"] == "litert"
    assert summary["counts"]["denoised"] == 20

    out, summary = _folder_run(
        tmp_path, store, prefect_api, src, tmp_path / "keras", "--runtime", "keras"
    )
    assert "tensorflow imported: True" in out
    assert summary["model"]["runtime"] == "keras"
    levels = [
        np.abs(
            np.asarray(Image.open(tmp_path / "lite" / p.name), int)
            - np.asarray(Image.open(tmp_path / "keras" / p.name), int)
        )
        for p in sorted(src.iterdir())
    ]
    assert max(d.max() for d in levels) <= 1  # the same images, up to float rounding
    assert np.mean([d.mean() for d in levels]) < 1e-3


def test_a_bucket_stores_export_is_fetched_and_run(exported, prefect_api, s3, tmp_path):
    """A store in a bucket: the export is fetched (checked against the card) and
    the folder denoised with it, TensorFlow never imported."""
    from artifacts.registry import register_model

    _, folder, _ = exported
    fs = s3.fs()
    store = f"s3://{s3.bucket('lite-store')}/team"
    for p in folder.iterdir():
        fs.put_file(str(p), f"{store}/models/{folder.name}/{p.name}")
    register_model(store, f"{store}/models/{folder.name}")
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(src / f"{i}.png")

    out, summary = _folder_run(tmp_path, store, prefect_api, src, tmp_path / "out")
    assert "tensorflow imported: False" in out
    assert summary["model"]["runtime"] == "litert"
    assert summary["model"]["litert_path"] == f"{store}/models/{folder.name}/{LITERT_FILE}"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        f"{i}.png" for i in range(4)
    ]


def test_a_kept_server_serves_later_commands(exported, tmp_path):
    """`denoise server start` keeps a Prefect server for this PREFECT_HOME; a
    folder run without PREFECT_API_URL reports to it (no temporary server),
    and `denoise server stop` ends it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.faults.harness import free_port

    _, folder, _ = exported
    env = denoise_env(folder.parent.parent, tmp_path / "prefect-home", None, None, None)
    env.pop("PREFECT_API_URL", None)
    (tmp_path / "prefect-home").mkdir()
    port = free_port()

    def denoise(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=tmp_path,
            env=env,
            text=True,
            capture_output=True,
            timeout=300,
        )

    assert denoise("server", "status").returncode == 1
    started = denoise("server", "start", "--port", str(port))
    try:
        assert started.returncode == 0, started.stderr
        assert f"started at http://127.0.0.1:{port}" in started.stdout
        assert denoise("server", "status").returncode == 0
        src = tmp_path / "in"
        src.mkdir()
        Image.fromarray(np.full((28, 28), 99, np.uint8)).save(src / "a.png")
        run = denoise("folder", str(src), str(tmp_path / "out"))
        assert run.returncode == 0, run.stderr
        assert "temporary server" not in run.stderr.lower()
        api = f"http://127.0.0.1:{port}/api"
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            names = {f.name for f in client.read_flows()}
        assert "denoise-folder" in names  # the run is in the kept server's database
    finally:
        stopped = denoise("server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert denoise("server", "status").returncode == 1


def test_models_says_which_versions_have_an_export(exported, tmp_path, capsys, monkeypatch):
    from flows.cli import main

    _, folder, _ = exported
    monkeypatch.setenv("COLUMNS", "250")
    plain = tmp_path / "store" / "models" / "20260101-000000-unet-0002"
    plain.mkdir(parents=True)
    (plain / "model.keras").write_bytes((folder / "model.keras").read_bytes())
    card = json.loads((folder / "model.json").read_text())
    card = {k: v for k, v in card.items() if not k.startswith("litert")}
    (plain / "model.json").write_text(json.dumps({**card, "version": plain.name}))
    for store, answer in ((folder.parent.parent, "yes"), (tmp_path / "store", "no")):
        assert main(["--store", str(store), "models"]) == 0
        out = capsys.readouterr().out
        header = next(line for line in out.splitlines() if "LiteRT" in line)
        row = next(line for line in out.splitlines() if "-unet-000" in line)
        cells = [c.strip() for c in row.split("│")]
        assert cells[[c.strip() for c in header.split("┃")].index("LiteRT")] == answer
