"""Training: device choice, a streamed tf.data input from the shards, and a
resumable ``fit`` that leaves ``model.keras`` and its card in a folder."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from denoiser.config import TrainConfig
from denoiser.core import interrupts
from denoiser.core.cards import CARD_FILE, CardData, ModelCard, Recipe, seed_facts
from denoiser.core.cpu import has_native_bf16
from denoiser.core.errors import ModelError, first_line
from denoiser.core.faults import failpoint
from denoiser.core.files import (
    atomic_file,
    fsync_dir,
    is_url,
    join_location,
    open_read,
    write_text_atomic,
)
from denoiser.data.shards import (
    check_shard_set,
    iter_batches,
    noise_config,
    read_manifest,
    split_rows,
    tested_images_sha256,
)
from denoiser.domains import domain_of_manifest
from denoiser.learning.checkpoints import (
    STALE_RUN_SECONDS,
    CheckpointRun,
    checkpoint_key,
    claim_remote_run,
    claim_run,
    clean_checkpoints,
    keep_open,
    remove_stale_remote_runs,
    remove_stale_runs,
)
from denoiser.learning.progress import epoch_bar, scores, validation_sample, validation_scores
from denoiser.nets.models import (
    architecture_recipe,
    build_model,
    count_params,
    file_sha256,
    load_model,
    warm_start_model,
)
from denoiser.runtimes.openvino_runtime import export_openvino

logger = logging.getLogger(__name__)


@dataclass
class DeviceInfo:
    kind: str  # "gpu" or "cpu"
    names: list[str]
    replicas: int
    mixed_precision: bool
    strategy_name: str
    precision: str = "float32"  # Keras' policy: float32, mixed_bfloat16 or mixed_float16
    strategy: Any = field(default=None, repr=False)

    def describe(self) -> str:
        if self.kind == "cpu":
            return "CPU, mixed bfloat16" if self.precision == "mixed_bfloat16" else "CPU"
        return (
            f"{self.replicas} GPU{'s' if self.replicas > 1 else ''} ({', '.join(self.names)})"
            + (", mixed precision" if self.mixed_precision else "")
        )

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("strategy")
        d["description"] = self.describe()
        return d | cpu_facts()  # what trained it, whatever the device: the card says


def cpu_facts(path: str = "/proc/cpuinfo") -> dict:
    """The CPU's model name (None where /proc/cpuinfo does not say) and how
    many cores this process may use."""
    name = None
    try:
        with open(path) as fh:
            name = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None
            )
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": name, "cpu_cores": cores}


def plan_device(
    gpus: list[str],
    mixed_precision: str = "auto",
    precision: str = "auto",
    flags: frozenset[str] | None = None,
) -> dict:
    """Pure decision: which strategy and precision for the GPUs TensorFlow
    sees. GPUs: mixed float16 unless ``mixed_precision`` is off. CPUs:
    ``precision`` auto is mixed bfloat16 where the CPU computes it in hardware
    (``flags`` holds amx_bf16 or avx512_bf16; elsewhere it is emulated, slower
    than float32), float32 otherwise; bfloat16 or float32 as asked."""
    if mixed_precision not in ("auto", "on", "off"):
        raise ValueError(f"mixed_precision must be auto, on or off, not {mixed_precision!r}")
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be auto, float32 or bfloat16, not {precision!r}")
    if not gpus:
        # float16 on a CPU is slower and less accurate; "on" is honoured only on GPUs
        native = has_native_bf16(flags)
        bf16 = precision == "bfloat16" or (precision == "auto" and native)
        return {
            "kind": "cpu",
            "names": ["CPU"],
            "replicas": 1,
            "mixed_precision": False,
            "strategy_name": "default",
            "precision": "mixed_bfloat16" if bf16 else "float32",
        }
    half = mixed_precision in ("auto", "on")
    return {
        "kind": "gpu",
        "names": list(gpus),
        "replicas": len(gpus),
        "mixed_precision": half,
        "strategy_name": "mirrored" if len(gpus) > 1 else "one_device",
        "precision": "mixed_float16" if half else "float32",
    }


def select_device(mixed_precision: str = "auto", precision: str = "auto") -> DeviceInfo:
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised
            pass
    plan = plan_device([g.name for g in gpus], mixed_precision, precision)
    keras.mixed_precision.set_global_policy(plan["precision"])
    if plan["strategy_name"] == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif plan["strategy_name"] == "one_device":
        strategy = tf.distribute.OneDeviceStrategy("/gpu:0")
    else:
        strategy = None  # the default; tf.distribute.get_strategy() breaks in worker threads
    info = DeviceInfo(**plan, strategy=strategy)
    logger.info("training on %s", info.describe())
    return info


def _shuffled_batches(
    shards_dir,
    split: str,
    batch_size: int,
    buffer_rows: int,
    seed: int | None,
    read_rows: int = 2048,
    columns: tuple[str, ...] = ("noisy", "clean"),
):
    """Whole batches from a block shuffle: rows are mixed within a buffer of
    ``buffer_rows`` (and shard files are visited in a seeded order). Shuffling
    and batching in numpy costs one Python step per batch, not per image, so
    the reader keeps up with the model on two cores. Yields one array per
    column of ``columns``, rows in the same order."""
    import numpy as np

    rng = np.random.default_rng(seed) if seed is not None else None
    parts: dict[str, list] = {c: [] for c in columns}
    held = 0

    def drain(final: bool):
        arrays = [np.concatenate(parts[c]) if len(parts[c]) > 1 else parts[c][0] for c in columns]
        n = len(arrays[0])
        if rng is not None:
            order = rng.permutation(n)
            arrays = [a[order] for a in arrays]
        cut = n if final else (n // batch_size) * batch_size
        for i in range(0, cut, batch_size):
            yield tuple(a[i : i + batch_size] for a in arrays)
        for c, a in zip(columns, arrays, strict=True):
            parts[c][:] = [a[cut:]] if cut < n else []

    order_seed = None if rng is None else int(rng.integers(2**31))
    for batch in iter_batches(
        shards_dir, split, batch_rows=read_rows, columns=columns, file_order_seed=order_seed
    ):
        for c in columns:
            parts[c].append(batch[c])
        held += len(batch[columns[0]])
        if held >= buffer_rows:
            yield from drain(final=False)
            held = sum(len(p) for p in parts[columns[0]])
    if held:
        yield from drain(final=True)


# the input's fixed knobs (tf.data's autotuning is off, see _without_autotune_model): batches
# converted at once, batches made ahead of the model; the conversion is cheap beside a step
PARALLEL_MAPS = 2
PREFETCH_BATCHES = 4

VALIDATION_NOISE_SEED = (
    1234  # the validation patches' noise: the same every epoch, so val_loss compares
)


def sigma_range(noise: dict) -> tuple[float, float]:
    """The awgn sigma range (0-255 units) a patch set's manifest asks the training graph for."""
    if noise.get("kind") != "awgn":
        raise ModelError(
            f"a patch set is trained with awgn noise added in the graph, not {noise.get('kind')!r}; "
            "write the shards again with noise kind awgn"
        )
    level = noise["level"]
    return (
        (float(level[0]), float(level[1]))
        if isinstance(level, (list, tuple))
        else (float(level),) * 2
    )


