"""The model factory: ``build_model(name)`` and safe loading of saved models."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from denoiser.core.cards import Recipe
from denoiser.core.errors import ModelError, first_line, look_up
from denoiser.core.files import file_sha256
from denoiser.nets.architectures import ARCHITECTURES

logger = logging.getLogger(__name__)

DEFAULT_ARCHITECTURE = "unet"


def available_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def _spec(name: str):
    return look_up(ARCHITECTURES, name, "architecture", ModelError)


def architecture_recipe(name: str) -> Recipe:
    """Loss, learning rate and shape facts that callers (training, tiling)
    need. An architecture that names no learning rate gets Keras' Adam
    default, 1e-3, which is also the reference's, and no reframing."""
    return _spec(name).recipe


def grows_from(name: str) -> str:
    """The domain whose model an architecture starts from (``""``: from scratch)."""
    return _spec(name).grows_from


def warm_start_model(model, name: str, seed_path: str | os.PathLike) -> int:
    """Start ``model`` (of architecture ``name``) from the saved model at
    ``seed_path`` (a ``.keras`` file): from a model of the same layout as it
    is (training on from it, e.g. on one's own photographs), else as the
    architecture says when it grows from another domain's model; the number
    of layers set.
    ModelError when the seed does not fit."""
    spec = _spec(name)
    seed = load_model(seed_path)
    try:
        same_layout = seed.name == model.name and [tuple(w.shape) for w in seed.weights] == [
            tuple(w.shape) for w in model.weights
        ]
        if spec.warm_start is None or same_layout:
            model.set_weights(seed.get_weights())
            return len(model.layers)
        return spec.warm_start(model, seed)
    except ValueError as exc:
        why = str(exc)
        if spec.warm_start is None and seed.name in ARCHITECTURES and seed.name != model.name:
            why = f"it is a {seed.name} (--architecture {seed.name})"
        raise ModelError(f"{seed_path}: cannot start {name} from it ({why})") from None


def build_model(name: str = DEFAULT_ARCHITECTURE, input_shape: tuple | None = None, **options):
    """``options`` go to the architecture's builder (``filters``, ``output``...):
    the ablations in ``bench/`` vary one design choice at a time this way."""
    spec = _spec(name)
    shape = input_shape or spec.recipe.input_shape
    return spec.builder(shape, **options)


def count_params(model) -> int:
    return int(model.count_params())


def check_model_file(path: Path, expected_sha256: str | None = None) -> None:
    """Refuse a model file that is not the one its card recorded, or not a whole
    ``.keras`` archive, with one line naming it (Keras would say "File not
    found" about a truncated one)."""
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        broken, names = "?", set()
    if broken is not None or "config.json" not in names:
        raise ModelError(f"{path}: not a valid .keras file (truncated or corrupt)")
    if expected_sha256:
        actual = file_sha256(path)
        if actual != expected_sha256:
            raise ModelError(
                f"{path}: corrupt model file (sha256 {actual[:16]}... does not match "
                f"the card's {expected_sha256[:16]}...)"
            )


def load_model(path: str | os.PathLike, expected_sha256: str | None = None):
    """Load a ``.keras`` file with safe mode on: a model file never runs code.
    ``expected_sha256`` (the card's ``model_sha256``) is checked when given."""
    import keras

    import denoiser.nets.architectures  # noqa: F401 - registers custom objects, if any

    path = Path(path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise ModelError(f"model file {path} not found")
    check_model_file(path, expected_sha256)
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds
        raise ModelError(f"cannot load model {path}: {first_line(exc)}") from None


@contextlib.contextmanager
def quiet_native_stderr(debug: bool | None = None) -> Iterator[None]:
    """File descriptor 2 closed to native libraries' start-up lines (TensorFlow's
    oneDNN and CUDA probing), which no log level
    silences; with --debug they show (``debug`` None: debug when
    ``TF_CPP_MIN_LOG_LEVEL`` is 0, as --debug sets it)."""
    if debug is None:
        debug = os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0"
    if debug:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow_quietly(debug: bool | None = None) -> None:
    """Import TensorFlow without its C++ start-up lines (see
    :func:`quiet_native_stderr`). Called once a command knows it will run a
    Keras model, after its options were checked, and by Dask workers."""
    if "tensorflow" in sys.modules:
        return
    with quiet_native_stderr(debug):
        import tensorflow  # noqa: F401
