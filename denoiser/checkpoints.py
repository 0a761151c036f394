"""Training checkpoints that each belong to one run, and their clean-up.

Layout under a checkpoints root (the store's ``checkpoints/``)::

    <key>/<run-id>/   run.json       run id, model version, flow run id, host, pid, created
                      history.jsonl  one line per finished epoch
                      state/         Keras' BackupAndRestore files
                      lease          an exclusive flock held by the live run

``<key>`` names the request (shards and training config). The lease is held
for the run's whole life and the kernel drops it when the process dies, even
on SIGKILL: a run folder whose lease can be taken belongs to a dead run and
is resumed as that run (same model version, same history); a run folder whose
lease is held belongs to a live run and is never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from denoiser.config import TrainConfig

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
HISTORY_FILE = "history.jsonl"
STATE_DIR = "state"
LEASE_FILE = "lease"
STALE_RUN_SECONDS = 7 * 24 * 3600
ORPHAN_MODEL_SECONDS = 3600
# a run folder without run.json: one being created (a moment) or left by a crash
UNFINISHED_RUN_SECONDS = 600


def checkpoint_key(shards_dir: str | os.PathLike, training: TrainConfig) -> str:
    """Names the request, so the runs of one request share a parent folder."""
    training = TrainConfig.model_validate(training)
    payload = json.dumps(
        {"shards": str(shards_dir), "training": training.model_dump(mode="json")}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def new_run_id(now: datetime | None = None) -> str:
    """Sortable by start time, unique without a lock."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S-%f}-{secrets.token_hex(3)}"


@dataclass
class CheckpointRun:
    """One training run's checkpoint folder, with its lease held by this process."""

    run_id: str
    dir: Path
    version: str
    resumed: bool
    lease: FileLock = field(repr=False)

    @property
    def history_path(self) -> Path:
        return self.dir / HISTORY_FILE

    @property
    def state_dir(self) -> Path:
        return self.dir / STATE_DIR

    def epochs_done(self) -> int:
        """Epochs the backup holds, so the epoch a resumed run starts after."""
        try:
            # the current generation of the state (denoiser.training writes it atomically)
            return int(
                json.loads((self.state_dir / "current" / "training_metadata.json").read_text())[
                    "epoch"
                ]
            )
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def finish(self) -> None:
        """Delete the folder of a run that succeeded, while still holding its lease."""
        _remove_run_dir(self.dir)
        self.release()
        with contextlib.suppress(OSError):
            self.dir.parent.rmdir()  # the key's folder, once no run is left in it

    def release(self) -> None:
        if self.lease.is_locked:
            self.lease.release()


_open_runs: dict[str, CheckpointRun] = {}


def keep_open(run: CheckpointRun) -> None:
    """A trained run whose model is not registered yet: its lease stays held by
    this process (the kernel drops it if the process dies, and the run is
    resumed, past its training) until :func:`finish_run`."""
    _open_runs[str(run.dir)] = run


def finish_run(run_dir: str | os.PathLike | None) -> None:
    """Delete a run's checkpoint once its model is registered; idempotent."""
    if not run_dir:
        return
    run = _open_runs.pop(str(run_dir), None)
    if run is not None:
        run.finish()
        return
    lease = _try_lease(Path(run_dir) / LEASE_FILE)  # opened by another process that has ended
    if lease is not None:
        try:
            _remove_run_dir(Path(run_dir))
        finally:
            lease.release()
        with contextlib.suppress(OSError):
            Path(run_dir).parent.rmdir()


def _try_lease(path: Path) -> FileLock | None:
    """The lease if nobody holds it, without waiting."""
    lock = FileLock(str(path), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def _read_run(run_dir: Path) -> dict | None:
    try:
        info = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("version"), str)
        or not info.get("run_id")
    ):
        return None
    return info