def awgn_batch(clean, sigmas: tuple[float, float], seed, density: str = "uniform"):
    """The literature's unclipped awgn on a (batch, H, W, C) float batch, one sigma
    (0-255 units) per image from ``sigmas`` with ``density``, as
    :func:`denoiser.data.noise.add_awgn_tf` draws it, but from a stateless ``seed``
    (an int64 scalar tensor): inside tf.data a stateful random op restarts its
    stream with every pass over the dataset, so each epoch would see the same
    noise again; a seed drawn per batch gives fresh noise that is still
    repeatable from the run's seed."""
    import tensorflow as tf

    from denoiser.data.noise import level_from_uniform

    lo, hi = sigmas
    pair = tf.stack([tf.cast(seed, tf.int64), tf.constant(0x5EED, tf.int64)])
    level_seed, noise_seed = tf.unstack(tf.random.experimental.stateless_split(pair, 2))
    u = tf.random.stateless_uniform(tf.shape(clean)[:1], seed=level_seed, dtype=tf.float32)
    sigma = tf.cast(level_from_uniform(u, lo, hi, density), clean.dtype) / 255.0
    noise = tf.random.stateless_normal(tf.shape(clean), seed=noise_seed, dtype=clean.dtype)
    return clean + noise * tf.reshape(sigma, [-1, 1, 1, 1])


class ColourCasts(NamedTuple):
    """Which colour training patches get a cast (:func:`colour_cast`) and how:
    ``TrainConfig``'s ``colour_gains``, ``colour_gains_low`` and
    ``colour_gains_balanced``."""

    share: float = 0.0
    low: float = TrainConfig.model_fields["colour_gains_low"].default
    balanced: bool = False

    @classmethod
    def of(cls, training: TrainConfig) -> ColourCasts:
        return cls(training.colour_gains, training.colour_gains_low, training.colour_gains_balanced)

    def apply_to(self, channels: int) -> bool:
        """Whether patches of ``channels`` channels get casts: colour ones, when a share is asked."""
        return self.share > 0 and channels == 3

    def describe(self) -> str:
        return (
            f"{round(100 * self.share)}% of the training patches get a colour cast, gains from "
            f"[{self.low:g}, 1]" + (", balanced to a mean of 1" if self.balanced else "")
        )


NO_CASTS = ColourCasts()


