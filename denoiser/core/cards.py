"""The model card and the architecture recipe, as typed models.

The card (``model.json`` beside each trained model) says what the model is,
what it learned from, how it was trained and, once evaluated, how it scored
and whether it passed its quality gate. The recipe is what an architecture
needs to be trained and run (loss, learning rate, input shape...); each
architecture has one, and a card records the one its model was trained with.

Reading is tolerant: every field has a default, so a card written before a
field existed still reads, and keys this code does not know are kept, so a
card rewritten by a newer step (the evaluation adds its verdict) loses
nothing. Writing (:meth:`ModelCard.to_json`) dumps only the fields the card
was read or built with, so the JSON on disk keeps the keys it had.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from denoiser.core.errors import ModelError
from denoiser.core.files import file_sha256, write_text_atomic

CARD_FILE = "model.json"
# facts of files no longer part of a model (the LiteRT export, model.tflite, before LiteRT was
# retired): an older card keeps them as unknown keys, read by nothing; a card made from one
# (a built-in model's) leaves them out
RETIRED_CARD_KEYS = ("litert_sha256", "litert_bytes")


class _Open(BaseModel):
    """Unknown keys are kept (a card from a newer version, a hand-made one)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data with the keys this was read or built with."""
        return self.model_dump(mode="json", exclude_unset=True)


class Recipe(_Open):
    """What an architecture needs to be trained and run. An architecture
    that names no learning rate gets Keras' Adam default, also the
    reference's, and no reframing."""

    model_config = ConfigDict(frozen=True)

    loss: str = "mse"
    lr_schedule: str = "constant"
    learning_rate: float = 1e-3
    reframe: float = 0.0
    fully_convolutional: bool = False
    input_shape: tuple[int | None, ...] | None = None
    size_multiple: int = 1
    # photographs' architectures: the training defaults a photo request takes
    patch_size: int | None = None
    batch_size: int | None = None
    epochs: int | None = None
    noise: str | None = None
    sigma_range: tuple[float, float] | None = None


class CardData(_Open):
    """What the model learned from: the shard set and its source."""

    shards_dir: str | None = None
    manifest_sha256: str | None = None
    test_sha256: str | None = None  # a patch set's test images (see shards.tested_images_sha256)
    dataset: str | None = None
    domain: str | None = None
    channels: int | None = None  # of the images the model takes and gives (1 grey, 3 RGB)
    shard_kind: str = "pairs"
    test_dataset: str | None = None
    patch_size: int | None = None
    patches_per_image: int | None = None
    noise: dict[str, Any] | None = None
    rows: dict[str, Any] | None = None


class CardMetrics(_Open):
    """The test-set figures the registry ranks models by (the overall row of
    the evaluation; photo sets: the mean over ``sigmas``)."""

    count: int | None = None
    sigmas: list[float] | None = None
    psnr_noisy: float | None = None
    psnr_denoised: float | None = None
    mse_noisy: float | None = None
    mse_denoised: float | None = None
    bce_noisy: float | None = None
    bce_denoised: float | None = None
    ssim_noisy: float | None = None
    ssim_denoised: float | None = None
    psnr_gain: float | None = None


class QualityGate(_Open):
    """The evaluation's verdict: did the model gain enough PSNR over its noisy input?"""

    min_psnr_gain: float | None = None
    psnr_gain: float | None = None
    passed: bool = False
    over: str | None = None  # what the gain is a mean over (photo sets: the sigmas)


class ModelCard(_Open):
    """The card beside a trained model. ``metrics`` and ``quality_gate`` are
    None until the model is evaluated."""

    version: str | None = None
    architecture: str | None = None
    params: int | None = None
    recipe: Recipe | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    # the model a warm-started training began from: its version (None when its folder has no
    # card) and its model file's sha256 (training.warm_start is where it was read, perhaps a
    # temporary stage)
    grown_from: dict[str, Any] | None = None
    # the `denoise train` command with the training flow's parameters (recorded at training time)
    training_command: str | None = None
    data: CardData = Field(default_factory=CardData)
    image_shape: list[int] | None = None
    device: dict[str, Any] = Field(default_factory=dict)
    precision: str | None = None  # Keras' policy the model trained in (float32, mixed_bfloat16...)
    seconds: float | None = None
    epochs_run: int | None = None
    best_val_loss: float | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)
    model_sha256: str | None = None
    model_bytes: int | None = None
    # (models trained before LiteRT was retired have RETIRED_CARD_KEYS too)
    # the OpenVINO export (model.xml, model.bin), when the model converts
    # (denoiser.runtimes.openvino_runtime); the evaluation adds the PSNRs its precision is chosen by
    openvino_xml_sha256: str | None = None
    openvino_bin_sha256: str | None = None
    openvino_bytes: int | None = None
    openvino_precision: str | None = None  # what it is to run at: "bf16" or "f32"
    openvino_scored_at: str | None = None  # what the CPU ran when it was scored
    openvino_psnr: float | None = None  # the export's test PSNR at bf16 (the CPU permitting)
    keras_psnr: float | None = None  # Keras fp32 on the same noisy test images
    versions: dict[str, str] = Field(default_factory=dict)
    created: str | None = None
    metrics: CardMetrics | None = None
    quality_gate: QualityGate | None = None
    # a model shipped in the package (artifacts/builtin.py): where it came from, how it was trained
    built_in: dict[str, Any] | None = None

    def to_json(self) -> str:
        """The text of ``model.json``."""
        return json.dumps(self.to_dict(), indent=2)


def parse_card(raw: bytes | str) -> ModelCard | None:
    """The card in ``raw`` (the bytes of a ``model.json``); None when it is
    not one: not JSON, empty, not an object, or a field of the wrong type."""
    try:
        data = json.loads(raw)
        return ModelCard.model_validate(data) if data else None
    except (ValueError, ValidationError):  # a ValidationError is a ValueError too
        return None


def load_card(folder: str | Path) -> ModelCard:
    """The card in the local model folder ``folder``; a one-line ModelError
    when there is none or it is not a model card."""
    try:
        card = parse_card((Path(folder) / CARD_FILE).read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        card = None
    if card is None:
        raise ModelError(f"{folder} has no model card ({CARD_FILE})")
    return card


def seed_facts(model_path: str | Path) -> dict[str, Any]:
    """What a card records of the model a training grew from (``grown_from``):
    the version on the card beside ``model_path`` (None without one) and the
    file's sha256."""
    folder = Path(model_path).parent
    card = parse_card((folder / CARD_FILE).read_bytes()) if (folder / CARD_FILE).is_file() else None
    return {"version": card.version if card else None, "sha256": file_sha256(model_path)}


def record_training_command(folder: str | Path, command: str | None) -> ModelCard:
    """The card in the local model folder ``folder``, with ``command`` (the
    ``denoise train`` command that trains the model again) written into it
    when it records none yet."""
    card = load_card(folder)
    if command and card.training_command is None:
        card = card.model_copy(update={"training_command": command})
        write_text_atomic(Path(folder) / CARD_FILE, card.to_json())
    return card
