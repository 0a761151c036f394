"""The store's staging helpers the tasks use instead of their own pull/push code:
several named locations staged at once (pulled, pushed in order with the
manifest last and rewritten with store locations, nothing pushed when the body
fails), a local store's folders used in place, and a Store passed where a root
was."""

from __future__ import annotations

import json

import pytest

from artifacts.store import Store
from denoiser.core.cards import ModelCard, load_card, record_training_command


def test_staged_folders_pull_push_in_order_with_store_locations(s3, tmp_path):
    s3.bucket("bkt")
    store = Store.at("s3://bkt/store")
    fs = s3.fs()
    fs.pipe_file("bkt/store/downloads/a/old.bin", b"old")
    locations = [store.download("a"), store.download("b")]
    with (
        store.stage() as stage,
        stage.staged_folders(
            locations, last=("manifest.json",), retract=True, store_urls=("manifest.json",)
        ) as folders,
    ):
        assert (folders[0] / "old.bin").read_bytes() == b"old"  # pulled
        for folder in folders:
            (folder / "new.bin").write_bytes(b"new")
            manifest = {"dir": str(folder), "file": str(folder / "new.bin")}
            (folder / "manifest.json").write_text(json.dumps(manifest))
    fs.invalidate_cache()
    for name in ("a", "b"):
        stored = json.loads(fs.cat_file(f"bkt/store/downloads/{name}/manifest.json"))
        # what is stored means something on any machine: store locations, not the stage's paths
        assert stored == {
            "dir": f"s3://bkt/store/downloads/{name}",
            "file": f"s3://bkt/store/downloads/{name}/new.bin",
        }
        assert fs.cat_file(f"bkt/store/downloads/{name}/new.bin") == b"new"


def test_a_failed_body_pushes_nothing(s3):
    s3.bucket("bkt")
    store = Store.at("s3://bkt/store")
    with pytest.raises(RuntimeError), store.staged(store.shards("set")) as folder:
        (folder / "part.parquet").write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert store.sizes(store.shards("set")) == {}


def test_a_local_store_stages_its_own_folders_untouched(tmp_path):
    store = Store.at(tmp_path / "store")
    assert Store.at(store) is store  # a task given the flow's Store uses it as it is
    with store.stage() as stage, stage.staged(store.shards("set")) as folder:
        assert str(folder) == store.shards("set")
        assert not folder.exists()  # left for the body to make
        dataset = {"dir": str(tmp_path / "raw")}
        assert stage.pull_dataset(dataset) is dataset


def test_the_training_command_is_recorded_once(tmp_path):
    (tmp_path / "model.json").write_text(ModelCard(version="v1").to_json())
    assert record_training_command(tmp_path, None).training_command is None
    assert record_training_command(tmp_path, "denoise train --epochs 2").training_command == (
        "denoise train --epochs 2"
    )
    record_training_command(tmp_path, "denoise train --epochs 3")  # a resumed run's card keeps it
    assert load_card(tmp_path).training_command == "denoise train --epochs 2"


def test_training_into_a_bucket_pushes_the_model_with_its_card(
    s3, tiny_shards, tmp_path, monkeypatch
):
    from artifacts.training import train_into_store
    from denoiser.config import TrainConfig
    from denoiser.learning.checkpoints import finish_run

    monkeypatch.setenv("DENOISE_CHECKPOINTS", str(tmp_path / "local-checkpoints"))
    s3.bucket("bkt")
    store = Store.at("s3://bkt/store")
    training = TrainConfig(architecture="unet-small", epochs=1, batch_size=16)
    started = []
    result, card = train_into_store(
        store, str(tiny_shards), training, "denoise train --epochs 1", on_start=started.append
    )
    version = result["version"]
    assert [run.version for run in started] == [version]
    assert result["dir"] == store.model(version)  # the store's location, not the stage's
    assert card.version == version and card.training_command == "denoise train --epochs 1"
    stored = store.sizes(store.model(version))
    assert {"model.keras", "model.json", "history.csv"} <= set(stored)
    assert (
        ModelCard.model_validate_json(
            store.read_bytes(f"{store.model(version)}/model.json")
        ).training_command
        == "denoise train --epochs 1"
    )
    finish_run(result["checkpoint"])
