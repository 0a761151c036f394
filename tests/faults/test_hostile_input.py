"""Careless and hostile input to `denoise folder` and `denoise models`: blank
folder arguments, a user's own files in OUT, hard links and symlinks between
IN and OUT, a store inside IN, version names that are paths, models that do
not fit, and errors raised deep inside a flow. Each must leave the user's
files byte-identical and end in one line on stderr with a consistent exit code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.faults.harness import (
    check_input_untouched,
    count_outputs,
    tree_hashes,
    wait_for,
)

# Prefect's own log lines (a time, a level); anything else on stderr is the command's
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| (DEBUG|INFO|WARNING) +\| ")


def error_lines(stderr: str) -> list[str]:
    """What the command itself printed on stderr: every line that is not one
    of Prefect's INFO/WARNING log lines (a traceback shows as many lines)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not LOG_LINE.match(ln)]


def one_line(result, code: int, *words: str) -> str:
    """The command exited ``code`` with exactly one line of its own on stderr,
    holding every one of ``words``; no traceback anywhere."""
    lines = error_lines(result.stderr)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(autouse=True)
def _in_the_tally(scenario):
    """Each case is a row of the fault suite's tally (files checked, lost)."""
    return scenario


def same_files(sc, root: Path, before: dict, keep=lambda p: True) -> None:
    """Every file of ``before`` under ``root`` byte-identical, same mtime; counted in the tally."""
    after = tree_hashes(root, keep)
    for rel, was in before.items():
        sc.checked += 1
        if after.get(rel) != was:
            sc.lose(f"{root / rel} changed or gone")
    assert after == before, sc.problems


def user_images(folder: Path, names=("img0000.png", "img0001.png")) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / name)
    return tree_hashes(folder)


# --------------------------------------------------------------------------- blank arguments


@pytest.mark.parametrize(
    "args",
    [
        ["folder", "IN", ""],
        ["folder", "", "OUT"],
        ["folder", "IN", "   "],
        ["folder", "IN", "OUT", "--store", ""],
    ],
    ids=["blank-out", "blank-in", "spaces-out", "blank-store"],
)
def test_blank_folder_arguments_are_usage_errors(args, scenario, denoise, model_store, tmp_path):
    """`denoise folder in ""` once took "" for the current folder and replaced
    the user's images there; now blanks are usage errors and nothing is written."""
    home = tmp_path / "home"
    mine = user_images(home)
    user_images(home / "IN", ("a.png",))
    before = tree_hashes(home)
    argv = [str(home / a) if a in ("IN", "OUT") else a for a in args]
    result = denoise.run(argv, model_store, cwd=home)
    one_line(result, 2, "empty")
    same_files(scenario, home, before)
    assert mine
    assert not (home / ".denoise-journal.jsonl").exists()
    assert not (home / ".denoise-journal.lock").exists()


# --------------------------------------------------------------------------- a user's files in OUT


def test_a_users_files_in_out_are_kept_unless_overwrite(scenario, denoise, model_store, tmp_path):
    """OUT pointed at a folder of the user's own images with the inputs' names:
    nothing is replaced without --overwrite, and the report says why."""
    src, out = tmp_path / "in", tmp_path / "out"
    user_images(src)
    mine = user_images(out)
    result = denoise.run(["folder", str(src), str(out)], model_store)
    assert result.returncode == 0, result.stderr[-2000:]
    same_files(scenario, out, mine, lambda p: not p.name.startswith("."))
    assert "0 denoised, 2 skipped" in result.stdout
    report = next(
        Path(ln.split(":", 1)[1].strip())
        for ln in result.stdout.splitlines()
        if ln.startswith("report:")
    )
    text = report.read_text()
    assert text.count("not made by denoise") == 2 and "--overwrite" in text
    again = denoise.run(["folder", str(src), str(out), "--overwrite"], model_store)
    assert again.returncode == 0 and "2 denoised" in again.stdout
    assert all(tree_hashes(out)[k][0] != v[0] for k, v in mine.items())


# --------------------------------------------------------------------------- links between IN and OUT


def test_out_hard_linked_to_in_never_writes_into_in(
    scenario, denoise, model_store, noisy_folder, tmp_path
):
    """OUT made with `cp -al IN OUT` after a run into IN (so IN holds a journal):
    the journal appended through the hard link changed IN; now IN stays byte-identical."""
    clean = tmp_path / "clean"
    first = denoise.run(["folder", str(noisy_folder), str(clean)], model_store)
    assert first.returncode == 0, first.stderr[-2000:]
    clean2 = tmp_path / "clean2"
    subprocess.run(["cp", "-al", str(clean), str(clean2)], check=True)
    before = tree_hashes(clean)
    inodes = {p: p.stat().st_ino for p in clean.rglob("*") if p.is_file()}
    result = denoise.run(["folder", str(clean), str(clean2), "--overwrite"], model_store)
    assert result.returncode == 0, result.stderr[-2000:]
    same_files(scenario, clean, before)
    assert {p: p.stat().st_ino for p in clean.rglob("*") if p.is_file()} == inodes
    # and OUT's own journal is its own file now
    assert (clean2 / ".denoise-journal.jsonl").stat().st_nlink == 1
    rerun = denoise.run(["folder", str(noisy_folder), str(clean)], model_store)
    assert rerun.returncode == 0 and " 0 denoised" in " " + rerun.stdout, rerun.stdout


