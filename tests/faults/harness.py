"""What the fault scenarios share: running the real ``denoise`` command,
snapshots of folders, and the checks every scenario ends with (every file
valid, nothing finished recomputed, the input untouched, the registry whole).

Checks collect problems instead of stopping at the first one, so each
scenario can report how many files it checked and how many it found lost.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from denoiser.core.files import file_sha256 as sha256_file

REPO = Path(__file__).resolve().parents[2]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
# small data everywhere: seconds per command, not minutes
TRAIN_ARGS = [
    "train",
    "--train-limit",
    "200",
    "--test-limit",
    "50",
    "--epochs",
    "2",
    "--batch-size",
    "32",
    "--architecture",
    "unet-small",
    # the gate off: these models are the faults' material, not their subject (a real
    # gate on a trained digit model: tests/test_training_flow.py)
    "--min-psnr-gain",
    "-50",
]
# one output every few tenths of a second: a kill lands mid-run, not after it
PACED = "folder.after_output=sleep:0.3"
# environment the test process may carry that must not leak into a command
_SCRUBBED = (
    "PREFECT_API_URL",
    "PREFECT_HOME",
    "PREFECT_LOCAL_STORAGE_PATH",
    "PREFECT_PROFILES_PATH",
    "DENOISE_STORE",
    "DENOISE_DATA_SOURCE",
    "DENOISE_FAILPOINTS",
    "PREFECT_UI_API_URL",
)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Command:
    """A running ``denoise`` command: the process, where its output goes, its argv."""

    proc: subprocess.Popen
    argv: list[str]
    out: Path
    err: Path
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"`denoise {' '.join(self.argv)}` still running after {timeout:.0f} s; "
                f"stderr tail:\n{tail(self.err.read_text(errors='replace'))}"
            ) from None
        return subprocess.CompletedProcess(
            self.argv,
            self.proc.returncode,
            self.out.read_text(errors="replace"),
            self.err.read_text(errors="replace"),
        )

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def denoise_env(
    store: Path,
    home: Path,
    api_url: str | None,
    data_source: Path | str | None,
    failpoints: str | None = None,
    env_extra: dict | None = None,
) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        TF_CPP_MIN_LOG_LEVEL="3",  # as the command sets it for its users
        DENOISE_STORE=str(store),
        PYTHONUNBUFFERED="1",
        COLUMNS="200",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if data_source:
        env["DENOISE_DATA_SOURCE"] = str(data_source)
    if failpoints:
        env["DENOISE_FAILPOINTS"] = failpoints
    env.update(env_extra or {})
    return env


def start_denoise(
    args: list[str],
    env: dict,
    logs: Path,
    preexec: Callable | None = None,
    cwd: Path | None = None,
) -> Command:
    logs.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.monotonic_ns()}"
    out, err = logs / f"{stamp}.out", logs / f"{stamp}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=cwd or REPO,
            env=env,
            stdout=o,
            stderr=e,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec,
        )
    return Command(proc, args, out, err, time.monotonic())


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    cmd: Command | None = None,
    poll: float = 0.05,
) -> None:
    """Until ``condition()`` holds; fails if the command ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if cmd is not None and cmd.proc.poll() is not None:
            if condition():
                return
            raise AssertionError(
                f"the command ended (exit {cmd.proc.returncode}) before {what}; stderr tail:\n"
                f"{tail(cmd.err.read_text(errors='replace'))}"
            )
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def descendants(pid: int) -> dict[int, int]:
    """pid -> start time (clock ticks) of every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields_ = stat.rsplit(b")", 1)[1].split()
        children.setdefault(int(fields_[1]), []).append(int(entry))
        starts[int(entry)] = int(fields_[19])
    found, stack = {}, [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found[child] = starts[child]
            stack.append(child)
    return found


def alive(pid: int, start: int) -> bool:
    """Whether that very process (same pid and start time) still runs (zombies do not count)."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    except OSError:
        return False
    return int(fields_[19]) == start and fields_[0] != b"Z"


