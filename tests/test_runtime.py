"""Which runtime runs a model now that LiteRT is retired: OpenVINO on a CPU
when the model has its export, else Keras; `--runtime litert` refused in one
line saying what to use; and a model trained before the retirement (a stray
`model.tflite` in its folder, `litert_*` facts on its card) still listed,
resolved and run by `denoise folder` (a real Prefect server, a real command in
its own process), its stray file never read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from denoiser.core.errors import ConfigError
from denoiser.learning.training import probe_shape
from denoiser.runtimes.openvino_runtime import BIN_FILE, XML_FILE, export_openvino
from denoiser.runtimes.runtime import RUNTIMES, check_runtime, choose_runtime, openvino_available
from tests.faults.harness import denoise_env

# openvino is a dependency: a missing one fails here (under CI=true), it is not skipped
pytestmark = pytest.mark.skipif(
    not openvino_available() and os.environ.get("CI") != "true", reason="pip install openvino"
)

STRAY = "model.tflite"  # what training wrote beside the model before LiteRT was retired


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Compiled models go to a test's own cache, not the user's."""
    monkeypatch.setenv("DENOISE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def unet(seed: int = 0):
    import keras

    from denoiser.nets.models import build_model

    keras.utils.set_random_seed(seed)
    return build_model("unet")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A model folder as training left it before LiteRT was retired: an
    untrained unet (random weights), its OpenVINO export, a stray
    ``model.tflite`` (not a model: whatever reads it fails) and a card naming
    it by its sha256 and size."""
    from denoiser.core.files import file_sha256

    store = tmp_path_factory.mktemp("store")
    folder = store / "models" / "20260101-000000-unet-0001"
    folder.mkdir(parents=True)
    model = unet()
    model.save(folder / "model.keras")
    facts = export_openvino(model, folder, probe_shape(model))
    assert facts, "the unet did not export to OpenVINO"
    (folder / STRAY).write_bytes(b"TFL3 not a model any more" * 40)
    card = {
        "version": folder.name,
        "architecture": "unet",
        "params": model.count_params(),
        "quality_gate": {"passed": True},
        "data": {"domain": "digits"},
        "model_sha256": file_sha256(folder / "model.keras"),
        "litert_sha256": file_sha256(folder / STRAY),
        "litert_bytes": (folder / STRAY).stat().st_size,
        **facts,
    }
    (folder / "model.json").write_text(json.dumps(card))
    return model, folder, facts


def test_auto_runs_openvino_on_a_cpu_when_the_model_has_its_export_else_keras(monkeypatch):
    import denoiser.runtimes.runtime as runtime

    monkeypatch.setattr(runtime, "gpu_present", lambda: False)
    monkeypatch.setattr(runtime, "openvino_available", lambda: True)
    assert choose_runtime("auto", has_openvino=True) == "openvino"
    assert choose_runtime("auto", has_openvino=False) == "keras"  # no export: Keras, any size
    assert choose_runtime("keras", has_openvino=True) == "keras"
    assert choose_runtime("openvino", has_openvino=True) == "openvino"
    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    assert choose_runtime("auto", has_openvino=True) == "keras"  # OpenVINO not installed


def test_litert_is_refused_in_one_line_saying_what_to_use():
    assert RUNTIMES == ("auto", "keras", "openvino")
    for asked in (lambda: check_runtime("litert"), lambda: choose_runtime("litert", True)):
        with pytest.raises(ConfigError, match="LiteRT was retired") as err:
            asked()
        line = str(err.value)
        assert "\n" not in line
        assert "--runtime openvino" in line and "denoise models export VERSION" in line
        assert "--runtime keras" in line
    with pytest.raises(ConfigError, match="--runtime must be one of auto, keras, openvino"):
        choose_runtime("onnx", True)
    assert check_runtime("openvino") == "openvino"


def test_folder_with_runtime_litert_exits_2_with_one_line_before_any_work(
    exported, tmp_path, capsys
):
    """Refused before a Prefect server starts or a model loads; `--help`
    offers the runtimes there are."""
    from flows.cli import main

    _, folder, _ = exported
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.full((28, 28), 9, np.uint8)).save(src / "a.png")
    store = str(folder.parent.parent)
    rc = main(["--store", store, "folder", str(src), str(tmp_path / "out"), "--runtime", "litert"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("denoise: error: --runtime litert: "), err
    assert "LiteRT was retired" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["folder", "--help"])
    folder_help = capsys.readouterr().out
    assert "{auto,keras,openvino}" in folder_help and "litert" not in folder_help.lower()


def test_an_old_card_with_litert_facts_still_loads_and_names_no_litert_file(exported):
    from artifacts.resolution import resolve_model
    from denoiser.core.cards import load_card

    _, folder, facts = exported
    card = load_card(folder)
    assert card.openvino_xml_sha256 == facts["openvino_xml_sha256"]
    assert card.to_dict()["litert_bytes"] == (folder / STRAY).stat().st_size  # kept, unread
    ref = resolve_model(str(folder.parent.parent), folder.name)
    assert ref.version == folder.name
    summary = ref.summary()
    assert not [k for k in summary if "litert" in k]
    assert summary["openvino_xml_path"] == str(folder / XML_FILE)


def _folder_run(tmp: Path, store: Path | str, api: str, src: Path, out: Path, *extra: str):
    """`denoise folder` in its own process; prints whether TensorFlow got imported
    (and LiteRT's interpreter: never; Keras' own modules may name LiteRT)."""
    env = denoise_env(store, tmp / "prefect-home", api, None, None)
    env["DENOISE_CACHE"] = str(tmp / "cache")
    code = (
        "import sys\nfrom flows.cli import main\n"
        f"rc = main({['folder', str(src), str(out), *extra]!r})\n"
        "print('tensorflow imported:', 'tensorflow' in sys.modules)\n"
        "print('litert imported:', 'ai_edge_litert' in sys.modules)\nsys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp, env=env, text=True, capture_output=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "litert imported: False" in proc.stdout
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


def test_an_old_model_folder_is_denoised_by_openvino_its_stray_tflite_unread(
    exported, prefect_api, tmp_path
):
    """A small folder (what `auto` once gave LiteRT) runs on OpenVINO without
    TensorFlow; Keras gives the same images."""
    _, folder, _ = exported
    store = folder.parent.parent
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(src / f"{i:02}.png")

    out, summary = _folder_run(tmp_path, store, prefect_api, src, tmp_path / "ov")
    assert "tensorflow imported: False" in out
    assert summary["model"]["runtime"] == "openvino"
    assert not [k for k in summary["model"] if "litert" in k]
    assert summary["counts"]["denoised"] == 20

    out, summary = _folder_run(
        tmp_path, store, prefect_api, src, tmp_path / "keras", "--runtime", "keras"
    )
    assert "tensorflow imported: True" in out
    assert summary["model"]["runtime"] == "keras"
    levels = [
        np.abs(
            np.asarray(Image.open(tmp_path / "ov" / p.name), int)
            - np.asarray(Image.open(tmp_path / "keras" / p.name), int)
        )
        for p in sorted(src.iterdir())
    ]
    assert max(d.max() for d in levels) <= 1  # the same images, up to float rounding
    assert (folder / STRAY).read_bytes().startswith(b"TFL3 not a model")  # left as it was


def test_a_bucket_stores_old_model_is_fetched_and_run_by_openvino(
    exported, prefect_api, s3, tmp_path
):
    """A store in a bucket: the OpenVINO export is fetched (checked against
    the card) and the folder denoised with it, TensorFlow never imported; the
    stray model.tflite is neither fetched nor read."""
    from artifacts.registry import register_model

    _, folder, _ = exported
    fs = s3.fs()
    store = f"s3://{s3.bucket('old-store')}/team"
    for p in folder.iterdir():
        fs.put_file(str(p), f"{store}/models/{folder.name}/{p.name}")
    register_model(store, f"{store}/models/{folder.name}")
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(src / f"{i}.png")

    out, summary = _folder_run(tmp_path, store, prefect_api, src, tmp_path / "out")
    assert "tensorflow imported: False" in out
    assert summary["model"]["runtime"] == "openvino"
    assert summary["model"]["openvino_bin_path"] == f"{store}/models/{folder.name}/{BIN_FILE}"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        f"{i}.png" for i in range(4)
    ]
    fetched = {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert XML_FILE in fetched and STRAY not in fetched


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
    env["DENOISE_CACHE"] = str(tmp_path / "cache")
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
    """The OpenVINO column: the precision this CPU runs the export at, "no"
    without one; no LiteRT column, whatever an old card says."""
    from flows.cli import main

    _, folder, _ = exported
    monkeypatch.setenv("COLUMNS", "250")
    plain = tmp_path / "store" / "models" / "20260101-000000-unet-0002"
    plain.mkdir(parents=True)
    (plain / "model.keras").write_bytes((folder / "model.keras").read_bytes())
    card = json.loads((folder / "model.json").read_text())
    card = {k: v for k, v in card.items() if not k.startswith("openvino")}
    (plain / "model.json").write_text(json.dumps({**card, "version": plain.name}))
    for store, answers in ((folder.parent.parent, {"bf16", "f32"}), (tmp_path / "store", {"no"})):
        assert main(["--store", str(store), "models"]) == 0
        out = capsys.readouterr().out
        header = next(line for line in out.splitlines() if "OpenVINO" in line)
        assert "LiteRT" not in out
        row = next(line for line in out.splitlines() if "-unet-000" in line)
        cells = [c.strip() for c in row.split("│")]
        assert cells[[c.strip() for c in header.split("┃")].index("OpenVINO")] in answers