def colour_cast(clean, casts: ColourCasts, seed):
    """A ``casts.share`` of a (batch, H, W, 3) float batch in [0, 1] with R, G
    and B each scaled by a gain drawn uniformly from [``casts.low``, 1], from a
    stateless ``seed`` (an int64 scalar tensor, as :func:`awgn_batch` takes).
    ``casts.balanced``: the three gains divided by their mean, so a grey stays
    as bright as it was, and the patch clipped to [0, 1] (a bright colour
    saturates, as in a photograph); otherwise gains of at most 1 keep the
    patch in [0, 1] and darken it.

    What it is for: in a JPEG stored with 4:2:0 chroma (all of CBSD432) the
    colour differences are at half resolution, so R, G and B share one fine
    detail and a colour model learns to smooth the colour differences, which
    photographs stored otherwise have detail in (docs/natural.md, "Colour
    casts"). Unequal gains turn the shared detail into colour-difference
    detail where the luminance has its own, as colour edges are."""
    import tensorflow as tf

    pair = tf.stack([tf.cast(seed, tf.int64), tf.constant(0xCA57, tf.int64)])
    pick_seed, gain_seed = tf.unstack(tf.random.experimental.stateless_split(pair, 2))
    batch = tf.shape(clean)[:1]
    picked = tf.random.stateless_uniform(batch, seed=pick_seed) < casts.share
    gains = tf.random.stateless_uniform(
        tf.concat([batch, [1, 1, 3]], 0), seed=gain_seed, minval=casts.low, maxval=1.0
    )
    if casts.balanced:
        gains = gains / tf.reduce_mean(gains, axis=-1, keepdims=True)
    gains = tf.where(tf.reshape(picked, [-1, 1, 1, 1]), gains, tf.ones_like(gains))
    cast = clean * tf.cast(gains, clean.dtype)
    return tf.clip_by_value(cast, 0.0, 1.0) if casts.balanced else cast


def make_dataset(
    shards_dir: str | os.PathLike,
    split: str,
    batch_size: int,
    shuffle_buffer: int = 10_000,
    seed: int = 0,
    training: bool = True,
    reframe: float = 0.0,
    casts: ColourCasts = NO_CASTS,
):
    """(noisy, clean) float32 batches streamed from the shards.

    Memory is bounded by the shuffle buffer and a few record batches whatever
    the number of shards; uint8 -> float32 happens inside the graph. A new
    shuffle order every epoch, reproducible from the seed. ``reframe``: the
    share of training pairs recut from mosaics (:func:`denoiser.data.augment.reframe`);
    ``casts``: which colour training patches get a colour cast
    (:func:`colour_cast`) before their noise.

    A patch set (manifest ``kind: patches``) holds clean patches only: the
    literature's awgn is added inside the graph (:func:`awgn_batch`), one
    sigma per patch from the manifest's range, drawn fresh for every batch of
    every epoch in training (from ``seed`` and the epoch), and from a fixed
    seed for validation so that its loss is comparable across epochs.
    """
    import tensorflow as tf

    manifest = read_manifest(shards_dir)
    shape = tuple(manifest["image_shape"])
    rows = split_rows(shards_dir, split)
    fresh_noise = domain_of_manifest(manifest).noise_in_training
    # Python hands over blocks of whole batches; tf.data cuts them into batches in C++
    block = batch_size * max(1, 4096 // batch_size)
    generate = _block_source(shards_dir, split, block, shuffle_buffer, seed, training, fresh_noise)
    spec = tf.TensorSpec(shape=(None, *shape), dtype=tf.uint8)
    seeds = tf.TensorSpec(shape=(None,), dtype=tf.int64)
    signature = (spec, seeds) if fresh_noise else (spec, spec)
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature).rebatch(batch_size)
    ds = ds.map(
        _float_pairs(manifest, shape, training, reframe, fresh_noise, casts),
        num_parallel_calls=PARALLEL_MAPS,
    )
    ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(rows / batch_size)))
    return ds.prefetch(PREFETCH_BATCHES).with_options(_without_autotune_model())


def _block_source(
    shards_dir,
    split: str,
    block: int,
    shuffle_buffer: int,
    seed: int,
    training: bool,
    fresh_noise: bool,
) -> Callable:
    """The generator function :func:`make_dataset` streams from: blocks of
    ``block`` uint8 rows, shuffled anew each training epoch (from ``seed`` and
    the epoch); for a patch set, the clean rows and a noise seed per row."""
    import numpy as np

    columns = ("clean",) if fresh_noise else ("noisy", "clean")
    epoch = {"n": 0}

    def generate():
        epoch_seed = seed * 100_003 + epoch["n"] if training else None
        # patch sets: a noise seed per row (a batch uses its first row's), new each training epoch,
        # the same every validation pass
        noise_rng = np.random.default_rng(
            [seed, epoch["n"], 1] if training else [VALIDATION_NOISE_SEED]
        )
        epoch["n"] += 1
        for arrays in _shuffled_batches(
            shards_dir,
            split,
            block,
            max(shuffle_buffer, block) if training else block,
            epoch_seed,
            columns=columns,
        ):
            if fresh_noise:
                arrays = (*arrays, noise_rng.integers(0, 2**62, len(arrays[0]), dtype=np.int64))
            yield arrays

    return generate


def _float_pairs(
    manifest: dict,
    shape: tuple,
    training: bool,
    reframe: float,
    fresh_noise: bool,
    casts: ColourCasts,
):
    """The graph function that turns a uint8 batch into a float32 (noisy, clean)
    pair: the stored pair scaled, or for a patch set awgn added to the clean
    patches (in training, ``casts``' share of colour patches cast
    first); in training, ``reframe`` of the pairs recut from mosaics."""
    import tensorflow as tf

    def recut(noisy, clean):
        if training and reframe > 0:
            from denoiser.data.augment import reframe as recut_pairs

            both = recut_pairs(tf.concat([noisy, clean], -1), reframe)
            noisy, clean = both[..., : shape[-1]], both[..., shape[-1] :]
        return noisy, clean

    if fresh_noise:
        noise = noise_config(manifest)
        sigmas = sigma_range({"kind": noise.kind, "level": noise.level})
        density = noise.level_density

        cast = training and casts.apply_to(shape[-1])

        def noisy_pair(clean, seeds):
            clean = tf.cast(clean, tf.float32) / 255.0
            if cast:
                clean = colour_cast(clean, casts, seeds[0])
            return recut(awgn_batch(clean, sigmas, seeds[0], density), clean)

        return noisy_pair

    def to_float(noisy, clean):
        return recut(tf.cast(noisy, tf.float32) / 255.0, tf.cast(clean, tf.float32) / 255.0)

    return to_float