@pytest.mark.parametrize("name", [".denoise-journal.jsonl", ".denoise-journal.lock"])
def test_journal_or_lock_symlinked_into_in_is_not_written_through(
    scenario, name, denoise, model_store, noisy_folder, tmp_path
):
    """A journal or lock file in OUT that is a symlink to a file of IN: IN is
    never truncated or appended to, and the run goes on with a file of its own."""
    victim = noisy_folder / "img001.png"
    out = tmp_path / "out"
    out.mkdir()
    (out / name).symlink_to(victim)
    before = tree_hashes(noisy_folder)
    result = denoise.run(["folder", str(noisy_folder), str(out)], model_store)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-2000:]
    same_files(scenario, noisy_folder, before)
    assert not (out / name).is_symlink()
    assert count_outputs(out) == count_outputs(noisy_folder)


def test_a_store_inside_in_is_refused(scenario, denoise, model_store, noisy_folder, tmp_path):
    """Reports written into IN when --store was inside it; now refused in one line."""
    store = noisy_folder / "store"
    shutil.copytree(model_store, store)
    before = tree_hashes(noisy_folder)
    result = denoise.run(["folder", str(noisy_folder), str(tmp_path / "out")], store)
    one_line(result, 2, "store", "inside the input folder")
    same_files(scenario, noisy_folder, before)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- names are names