def command_line(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return "?"


def kill_survivors(procs: dict[int, int]) -> None:
    for pid, start in procs.items():
        if alive(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------- snapshots


def is_temporary(name: str) -> bool:
    """A temporary file of a writer (ours or the pipeline's): hidden, ending .tmp/.part."""
    return name.startswith(".") and (name.endswith((".tmp", ".part")) or ".tmp." in name)


def tree_hashes(
    root: Path, keep: Callable[[Path], bool] = lambda p: True
) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every regular file under ``root``."""
    out = {}
    if not root.exists():
        return out
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink() and keep(path):
                st = path.stat()
                out[os.path.relpath(path, root)] = (sha256_file(path), st.st_mtime_ns)
    return out


def count_outputs(out: Path) -> int:
    if not out.is_dir():
        return 0
    return sum(
        1
        for _, _, names in os.walk(out)
        for n in names
        if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES
    )


def finished_files(root: Path) -> dict[str, tuple[str, int]]:
    """Files under their final names (no temporary files, no locks)."""
    return tree_hashes(root, lambda p: not is_temporary(p.name) and not p.name.endswith(".lock"))


# --------------------------------------------------------------------------- the tally


@dataclass
class Scenario:
    """What one fault scenario found: files checked, files lost, other problems."""

    name: str
    checked: int = 0
    lost: int = 0
    problems: list[str] = field(default_factory=list)
    mode: str = ""  # how the fault was made, when there is more than one way (a small disk's kind)

    def lose(self, what: str) -> None:
        self.lost += 1
        self.problems.append(f"LOST {what}")

    def problem(self, what: str) -> None:
        self.problems.append(what)

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)

    def assert_ok(self) -> None:
        assert not self.problems, (
            f"{self.name}: {len(self.problems)} problem(s), {self.lost} file(s) lost "
            f"of {self.checked} checked:\n  " + "\n  ".join(self.problems[:40])
        )


# --------------------------------------------------------------------------- checks


def check_unchanged(
    sc: Scenario, before: dict[str, tuple[str, int]], root: Path, what: str, redo_allowed: int = 0
) -> list[str]:
    """Every finished file of ``before`` is still there, same bytes, same mtime
    (not recomputed). ``redo_allowed``: how many may have been redone (files a
    kill caught between their rename and their record); returns those."""
    redone = []
    for rel, (sha, mtime) in before.items():
        path = root / rel
        sc.checked += 1
        if not path.is_file():
            sc.lose(f"{what}: {rel} (finished before the fault) is gone")
        elif path.stat().st_mtime_ns != mtime or sha256_file(path) != sha:
            redone.append(rel)
    if len(redone) > redo_allowed:
        sc.problem(
            f"{what}: {len(redone)} file(s) finished before the fault were recomputed "
            f"(allowed {redo_allowed}): {', '.join(redone[:5])}"
        )
    return redone


def check_input_untouched(sc: Scenario, before: dict[str, tuple[str, int]], root: Path) -> None:
    after = tree_hashes(root)
    for rel, (sha, mtime) in before.items():
        sc.checked += 1
        if rel not in after:
            sc.lose(f"input {rel} deleted")
        elif after[rel] != (sha, mtime):
            sc.lose(f"input {rel} modified")
    for rel in sorted(set(after) - set(before)):
        sc.problem(f"input folder gained a file: {rel}")


_loaded_models: dict[tuple[str, int], str | None] = {}


def model_error(path: Path) -> str | None:
    """Why ``model.keras`` does not load (safe mode, as the pipeline loads it), or None."""
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _loaded_models:
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
            if bad:
                raise ValueError(f"corrupt member {bad}")
            from denoiser.nets.models import load_model

            load_model(path)
            _loaded_models[key] = None
        except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
            _loaded_models[key] = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
    return _loaded_models[key]


def image_error(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_file(sc: Scenario, path: Path, root: Path, keras_files: bool) -> None:
    rel = os.path.relpath(path, root)
    suffix = path.suffix.lower()
    sc.checked += 1
    try:
        if suffix == ".json":
            json.loads(path.read_bytes())
        elif suffix == ".csv":
            list(csv.reader(path.read_text().splitlines()))
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.ParquetFile(path).read()
        elif suffix in IMAGE_SUFFIXES:
            if err := image_error(path):
                sc.lose(f"{rel}: image does not decode ({err})")
        elif suffix == ".keras" and keras_files:
            if err := model_error(path):
                sc.lose(f"{rel}: model does not load ({err})")
    except Exception as exc:  # noqa: BLE001
        sc.lose(f"{rel}: unreadable {suffix} ({type(exc).__name__}: {str(exc)[:120]})")


def check_tree(
    sc: Scenario, root: Path, label: str, temps_ok: bool = False, ignore: Iterable[str] = ()
) -> None:
    """Every file under ``root`` is valid for its type; no temporary file is
    left (unless ``temps_ok``: right after a kill, before the rerun).
    ``ignore``: relative paths of the user's own files (checked elsewhere)."""
    ignored = set(ignore)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if os.path.relpath(path, root) in ignored:
                continue
            if is_temporary(name):
                if temps_ok:
                    continue
                sc.problem(f"{label}: temporary file left behind: {os.path.relpath(path, root)}")
                continue
            if "prefect-results" in path.parts:
                continue
            _check_file(sc, path, root, keras_files=True)


def check_shards(sc: Scenario, store: Path) -> None:
    """Every shard set is finished and every shard matches its manifest's sha256 and rows."""
    import pyarrow.parquet as pq

    root = store / "shards"
    if not root.is_dir():
        return
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            sc.problem(f"shard set {folder.name} left unfinished (no manifest.json)")
            continue
        manifest = json.loads(manifest_path.read_text())
        for rec in manifest["shards"]:
            path = folder / rec["file"]
            sc.checked += 1
            if not path.is_file():
                sc.lose(f"shards/{folder.name}/{rec['file']} listed in the manifest is missing")
            elif sha256_file(path) != rec["sha256"]:
                sc.lose(f"shards/{folder.name}/{rec['file']} does not match the manifest's sha256")
            elif pq.ParquetFile(path).metadata.num_rows != rec["rows"]:
                sc.lose(f"shards/{folder.name}/{rec['file']} has the wrong number of rows")


def check_downloads(sc: Scenario, store: Path) -> None:
    """Every cached download matches the sha256 its cache manifest records."""
    for manifest_path in sorted((store / "downloads").glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        files = manifest.get("files", {})
        for rec in files.values():
            path = manifest_path.parent / rec["name"]
            sc.checked += 1
            if not path.is_file():
                sc.lose(f"downloads: {rec['name']} recorded but missing")
            elif sha256_file(path) != rec["sha256"]:
                sc.lose(f"downloads: {rec['name']} does not match its recorded sha256")


def read_registry_file(store: Path) -> dict:
    return json.loads((store / "models" / "registry.json").read_text())


def check_registry(sc: Scenario, store: Path, expect_versions: Iterable[str] = ()) -> dict:
    """registry.json has the right shape, lists every expected version, and
    every version it lists (production above all) has a model that loads."""
    path = store / "models" / "registry.json"
    sc.checked += 1
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        sc.lose(f"registry: {exc}")
        return {}
    if not isinstance(state, dict) or not isinstance(state.get("versions"), dict):
        sc.lose(f"registry: wrong shape: {str(state)[:100]}")
        return {}
    versions = state["versions"]
    for version in expect_versions:
        if version not in versions:
            sc.lose(f"registry: version {version} missing (it finished)")
    for version in versions:
        model = store / "models" / version / "model.keras"
        sc.checked += 1
        if not model.is_file():
            sc.lose(f"registry lists {version}, which has no model.keras")
        elif err := model_error(model):
            sc.lose(f"registry lists {version}, whose model does not load ({err})")
    production = state.get("production")
    if production is not None and production not in versions:
        sc.problem(f"registry: production {production} is not among its versions")
    return state


def check_store(sc: Scenario, store: Path, expect_versions: Iterable[str] = ()) -> dict:
    check_tree(sc, store, "store")
    check_shards(sc, store)
    check_downloads(sc, store)
    if (store / "models" / "registry.json").exists() or expect_versions:
        return check_registry(sc, store, expect_versions)
    return {}


def check_outputs(sc: Scenario, inputs: Path, out: Path, ignore: Iterable[str] = ()) -> None:
    """OUT holds a valid output for every input image, and nothing half-written."""
    check_tree(sc, out, "OUT", ignore=ignore)
    for rel in tree_hashes(inputs):
        if Path(rel).suffix.lower() in IMAGE_SUFFIXES and not (out / rel).is_file():
            sc.problem(f"OUT: no output for {rel}")


# --------------------------------------------------------------------------- command results


def model_version(result: subprocess.CompletedProcess) -> str:
    """The version a finished ``denoise train`` made (its summary's first line)."""
    for line in result.stdout.splitlines():
        if line.startswith("model "):
            return line.split()[1]
    raise AssertionError(f"no model line in the output of `denoise train`:\n{tail(result.stdout)}")


def expect_success(sc: Scenario, result: subprocess.CompletedProcess, what: str) -> bool:
    if result.returncode != 0:
        sc.problem(f"{what} exited {result.returncode}; stderr tail:\n{tail(result.stderr, 6)}")
        return False
    return True


def last_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("denoise:")]
    return lines[-1] if lines else ""


def card(store: Path, version: str) -> dict:
    return json.loads((store / "models" / version / "model.json").read_text())


def epoch_records(root: Path) -> list[dict]:
    """Every epoch record in the JSON-lines files under ``root`` (the checkpoints)."""
    records = []
    for path in root.rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "epoch" in rec:
                records.append(rec)
    return records
