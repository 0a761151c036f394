"""The model registry: promotion rules, resolution, and `denoise models`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from artifacts.registry import list_models, promote, read_registry, register_model, resolve_model
from denoiser.errors import ConfigError, ModelError
from flows.cli import main


def make_version(store: Path, version: str, psnr: float, passed: bool = True, data: str = "d1") -> Path:
    folder = store / "models" / version
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"weights")  # the registry never loads it
    card = {"version": version, "architecture": "unet", "params": 118945, "created": version,
            "data": {"manifest_sha256": data},
            "metrics": {"psnr_denoised": psnr, "ssim_denoised": 0.9},
            "quality_gate": {"passed": passed, "psnr_gain": psnr - 9.4, "min_psnr_gain": 5.0}}
    (folder / "model.json").write_text(json.dumps(card))
    return folder


def test_promotion_rules(tmp_path):
    first = register_model(tmp_path, make_version(tmp_path, "20260101-000000-unet-0001", 20.0), None, "run-1")
    assert first["promoted"] and first["status"] == "production"
    worse = register_model(tmp_path, make_version(tmp_path, "20260102-000000-unet-0002", 19.0))
    assert not worse["promoted"] and "does not beat production" in worse["reason"]
    failing = register_model(tmp_path, make_version(tmp_path, "20260103-000000-unet-0003", 30.0, passed=False))
    assert not failing["promoted"] and "failed the quality gate" in failing["reason"]
    other_data = register_model(tmp_path, make_version(tmp_path, "20260104-000000-unet-0004", 25.0, data="d2"))
    assert not other_data["promoted"] and "different test set" in other_data["reason"]
    better = register_model(tmp_path, make_version(tmp_path, "20260105-000000-unet-0005", 21.0))
    assert better["promoted"] and "beats production" in better["reason"]

    state = read_registry(tmp_path)
    assert state["production"] == "20260105-000000-unet-0005"
    assert state["versions"]["20260101-000000-unet-0001"]["flow_run_id"] == "run-1"
    assert [m.version for m in list_models(tmp_path)][0] == "20260105-000000-unet-0005"
    assert not list(tmp_path.glob("models/.*.tmp"))

    promote(tmp_path, "20260101-000000-unet-0001")
    assert resolve_model(tmp_path).version == "20260101-000000-unet-0001"
    with pytest.raises(ConfigError, match="unknown model version"):
        promote(tmp_path, "nope")


def test_resolve_model_by_version_folder_and_file(tmp_path):
    folder = make_version(tmp_path, "v1", 20.0)
    assert resolve_model(tmp_path, "v1").model_path == folder / "model.keras"
    assert resolve_model(tmp_path, str(folder)).version == "v1"
    assert resolve_model(tmp_path, str(folder / "model.keras")).card["architecture"] == "unet"
    assert resolve_model(tmp_path).version == "v1"  # no production yet: newest that passed
    with pytest.raises(ModelError, match="not found"):
        resolve_model(tmp_path, str(tmp_path / "nowhere.keras"))
    with pytest.raises(ModelError, match="holds no model.keras"):
        resolve_model(tmp_path, str(tmp_path))


def test_an_empty_store_says_to_train_first(tmp_path):
    with pytest.raises(ModelError, match="run `denoise train` first"):
        resolve_model(tmp_path)
    make_version(tmp_path, "v1", 12.0, passed=False)
    with pytest.raises(ModelError, match="none passed its quality gate"):
        resolve_model(tmp_path)


def test_models_command_lists_and_promotes(tmp_path, capsys):
    make_version(tmp_path, "20260101-000000-unet-0001", 20.0)
    make_version(tmp_path, "20260102-000000-unet-0002", 21.0)
    assert main(["--store", str(tmp_path), "models"]) == 0
    out = capsys.readouterr().out
    assert "20260102-000000-unet-0002" in out and "21.00" in out
    assert main(["--store", str(tmp_path), "models", "promote", "20260101-000000-unet-0001"]) == 0
    assert "production" in capsys.readouterr().out
    assert main(["--store", str(tmp_path), "models", "promote", "missing"]) == 2
    assert "unknown model version 'missing'" in capsys.readouterr().err
