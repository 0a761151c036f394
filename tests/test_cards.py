"""The model card and the architecture recipe as typed models: old cards
still read, current ones round-trip to the same JSON, bad ones are refused
in one line."""

from __future__ import annotations

import json
import math

import pytest

from denoiser.core.cards import (
    CardData,
    CardMetrics,
    ModelCard,
    QualityGate,
    Recipe,
    load_card,
    parse_card,
)
from denoiser.core.errors import ModelError
from denoiser.nets.models import architecture_recipe

# a card as a training and an evaluation of this code write it
CURRENT = {
    "version": "20260101-000000-unet-0001",
    "architecture": "unet",
    "params": 411297,
    "recipe": {
        "loss": "psnr_ssim",
        "lr_schedule": "cosine",
        "learning_rate": 0.002,
        "reframe": 0.2,
        "fully_convolutional": True,
        "input_shape": [None, None, 1],
        "size_multiple": 4,
    },
    "training": {"architecture": "unet", "epochs": 2, "batch_size": 64},
    "data": {
        "shards_dir": "/store/shards/mnist-abc",
        "manifest_sha256": "ab" * 32,
        "dataset": "mnist",
        "domain": "digits",
        "shard_kind": "pairs",
        "test_dataset": None,
        "patch_size": None,
        "patches_per_image": None,
        "noise": {"kind": "gaussian", "level": 0.5},
        "rows": {"train": {"rows": 90}},
    },
    "image_shape": [28, 28, 1],
    "device": {"kind": "cpu", "description": "CPU"},
    "seconds": 12.5,
    "epochs_run": 2,
    "best_val_loss": 0.01,
    "history": [{"epoch": 1, "loss": 0.02, "val_loss": 0.01, "seconds": 6.0}],
    "model_sha256": "cd" * 32,
    "model_bytes": 1234,
    "versions": {"tensorflow": "2.20.0", "keras": "3.0", "python": "3.12"},
    "created": "2026-01-01T00:00:00+00:00",
    "metrics": {
        "count": 30,
        "psnr_noisy": 10.5,
        "psnr_denoised": 20.25,
        "mse_noisy": 0.1,
        "mse_denoised": 0.01,
        "bce_noisy": 0.5,
        "bce_denoised": 0.2,
        "ssim_noisy": 0.3,
        "ssim_denoised": 0.9,
        "psnr_gain": 9.75,
    },
    "quality_gate": {"min_psnr_gain": 5.0, "psnr_gain": 9.75, "passed": True},
}

# a card from before recipes, domains, checksums and evaluations were recorded
OLD = {"version": "v0", "architecture": "seed", "params": 440865, "data": {"dataset": "mnist"}}


def test_a_current_card_reads_and_round_trips_to_the_same_json():
    card = parse_card(json.dumps(CURRENT))
    assert card.recipe.loss == "psnr_ssim" and card.recipe.input_shape == (None, None, 1)
    assert card.data.manifest_sha256 == "ab" * 32 and card.data.noise["kind"] == "gaussian"
    assert card.metrics.psnr_denoised == 20.25 and card.quality_gate.passed
    assert json.loads(card.to_json()) == CURRENT
    assert parse_card(card.to_json()) == card


def test_an_old_card_reads_with_defaults_and_is_written_back_with_its_own_keys():
    card = parse_card(json.dumps(OLD))
    assert card.recipe is None and card.metrics is None and card.quality_gate is None
    assert card.data.domain is None and card.data.shard_kind == "pairs"
    assert card.model_sha256 is None and card.history == [] and card.training == {}
    assert json.loads(card.to_json()) == OLD


def test_keys_this_code_does_not_know_are_kept():
    raw = {**OLD, "dataset": "mnist", "data": {"dataset": "mnist", "extra": [1, 2]}, "x": {"y": 1}}
    card = parse_card(json.dumps(raw))
    assert json.loads(card.to_json()) == raw


def test_an_evaluation_adds_its_verdict_and_keeps_the_rest():
    card = parse_card(json.dumps(OLD))
    gate = QualityGate(min_psnr_gain=5.0, psnr_gain=6.0, passed=True)
    judged = card.model_copy(
        update={"metrics": CardMetrics(psnr_denoised=20.0, psnr_gain=6.0), "quality_gate": gate}
    )
    assert json.loads(judged.to_json()) == {
        **OLD,
        "metrics": {"psnr_denoised": 20.0, "psnr_gain": 6.0},
        "quality_gate": {"min_psnr_gain": 5.0, "psnr_gain": 6.0, "passed": True},
    }


def test_a_nan_loss_survives_the_round_trip():
    card = ModelCard(version="v", best_val_loss=float("nan"))
    assert math.isnan(parse_card(card.to_json()).best_val_loss)


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"\xff\xfe", b"[]", b"null", b"{}", b'"x"', b'{"metrics": "x"}'],
)
def test_what_is_not_a_card_parses_as_none(raw):
    assert parse_card(raw) is None


def test_load_card_refuses_a_missing_or_bad_card_in_one_line(tmp_path):
    with pytest.raises(ModelError, match=r"has no model card \(model.json\)") as info:
        load_card(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "model.json").write_text('{"quality_gate": {"passed": "maybe"}}')
    with pytest.raises(ModelError, match=r"has no model card \(model.json\)"):
        load_card(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps(OLD))
    assert load_card(tmp_path).architecture == "seed"


def test_an_invalid_card_stops_a_registration_in_one_line(tmp_path):
    from artifacts.registry import register_model

    folder = tmp_path / "models" / "v1"
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"weights")
    (folder / "model.json").write_text('{"metrics": {"psnr_denoised": "high"}}')
    with pytest.raises(ModelError) as info:
        register_model(tmp_path, folder)
    assert str(info.value) == f"{folder} has no model card (model.json)"


def test_the_recipe_of_a_card_keeps_the_keys_of_the_architecture_and_the_run():
    recipe = architecture_recipe("seed").model_copy(
        update={"loss": "bce", "lr_schedule": "constant", "learning_rate": 1e-3, "reframe": 0.0}
    )
    assert ModelCard(recipe=recipe).to_dict()["recipe"] == {
        "loss": "bce",
        "lr_schedule": "constant",
        "learning_rate": 1e-3,
        "reframe": 0.0,
        "fully_convolutional": False,
        "input_shape": [28, 28, 1],
        "size_multiple": 28,
    }


def test_an_architecture_recipe_fills_in_what_it_does_not_name():
    seed = architecture_recipe("seed")
    assert (seed.learning_rate, seed.reframe, seed.lr_schedule) == (1e-3, 0.0, "constant")
    assert Recipe.model_validate({"fully_convolutional": True}).size_multiple == 1
    assert CardData().shard_kind == "pairs"
