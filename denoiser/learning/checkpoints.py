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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from denoiser.config import TrainConfig
from denoiser.core.errors import first_line
from denoiser.core.files import file_sha256, write_json_atomic

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
    """Names the request, so the runs of one request share a parent folder. A
    warm start counts by its file's contents: where it was staged changes
    from run to run."""
    training = TrainConfig.model_validate(training)
    config = training.model_dump(mode="json")
    if training.warm_start:
        config["warm_start"] = file_sha256(training.warm_start)
    payload = json.dumps({"shards": str(shards_dir), "training": config}, sort_keys=True)
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
    remote: RemoteRun | None = field(default=None, repr=False)

    @property
    def history_path(self) -> Path:
        return self.dir / HISTORY_FILE

    @property
    def state_dir(self) -> Path:
        return self.dir / STATE_DIR

    def epochs_done(self) -> int:
        """Epochs the backup holds, so the epoch a resumed run starts after."""
        try:
            # the current generation of the state (denoiser.learning.training writes it atomically)
            return int(
                json.loads((self.state_dir / "current" / "training_metadata.json").read_text())[
                    "epoch"
                ]
            )
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def finish(self) -> None:
        """Delete the folder of a run that succeeded (and its copy in the
        store), while still holding its lease."""
        if self.remote is not None:
            self.remote.finish()
        _remove_run_dir(self.dir)
        self.release()
        with contextlib.suppress(OSError):
            self.dir.parent.rmdir()  # the key's folder, once no run is left in it

    def save_epoch(self) -> None:
        """After each epoch's backup: copy it to the store, for a run kept there."""
        if self.remote is not None:
            self.remote.push(self.dir)

    def release(self) -> None:
        if self.remote is not None:
            self.remote.release()
        if self.lease.is_locked:
            self.lease.release()


_open_runs: dict[str, tuple[CheckpointRun, str | None]] = {}


def keep_open(run: CheckpointRun, flow_run_id: str | None = None) -> None:
    """A trained run whose model is not registered yet: its lease stays held by
    this process (the kernel drops it if the process dies, and the run is
    resumed, past its training) until :func:`finish_run`, or until
    :func:`release_open_runs` for the flow run that trained it."""
    _open_runs[str(run.dir)] = (run, flow_run_id)


def release_open_runs(flow_run_id: str | None) -> list[str]:
    """Let go of the runs a flow run kept open (it failed after training, in a
    process that lives on): a rerun, here or on another machine, resumes them
    past their training. Returns their folders."""
    released = []
    for run_dir, (run, owner) in list(_open_runs.items()):
        if owner == flow_run_id:
            del _open_runs[run_dir]
            run.release()
            released.append(run_dir)
    return released