def _run_dirs(key_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in key_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def _remove_run_dir(run_dir: Path) -> None:
    """run.json first: from then on no one takes the folder for a resumable run."""
    with contextlib.suppress(FileNotFoundError):
        (run_dir / RUN_FILE).unlink()
    shutil.rmtree(run_dir, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(data, indent=2))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def claim_run(
    key_dir: str | os.PathLike, new_version: Callable[[], str], flow_run_id: str | None = None
) -> CheckpointRun:
    """Resume the oldest run under ``key_dir`` whose owner died, or start a new one.

    A run is resumable when its lease can be taken at once; runs whose lease
    is held are live concurrent runs and are left alone. The returned run's
    lease stays held until :meth:`CheckpointRun.finish` or ``release``.
    """
    key_dir = Path(key_dir)
    for run_dir in _run_dirs(key_dir):
        if not (run_dir / RUN_FILE).exists():
            continue  # being created, or a crash's leftover for the clean-up
        lease = _try_lease(run_dir / LEASE_FILE)
        if lease is None:
            continue
        info = _read_run(run_dir)  # read again under the lease: a finishing run removes it first
        if info is None:
            lease.release()
            continue
        return CheckpointRun(str(info["run_id"]), run_dir, info["version"], True, lease)

    run_id = new_run_id()
    run_dir = key_dir / run_id
    run_dir.mkdir(parents=True)
    lease = _try_lease(run_dir / LEASE_FILE)
    if lease is None:  # a fresh, unique folder: nobody else can hold it
        raise RuntimeError(f"{run_dir}: lease of a new run folder is held")
    version = new_version()
    _write_json(
        run_dir / RUN_FILE,
        {
            "run_id": run_id,
            "version": version,
            "flow_run_id": flow_run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    return CheckpointRun(run_id, run_dir, version, False, lease)


def _newest_mtime(folder: Path) -> float:
    """Last activity in a folder: itself and what it holds, one level down."""
    newest = folder.stat().st_mtime
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            with contextlib.suppress(OSError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def _all_run_dirs(checkpoints_root: Path) -> Iterator[Path]:
    try:
        keys = [k for k in checkpoints_root.iterdir() if k.is_dir()]
    except FileNotFoundError:
        return
    for key_dir in keys:
        with contextlib.suppress(FileNotFoundError):
            yield from (p for p in key_dir.iterdir() if p.is_dir())


def remove_stale_runs(
    checkpoints_root: str | os.PathLike,
    max_age: float = STALE_RUN_SECONDS,
    now: float | None = None,
) -> list[Path]:
    """Remove run folders whose owner died and that saw no activity for ``max_age``
    seconds (and crash leftovers without run.json after a few minutes). A run
    whose lease is held is never touched. Returns the folders removed."""
    root, now = Path(checkpoints_root), now if now is not None else time.time()
    removed = []
    for run_dir in _all_run_dirs(root):
        try:
            age = now - _newest_mtime(run_dir)
        except FileNotFoundError:
            continue
        limit = max_age if (run_dir / RUN_FILE).exists() else min(max_age, UNFINISHED_RUN_SECONDS)
        if age <= limit:
            continue
        lease = _try_lease(run_dir / LEASE_FILE)
        if lease is None:
            continue
        try:
            _remove_run_dir(run_dir)
        finally:
            lease.release()
        removed.append(run_dir)
        with contextlib.suppress(OSError):
            run_dir.parent.rmdir()
    return removed


def referenced_versions(checkpoints_root: str | os.PathLike) -> set[str]:
    """Model versions named by a run folder (live or resumable)."""
    versions = set()
    for run_dir in _all_run_dirs(Path(checkpoints_root)):
        info = _read_run(run_dir)
        if info is not None:
            versions.add(info["version"])
    return versions


def remove_orphan_model_dirs(
    models_root: str | os.PathLike,
    checkpoints_root: str | os.PathLike,
    max_age: float = ORPHAN_MODEL_SECONDS,
    now: float | None = None,
) -> list[Path]:
    """Remove model folders without ``model.keras`` that no run folder names and
    that saw no activity for ``max_age`` seconds: what a training killed before
    its run folder was written, or whose run folder went stale, leaves behind.
    The age guards a run that is creating its folder right now."""
    now = now if now is not None else time.time()
    referenced = referenced_versions(checkpoints_root)
    try:
        folders = [
            p for p in Path(models_root).iterdir() if p.is_dir() and not p.name.startswith(".")
        ]
    except FileNotFoundError:
        return []
    removed = []
    for folder in folders:
        if folder.name in referenced or (folder / "model.keras").exists():
            continue
        try:
            if now - _newest_mtime(folder) <= max_age:
                continue
        except FileNotFoundError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def clean_checkpoints(
    checkpoints_root: str | os.PathLike,
    models_root: str | os.PathLike,
    log: Callable[..., None] = logger.info,
) -> list[Path]:
    """The start-up clean-up: stale runs first, then the model folders they named."""
    removed = remove_stale_runs(checkpoints_root)
    for run_dir in removed:
        log(
            "removed stale checkpoint %s (no live owner, no activity for %d days)",
            run_dir,
            STALE_RUN_SECONDS // 86400,
        )
    orphans = remove_orphan_model_dirs(models_root, checkpoints_root)
    for folder in orphans:
        log(
            "removed unfinished model folder %s (no model.keras, no checkpoint run names it)",
            folder,
        )
    return removed + orphans