def _without_autotune_model():
    """tf.data options without the autotuning model's thread, so that the
    input's knobs are the fixed ones above.

    Keras drops each epoch's iterator at the next epoch's first step, and the
    last one when ``fit`` returns. Deleting an iterator can wait until its
    tuning thread wakes from its current sleep, a sleep that doubles after
    each tuning round: seconds of nothing at an epoch boundary or after the
    last epoch, more the longer the epochs.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def learning_rate(base: float, schedule: str, total_steps: int):
    """Adam's learning rate: constant (the reference's recipe), or a cosine
    decay to 1% over the whole run, which settles the weights by the last
    epoch instead of leaving them jittering at the initial rate."""
    import keras

    if schedule == "constant":
        return base
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(base, max(total_steps, 1), alpha=0.01)
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; known: constant, cosine")


def _epoch_log_callbacks(path: Path, on_epoch_end: Callable | None, epochs: int):
    """Two callbacks around the backup: the first appends each finished epoch
    to a JSON-lines file that survives restarts (so a resumed run's history
    still starts at epoch 1), the second runs once the backup is written too.
    History before backup: a crash between them reruns an epoch whose line is
    then replaced, instead of losing a line."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            interrupts.hold()  # a signal from here to the backup waits for it (released by EpochDone)
            self.record = {
                "epoch": epoch + 1,
                "seconds": round(time.perf_counter() - self._t0, 3),
                **{k: float(v) for k, v in (logs or {}).items()},
            }
            with open(path, "a") as fh:
                fh.write(json.dumps(self.record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    log = EpochLog()

    class EpochDone(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            interrupts.release()
            failpoint("train.epoch_end")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, epochs, log.record)

    return log, EpochDone()


class CheckpointUnreadable(Exception):
    """A run's backed-up training state cannot be loaded (a damaged file)."""


EARLY_STOPPING_FILE = "early_stopping.json"
BEST_WEIGHTS_FILE = "best.weights.npz"


def _atomic_backup(state_dir: Path, early_stopping=None):
    """Keras' BackupAndRestore, all-or-nothing: each save goes to a fresh
    generation folder and a symlink swap makes it current, so a crash or a
    signal at any moment leaves the previous complete state (Keras' own save
    rewrites the weights file in place, and a torn one cannot be loaded).
    A generation also keeps ``early_stopping``'s state and best weights, so a
    resumed run stops when the whole run would have and ends with the best
    weights of all its epochs (:func:`_resumable_early_stopping`)."""
    import secrets

    import keras

    state_dir.mkdir(parents=True, exist_ok=True)
    current = state_dir / "current"

    class AtomicBackup(keras.callbacks.BackupAndRestore):
        def __init__(self):
            super().__init__(str(current), save_freq="epoch", delete_checkpoint=False)

        def _save_model(self):
            gen = state_dir / f"gen-{self._current_epoch:05d}-{secrets.token_hex(3)}"
            gen.mkdir()
            self.model.save_weights(str(gen / "latest.weights.h5"), overwrite=True)
            meta = json.dumps({"epoch": self._current_epoch, "batch": self._last_batch_seen})
            (gen / "training_metadata.json").write_text(meta)
            if early_stopping is not None:
                _save_early_stopping(early_stopping, gen)
            for name in os.listdir(gen):
                with open(gen / name, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(gen)
            link = state_dir / f".current.{secrets.token_hex(4)}"
            os.symlink(gen.name, link)
            os.replace(link, current)
            fsync_dir(state_dir)
            _drop_other_generations(state_dir, keep=gen.name)

        def on_train_begin(self, logs=None):
            keep = os.readlink(current) if current.is_symlink() else None
            _drop_other_generations(state_dir, keep=keep)
            if keep is not None and not all(
                (current / n).is_file() for n in ("latest.weights.h5", "training_metadata.json")
            ):
                raise CheckpointUnreadable(
                    f"{state_dir}: the current generation {keep} is incomplete"
                )
            try:
                self._load_model()
            except Exception as exc:  # noqa: BLE001 - any unreadable state: start the run over
                raise CheckpointUnreadable(f"{state_dir}: {type(exc).__name__}: {exc}") from exc

    return AtomicBackup()


def _save_early_stopping(es, gen: Path) -> None:
    import numpy as np

    best = None if es.best is None else float(es.best)
    state = {"best": best, "wait": int(es.wait), "best_epoch": int(es.best_epoch)}
    (gen / EARLY_STOPPING_FILE).write_text(json.dumps(state))
    if es.best_weights is not None:
        with open(gen / BEST_WEIGHTS_FILE, "wb") as fh:
            np.savez(fh, *es.best_weights)


def _resumable_early_stopping(state_dir: Path, monitor: str, patience: int):
    """Keras' EarlyStopping that takes up a resumed run's state (best value,
    epochs without improvement, best weights) from the backup's current
    generation in ``state_dir`` instead of starting over. It must come before
    the backup among the callbacks, so that each generation holds the state
    after its own epoch."""
    import keras
    import numpy as np

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            folder = state_dir / "current"
            if not (folder / EARLY_STOPPING_FILE).is_file():
                return  # a new run, or one saved before this state was kept
            try:
                state = json.loads((folder / EARLY_STOPPING_FILE).read_text())
                self.best, self.wait = state["best"], int(state["wait"])
                self.best_epoch = int(state["best_epoch"])
                if (folder / BEST_WEIGHTS_FILE).is_file():
                    with np.load(folder / BEST_WEIGHTS_FILE) as saved:
                        self.best_weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
            except Exception as exc:  # noqa: BLE001 - any unreadable state: start the run over
                raise CheckpointUnreadable(f"{folder}: {type(exc).__name__}: {exc}") from exc

    return ResumableEarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True)


def _drop_other_generations(state_dir: Path, keep: str | None) -> None:
    """Generations a crash left half-written or superseded, and stray temporary links."""
    import shutil

    for path in state_dir.iterdir():
        if path.name.startswith(".current."):
            path.unlink(missing_ok=True)
        elif path.name.startswith("gen-") and path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def _read_history(path: Path) -> list[dict]:
    """Finished epochs, one each (a rerun epoch's last line wins); a line torn
    by a crash mid-write is skipped."""
    if not path.exists():
        return []
    by_epoch = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            by_epoch[int(rec["epoch"])] = rec
        except (ValueError, KeyError, TypeError):
            continue
    return [by_epoch[k] for k in sorted(by_epoch)]


def save_model_file(model, path: Path) -> dict:
    """Save the model as ``path``, atomically (the old file or the whole new
    one). Returns the file's sha256 and size, for the card."""
    with atomic_file(path, ".tmp.keras") as tmp:
        model.save(tmp)
    return {"model_sha256": file_sha256(path), "model_bytes": path.stat().st_size}


def as_float32(model, architecture: str, shape: tuple, fully_convolutional: bool):
    """A model trained in mixed precision rebuilt in float32 with its weights
    (kept in float32 all along), so that the saved model, its export and
    every later run compute in float32 whatever the CPU."""
    import keras

    if keras.mixed_precision.global_policy().name == "float32":
        return model
    keras.mixed_precision.set_global_policy("float32")
    plain = build_model(architecture, shape if not fully_convolutional else None)
    plain.set_weights(model.get_weights())
    return plain


def probe_shape(model) -> tuple[int, ...]:
    """A small batch shape the model takes (its fixed size, else 32x32), to
    check an export against."""
    _, h, w, c = model.input_shape
    return (2, h or 32, w or 32, c or 1)


def _finished_model(path: Path):
    """The model a killed run saved before writing its card, or None. A file at
    ``path`` is always whole (it is renamed into place); one that still fails
    to load is removed and the model rebuilt from the backup."""
    if not path.exists():
        return None
    try:
        model = load_model(path)
    except ModelError as exc:
        logger.warning("%s; training again from the backup", exc)
        path.unlink(missing_ok=True)
        return None
    logger.info("%s was saved before the run was interrupted: writing its card", path)
    return model


def resolve_architecture(training: TrainConfig, shards_dir: str | os.PathLike) -> TrainConfig:
    """``architecture: auto`` made concrete for the shard set: its domain's."""
    training = TrainConfig.model_validate(training)
    if training.architecture != "auto":
        return training
    domain = domain_of_manifest(read_manifest(shards_dir))
    return training.model_copy(update={"architecture": domain.default_architecture})


def data_facts(shards_dir: str | os.PathLike, manifest: dict) -> CardData:
    """What the model card records about the data a model learned from."""
    where = str(shards_dir) if is_url(shards_dir) else str(Path(shards_dir).resolve())
    return CardData(
        shards_dir=where,
        manifest_sha256=manifest_hash(shards_dir),
        test_sha256=tested_images_sha256(manifest),
        dataset=manifest.get("dataset"),
        domain=domain_of_manifest(manifest).name,
        channels=domain_of_manifest(manifest).channels,
        shard_kind=manifest.get("kind", "pairs"),
        test_dataset=manifest.get("test_dataset"),
        patch_size=manifest.get("patch_size"),
        patches_per_image=manifest.get("patches_per_image"),
        noise=manifest.get("noise"),
        rows=manifest.get("splits"),
    )


def manifest_hash(shards_dir: str | os.PathLike) -> str:
    with open_read(join_location(shards_dir, "manifest.json")) as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def train_model(
    shards_dir: str | os.PathLike,
    training: TrainConfig,
    out_dir: str | os.PathLike,
    backup_dir: str | os.PathLike,
    version: str | None = None,
    on_epoch_end: Callable[[int, int, dict], None] | None = None,
    show_progress: bool = False,
    log: Callable[..., None] = logger.info,
) -> dict:
    """Train, keeping a backup each epoch so a killed run resumes where it stopped.

    Writes ``model.keras`` (best validation weights), ``model.json`` (the card's
    data, with the model file's sha256 and size) and ``history.csv`` into
    ``out_dir``. A ``model.keras`` already in ``out_dir`` is what this run saved
    before it was killed: it is kept, and only the card written.

    Each epoch's record (``on_epoch_end``, the history) holds ``val_psnr`` and
    ``val_ssim``: the model scored on the first validation pairs
    (:data:`denoiser.learning.progress.SCORED_IMAGES`), as the evaluation scores.
    ``show_progress``: a bar within each epoch on stderr (for a terminal).
    ``log``: where the lines saying what is trained go.
    """
    import keras

    training = resolve_architecture(training, shards_dir)
    out, backup = Path(out_dir), Path(backup_dir)
    out.mkdir(parents=True, exist_ok=True)
    backup.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(training.seed)
    device = select_device(training.mixed_precision, training.precision)
    plan = _training_plan(training)
    # every shard against its recorded sha256: a damaged one fails here in one line naming it,
    # not as a TensorFlow graph error mid-epoch
    manifest = check_shard_set(shards_dir)
    shape = tuple(manifest["image_shape"])
    _check_input_shape(training, plan.recipe, shape)

    model, file_facts, seconds = _saved_or_fitted_model(
        FitJob(
            shards_dir, training, plan, device, shape, out, backup, on_epoch_end, show_progress, log
        )
    )
    file_facts |= _export_runtimes(model, out)

    history = _read_history(backup / "history.jsonl")
    if seconds is None:
        seconds = sum(h.get("seconds", 0.0) for h in history)
    _write_history_csv(out / "history.csv", history)
    card = _model_card(
        version or out.name,
        model,
        training,
        plan,
        device,
        shards_dir,
        manifest,
        history,
        seconds,
        file_facts,
    )
    write_text_atomic(out / CARD_FILE, card.to_json())
    keras.mixed_precision.set_global_policy("float32")
    return _training_summary(card, out, device)


class FitJob(NamedTuple):
    """What a fit needs: the shards, the config and its plan, the device, the
    input shape, the model folder and the run's backup folder, and where its
    progress goes."""

    shards_dir: str | os.PathLike
    training: TrainConfig
    plan: TrainingPlan
    device: Any
    shape: tuple
    out: Path
    backup: Path
    on_epoch_end: Callable | None
    show_progress: bool
    log: Callable[..., None]


def _saved_or_fitted_model(job: FitJob) -> tuple[Any, dict, float | None]:
    """The model in ``out/model.keras``, its file's facts and the fit's seconds:
    the one a killed run saved before writing its card (seconds None: the fit
    is done, only the card is missing), else a new fit saved there in float32."""
    training, plan, shape, out = job.training, job.plan, job.shape, job.out
    model_path = out / "model.keras"
    start = time.perf_counter()
    model = _finished_model(model_path)
    if model is not None:
        file_facts = {
            "model_sha256": file_sha256(model_path),
            "model_bytes": model_path.stat().st_size,
        }
        return model, file_facts, None
    model = _fit_new_model(job)
    model = as_float32(model, training.architecture, shape, plan.recipe.fully_convolutional)
    file_facts = save_model_file(model, model_path)
    failpoint("train.after_model_saved")
    return model, file_facts, time.perf_counter() - start


def _export_runtimes(model, out: Path) -> dict:
    """The model's export beside it, when it converts, and its files' facts:
    the CPU runtime of folder runs (OpenVINO: model.xml, model.bin)."""
    return export_openvino(model, out, probe_shape(model))


def _training_summary(card: ModelCard, out: Path, device) -> dict:
    """What a training returns to its caller: the model's folder and the card's headline facts."""
    return {
        "version": card.version,
        "dir": str(out),
        "model_path": str(out / "model.keras"),
        "architecture": card.architecture,
        "params": card.params,
        "device": device.describe(),
        "seconds": card.seconds,
        "epochs_run": card.epochs_run,
        "best_val_loss": card.best_val_loss,
    }


class TrainingPlan(NamedTuple):
    """The recipe a training runs: the architecture's, with what the config sets over it."""

    recipe: Recipe
    loss: str
    schedule: str
    learning_rate: float
    reframe: float


def _training_plan(training: TrainConfig) -> TrainingPlan:
    recipe = architecture_recipe(training.architecture)
    return TrainingPlan(
        recipe,
        recipe.loss if training.loss == "auto" else training.loss,
        recipe.lr_schedule if training.lr_schedule == "auto" else training.lr_schedule,
        training.learning_rate or recipe.learning_rate,
        recipe.reframe if training.reframe is None else training.reframe,
    )


def _check_input_shape(training: TrainConfig, recipe: Recipe, shape: tuple) -> None:
    """A model tied to its input frame must get shards of that frame."""
    fixed = recipe.input_shape
    if not recipe.fully_convolutional and fixed and tuple(fixed) != shape:
        raise ModelError(
            f"architecture {training.architecture} takes {tuple(fixed)} images, "
            f"the shards hold {shape}"
        )


class _FitInputs(NamedTuple):
    """What a fit reads: the streamed splits, the batch and step counts, and
    the validation pairs scored every epoch."""

    train: Any
    validation: Any
    global_batch: int
    steps: int
    scored_noisy: Any
    scored_clean: Any


def _fit_inputs(shards_dir, training: TrainConfig, plan: TrainingPlan, device) -> _FitInputs:
    """The training and validation datasets of a fit, one global batch per step
    across the device's replicas, and the scored validation pairs."""
    global_batch = training.batch_size * device.replicas
    train_ds = make_dataset(
        shards_dir,
        "train",
        global_batch,
        training.shuffle_buffer,
        training.seed,
        True,
        plan.reframe,
        ColourCasts.of(training),
    )
    val_ds = make_dataset(shards_dir, "validation", global_batch, training=False)
    steps = math.ceil(split_rows(shards_dir, "train") / global_batch)
    scored_noisy, scored_clean = validation_sample(val_ds)  # the same pairs every epoch
    return _FitInputs(train_ds, val_ds, global_batch, steps, scored_noisy, scored_clean)


def _compiled_model(training: TrainConfig, plan: TrainingPlan, device, shape: tuple, steps: int):
    """The architecture built (for ``shape`` when it is tied to its frame) and
    compiled with the plan's loss and learning-rate schedule, on the device's strategy."""
    import keras

    from denoiser.learning.losses import make_loss

    with device.strategy.scope() if device.strategy is not None else contextlib.nullcontext():
        built = build_model(
            training.architecture, shape if not plan.recipe.fully_convolutional else None
        )
        if training.warm_start:  # a resumed run's backup replaces these weights
            warm_start_model(built, training.architecture, training.warm_start)
        built.compile(
            optimizer=keras.optimizers.Adam(
                learning_rate(plan.learning_rate, plan.schedule, training.epochs * steps)
            ),
            loss=make_loss(plan.loss),
        )
    return built


def _log_fit_start(log, model, training: TrainConfig, plan: TrainingPlan, device, inputs) -> None:
    """The lines saying what is trained, and the scored validation images' noisy baseline."""
    import numpy as np

    log(
        "training %s (%s parameters, loss %s, %s learning rate from %g, batch %d, %d%% reframed) "
        "on %s",
        training.architecture,
        f"{count_params(model):,}",
        plan.loss,
        plan.schedule,
        plan.learning_rate,
        inputs.global_batch,
        round(100 * plan.reframe),
        device.describe(),
    )
    casts = ColourCasts.of(training)
    if casts.apply_to(inputs.train.element_spec[1].shape[-1]):
        log("%s", casts.describe())
    if len(inputs.scored_clean):
        noisy_scores = scores(inputs.scored_clean, np.clip(inputs.scored_noisy, 0.0, 1.0))
        log(
            "each epoch is scored on the first %d validation images: PSNR and SSIM of the "
            "model's outputs (their noisy inputs: PSNR %.2f dB, SSIM %.3f)",
            len(inputs.scored_clean),
            noisy_scores["psnr"],
            noisy_scores["ssim"],
        )


def _fit(
    model,
    shards_dir,
    training: TrainConfig,
    inputs: _FitInputs,
    out: Path,
    backup: Path,
    on_epoch_end,
    show_progress: bool,
) -> None:
    """One ``fit`` of ``model`` over the epochs left, resuming the backup in
    ``backup`` (each epoch logged, scored and backed up atomically)."""
    import keras

    epoch_log, epoch_done = _epoch_log_callbacks(
        backup / "history.jsonl", on_epoch_end, training.epochs
    )
    bar = (
        epoch_bar(
            training.epochs,
            inputs.steps,
            math.ceil(split_rows(shards_dir, "validation") / inputs.global_batch),
            inputs.global_batch,
        )
        if show_progress
        else None
    )
    early_stopping = _resumable_early_stopping(backup / "state", "val_loss", training.patience)
    callbacks = [
        # first: all see them
        validation_scores(inputs.scored_noisy, inputs.scored_clean, inputs.global_batch),
        epoch_log,
        early_stopping,  # before the backup: a generation holds its own epoch's state
        _atomic_backup(backup / "state", early_stopping),
        keras.callbacks.TensorBoard(log_dir=str(out / "tensorboard"), write_graph=False),
        *([bar] if bar is not None else []),  # gone before epoch_done's line
        epoch_done,
    ]
    try:
        model.fit(
            inputs.train,
            validation_data=inputs.validation,
            epochs=training.epochs,
            callbacks=callbacks,
            shuffle=False,
            verbose=0,
        )  # the dataset shuffles itself
    finally:
        if bar is not None:
            bar.close()  # an error or a signal mid-epoch leaves no bar drawn
        interrupts.release()  # a stretch cut short by an error; a pending signal is delivered


def _drop_backup(backup: Path, exc: CheckpointUnreadable) -> None:
    """Forget an interrupted run's unreadable checkpoint: its state and history."""
    import shutil

    logger.warning(
        "the interrupted run's checkpoint cannot be loaded (%s); training it again from epoch 1",
        str(exc).splitlines()[0],
    )
    shutil.rmtree(backup / "state", ignore_errors=True)
    (backup / "history.jsonl").unlink(missing_ok=True)


def _fit_new_model(job: FitJob):
    """Build, compile and fit the model (resuming the backup in ``backup``);
    an unreadable backup is dropped and the training starts again from epoch 1."""
    shards_dir, training, plan, device, shape, out, backup, on_epoch_end, show_progress, log = job
    inputs = _fit_inputs(shards_dir, training, plan, device)
    model = _compiled_model(training, plan, device, shape, inputs.steps)
    _log_fit_start(log, model, training, plan, device, inputs)
    fit_args = (shards_dir, training, inputs, out, backup, on_epoch_end, show_progress)
    try:
        _fit(model, *fit_args)
    except CheckpointUnreadable as exc:
        _drop_backup(backup, exc)
        model = _compiled_model(training, plan, device, shape, inputs.steps)
        _fit(model, *fit_args)
    return model


def _write_history_csv(path: Path, history: list[dict]) -> None:
    """The epochs' records as a CSV beside the model (nothing without epochs)."""
    if not history:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0].keys()), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, buf.getvalue())