def test_version_names_that_are_paths_are_refused(denoise, golden, model_store, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(model_store / "models" / golden.version, outside)
    registry = model_store / "models" / "registry.json"
    before = registry.read_bytes()
    for name in ("../../outside", "..", "a/b", ".hidden", ""):
        result = denoise.run(["models", "promote", name], model_store)
        one_line(result, 2, "version")
    assert registry.read_bytes() == before
    # a hand-edited registry naming a path is refused in one line naming the file
    state = json.loads(before)
    state["production"] = "../../outside"
    state["production_by_domain"] = {"digits": "../../outside"}
    registry.write_text(json.dumps(state))
    src = tmp_path / "in"
    user_images(src)
    for args in (["models"], ["folder", str(src), str(tmp_path / "out")]):
        result = denoise.run(args, model_store)
        one_line(result, 1, "registry.json", "version name")
    assert not (tmp_path / "out").exists()


def test_models_lists_the_model_folder_runs(denoise, golden, model_store, tmp_path):
    """`denoise models` shows as production exactly what `denoise folder` uses."""
    listing = denoise.run(["models"], model_store)
    assert listing.returncode == 0
    production = [ln for ln in listing.stdout.splitlines() if "production" in ln]
    assert len(production) == 1 and golden.version in production[0]
    src = tmp_path / "in"
    user_images(src)
    result = denoise.run(["folder", str(src), str(tmp_path / "out")], model_store)
    assert f"with model {golden.version}" in result.stdout


def test_a_missing_model_is_a_not_found_error(denoise, model_store, tmp_path):
    src = tmp_path / "in"
    user_images(src)
    result = denoise.run(
        ["folder", str(src), str(tmp_path / "out"), "--model", "nope"], model_store
    )
    one_line(result, 2, "nope", "not found")
    result = denoise.run(["models", "promote", "nope"], model_store)
    one_line(result, 2, "nope")


# --------------------------------------------------------------------------- models that do not fit


def _save(model, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory) -> dict[str, Path]:
    import keras

    root = tmp_path_factory.mktemp("odd-models")
    found = {}
    x = keras.Input((None, None, 3))
    found["rgb"] = _save(
        keras.Model(x, keras.layers.Conv2D(3, 3, padding="same")(x)), root / "rgb.keras"
    )
    x = keras.Input((None, None, 1))
    found["two"] = _save(
        keras.Model(x, keras.layers.Conv2D(2, 3, padding="same")(x)), root / "two.keras"
    )
    x = keras.Input((None, None, 1))
    found["lambda"] = _save(
        keras.Model(x, keras.layers.Lambda(lambda t: t * 1.0)(x)), root / "lambda.keras"
    )
    x = keras.Input((None, None, 1))
    found["flat"] = _save(
        keras.Model(x, keras.layers.GlobalAveragePooling2D()(x)), root / "flat.keras"
    )
    junk = root / "junk.keras"
    junk.write_bytes(os.urandom(4096))
    found["junk"] = junk
    return found


@pytest.mark.parametrize(
    "kind, words",
    [
        ("rgb", ("3-channel", "grey")),
        ("two", ("2 channels",)),
        ("flat", ("output",)),
        ("lambda", ("lambda",)),
        ("junk", ("junk.keras",)),
    ],
)
def test_a_model_that_does_not_fit_is_refused_in_one_line(
    kind, words, odd_models, denoise, model_store, tmp_path
):
    src, out = tmp_path / "in", tmp_path / "out"
    user_images(src)
    result = denoise.run(
        ["folder", str(src), str(out), "--model", str(odd_models[kind])], model_store
    )
    # a model that does not fit the images is a usage error; one that does not load, a failure
    line = one_line(result, 2 if kind in ("rgb", "two", "flat") else 1)
    for word in words:
        assert word.lower() in line.lower(), line
    assert count_outputs(out) == 0


def test_litert_asked_for_after_it_was_retired(denoise, model_store, tmp_path):
    src = tmp_path / "in"
    user_images(src)
    result = denoise.run(
        ["folder", str(src), str(tmp_path / "out"), "--runtime", "litert"], model_store
    )
    one_line(result, 2, "LiteRT was retired", "--runtime openvino", "--runtime keras")
    assert count_outputs(tmp_path / "out") == 0


# --------------------------------------------------------------------------- failures inside a run


def test_a_file_where_an_out_subfolder_goes_fails_per_file(denoise, model_store, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    user_images(src / "sub")
    out.mkdir()
    (out / "sub").write_text("a file where a folder must go")
    result = denoise.run(["folder", str(src), str(out)], model_store)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 0, lines  # per-file failures are Prefect warnings and the report
    assert "2 failed" in result.stdout


def test_out_under_a_file_is_one_line(denoise, model_store, tmp_path):
    src = tmp_path / "in"
    user_images(src)
    (tmp_path / "afile").write_text("x")
    result = denoise.run(["folder", str(src), str(tmp_path / "afile" / "out")], model_store)
    one_line(result, 2, "afile")


def _own_terminal_group() -> None:
    """The command as a terminal's foreground job: its own process group, and
    SIGINT at its default even when the tests run as a background job (a
    shell's background jobs inherit SIGINT ignored, and keep it so)."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_on_a_dask_run_is_one_line(denoise, model_store, noisy_folder, tmp_path):
    """Ctrl-C reaches the whole process group (the command and its Dask workers):
    the command ends with one line and 130, the workers print nothing."""
    out = tmp_path / "out"
    cmd = denoise.start(
        ["folder", str(noisy_folder), str(out), "--workers", "2", "--chunk-files", "4"],
        model_store,
        failpoints="folder.after_output=sleep:0.3",
        preexec=_own_terminal_group,
    )
    wait_for(lambda: count_outputs(out) >= 2, 240, "2 outputs", cmd)
    os.killpg(cmd.pid, signal.SIGINT)
    result = cmd.wait(120)
    one_line(result, 130, "interrupted")
    before = tree_hashes(noisy_folder)
    check_input_untouched(_Sc(), before, noisy_folder)


class _Sc:
    checked = lost = 0

    def lose(self, what):
        raise AssertionError(what)

    def problem(self, what):
        raise AssertionError(what)


# --------------------------------------------------------------------------- the kept server


def test_a_killed_kept_server_is_started_again_without_a_manual_stop(
    denoise, model_store, tmp_path
):
    from tests.faults.harness import free_port

    port = str(free_port())
    started = denoise.run(["server", "start", "--port", port], model_store, api_url=None)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        pid = int((denoise.home / "server.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 30, "the server gone")
        status = denoise.run(["server", "status"], model_store, api_url=None)
        assert status.returncode == 1
        again = denoise.run(["server", "start", "--port", port], model_store, api_url=None)
        assert again.returncode == 0, again.stderr[-2000:]
        assert "started" in again.stdout
    finally:
        denoise.run(["server", "stop"], model_store, api_url=None)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_server_answering_200_to_everything_is_not_taken_for_the_kept_one(
    denoise, model_store, tmp_path
):
    import http.server
    import threading

    class Yes(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>OK</html>")

        def log_message(self, *args):
            pass

    fake = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Yes)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        denoise.home.mkdir(parents=True, exist_ok=True)
        url = f"http://127.0.0.1:{fake.server_address[1]}/api"
        (denoise.home / "denoise-server.json").write_text(json.dumps({"url": url}))
        status = denoise.run(["server", "status"], model_store, api_url=None)
        assert status.returncode == 1 and "no kept" in status.stdout
        src = tmp_path / "in"
        user_images(src)
        run = denoise.run(["folder", str(src), str(tmp_path / "out")], model_store, api_url=None)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "2 denoised" in run.stdout
    finally:
        fake.shutdown()
