"""One holder at a time: Prefect global concurrency limits of 1, keyed by what
must not be shared (a store's training, an output folder's runs).

A limit is created on demand (limit 1, visible on the UI's Concurrency page);
a second caller waits for the slot (queued, not failed) and says so once.
Slots are held as leases (60 s, renewed every 15 s). Prefect's own
``concurrency()`` hides the lease, so a killed holder keeps the slot until the
lease runs out (60-300 s); here each lease is recorded in
``$PREFECT_HOME/denoise-leases/`` with its process, and the next caller on
this host releases the leases of processes that died, as the run ledger marks
their runs Crashed (flows/session.py). A lost API during the work never fails
it: renewing and releasing are best-effort.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from denoiser.core.files import write_json_atomic

logger = logging.getLogger("denoise.limits")

LEASE_SECONDS = 60  # the server's minimum
RENEW_EVERY = 15.0
POLL_SECONDS = 1.0


def limit_name(kind: str, key: str) -> str:
    """``denoise-<kind>-<12 hex digits of key's sha256>``: a valid limit name for any path or URL."""
    return f"denoise-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _lease_dir() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()).expanduser() / "denoise-leases"


def _create_limit(client, name: str) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        with contextlib.suppress(ObjectAlreadyExists):  # another caller made it first
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=1, active=True)
            )


def release_dead_leases(client) -> list[str]:
    """Release the leases recorded by processes of this host that died holding them."""
    from flows.ledger import run_alive

    folder = _lease_dir()
    released = []
    for path in folder.glob("*.json") if folder.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if entry.get("host") != socket.gethostname() or run_alive(entry):
            continue
        with contextlib.suppress(Exception):  # already expired, or another server's
            client.release_concurrency_slots_with_lease(entry["lease_id"])
        logger.info(
            "released %s, held by a dead process (pid %s)", entry.get("limit"), entry.get("pid")
        )
        released.append(str(entry.get("limit")))
        path.unlink(missing_ok=True)
    return released


def _acquire(client, name: str, what: str) -> str:
    """The lease id of the slot of ``name``, waiting as long as it is held."""
    import httpx

    told = False
    while True:
        release_dead_leases(client)
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency", lease_duration=LEASE_SECONDS
            )
            return str(response.json()["lease_id"])
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 423:  # 423 Locked: the slot is taken
                raise
            retry = float(exc.response.headers.get("Retry-After") or POLL_SECONDS)
        if not told:
            _log(f"waiting for {what} to finish (concurrency limit {name})")
            told = True
        time.sleep(min(max(retry, 0.2), 5.0))


def _log(message: str) -> None:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().info(message)
    except MissingContextError:
        logger.info(message)
        print(message, flush=True)


def _record(lease_id: str, name: str) -> Path:
    from flows.ledger import process_start

    folder = _lease_dir()
    folder.mkdir(parents=True, exist_ok=True)
    entry = {
        "lease_id": lease_id,
        "limit": name,
        "pid": os.getpid(),
        "started": process_start(os.getpid()),
        "host": socket.gethostname(),
    }
    path = folder / f"{lease_id}.json"
    write_json_atomic(path, entry)
    return path


def _renew(lease_id: str, stop: threading.Event) -> None:
    from prefect.client.orchestration import get_client

    failed = False
    while not stop.wait(RENEW_EVERY):
        try:
            with get_client(sync_client=True) as client:
                client.renew_concurrency_lease(lease_id, lease_duration=LEASE_SECONDS)
            failed = False
        except Exception as exc:  # noqa: BLE001 - the work goes on without the API
            if not failed:
                logger.warning("cannot renew concurrency lease %s: %s", lease_id, exc)
            failed = True


@contextlib.contextmanager
def hold_limit(name: str, what: str) -> Iterator[None]:
    """Hold the one slot of limit ``name`` (created with limit 1 if missing)
    for the block; ``what`` names the holder in the waiting message. Not
    under a temporary server of this command (see below): only a server that
    outlives the command (``denoise server start``, ``PREFECT_API_URL``)
    expires the lease of a holder that was killed."""
    from prefect.client.orchestration import get_client

    from flows.server import TEMPORARY_SERVER

    if TEMPORARY_SERVER:
        # its leases die with it while the taken slot stays in the database: a killed
        # holder would block every later run; limits need a server that outlives commands
        yield
        return
    with get_client(sync_client=True) as client:
        _create_limit(client, name)
        lease_id = _acquire(client, name, what)
    record = _record(lease_id, name)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(lease_id, stop), daemon=True, name="lease")
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        try:
            with get_client(sync_client=True) as client:
                client.release_concurrency_slots_with_lease(lease_id)
        except Exception as exc:  # noqa: BLE001 - the lease runs out by itself
            logger.warning("cannot release concurrency lease of %s: %s", name, exc)
        record.unlink(missing_ok=True)
