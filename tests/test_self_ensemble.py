"""`denoise folder --self-ensemble`: each photograph as the mean of its
model's outputs for the eight flips and quarter turns of the image, each
turned back; a digits model, whose images have an up, runs one pass and the
run says so."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from denoiser.folder import BatchPredictor, SelfEnsemble
from denoiser.folder.predictor import TURNS, turn_batch, unturn_batch
from denoiser.runtimes.inference import denoise_planes, tile_spec_for_model
from tests.test_routing import build_mixed_folder, identity, make_store


def leaning(channels: int):
    """A model that knows left from right: each pixel half itself, half its
    left neighbour (one 3x3 convolution)."""
    import keras

    kernel = np.zeros((3, 3, channels, channels), np.float32)
    for c in range(channels):
        kernel[1, 1, c, c] = kernel[1, 0, c, c] = 0.5
    inputs = keras.Input((None, None, channels))
    conv = keras.layers.Conv2D(channels, 3, padding="same")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([kernel, np.zeros(channels, np.float32)])
    return model


@pytest.fixture(scope="module")
def models():
    """Store models for test_routing's store: leaning grey and colour photo
    models, an identity for digits."""
    return {"grey": leaning(1), "colour": leaning(3), "digits": identity(1)}


class Ramp:
    """A model that adds, to each tile, a ramp from 0 at its left edge to 1 at
    its right: it knows left from right, as a trained model slightly does."""

    def predict_on_batch(self, x):
        w = x.shape[2]
        return x + np.linspace(0.0, 1.0, w, dtype=np.float32)[None, None, :, None]


def test_the_eight_orientations_average_a_one_sided_ramp_to_its_mean():
    # the ramp turned back from the eight orientations runs left-right, right-left,
    # top-bottom and bottom-top twice each: their mean is 0.5 at every pixel, tiles
    # square or not
    rng = np.random.default_rng(0)
    for shape in ((2, 8, 8, 3), (1, 6, 10, 1)):
        x = rng.random(shape, dtype=np.float32)
        once = Ramp().predict_on_batch(x)
        assert np.ptp(once - x) == 1.0
        np.testing.assert_allclose(SelfEnsemble(Ramp()).predict_on_batch(x), x + 0.5, atol=1e-6)


def test_the_eight_orientations_are_all_different_and_each_turns_back():
    # a tile with no symmetry: the four quarter turns and their mirrors are eight
    # different arrays (a mirror missing would still average the ramp to 0.5)
    x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
    turns = [turn_batch(x, t) for t in range(TURNS)]
    assert len({(t.shape, t.tobytes()) for t in turns}) == TURNS
    for t, y in enumerate(turns):
        np.testing.assert_array_equal(unturn_batch(y, t), x)


def test_a_self_ensemble_keeps_whether_its_model_pads_batches_and_its_channels():
    class Unpadded(Ramp):
        pads_batches = False
        input_shape = (None, None, None, 3)

        def __init__(self):
            self.batches = []

        def predict_on_batch(self, x):
            self.batches.append(len(x))
            return super().predict_on_batch(x)

    assert SelfEnsemble(Ramp()).pads_batches is True
    unpadded = Unpadded()
    ensemble = SelfEnsemble(unpadded)
    assert ensemble.pads_batches is False
    assert ensemble.input_shape == (None, None, None, 3)  # the router reads the channels from it
    tiles = np.zeros((3, 8, 8, 3), np.float32)
    out = BatchPredictor(ensemble, batch_size=2)(tiles)
    np.testing.assert_allclose(out, 0.5, atol=1e-6)
    # eight turns of a batch of two, then eight of the last tile alone: not padded to two
    assert unpadded.batches == [2] * TURNS + [1] * TURNS


def _eight_way_mean(model, image: np.ndarray) -> np.ndarray:
    """What the self-ensemble should give for a whole (H, W, C) float image:
    the model through the folder's tiling on each flip and quarter turn of the
    image, turned back, averaged (written out here, not the library's)."""
    spec = tile_spec_for_model(model)
    outs = []
    for k in range(4):
        for mirror in (False, True):
            t = np.rot90(image, k)
            t = t[:, ::-1] if mirror else t
            out = denoise_planes([np.ascontiguousarray(t)], spec, BatchPredictor(model, 32))[0]
            out = out[:, ::-1] if mirror else out
            outs.append(np.rot90(out, -k))
    return np.clip(np.mean(outs, axis=0), 0.0, 1.0)


def test_the_folder_run_averages_photo_models_and_leaves_digits_one_pass(
    prefect_harness, models, tmp_path, capsys
):
    from flows.cli import main

    src = tmp_path / "in"
    build_mixed_folder(src)
    store = make_store(tmp_path / "store", models)
    base = ["--store", str(store), "folder", str(src)]
    assert main([*base, str(tmp_path / "one")]) == 0
    capsys.readouterr()
    assert main([*base, str(tmp_path / "eight"), "--self-ensemble"]) == 0
    printed = capsys.readouterr().out
    assert "model colour-v1: 3 colour; the mean of eight orientations" in printed
    assert "model grey-v1: 3 grey; the mean of eight orientations" in printed
    assert "model digits-v1: 1 grey\n" in printed
    assert "--self-ensemble: model digits-v1 learned images with an up" in printed

    newest = max((store / "reports").glob("*/summary.json"), key=lambda p: p.stat().st_mtime_ns)
    routes = json.loads(newest.read_text())["model"]["routes"]
    assert {d: r["self_ensemble"] for d, r in routes.items()} == {
        "colour": True,
        "photos": True,
        "digits": False,
    }
    # the summary artifact, which the UI shows, says how each model ran
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        shown = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["denoise-summary"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )[0].data
    table = [line for line in shown.splitlines() if line.startswith("|") and "-v1" in line]
    rows = {line.split("|")[1].strip(): line for line in table}
    assert "keras, mean of eight orientations" in rows["colour-v1"]
    assert "keras, mean of eight orientations" in rows["grey-v1"]
    assert "keras" in rows["digits-v1"] and "mean of eight" not in rows["digits-v1"]
    for name, kind in (("colour0.png", "colour"), ("grey1.png", "grey")):
        noisy = np.asarray(Image.open(src / name), np.float32) / 255.0
        noisy = noisy if noisy.ndim == 3 else noisy[..., None]
        expected = np.rint(_eight_way_mean(models[kind], noisy) * 255.0)
        eight = np.asarray(Image.open(tmp_path / "eight" / name), np.float32)
        one = np.asarray(Image.open(tmp_path / "one" / name), np.float32)
        eight, one = (a if a.ndim == 3 else a[..., None] for a in (eight, one))
        assert np.abs(eight - expected).max() <= 1.0, name  # rounding, nothing more
        assert np.abs(eight - one).max() >= 2.0, name  # not the one pass
    # the digit went through its identity model once, as the plain run did
    digit_one = np.asarray(Image.open(tmp_path / "one" / "digit.png"))
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "eight" / "digit.png")), digit_one
    )
