"""Running a trained model on the CPU with OpenVINO: its IR export.

Each trained model is also exported to OpenVINO's IR (``model.xml`` and
``model.bin`` beside ``model.keras``, their sha256s on the card), with the
batch, height and width left dynamic, when it converts and its outputs match
Keras' at fp32. The card also says at which precision the export is to run
(``openvino_precision``): ``bf16`` (OpenVINO's own choice where the CPU has
bf16 units, f32 elsewhere) unless the evaluation found that bf16 loses more
than :data:`MAX_BF16_LOSS_DB` of PSNR against Keras, then ``f32``. A folder
run on the CPU then needs no TensorFlow (:func:`denoiser.runtimes.runtime.choose_runtime`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np

from denoiser.core.cpu import has_native_bf16
from denoiser.core.errors import ModelError, first_line
from denoiser.core.files import fsync_dir, read_checked

logger = logging.getLogger(__name__)

XML_FILE = "model.xml"
BIN_FILE = "model.bin"
PRECISIONS = ("bf16", "f32")
# what an export is to run at unless its evaluation says otherwise
DEFAULT_PRECISION = "bf16"
# bf16 losing more PSNR than this (dB, on the evaluation set) against Keras fp32: run at f32
MAX_BF16_LOSS_DB = 0.05
CACHE_ENV = "DENOISE_CACHE"


def openvino_cache_dir() -> Path:
    """Where OpenVINO keeps compiled models, so that a later process skips
    compiling: ``$DENOISE_CACHE/openvino``, default ``~/.cache/denoise-flow/openvino``."""
    base = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "denoise-flow"
    return Path(base).expanduser() / "openvino"


class _NotExported(Exception):
    """Why a model gets no OpenVINO export."""


def export_openvino(model, folder: str | os.PathLike, probe_shape: tuple[int, ...]) -> dict:
    """:func:`make_openvino_export`, or ``{}`` with a log line when the model
    does not convert or its outputs differ from Keras' (training goes on)."""
    try:
        return make_openvino_export(model, folder, probe_shape)
    except ModelError as exc:
        logger.info("%s", exc)
        return {}


