"""What fetching a dataset's files shares, whichever kind of dataset it is:
where files come from (a source: an http(s) URL or a folder, its
SHA256SUMS), streaming a file into the cache under a temporary name that says
which process writes it, checking it, renaming it, and removing what killed
runs left. :mod:`denoiser.data.datasets` (IDX files) and
:mod:`denoiser.data.image_datasets` (folders of images) both build on it.

A leaf of the library: imports only errors, faults and files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from denoiser.core.catalog import parse_sha256sums
from denoiser.core.errors import ChecksumError, ConfigError, DownloadError
from denoiser.core.faults import failpoint
from denoiser.core.files import file_sha256, host_tag, pid_alive

logger = logging.getLogger(__name__)

SOURCE_ENV = "DENOISE_DATA_SOURCE"
CHUNK = 1 << 20
TIMEOUT = 60


class TransientDownloadError(DownloadError):
    """A network failure worth retrying (refused, reset, timeout, HTTP 5xx/429)."""


def normalise_source(chosen: str) -> str:
    """An http(s) URL ending in ``/`` or an absolute folder path; ConfigError otherwise."""
    parsed = urllib.parse.urlparse(chosen)
    if parsed.scheme in ("http", "https"):
        return chosen if chosen.endswith("/") else chosen + "/"
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path))
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = Path(chosen).expanduser()
    else:
        raise ConfigError(
            f"data source {chosen!r}: use an http(s) URL, a file:// URL or a folder path"
        )
    path = path.resolve()
    if not path.is_dir():
        raise ConfigError(f"data source folder {path} does not exist")
    return str(path)


def join_source(source: str, name: str) -> str:
    return (
        urllib.parse.urljoin(source, urllib.parse.quote(name) + "/")
        if is_http_url(source)
        else str(Path(source) / name)
    )


def locate_source(
    name: str, origin: str, probe: str, source: str | None = None
) -> tuple[str, dict[str, str] | None]:
    """The folder or URL that holds dataset ``name`` (whose files include
    ``probe``) and its SHA256SUMS if it has one: the source itself when it holds
    the files, else ``<source>/<name>/`` when that does."""
    root = normalise_source(source or os.environ.get(SOURCE_ENV) or origin)
    if not is_http_url(root):
        nested = Path(root) / name
        if not (Path(root) / probe).is_file() and nested.is_dir():
            return str(nested), read_sha256sums(str(nested))
        return root, read_sha256sums(root)
    sums = read_sha256sums(root)
    if sums is not None and probe in sums:
        return root, sums
    nested_url = join_source(root, name)
    nested_sums = read_sha256sums(nested_url)
    if nested_sums is not None and probe in nested_sums:
        return nested_url, nested_sums
    return root, sums


def is_http_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def open_source(source: str, filename: str):
    """A readable binary stream for one file of the source."""
    if is_http_url(source):
        url = urllib.parse.urljoin(source, filename)
        try:
            return urllib.request.urlopen(url, timeout=TIMEOUT)  # noqa: S310 - http(s) only
        except urllib.error.HTTPError as exc:
            cls = TransientDownloadError if exc.code >= 500 or exc.code == 429 else DownloadError
            raise cls(f"{filename}: HTTP {exc.code} {exc.reason} from {url}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransientDownloadError(f"{filename}: cannot reach {url}: {reason}") from None
    path = Path(source) / filename
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DownloadError(f"{filename}: not found in mirror {source}") from None
    except OSError as exc:
        raise DownloadError(f"{filename}: cannot read {path}: {exc.strerror}") from None


def read_sha256sums(source: str) -> dict[str, str] | None:
    """The mirror's SHA256SUMS (``sha256sum`` format), or None if it has none."""
    try:
        stream = open_source(source, "SHA256SUMS")
    except TransientDownloadError:
        raise
    except DownloadError:
        return None
    with stream:
        text = stream.read().decode("utf-8", "replace")
    return parse_sha256sums(text)


# --------------------------------------------------------------------------- temporary files

_TEMP_NAME = re.compile(
    r"^\.(?P<final>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]+\.(?P<suffix>\w+)$"
)


def temp_path(final: Path, suffix: str, pid: int | None = None) -> Path:
    """A unique temporary name beside ``final`` that says which process writes it
    (this one unless ``pid`` is given), for :func:`remove_orphan_temps`."""
    pid = os.getpid() if pid is None else pid
    return final.with_name(f".{final.name}.{host_tag()}-{pid}-{secrets.token_hex(3)}.{suffix}")


