"""Running a trained model without TensorFlow, and which runtime a run uses.

Importing TensorFlow and Keras costs several seconds, more than denoising a
few dozen images takes. Each trained model is therefore also exported to
OpenVINO (:mod:`denoiser.runtimes.openvino_runtime`) and to LiteRT (``model.tflite``
beside ``model.keras``, its sha256 on the card), when its layers convert and
its outputs match Keras'. A run then picks a runtime (:func:`choose_runtime`):
OpenVINO on a CPU for any job, else LiteRT for small jobs, else Keras (GPUs,
models without an export, OpenVINO not installed).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from denoiser.core.errors import ConfigError, ModelError, first_line
from denoiser.core.files import atomic_file, file_sha256, read_checked

logger = logging.getLogger(__name__)

LITERT_FILE = "model.tflite"
RUNTIMES = ("auto", "keras", "litert", "openvino")
# "auto" runs LiteRT on a folder whose images take at most this many bytes:
# there it saves TensorFlow's start-up; past it, Keras' faster large batches win
SMALL_JOB_BYTES = 4 << 20
# exported outputs further than this from Keras' on the probe images: not used
EXPORT_TOLERANCE = 1e-3


def litert_available() -> bool:
    """Whether the LiteRT interpreter (``ai-edge-litert``) is installed."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_available() -> bool:
    """Whether OpenVINO is installed (looked up, not imported)."""
    return importlib.util.find_spec("openvino") is not None


def gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU that TensorFlow would use,
    told without importing TensorFlow: the driver lists a GPU and
    ``CUDA_VISIBLE_DEVICES`` does not hide them all."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    try:
        return any(Path("/proc/driver/nvidia/gpus").iterdir())
    except OSError:
        return False


class _NotExported(Exception):
    """Why a model gets no LiteRT export."""


def export_litert(model, path: str | os.PathLike, probe_shape: tuple[int, ...]) -> dict:
    """Export a Keras ``model`` to LiteRT at ``path`` (whole or absent) and
    check it against Keras on random images of ``probe_shape`` (N, H, W, C).
    Returns the card's facts (``litert_sha256``, ``litert_bytes``), or ``{}``
    with a log line when the model needs operations outside LiteRT's
    built-ins or its outputs differ."""
    path = Path(path)
    try:
        with atomic_file(path, ".tmp.tflite") as tmp:
            _export_checked(model, tmp, probe_shape)
    except _NotExported as exc:
        logger.info("no LiteRT export of this model: %s", exc)
        return {}
    return {"litert_sha256": file_sha256(path), "litert_bytes": path.stat().st_size}


def _export_checked(model, tmp: Path, probe_shape: tuple[int, ...]) -> None:
    try:
        model.export(str(tmp), format="litert", verbose=False)
        probe = np.random.default_rng(0).random(probe_shape, dtype=np.float32)
        expected = np.asarray(model.predict_on_batch(probe), np.float32)
        got = LiteModel(tmp.read_bytes())(probe)
    except Exception as exc:  # noqa: BLE001 - the converter and interpreter raise many kinds
        raise _NotExported(first_line(exc)) from None
    gap = float(np.max(np.abs(got - expected)))
    if not gap <= EXPORT_TOLERANCE:
        raise _NotExported(f"its outputs differ from Keras' by up to {gap:.2g}")


_announced = False  # LiteRT's one start-up line of the process went to /dev/null


class LiteModel:
    """A LiteRT model that runs batches of any shape, as ``BatchPredictor``
    expects of a model (``predict_on_batch``, ``input_shape``). Batches are not
    padded to a fixed size: one interpreter per recent input shape instead."""

    pads_batches = False
    KEEP_SHAPES = 4

    def __init__(self, content: bytes, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self._content = content
        self._threads = threads or int(
            os.environ.get("TF_NUM_INTRAOP_THREADS") or os.cpu_count() or 1
        )
        self._make = Interpreter
        self._by_shape: OrderedDict[tuple, tuple] = OrderedDict()
        first = self._new()
        details = first.get_input_details()
        if len(details) != 1 or len(first.get_output_details()) != 1:
            raise ModelError("a LiteRT model with one input and one output was expected")
        self.input_shape = tuple(
            None if d < 0 else int(d) for d in details[0]["shape_signature"].tolist()
        )

    def _new(self):
        return self._make(model_content=self._content, num_threads=self._threads)

    def _for(self, shape: tuple):
        entry = self._by_shape.get(shape)
        if entry is None:
            it = self._new()
            inp = it.get_input_details()[0]["index"]
            it.resize_tensor_input(inp, list(shape), strict=True)
            _allocate(it)
            entry = (it, inp, it.get_output_details()[0]["index"])
            self._by_shape[shape] = entry
            if len(self._by_shape) > self.KEEP_SHAPES:
                self._by_shape.popitem(last=False)
        else:
            self._by_shape.move_to_end(shape)
        return entry

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        it, inp, out = self._for(x.shape)
        it.set_tensor(inp, x)
        it.invoke()
        return it.get_tensor(out).copy()

    __call__ = predict_on_batch


def _allocate(interpreter) -> None:
    """``allocate_tensors``; the process's first one prints "Created TensorFlow
    Lite XNNPACK delegate for CPU" on file descriptor 2, silenced unless --debug."""
    global _announced
    if _announced:
        interpreter.allocate_tensors()
        return
    from denoiser.nets.models import quiet_native_stderr

    with quiet_native_stderr():
        interpreter.allocate_tensors()
    _announced = True


def load_litert(path: str | os.PathLike, expected_sha256: str | None = None) -> LiteModel:
    """The LiteRT model at ``path``, checked against the card's sha256."""
    path = Path(path)
    content = read_checked(path, expected_sha256, "LiteRT")
    try:
        return LiteModel(content)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - the interpreter raises ValueError, RuntimeError
        raise ModelError(f"cannot load LiteRT model {path}: {first_line(exc)}") from None


def choose_runtime(
    requested: str, has_export: bool, image_bytes: int | None, has_openvino: bool = False
) -> str:
    """``keras``, ``litert`` or ``openvino`` for a run. ``has_export``: the
    model has a LiteRT export; ``has_openvino``: an OpenVINO one.
    ``requested``: ``auto`` (OpenVINO when the model has its export, OpenVINO
    is installed and there is no GPU; else LiteRT when the model has an
    export, the interpreter is installed and the folder's images take at most
    :data:`SMALL_JOB_BYTES`; else Keras), or one of the three; a runtime
    asked for without its export or its package is a one-line ConfigError."""
    if requested not in RUNTIMES:
        raise ConfigError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {requested!r}")
    if requested == "keras":
        return "keras"
    if requested == "openvino":
        if not has_openvino:
            raise ConfigError(
                "--runtime openvino: this model has no OpenVINO export; make one with "
                "`denoise models export VERSION`, or use --runtime keras"
            )
        if not openvino_available():
            raise ConfigError("--runtime openvino needs OpenVINO: pip install openvino")
        return "openvino"
    if requested == "litert":
        if not has_export:
            raise ConfigError(
                "--runtime litert: this model has no LiteRT export (trained before exports, "
                "or its layers do not convert); use --runtime keras"
            )
        if not litert_available():
            raise ConfigError("--runtime litert needs ai-edge-litert: pip install ai-edge-litert")
        return "litert"
    if has_openvino and openvino_available() and not gpu_present():
        return "openvino"
    small = image_bytes is not None and image_bytes <= SMALL_JOB_BYTES
    return "litert" if small and has_export and litert_available() else "keras"
