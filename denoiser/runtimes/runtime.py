"""Which runtime runs a trained model: OpenVINO on CPUs, else Keras.

Importing TensorFlow and Keras costs several seconds, more than denoising a
few dozen images takes. Each trained model is therefore also exported to
OpenVINO (:mod:`denoiser.runtimes.openvino_runtime`: ``model.xml`` and
``model.bin`` beside ``model.keras``, their sha256s on the card), when its
layers convert and its outputs match Keras'. A run then picks a runtime
(:func:`choose_runtime`): OpenVINO on a CPU for any job, else Keras (GPUs,
models without an export, OpenVINO not installed). LiteRT, once a second
export for short folder runs, was retired; a stray ``model.tflite`` in an
older model's folder is not read.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from denoiser.core.errors import ConfigError

RUNTIMES = ("auto", "keras", "openvino")
# the runtime that was retired: asked for, a one-line ConfigError saying what to use instead
RETIRED_RUNTIME = "litert"
# exported outputs further than this from Keras' on the probe images: not used
EXPORT_TOLERANCE = 1e-3


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


def check_runtime(requested: str) -> str:
    """``requested`` when it names a runtime (:data:`RUNTIMES`); a one-line
    ConfigError otherwise, with what to use instead of the retired LiteRT."""
    if requested == RETIRED_RUNTIME:
        raise ConfigError(
            "--runtime litert: LiteRT was retired, models have no LiteRT export any more; "
            "use --runtime openvino (make an export with `denoise models export VERSION`) "
            "or --runtime keras"
        )
    if requested not in RUNTIMES:
        raise ConfigError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {requested!r}")
    return requested


def choose_runtime(requested: str, has_openvino: bool) -> str:
    """``keras`` or ``openvino`` for a run of a model; ``has_openvino``: the
    model has an OpenVINO export. ``requested``: ``auto`` (OpenVINO when the
    model has its export, OpenVINO is installed and there is no GPU; else
    Keras), or one of the two; OpenVINO asked for without its export or its
    package, or a runtime that is not one (:func:`check_runtime`), is a
    one-line ConfigError."""
    if check_runtime(requested) == "keras":
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
    return "openvino" if has_openvino and openvino_available() and not gpu_present() else "keras"