def orphan_writer(path: Path, suffix: str) -> int | None:
    """The pid of the dead process on this host that left ``path``, a temporary
    file named by :func:`temp_path`; None if it is not one or its writer may be alive."""
    match = _TEMP_NAME.match(path.name)
    if not match or match["suffix"] != suffix or match["host"] != host_tag():
        return None
    pid = int(match["pid"])
    return None if pid == os.getpid() or pid_alive(pid) else pid


def remove_orphan_temps(folder: Path, suffix: str, log: Any = logger) -> list[Path]:
    """Delete the ``.*.<suffix>`` files in ``folder`` left by killed runs on this
    host (never a live writer's); returns what was removed."""
    removed = []
    try:
        candidates = [
            p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(f".{suffix}")
        ]
    except FileNotFoundError:
        return removed
    for path in sorted(candidates):
        pid = orphan_writer(path, suffix)
        if pid is None:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        log.info("removed %s, left by a killed run (pid %d)", path, pid)
        removed.append(path)
    return removed


def cache_write_error(name: str, cache_dir: Path, exc: OSError) -> DownloadError:
    """A full disk or a size limit is not a network error: not worth retrying."""
    return DownloadError(f"{name}: cannot write to the cache {cache_dir}: {exc.strerror or exc}")


def stream_to(stream, out, name: str, cache_dir: Path, hashes: list) -> int:
    """Copy the download into the temporary file; returns its size. Read errors
    are transient (the network), write errors permanent (the disk)."""
    size = 0
    while True:
        try:
            chunk = stream.read(CHUNK)
        except (OSError, TimeoutError) as exc:
            raise TransientDownloadError(f"{name}: download interrupted: {exc}") from None
        if not chunk:
            return size
        try:
            out.write(chunk)
            if not size:
                failpoint("download.mid_file")
        except OSError as exc:
            raise cache_write_error(name, cache_dir, exc) from None
        for h in hashes:
            h.update(chunk)
        size += len(chunk)


def download_to(
    source: str, filename: str, tmp: Path, name: str, cache_dir: Path, hashes: list
) -> int:
    """Stream ``filename`` of ``source`` into ``tmp`` (a new file, see
    :func:`temp_path`), feeding ``hashes``; returns its size. Errors of the
    network are transient, errors of the disk permanent (one DownloadError
    naming the cache)."""
    with open_source(source, filename) as stream:
        try:
            out = open(tmp, "xb")  # noqa: SIM115 - closed below, where its errors are disk errors
        except OSError as exc:
            raise cache_write_error(name, cache_dir, exc) from None
        try:
            return stream_to(stream, out, name, cache_dir, hashes)
        finally:
            try:
                out.close()
            except OSError as exc:
                raise cache_write_error(name, cache_dir, exc) from None


def check_listed(name: str, digest: str, sums: dict[str, str] | None, source: str) -> None:
    """A ChecksumError unless the mirror's SHA256SUMS (when it has one) lists
    ``name`` with ``digest``."""
    if sums is None:
        return
    if name not in sums:
        raise ChecksumError(f"{name}: not listed in the mirror's SHA256SUMS ({source})")
    if sums[name] != digest:
        raise ChecksumError(f"{name}: sha256 {digest} does not match SHA256SUMS ({sums[name]})")


def rename_into_cache(tmp: Path, final: Path, name: str, cache_dir: Path) -> None:
    """The verified ``tmp`` renamed to ``final``; a full disk is one DownloadError."""
    try:
        os.replace(tmp, final)
    except OSError as exc:
        raise cache_write_error(name, cache_dir, exc) from None


def write_cache_json(path: Path, data: Any) -> None:
    tmp = temp_path(path, "part")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise cache_write_error(path.name, path.parent, exc) from None


def open_cache(name: str, cache_dir: str | os.PathLike, log: Any = logger) -> Path:
    """A dataset's cache folder, created if need be and rid of the temporary
    files killed writers left in it (a DownloadError if it cannot be written)."""
    cache = Path(cache_dir)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise cache_write_error(name, cache, exc) from None
    remove_orphan_temps(cache, "part", log)
    return cache


def recorded_files(files: dict[str, dict]) -> dict[str, dict]:
    """The file records as a cache manifest keeps them: without this call's ``status``."""
    return {r: {k: v for k, v in f.items() if k != "status"} for r, f in files.items()}


def cached_file_problem(path: Path, rec: dict) -> str | None:
    """Why the cached file cannot be used as recorded (None if it can): size first, it is free."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing from the cache"
    if rec.get("bytes") is not None and size != rec["bytes"]:
        return "sha256 mismatch with the cache manifest"
    if file_sha256(path) != rec["sha256"]:
        return "sha256 mismatch with the cache manifest"
    return None