def finish_run(run_dir: str | os.PathLike | None) -> None:
    """Delete a run's checkpoint once its model is registered; idempotent."""
    if not run_dir:
        return
    run, _ = _open_runs.pop(str(run_dir), (None, None))
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
    write_json_atomic(
        run_dir / RUN_FILE,
        {
            "run_id": run_id,
            "version": version,
            "flow_run_id": flow_run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        indent=2,
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


# ------------------------------------------------------------------ runs kept in object storage
#
# Layout under the store's ``checkpoints/<key>/<run-id>/``::
#
#     head.json        run id, model version, owner, last renewal, current generation
#     gen-<epoch>-<random>/   latest.weights.h5, training_metadata.json, history.jsonl
#
# The head is the lease: its owner renews it every RENEW_SECONDS and every
# change to it is a conditional PUT on the ETag that owner wrote last, so two
# machines never both own a run, and an owner that was taken over learns it at
# its next write. Generations are written once and named uniquely; the head
# names the current one only after all its files are in, so a reader never
# resumes from half a generation. The training itself works on a local copy
# (a run folder as above, under ``$DENOISE_CHECKPOINTS``).

HEAD_FILE = "head.json"
LEASE_SECONDS = 60.0  # a head not renewed for this long belongs to a dead owner (clocks in sync)
RENEW_SECONDS = 10.0


class LeaseLost(RuntimeError):
    """Another process took this run over: ours stopped renewing its lease for
    longer than a lease lasts (a long pause, a lost network)."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)  # type: ignore[arg-type]
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # another user's process, or no pid: assume it lives
    return True


def this_owner() -> dict:
    """Who holds a lease: machine (host and boot), process, and a token of this claim."""
    return {
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pid": os.getpid(),
        "token": secrets.token_hex(6),
    }


def head_is_free(head: dict, now: float | None = None) -> bool:
    """Whether a run's owner let it go, died on this machine, or stopped renewing."""
    now = time.time() if now is None else now
    if head.get("released"):
        return True
    owner, me = head.get("owner") or {}, this_owner()
    if (
        owner.get("boot")
        and (owner.get("host"), owner.get("boot")) == (me["host"], me["boot"])
        and not _pid_alive(owner.get("pid"))
    ):
        return True  # its process is gone: no need to wait for the lease to run out
    try:
        lease = float(head.get("lease_seconds", LEASE_SECONDS))
    except (TypeError, ValueError):
        lease = LEASE_SECONDS
    return now - _renewed(head) > lease


def _renewed(head: dict) -> float:
    try:
        return float(head["renewed"])
    except (KeyError, TypeError, ValueError):
        return 0.0


def _parse_head(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        head = json.loads(raw)
    except ValueError:
        return None
    if (
        not isinstance(head, dict)
        or not head.get("run_id")
        or not isinstance(head.get("version"), str)
    ):
        return None
    return head


def _put_head(objects, run_url: str, head: dict, etag: str | None) -> str | None:
    """Write a run's head if it still has ``etag`` (None: if there is none);
    its new ETag, or None when another writer changed it first."""
    return objects.write_if(f"{run_url}/{HEAD_FILE}", json.dumps(head).encode(), etag)


def _delete_remote_run(objects, run_url: str) -> None:
    """Everything of a run whose head is marked ``finishing``; the head last,
    so a crash midway leaves a run the clean-up still finds."""
    for name in objects.list_names(run_url):
        if name != HEAD_FILE:
            objects.remove(f"{run_url}/{name}")
    objects.remove(f"{run_url}/{HEAD_FILE}")


class RemoteRun:
    """A run's checkpoint in the store, owned by this process while it is open.

    ``objects`` is the store (``artifacts.store.Store``): ``read_versioned``,
    ``write_if``, ``put_file``, ``fetch``, ``list_names`` and ``remove``."""

    def __init__(self, objects, url: str, head: dict, etag: str):
        self.objects, self.url, self.head, self.etag = objects, url, head, etag
        self.closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew, name=f"checkpoint lease {head['run_id']}", daemon=True
        )
        self._thread.start()

    @property
    def head_url(self) -> str:
        return f"{self.url}/{HEAD_FILE}"

    def _write_head(self, **changes) -> None:
        with self._lock:
            if self.closed:
                raise LeaseLost(f"{self.url}: this process no longer owns the training run")
            head = {**self.head, **changes, "renewed": time.time()}
            etag = _put_head(self.objects, self.url, head, self.etag)
            if etag is None:
                self.closed = True
                raise LeaseLost(
                    f"{self.url}: another process took this training run over (this one did "
                    f"not renew its lease for {LEASE_SECONDS:.0f} s); stopping without writing to it"
                )
            self.head, self.etag = head, etag

    def _renew(self) -> None:
        failures = 0
        while not self._stop.wait(RENEW_SECONDS):
            try:
                self._write_head()
                failures = 0
            except LeaseLost as exc:
                if not self._stop.is_set():
                    logger.warning("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a store that fails for a moment: next beat
                failures += 1
                if failures == 1:
                    logger.warning(
                        "%s: cannot renew the training run's lease (%s); retrying",
                        self.url,
                        first_line(exc),
                    )

    def push(self, run_dir: Path) -> None:
        """Copy the local run's current generation (and history) to the store,
        then make it the head's; the previous generation goes. LeaseLost if
        another process owns the run now."""
        state = run_dir / STATE_DIR
        try:
            gen = os.readlink(state / "current")
        except OSError:
            return
        if gen == self.head.get("generation"):
            return
        meta = json.loads((state / gen / "training_metadata.json").read_text())
        for name in sorted(os.listdir(state / gen)):  # weights, metadata, early stopping's state
            self.objects.put_file(state / gen / name, f"{self.url}/{gen}/{name}")
        if (run_dir / HISTORY_FILE).exists():
            self.objects.put_file(run_dir / HISTORY_FILE, f"{self.url}/{gen}/{HISTORY_FILE}")
        old = self.head.get("generation")
        self._write_head(generation=gen, epoch=int(meta["epoch"]))
        if old:
            with contextlib.suppress(OSError):
                self.objects.remove(f"{self.url}/{old}")

    def restore(self, run_dir: Path) -> None:
        """Lay the head's generation out in a local run folder, as the training left it."""
        gen = self.head.get("generation")
        if not gen:
            return  # ended before its first epoch
        for name in self.objects.list_names(f"{self.url}/{gen}"):
            dest = run_dir / (HISTORY_FILE if name == HISTORY_FILE else f"{STATE_DIR}/{gen}/{name}")
            self.objects.fetch(f"{self.url}/{gen}/{name}", dest)
        os.symlink(gen, run_dir / STATE_DIR / "current")

    def release(self) -> None:
        """Let go (a failed run): another process may resume it at once."""
        self._stop.set()
        if not self.closed:
            with contextlib.suppress(Exception):
                self._write_head(released=True)
            self.closed = True

    def finish(self) -> None:
        """Delete the run from the store (it succeeded): the head is marked
        first, so nobody resumes it while its generations go, and removed last."""
        self._stop.set()
        try:
            self._write_head(finishing=True)
        except LeaseLost:
            return  # another process owns it now; its head is not ours to delete
        self.closed = True
        _delete_remote_run(self.objects, self.url)


def claim_remote_run(
    objects,
    key_url: str,
    local_key_dir: str | os.PathLike,
    new_version: Callable[[], str],
    flow_run_id: str | None = None,
) -> CheckpointRun:
    """:func:`claim_run` for a store in object storage: take over the oldest
    run of this request whose owner let go or died (a conditional PUT of its
    head, so one claimant wins), restore its current generation into a local
    run folder and return it; or start a new run."""
    local_key_dir = Path(local_key_dir)
    me = this_owner()
    for name in objects.list_names(key_url):
        run_url = f"{key_url}/{name}"
        raw, etag = objects.read_versioned(f"{run_url}/{HEAD_FILE}")
        head = _parse_head(raw)
        if head is None or head.get("finishing") or not head_is_free(head):
            continue
        taken = {**head, "owner": me, "renewed": time.time(), "released": False}
        new_etag = _put_head(objects, run_url, taken, etag)
        if new_etag is not None:  # else another claimant was first
            return _open_claim(objects, run_url, taken, new_etag, local_key_dir, resumed=True)

    run_id, version = new_run_id(), new_version()
    head = {
        "run_id": run_id,
        "version": version,
        "flow_run_id": flow_run_id,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "owner": me,
        "renewed": time.time(),
        "lease_seconds": LEASE_SECONDS,
        "generation": None,
        "epoch": 0,
    }
    run_url = f"{key_url}/{run_id}"
    etag = _put_head(objects, run_url, head, None)
    if etag is None:  # a fresh, unique name: nobody else can have written it
        raise RuntimeError(f"{run_url}: a new run's head exists already")
    return _open_claim(objects, run_url, head, etag, local_key_dir, resumed=False)


def _open_claim(
    objects, run_url: str, head: dict, etag: str, local_key_dir: Path, resumed: bool
) -> CheckpointRun:
    """The run whose head this process just wrote: its lease renewed from now
    on, and a fresh local run folder for this claim (its own name: a dead
    owner's copy on this machine is left to the clean-up), with run.json, its
    flock and the head's generation."""
    remote = RemoteRun(objects, run_url, head, etag)
    try:
        owner = head["owner"]
        run_dir = local_key_dir / f"{head['run_id']}-{owner['token']}"
        run_dir.mkdir(parents=True)
        lease = _try_lease(run_dir / LEASE_FILE)
        if lease is None:
            raise RuntimeError(f"{run_dir}: lease of a new run folder is held")
        info = {k: head.get(k) for k in ("run_id", "version", "flow_run_id", "created")}
        write_json_atomic(
            run_dir / RUN_FILE, {**info, "host": owner["host"], "pid": owner["pid"]}, indent=2
        )
        remote.restore(run_dir)
    except BaseException:
        remote.release()
        raise
    return CheckpointRun(str(head["run_id"]), run_dir, head["version"], resumed, lease, remote)


def remove_stale_remote_runs(
    objects, checkpoints_url: str, max_age: float = STALE_RUN_SECONDS, now: float | None = None
) -> list[str]:
    """Remove the store's runs whose owner is gone and that were not renewed
    for ``max_age`` seconds, and those a crash left half-deleted. The head is
    taken (a conditional PUT) before anything is deleted. Returns their URLs."""
    now = time.time() if now is None else now
    removed = []
    for key in objects.list_names(checkpoints_url):
        for name in objects.list_names(f"{checkpoints_url}/{key}"):
            run_url = f"{checkpoints_url}/{key}/{name}"
            raw, etag = objects.read_versioned(f"{run_url}/{HEAD_FILE}")
            head = _parse_head(raw)
            if head is None or not head_is_free(head, now):
                continue
            if not head.get("finishing") and now - _renewed(head) <= max_age:
                continue
            marked = {**head, "finishing": True, "owner": this_owner(), "renewed": now}
            if _put_head(objects, run_url, marked, etag) is None:
                continue
            _delete_remote_run(objects, run_url)
            removed.append(run_url)
    return removed