def make_openvino_export(model, folder: str | os.PathLike, probe_shape: tuple[int, ...]) -> dict:
    """Export a Keras ``model`` to OpenVINO IR as ``folder``/model.xml and
    model.bin (fp32 weights; dynamic batch, and height and width where the
    model takes any size) and check it at f32 against Keras on random images
    of ``probe_shape`` (N, H, W, C) and of another batch size. Both files are
    written under temporary names and renamed; the card's sha256s tell whether
    a pair is whole. Returns the card's facts (``openvino_xml_sha256``,
    ``openvino_bin_sha256``, ``openvino_bytes``, ``openvino_precision``); a
    one-line ModelError when the model does not convert or its outputs differ."""
    folder = Path(folder)
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    tmp_xml = folder / f".model.{token}.tmp.xml"
    tmp_bin = tmp_xml.with_suffix(".bin")  # where save_model puts the weights
    work = Path(tempfile.mkdtemp(prefix="denoise-openvino-"))
    try:
        _export_checked(model, work, tmp_xml, probe_shape)
        for tmp in (tmp_xml, tmp_bin):
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        facts = {
            "openvino_xml_sha256": _sha256(tmp_xml),
            "openvino_bin_sha256": _sha256(tmp_bin),
            "openvino_bytes": tmp_xml.stat().st_size + tmp_bin.stat().st_size,
            "openvino_precision": DEFAULT_PRECISION,
        }
        os.replace(tmp_bin, folder / BIN_FILE)
        os.replace(tmp_xml, folder / XML_FILE)
        fsync_dir(folder)
    except _NotExported as exc:
        raise ModelError(f"no OpenVINO export of this model: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for tmp in (tmp_xml, tmp_bin):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return facts


def _without_telemetry() -> None:
    """OpenVINO's tools report usage to Google Analytics, from forked
    processes, unless their user opted out with a file in their home (the
    import of its converter alone sends an event): a fork of this threaded
    process, network calls nobody asked for, and, offline, children that
    never end and hold the command at its exit. Its consent check is made to
    answer "declined" for this process, before the converter is imported."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # not installed: nothing is reported
        return
    OptInChecker.check = lambda self, *args, **kwargs: ConsentCheckResult.DECLINED


def _export_checked(model, work: Path, xml: Path, probe_shape: tuple[int, ...]) -> None:
    from denoiser.runtimes.runtime import EXPORT_TOLERANCE

    _without_telemetry()
    try:
        import openvino as ov

        with _quiet_logger("tensorflow"):  # "Assets written to ..." at INFO
            model.export(str(work / "saved_model"), format="tf_saved_model", verbose=False)
        converted = ov.convert_model(str(work / "saved_model"))
        ov.save_model(converted, str(xml), compress_to_fp16=False)
        exported = OpenVinoModel(xml.read_bytes(), xml.with_suffix(".bin").read_bytes(), "f32")
        rng = np.random.default_rng(0)
        gap = 0.0
        n, *rest = probe_shape
        for shape in ((n, *rest), (n + 1, *rest)):
            probe = rng.random(shape, dtype=np.float32)
            expected = np.asarray(model.predict_on_batch(probe), np.float32)
            gap = max(gap, float(np.max(np.abs(exported(probe) - expected))))
    except Exception as exc:  # noqa: BLE001 - the converter and the runtime raise many kinds
        raise _NotExported(first_line(exc)) from None
    if not gap <= EXPORT_TOLERANCE:
        raise _NotExported(f"its outputs differ from Keras' by up to {gap:.2g}")


@contextlib.contextmanager
def _quiet_logger(name: str):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def precision_to_run(keras_psnr: float, openvino_psnr: float, scored_at: str) -> str:
    """The precision an export is to run at, from its evaluation: ``f32`` when
    it was scored at bf16 and lost more than :data:`MAX_BF16_LOSS_DB` against
    Keras fp32, else ``bf16`` (a CPU without bf16 runs f32 in any case)."""
    lost = keras_psnr - openvino_psnr
    return "f32" if scored_at == "bf16" and lost > MAX_BF16_LOSS_DB else "bf16"


def precision_on_cpu(precision: str | None, flags: frozenset[str] | None = None) -> str:
    """The precision the CPU will run an export at that is to run at
    ``precision`` (a card's; None: :data:`DEFAULT_PRECISION`): OpenVINO's CPU
    plugin runs bf16 only where the CPU computes it in hardware (AMX or
    AVX512-BF16), f32 elsewhere. ``flags`` default to this machine's."""
    wanted = precision or DEFAULT_PRECISION
    return "bf16" if wanted == "bf16" and has_native_bf16(flags) else "f32"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class OpenVinoModel:
    """An OpenVINO model compiled once for the CPU, with dynamic shapes, that
    runs batches of any shape, as ``BatchPredictor`` expects of a model
    (``predict_on_batch``, ``input_shape``). Batches are not padded to a fixed
    size; one infer request is reused. ``precision``: ``bf16`` (where the CPU
    has it, else OpenVINO runs f32) or ``f32``. Compiled models are kept in
    :func:`openvino_cache_dir` unless ``cache`` is False."""

    pads_batches = False
    #: pixels a batch: one 512x512 image. On the CPU a photo model runs fastest
    #: a pixel at batch 1 (README.md: photographs on AMX), and a folder run's
    #: other threads share the cores with it
    pixel_budget = 512 * 512

    def __init__(self, xml: bytes, weights: bytes, precision: str = DEFAULT_PRECISION, cache=True):
        _without_telemetry()
        import openvino as ov

        if precision not in PRECISIONS:
            raise ModelError(f"unknown OpenVINO precision {precision!r}; one of {PRECISIONS}")
        core = ov.Core()
        config: dict = {"INFERENCE_PRECISION_HINT": precision}
        threads = os.environ.get("TF_NUM_INTRAOP_THREADS")  # a Dask worker's share of the cores
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache:
            folder = openvino_cache_dir()
            with contextlib.suppress(OSError):  # an unwritable cache only costs the compile
                folder.mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(folder)
        model = core.read_model(xml.decode(), ov.Tensor(np.frombuffer(weights, np.uint8)))
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ModelError("an OpenVINO model with one input and one output was expected")
        self.input_shape = tuple(
            None if d.is_dynamic else d.get_length() for d in model.inputs[0].get_partial_shape()
        )
        self._compiled = core.compile_model(model, "CPU", config)
        self._request = self._compiled.create_infer_request()

    @property
    def precision(self) -> str:
        """The precision the CPU runs the model at (``bf16`` or ``f32``)."""
        hint = str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        return "bf16" if "bf" in hint.lower() else "f32"  # bf16 shows as "bfloat16"

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._request.infer([x])
        return self._request.get_output_tensor(0).data.copy()

    __call__ = predict_on_batch


def load_openvino(
    xml_path: str | os.PathLike,
    bin_path: str | os.PathLike,
    xml_sha256: str | None = None,
    bin_sha256: str | None = None,
    precision: str = DEFAULT_PRECISION,
) -> OpenVinoModel:
    """The OpenVINO model at ``xml_path`` and ``bin_path``, each file checked
    against the card's sha256, compiled for the CPU at ``precision``."""
    files = [
        read_checked(xml_path, xml_sha256, "OpenVINO"),
        read_checked(bin_path, bin_sha256, "OpenVINO"),
    ]
    try:
        return OpenVinoModel(*files, precision=precision)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - the runtime raises RuntimeError and its own kinds
        raise ModelError(f"cannot load OpenVINO model {xml_path}: {first_line(exc)}") from None