def _model_card(
    version: str,
    model,
    training: TrainConfig,
    plan: TrainingPlan,
    device,
    shards_dir,
    manifest: dict,
    history: list[dict],
    seconds: float,
    file_facts: dict,
) -> ModelCard:
    """What the card records of a training: the recipe as run, the data, the
    device, the epochs, the model files' facts (``file_facts``)."""
    import keras
    import tensorflow as tf

    return ModelCard(
        version=version,
        architecture=training.architecture,
        params=count_params(model),
        recipe=plan.recipe.model_copy(
            update={
                "loss": plan.loss,
                "lr_schedule": plan.schedule,
                "learning_rate": plan.learning_rate,
                "reframe": plan.reframe,
            }
        ),
        training=training.model_dump(mode="json"),
        grown_from=seed_facts(training.warm_start) if training.warm_start else None,
        data=data_facts(shards_dir, manifest),
        image_shape=list(manifest["image_shape"]),
        device=device.as_dict(),
        precision=device.precision,
        seconds=round(seconds, 2),
        epochs_run=len(history),
        best_val_loss=min(
            (h["val_loss"] for h in history if "val_loss" in h), default=float("nan")
        ),
        history=history,
        **file_facts,
        versions={
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
        },
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def train_in_run(
    shards_dir: str | os.PathLike,
    training: TrainConfig,
    models_root: str | os.PathLike,
    checkpoints_root: str | os.PathLike,
    new_version: Callable[[], str],
    flow_run_id: str | None = None,
    on_start: Callable[[CheckpointRun], None] | None = None,
    on_epoch_end: Callable[[int, int, dict], None] | None = None,
    log: Callable[..., None] = logger.info,
    show_progress: bool = False,
    objects=None,
    checkpoints_url: str | None = None,
) -> dict:
    """Train as one checkpoint run: clean up what dead runs left, resume the run
    of this request whose owner died (or start a new one beside live ones),
    train into ``models_root/<version>``. On success the run stays open (its
    lease held by this process) until :func:`denoiser.learning.checkpoints.finish_run`
    is called once the model is registered: a crash in between (in evaluation,
    in registration) leaves a run the rerun resumes, without training again.
    On failure the lease is released.

    ``checkpoints_url`` (with ``objects``, the store holding it): runs are kept
    there, each epoch copied as it ends (:class:`denoiser.learning.checkpoints.RemoteRun`),
    and ``checkpoints_root`` holds only the local working copies, so a rerun on
    any machine resumes them."""
    training = resolve_architecture(training, shards_dir)
    checkpoints_root = Path(checkpoints_root)
    key = checkpoint_key(shards_dir, training)
    if checkpoints_url is None:
        clean_checkpoints(checkpoints_root, models_root, log=log)
        run = claim_run(checkpoints_root / key, new_version, flow_run_id)
    else:
        remove_stale_runs(checkpoints_root, max_age=0)  # working copies of runs no one holds
        for url in remove_stale_remote_runs(objects, checkpoints_url):
            log(
                "removed stale checkpoint %s (no live owner, no renewal for %d days)",
                url,
                STALE_RUN_SECONDS // 86400,
            )
        run = claim_remote_run(
            objects, f"{checkpoints_url}/{key}", checkpoints_root / key, new_version, flow_run_id
        )

    def epoch_end(epoch: int, epochs: int, record: dict) -> None:
        try:
            run.save_epoch()
        except OSError as exc:  # the store failed for a moment: the next epoch tries again
            logger.warning(
                "could not copy epoch %d's checkpoint to the store (%s); the next epoch retries",
                epoch,
                first_line(exc),
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch, epochs, record)

    try:
        if run.resumed:
            done = run.epochs_done()
            where = f"at epoch {done + 1}" if done < training.epochs else "after its last epoch"
            log("resuming interrupted run %s %s (model %s)", run.run_id, where, run.version)
        if on_start is not None:
            on_start(run)
        result = train_model(
            shards_dir,
            training,
            Path(models_root) / run.version,
            run.dir,
            version=run.version,
            on_epoch_end=epoch_end,
            show_progress=show_progress,
            log=log,
        )
    except BaseException:
        run.release()
        raise
    keep_open(run, flow_run_id)
    return {**result, "run_id": run.run_id, "resumed": run.resumed, "checkpoint": str(run.dir)}
