"""Adding an OpenVINO export to a model already in the store (``denoise
models export VERSION``): models trained before exports existed get one, and
their card says so. Prefect-free."""

from __future__ import annotations

import os

from artifacts.registry import _version_ref, check_version_name
from artifacts.store import Store
from denoiser.core.cards import CARD_FILE, load_card
from denoiser.core.errors import ModelNotFound
from denoiser.core.files import file_sha256, join_location, write_text_atomic
from denoiser.runtimes.openvino_runtime import BIN_FILE, XML_FILE, make_openvino_export

# what an earlier export's evaluation said: void once the export is made again
_SCORES = ("openvino_psnr", "keras_psnr", "openvino_scored_at")


def has_openvino_export(folder, card) -> bool:
    """Whether the model folder (a path or a URL) holds the OpenVINO export
    its card names, both files whole (their sha256s match the card's)."""
    if not (card.openvino_xml_sha256 and card.openvino_bin_sha256):
        return False
    try:
        return file_sha256(join_location(folder, XML_FILE)) == card.openvino_xml_sha256 and (
            file_sha256(join_location(folder, BIN_FILE)) == card.openvino_bin_sha256
        )
    except FileNotFoundError:
        return False


def export_model_version(store_root: str | os.PathLike | None, version: str) -> dict | None:
    """Make the OpenVINO export of the store's model ``version`` and write its
    facts into the card (atomically; a remote store's files are staged and
    pushed, the card last). Returns the card's new facts; None when the model
    already has a whole export. Loads the Keras model (imports TensorFlow)."""
    from denoiser.learning.training import probe_shape
    from denoiser.nets.models import load_model

    store = Store.at(store_root)
    ref = _version_ref(store, check_version_name(version))
    if ref is None:
        from artifacts.builtin import refuse_builtin_change

        refuse_builtin_change(version, "export (its export ships with it)")
        raise ModelNotFound(f"unknown model version {version!r} (not in {store.url}/models)")
    if has_openvino_export(ref.dir, ref.card):
        return None
    with store.stage() as stage:
        folder = stage.pull(ref.dir, files=(CARD_FILE, "model.keras"))
        card = load_card(folder)
        model = load_model(folder / "model.keras", expected_sha256=card.model_sha256)
        facts = make_openvino_export(model, folder, probe_shape(model))
        stale = {k: None for k in _SCORES if k in card.model_fields_set}
        write_text_atomic(folder / CARD_FILE, card.model_copy(update=facts | stale).to_json())
        stage.push(folder, last=(CARD_FILE,))
    return facts
