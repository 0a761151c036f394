"""Models in the package (issue 25): a tiny photo model trained by the real
flow, built in with `denoise models build-in` into a folder that
$DENOISE_BUILTIN_DIR names (the only difference from the package's own
folder), then used by `denoise folder` on an empty store without TensorFlow,
listed, outranked by the store's production model, refused when damaged, and
replaced atomically."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artifacts.builtin import BUILTIN_ENV, INDEX_FILE, PACKAGE_DIR
from denoiser.core.files import file_sha256
from denoiser.runtimes.openvino_runtime import BIN_FILE, XML_FILE
from flows.cli import main
from tests.faults.harness import denoise_env
from tests.test_photo_pipeline import smooth_image

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Compiled OpenVINO models go to the tests' own cache, not the user's."""
    monkeypatch.setenv("DENOISE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def trained(prefect_harness, tmp_path_factory):
    """A store whose production model is a tiny blind photo model (one quick
    epoch of photo_unet on 12 small grey images), trained by `denoise train`."""
    photos = tmp_path_factory.mktemp("photos") / "mine"
    photos.mkdir()
    for i in range(12):
        Image.fromarray(smooth_image(i, 80, 80)).save(photos / f"photo_{i:02d}.png")
    store = tmp_path_factory.mktemp("store")
    args = ["--dataset", str(photos), "--quick", "--epochs", "1", "--patch-size", "32"]
    args += ["--patches-per-image", "8", "--batch-size", "32", "--min-psnr-gain=-100"]
    assert main(["--store", str(store), "train", *args]) == 0
    [version] = [p.name for p in (store / "models").iterdir() if (p / "model.keras").is_file()]
    return store, version, photos


@pytest.fixture(scope="module")
def builtin(trained, tmp_path_factory):
    """The trained model built in, into a folder of the test's own."""
    store, version, _ = trained
    root = tmp_path_factory.mktemp("builtin")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(BUILTIN_ENV, str(root))
        assert main(["--store", str(store), "models", "build-in", version]) == 0
    return root


@pytest.fixture()
def use_builtin(builtin, monkeypatch):
    monkeypatch.setenv(BUILTIN_ENV, str(builtin))
    return builtin


def grey_photos(folder: Path, count: int = 4) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(count):
        x = smooth_image(100 + i, 96, 96).astype(float)
        y = np.clip(np.rint(x + 25.0 * rng.standard_normal(x.shape)), 0, 255).astype(np.uint8)
        Image.fromarray(y).save(folder / f"n{i}.png")
    return folder


def test_build_in_writes_a_compact_model_its_export_and_a_card_saying_how_it_was_trained(
    trained, builtin
):
    store, version, photos = trained
    source = store / "models" / version
    folder = builtin / version
    store_card = json.loads((source / "model.json").read_text())
    card = json.loads((folder / "model.json").read_text())
    index = json.loads((builtin / INDEX_FILE).read_text())
    assert index == {
        "models": {
            "photos": {"version": version, "card_sha256": file_sha256(folder / "model.json")}
        }
    }
    assert {p.name for p in builtin.iterdir() if not p.name.startswith(".")} == {
        INDEX_FILE,
        version,
    }
    assert not [p for p in builtin.iterdir() if p.name.endswith(".tmp")]
    for name, field in (
        ("model.keras", "model_sha256"),
        (XML_FILE, "openvino_xml_sha256"),
        (BIN_FILE, "openvino_bin_sha256"),
    ):
        assert card[field] == file_sha256(folder / name)
    # no optimizer state: smaller than the store's file, the same weights (checked at build-in)
    assert card["model_bytes"] < store_card["model_bytes"]
    assert card["built_in"]["source_model_sha256"] == store_card["model_sha256"]
    assert card["openvino_xml_sha256"] == store_card["openvino_xml_sha256"]  # copied, whole

    record = card["built_in"]
    # the command was recorded at training time, from the flow's parameters
    assert store_card["training_command"] == record["training_command"]
    assert record["training_command"].startswith(f"denoise train --dataset {photos} ")
    assert "--epochs 1" in record["training_command"]
    assert record["training_command_source"] == "recorded at training"
    assert record["data_manifest_sha256"] == store_card["data"]["manifest_sha256"]
    metrics = json.loads((source / "metrics.json").read_text())
    assert [r["sigma"] for r in record["test_scores"]] == [15, 25, 50]
    assert [r["psnr_denoised"] for r in record["test_scores"]] == [
        r["psnr_denoised"] for r in metrics["per_sigma"]
    ]
    assert record["training_seconds"] == store_card["seconds"] > 0
    trained_on = record["trained_on"]
    assert trained_on["cpu_cores"] >= 1 and trained_on["precision"] in ("float32", "mixed_bfloat16")
    assert trained_on["cpu_model"] == store_card["device"]["cpu_model"]
    assert record["metrics_sha256"] == file_sha256(folder / "metrics.json")

    # again: nothing to do, nothing written
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(BUILTIN_ENV, str(builtin))
        assert main(["--store", str(store), "models", "build-in", version]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def _folder_run(
    tmp: Path, store: Path, api: str, builtin: Path | None, src: Path, out: Path, *options: str
):
    """`denoise folder` (with ``options``) in its own process, as a user runs
    it, the built-in folder given by the environment (None: the package's
    own); prints whether TensorFlow got imported."""
    env = denoise_env(store, tmp / "prefect-home", api, None, None)
    if builtin is None:
        env.pop(BUILTIN_ENV, None)  # the package's own folder, as installed
    else:
        env[BUILTIN_ENV] = str(builtin)
    env["DENOISE_CACHE"] = str(tmp / "cache")
    code = (
        "import sys\nfrom flows.cli import main\n"
        f"rc = main({['folder', str(src), str(out), *options]!r})\n"
        "print('tensorflow imported:', 'tensorflow' in sys.modules)\nsys.exit(rc)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp, env=env, text=True, capture_output=True, timeout=300
    )


def _denoised_summary(proc) -> dict:
    """The summary.json of a `_folder_run` that denoised 4 images without TensorFlow."""
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "4 denoised, 0 skipped, 0 failed" in proc.stdout
    assert "tensorflow imported: False" in proc.stdout
    report = next(ln.split("report: ", 1)[1] for ln in proc.stdout.splitlines() if "report: " in ln)
    return json.loads((Path(report.strip()).parent / "summary.json").read_text())


def test_an_empty_store_denoises_photos_with_the_builtin_model_without_tensorflow(
    trained, builtin, prefect_api, tmp_path
):
    _, version, _ = trained
    store = tmp_path / "empty-store"
    src = grey_photos(tmp_path / "in")
    proc = _folder_run(tmp_path, store, prefect_api, builtin, src, tmp_path / "out")
    summary = _denoised_summary(proc)
    assert f"with model {version} (built in)" in proc.stdout
    model = summary["model"]
    assert (model["version"], model["status"], model["domain"]) == (version, "built in", "photos")
    assert model["runtime"] == "openvino"
    assert model["openvino_xml_path"] == str(builtin / version / XML_FILE)
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert written == [f"n{i}.png" for i in range(4)]
    assert not (store / "models").exists()  # nothing written to the store's models


def test_models_lists_the_builtin_model_beside_the_stores(trained, use_builtin, tmp_path, capsys):
    store, version, _ = trained
    assert main(["--store", str(tmp_path / "empty"), "models"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if version in line)
    assert "built in" in row and "photos" in row and "photo_unet" in row
    assert str(use_builtin) in out

    # the store's production model of the same domain comes first, and the listing says so
    assert main(["--store", str(store), "models"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if version in line]
    assert len(rows) == 2
    assert "production" in rows[0] and "built in (the store's model first)" in rows[1]

    assert main(["--store", str(tmp_path / "empty"), "models", "show", version]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{version}: built in, photos, in {use_builtin / version}")
    assert '"training_command"' in out


def test_the_stores_production_model_takes_precedence(trained, use_builtin, tmp_path, monkeypatch):
    from artifacts.resolution import resolve_model
    from denoiser.core.errors import ModelError

    store, version, _ = trained
    ref = resolve_model(store, None, "photos")
    assert (ref.status, ref.dir) == ("production", store / "models" / version)
    assert resolve_model(store, version).status == "production"  # a name: the store's first
    for domain in ("photos", None):  # an empty store: the built-in model
        ref = resolve_model(tmp_path / "empty", None, domain)
        assert (ref.status, ref.dir) == ("built in", use_builtin / version)
    assert resolve_model(tmp_path / "empty", version).status == "built in"  # --model VERSION
    # no built-in model of the images' domain: another one (the folder run warns), as a
    # store's production model of another domain is used
    assert resolve_model(tmp_path / "empty", None, "colour").dir == use_builtin / version
    monkeypatch.setenv(BUILTIN_ENV, str(tmp_path / "none"))  # none built in: as before
    with pytest.raises(ModelError, match="run `denoise train` first"):
        resolve_model(tmp_path / "empty", None, "photos")


def _damage(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("name", [BIN_FILE, "model.keras", "model.json"])
def test_a_damaged_builtin_model_is_refused_in_one_line(
    trained, builtin, tmp_path, monkeypatch, capsys, name
):
    _, version, _ = trained
    copy = tmp_path / "builtin"
    shutil.copytree(builtin, copy)
    _damage(copy / version / name)
    monkeypatch.setenv(BUILTIN_ENV, str(copy))
    src = grey_photos(tmp_path / "in")
    args = ["--store", str(tmp_path / "empty"), "folder", str(src), str(tmp_path / "out")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"built-in model {version}: {copy / version / name} is damaged" in err
    assert "reinstall" in err
    assert not (tmp_path / "out").exists()
    assert main(["--store", str(tmp_path / "empty"), "folder", str(src), "--model", version,
                 str(tmp_path / "out")]) == 1  # fmt: skip
    assert "is damaged" in capsys.readouterr().err


def test_registry_commands_leave_a_builtin_model_alone(trained, use_builtin, tmp_path, capsys):
    _, version, _ = trained
    before = {p: file_sha256(p) for p in use_builtin.rglob("*") if p.is_file()}
    for action in ("promote", "export"):
        assert main(["--store", str(tmp_path / "empty"), "models", action, version]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{version} is a built-in model" in err, err
    assert {p: file_sha256(p) for p in use_builtin.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "empty" / "models").exists()


def test_a_build_in_failing_before_the_index_leaves_the_previous_model_in_use(
    trained, builtin, tmp_path, monkeypatch, capsys
):
    """The second model of the domain fails (a full disk) after its folder is
    written, before the index names it: the first stays the one used, whole;
    a rerun finishes and clears the first and whatever the failed one left."""
    from artifacts.resolution import resolve_model

    store, version, _ = trained
    copy = tmp_path / "builtin"
    shutil.copytree(builtin, copy)
    monkeypatch.setenv(BUILTIN_ENV, str(copy))
    newer = f"{version}-b"
    shutil.copytree(store / "models" / version, store / "models" / newer)
    card = json.loads((store / "models" / newer / "model.json").read_text())
    (store / "models" / newer / "model.json").write_text(json.dumps({**card, "version": newer}))
    (store / "models" / newer / BIN_FILE).unlink()  # no whole export to copy: one is made
    try:
        monkeypatch.setenv("DENOISE_FAILPOINTS", "builtin.before_index=enospc")
        assert main(["--store", str(store), "models", "build-in", newer]) == 1
        assert capsys.readouterr().err.count("\n") == 1
        monkeypatch.delenv("DENOISE_FAILPOINTS")
        ref = resolve_model(tmp_path / "empty", None, "photos")  # checked: whole
        assert (ref.version, ref.status) == (version, "built in")
        assert (copy / newer).is_dir()  # written, but named by no index

        assert main(["--store", str(store), "models", "build-in", newer]) == 0
        ref = resolve_model(tmp_path / "empty", None, "photos")
        assert (ref.version, ref.dir) == (newer, copy / newer)
        card = json.loads((copy / newer / "model.json").read_text())
        assert card["built_in"]["version"] == newer
        assert card["built_in"]["openvino_export"] == "made at build-in"
        assert card["openvino_bin_sha256"] == file_sha256(copy / newer / BIN_FILE)
        assert card["openvino_xml_sha256"] == file_sha256(copy / newer / XML_FILE)
        assert card.get("openvino_psnr") is None  # the store's score was of another export
        assert {p.name for p in copy.iterdir() if not p.name.startswith(".")} == {
            INDEX_FILE,
            newer,
        }
        assert not [p for p in copy.iterdir() if p.name.endswith(".tmp")]
    finally:
        shutil.rmtree(store / "models" / newer)


def test_a_model_trained_before_litert_was_retired_is_built_in_without_its_tflite(
    trained, tmp_path, monkeypatch
):
    """The store's model has a model.tflite and litert_* facts on its card (as
    training made them before LiteRT was retired): the built-in copy ships
    neither, and is whole by its card."""
    from artifacts.resolution import resolve_model

    store, version, _ = trained
    older = f"{version}-lite"
    source = store / "models" / older
    shutil.copytree(store / "models" / version, source)
    (source / "model.tflite").write_bytes(b"TFL3 an export nothing reads" * 50)
    card = json.loads((source / "model.json").read_text())
    card |= {
        "version": older,
        "litert_sha256": file_sha256(source / "model.tflite"),
        "litert_bytes": (source / "model.tflite").stat().st_size,
    }
    (source / "model.json").write_text(json.dumps(card))
    root = tmp_path / "builtin"
    monkeypatch.setenv(BUILTIN_ENV, str(root))
    try:
        assert main(["--store", str(store), "models", "build-in", older]) == 0
        built = json.loads((root / older / "model.json").read_text())
        assert not [k for k in built if k.startswith("litert")]
        assert not (root / older / "model.tflite").exists()
        assert built["model_sha256"] == file_sha256(root / older / "model.keras")
        ref = resolve_model(tmp_path / "empty", None, "photos")  # every file checked
        assert (ref.version, ref.dir) == (older, root / older)
    finally:
        shutil.rmtree(source)


def test_the_wheel_ships_every_file_of_a_builtin_model(builtin, tmp_path):
    """The wheel setuptools builds from a copy of the source (the tree itself
    is never written) with the built-in folder in place holds the index and
    every file of the model, and no temporary or lock file."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", PACKAGE_DIR.name)
    for package in ("denoiser", "tasks", "flows", "artifacts"):
        shutil.copytree(REPO / package, src / package, ignore=ignore)
    shutil.copytree(builtin, src / "artifacts" / PACKAGE_DIR.name)
    leftover = src / "artifacts" / PACKAGE_DIR.name / ".build-x.1.tmp"
    leftover.mkdir()
    (leftover / "model.keras").write_bytes(b"half")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path / "wheel"), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if f"/{PACKAGE_DIR.name}/" in n}
    files = {
        f"artifacts/{p.relative_to(src / 'artifacts').as_posix()}"
        for p in (src / "artifacts" / PACKAGE_DIR.name).rglob("*")
        if p.is_file() and "/." not in p.as_posix()
    }
    assert shipped == files and len(files) >= 6, (shipped, files)
    # the package's own folder is where an install looks, and has its index
    assert PACKAGE_DIR == REPO / "artifacts" / PACKAGE_DIR.name
    assert (PACKAGE_DIR / INDEX_FILE).is_file()


def test_the_training_command_gives_the_flow_the_same_parameters():
    from denoiser.config import DataConfig, EvalConfig, NoiseConfig, TrainConfig, train_command
    from flows.cli import _train_configs, build_parser

    params = {
        "data": DataConfig(dataset="my photos/set", test_limit=6),
        "noise": NoiseConfig(kind="awgn", level=(0.0, 55.0), patch_size=32, seed=4),
        "training": TrainConfig(
            architecture="photo_unet",
            epochs=2,
            seed=4,
            learning_rate=5e-4,
            colour_gains=0.5,
            colour_gains_balanced=True,
        ),
        "evaluation": EvalConfig(sigmas=[15, 25], min_psnr_gain=1.5),
    }
    command = train_command({k: v.model_dump(mode="json") for k, v in params.items()})
    assert command.startswith("denoise train --dataset 'my photos/set' --test-limit 6 ")
    import shlex

    args = build_parser().parse_args(shlex.split(command)[1:])
    again = _train_configs(args)
    for name in ("data", "training", "evaluation"):
        assert again[name] == params[name], name
    assert again["noise"].model_dump(exclude={"level_density"}) == params["noise"].model_dump(
        exclude={"level_density"}
    )


def test_a_card_from_before_the_command_was_recorded_gets_one_from_its_configs():
    from artifacts.builtin import _derived_command
    from denoiser.core.cards import ModelCard

    card = ModelCard.model_validate(
        {
            "training": {"architecture": "photo_unet", "epochs": 8, "batch_size": 32},
            "data": {
                "dataset": "train400",
                "test_dataset": "set12",
                "noise": {"kind": "awgn", "level": [0.0, 55.0], "applied": "in_training"},
            },
        }
    )
    assert _derived_command(card) == (
        "denoise train --dataset train400 --test-dataset set12 --noise-kind awgn "
        "--noise-level 0,55 --architecture photo_unet --epochs 8 --batch-size 32"
    )
