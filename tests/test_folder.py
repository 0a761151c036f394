"""Folder denoising on real files of every kind, with every kind of bad file."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from denoiser.core.errors import ConfigError, ImageError
from denoiser.folder import (
    JOURNAL_NAME,
    BatchPredictor,
    check_folders,
    denoise_tree,
    parse_journal,
)
from denoiser.imaging.images import (
    decode_image,
    decode_with_pillow,
    encode_image,
    read_image,
    rebuild_image,
    small_grey_pixels,
    small_grey_png,
    temp_path,
)
from denoiser.imaging.tiling import TileSpec, denoise_plane, split

RNG = np.random.default_rng(0)


def identity_model(fixed: int | None = None):
    """A real Keras model whose output equals its input: shape, mode and seam
    checks become exact."""
    import keras

    inputs = keras.Input((fixed, fixed, 1))
    out = keras.layers.Conv2D(1, 1, kernel_initializer="ones", bias_initializer="zeros")(inputs)
    return keras.Model(inputs, out)


def save_model(folder: Path, model, architecture: str = "custom") -> Path:
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    (folder / "model.json").write_text(
        json.dumps(
            {
                "version": folder.name,
                "architecture": architecture,
                "params": model.count_params(),
                "quality_gate": {"passed": True},
            }
        )
    )
    return folder


def snapshot(root: Path) -> dict[bytes, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                out[p] = "link:" + os.fsdecode(os.readlink(p))
            elif os.path.isfile(p):
                with open(p, "rb") as fh:
                    out[p] = hashlib.sha256(fh.read()).hexdigest()
            else:
                out[p] = "dir"
    return out


def noisy_gray(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w), dtype=np.uint8)


def build_folder(root: Path) -> dict[str, str]:
    """Good images of each mode/format/size, and every bad case. Returns the
    expected status by relative path."""
    root.mkdir()
    (root / "sub" / "deeper").mkdir(parents=True)
    expected = {}

    def save(rel, img, **kw):
        img.save(root / rel, **kw)
        expected[rel] = "denoised"

    save("gray.png", Image.fromarray(noisy_gray(28, 28)))
    save("odd.png", Image.fromarray(noisy_gray(37, 53)))
    save("sixteen.png", Image.fromarray(RNG.integers(0, 65536, (30, 30), dtype=np.uint16)))
    save("rgb.jpg", Image.fromarray(RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)), quality=90)
    rgba = RNG.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    save("sub/rgba.png", Image.fromarray(rgba))
    save("sub/palette.gif", Image.fromarray(noisy_gray(30, 30)).convert("P"))
    save("sub/la.png", Image.merge("LA", [Image.fromarray(noisy_gray(20, 20))] * 2))
    save(
        "sub/deeper/pic.webp",
        Image.fromarray(RNG.integers(0, 256, (28, 28, 3), dtype=np.uint8)),
        lossless=True,
    )
    save("sub/deeper/pic.tiff", Image.fromarray(noisy_gray(64, 48)))
    save("sub/deeper/pic.bmp", Image.fromarray(noisy_gray(28, 28)))
    save("big.png", Image.fromarray(noisy_gray(700, 650)))
    # EXIF orientation 6 (rotate 90 degrees): the output is upright, 20 wide and 10 high
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", Image.fromarray(noisy_gray(20, 10)), exif=exif.tobytes())
    # bad files
    (root / "empty.png").write_bytes(b"")
    expected["empty.png"] = "failed"
    png = io.BytesIO()
    Image.fromarray(noisy_gray(64, 64)).save(png, "PNG")
    (root / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    expected["truncated.png"] = "failed"
    jpg = io.BytesIO()
    Image.fromarray(noisy_gray(64, 64)).save(jpg, "JPEG")
    (root / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    expected["truncated.jpg"] = "failed"
    (root / "text.png").write_text("this is not an image\n")
    expected["text.png"] = "failed"
    Image.new("L", (1000, 1000)).save(root / "bomb.png")  # over the lowered limit in the test
    expected["bomb.png"] = "failed"
    os.symlink(root / "nothing-here.png", root / "broken.png")
    expected["broken.png"] = "failed"
    outside = root.parent / "outside.png"
    Image.fromarray(noisy_gray(28, 28)).save(outside)
    os.symlink(outside, root / "escape.png")
    expected["escape.png"] = "failed"
    os.mkfifo(root / "pipe.png")
    expected["pipe.png"] = "failed"
    (root / "notes.txt").write_text("not an image type: skipped")
    expected["notes.txt"] = "skipped"
    with open(os.path.join(os.fsencode(root), b"caf\xe9.png"), "wb") as fh:  # not valid UTF-8
        Image.fromarray(noisy_gray(28, 28)).save(fh, "PNG")
    expected["caf\\xe9.png"] = "denoised"
    return expected


@pytest.fixture()
def folder_case(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 800 * 800)
    src = tmp_path / "in"
    expected = build_folder(src)
    return src, expected


def run(src: Path, dst: Path, model, **kw):
    from denoiser.runtimes.inference import tile_spec_for_model

    return denoise_tree(
        src, dst, BatchPredictor(model, batch_size=32), tile_spec_for_model(model), **kw
    )


def test_every_good_file_is_denoised_and_every_bad_one_reported(folder_case, tmp_path):
    src, expected = folder_case
    before = snapshot(src)
    results = run(src, tmp_path / "out", identity_model())
    assert snapshot(src) == before  # the input is byte-identical
    got = {r.path: r.status for r in results}
    assert got == expected
    errors = {r.path: r.error for r in results}
    assert errors["empty.png"] == "empty file (0 bytes)"
    assert "not an image" in errors["text.png"]
    assert "decompression-bomb" in errors["bomb.png"]
    assert errors["broken.png"] == "broken symlink"
    assert "outside the input folder" in errors["escape.png"]
    assert errors["pipe.png"] == "not a regular file"
    assert errors["truncated.png"] and errors["truncated.jpg"]

    out = tmp_path / "out"
    checks = {
        "gray.png": ("L", (28, 28)),
        "odd.png": ("L", (53, 37)),
        "sixteen.png": ("I;16", (30, 30)),
        "rgb.jpg": ("RGB", (60, 40)),
        "sub/rgba.png": ("RGBA", (32, 32)),
        "sub/palette.gif": ("P", (30, 30)),
        "sub/la.png": ("LA", (20, 20)),
        "sub/deeper/pic.webp": ("RGB", (28, 28)),
        "sub/deeper/pic.tiff": ("L", (48, 64)),
        "sub/deeper/pic.bmp": ("L", (28, 28)),
        "big.png": ("L", (650, 700)),
        "rotated.jpg": ("L", (20, 10)),
    }
    for rel, (mode, size) in checks.items():
        with Image.open(out / rel) as img:
            assert (img.mode, img.size) == (mode, size), rel
            assert img.format == Image.open(src / rel).format
    # identity model: 8- and 16-bit grey come back exactly; alpha is untouched
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "gray.png")), np.asarray(Image.open(src / "gray.png"))
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "sixteen.png")), np.asarray(Image.open(src / "sixteen.png"))
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "sub/rgba.png"))[..., 3],
        np.asarray(Image.open(src / "sub/rgba.png"))[..., 3],
    )
    assert os.path.exists(os.path.join(os.fsencode(out), b"caf\xe9.png"))
    assert not list(out.rglob("*.denoise.part"))


def test_png_format_option_and_output_inside_input(folder_case):
    src, expected = folder_case
    inside = src / "cleaned"
    results = run(src, inside, identity_model(), fmt="png", pattern="*.jpg")
    assert {r.path for r in results} == {"rgb.jpg", "rotated.jpg", "truncated.jpg"}
    assert (inside / "rgb.png").is_file() and not (inside / "rgb.jpg").exists()
    again = run(
        src, inside, identity_model(), fmt="png", pattern="*.jpg"
    )  # the output tree is not walked
    assert {r.path for r in again} == {"rgb.jpg", "rotated.jpg", "truncated.jpg"}


def test_constant_and_smooth_images_survive_tiling_without_seams():
    model = identity_model(28)
    predict = BatchPredictor(model, batch_size=16)
    spec = TileSpec(tile=28, overlap=14)
    for h, w in [(28, 28), (100, 75), (10, 13), (257, 301)]:
        const = np.full((h, w), 0.37, np.float32)
        np.testing.assert_allclose(denoise_plane(const, spec, predict), const, atol=1e-5)
        ramp = np.add.outer(np.linspace(0, 0.5, h), np.linspace(0, 0.5, w)).astype(np.float32)
        np.testing.assert_allclose(denoise_plane(ramp, spec, predict), ramp, atol=1e-5)
    # a smoothing model across tile borders: constant in, constant out, whatever the tiling
    fcn = TileSpec(tile=64, overlap=16, multiple=4, whole_max=32)
    assert len(split(np.zeros((300, 200), np.float32), fcn)) > 1
    np.testing.assert_allclose(
        denoise_plane(np.full((300, 200), 0.8, np.float32), fcn, BatchPredictor(identity_model())),
        0.8,
        atol=1e-5,
    )


def test_a_fixed_size_model_denoises_any_size_through_tiles(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(noisy_gray(90, 61)).save(src / "a.png")
    results = run(src, tmp_path / "out", identity_model(28))
    assert [r.status for r in results] == ["denoised"]
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "out" / "a.png")), np.asarray(Image.open(src / "a.png"))
    )


class Stop(Exception):
    pass


def test_an_interrupted_run_is_finished_by_a_rerun(tmp_path):
    N = 320
    src = tmp_path / "in"
    src.mkdir()
    for i in range(N):  # many batches: the stop comes long before the last output is written
        Image.fromarray(noisy_gray(28, 28)).save(src / f"{i:03d}.png")
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    temp_path(out / "007.png", pid=dead_pid()).write_bytes(b"half")  # litter of a killed run

    def stop_after_ten(result, done, total):
        if result.status == "denoised" and done >= 10:
            raise Stop

    with pytest.raises(Stop):
        run(src, out, identity_model(), on_result=stop_after_ten)
    finished = {p.name for p in out.glob("*.png")}
    assert 10 <= len(finished) < N
    for name in finished:  # whatever exists under a final name is a whole image
        Image.open(out / name).load()

    results = run(src, out, identity_model())
    statuses = {r.path: r.status for r in results}
    assert sum(s == "skipped" for s in statuses.values()) == len(finished)
    assert sum(s == "denoised" for s in statuses.values()) == N - len(finished)
    assert len(list(out.glob("*.png"))) == N and not list(out.rglob("*.denoise.part"))
    rerun = run(src, out, identity_model(), overwrite=True)
    assert len(rerun) == N and {r.path for r in rerun} == set(statuses)  # every image, once
    assert all(r.status == "denoised" for r in rerun)


def test_color_goes_through_luminance_and_keeps_hue(tmp_path):
    img = Image.new("RGB", (28, 28), (200, 40, 90))
    img.save(tmp_path / "c.png")
    loaded = read_image(tmp_path / "c.png")
    assert loaded.chroma is not None
    back = np.asarray(rebuild_image(loaded, loaded.luma))
    assert np.abs(back.astype(int) - np.array([200, 40, 90])).max() <= 1


def test_cli_runs_the_flow_and_reports_failures(prefect_harness, folder_case, tmp_path):
    import csv

    from flows.cli import main

    src, expected = folder_case
    model_dir = save_model(
        tmp_path / "store" / "models" / "20260101-000000-custom-0001", identity_model()
    )
    store = str(tmp_path / "store")
    assert (
        main(["--store", store, "folder", str(src), str(tmp_path / "out")]) == 1
    )  # some files failed
    report = next((tmp_path / "store" / "reports").glob("*/report.csv"))
    rows = list(csv.DictReader(report.open()))
    assert {r["path"]: r["status"] for r in rows} == expected
    assert all(r["ms"] for r in rows if r["status"] == "denoised")
    summary = json.loads((report.parent / "summary.json").read_text())
    assert summary["counts"]["failed"] == sum(s == "failed" for s in expected.values())
    assert summary["model"]["version"] == model_dir.name

    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(noisy_gray(28, 28)).save(good / "x.png")
    assert (
        main(
            [
                "--store",
                store,
                "folder",
                str(good),
                str(tmp_path / "out2"),
                "--model",
                str(model_dir),
            ]
        )
        == 0
    )
    assert (tmp_path / "out2" / "x.png").is_file()


def test_cli_usage_errors_fail_fast_with_one_line(tmp_path, capsys):
    from flows.cli import main

    good = tmp_path / "good"
    good.mkdir()
    assert (
        main(["--store", str(tmp_path), "folder", str(tmp_path / "missing"), str(tmp_path / "o")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["--store", str(tmp_path), "folder", str(good), str(good)]) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert (
        main(["--store", str(tmp_path / "empty-store"), "folder", str(good), str(tmp_path / "o")])
        == 1
    )
    err = capsys.readouterr().err
    assert "run `denoise train` first" in err and len(err.strip().splitlines()) == 1


def test_an_unreadable_file_is_reported_and_the_batch_goes_on():
    """Tests run as root, who can read anything: the denoising runs in a thread
    whose file-system uid is `nobody` (Linux setfsuid is per thread, and the
    reader threads it starts inherit it), so permissions apply for real."""
    import ctypes
    import stat
    import tempfile
    import threading

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    base = Path(tempfile.mkdtemp(prefix="denoise-perm-"))
    try:
        base.chmod(0o755)
        src, dst = base / "in", base / "out"
        src.mkdir(mode=0o755)
        dst.mkdir(mode=0o777)
        dst.chmod(0o777)
        for name in ("a.png", "secret.png"):
            Image.fromarray(noisy_gray(28, 28)).save(src / name)
            (src / name).chmod(0o644)
        (src / "secret.png").chmod(0o000)
        model = identity_model()
        outcome: dict = {}

        def as_nobody():
            libc.setfsuid(65534)
            try:
                outcome["results"] = run(src, dst, model)
            except BaseException as exc:  # noqa: BLE001 - reported to the test below
                outcome["error"] = exc
            finally:
                libc.setfsuid(0)

        thread = threading.Thread(target=as_nobody)
        thread.start()
        thread.join()
        assert "error" not in outcome, outcome.get("error")
        got = {r.path: (r.status, r.error) for r in outcome["results"]}
        assert got["a.png"] == ("denoised", "")
        assert got["secret.png"] == ("failed", "permission denied")
        assert stat.S_IMODE((src / "secret.png").stat().st_mode) == 0
    finally:
        (base / "in" / "secret.png").chmod(0o644)
        import shutil

        shutil.rmtree(base, ignore_errors=True)


# --- issue 13: an OUT holding IN, temporary files, long names, content checks, kill -9 ---------


class CountingIdentity:
    """Stands in for a Keras model (output = input) and counts the tiles it sees."""

    def __init__(self):
        self.tiles = 0

    def predict_on_batch(self, x):
        self.tiles += len(x)
        return x


CHEAP_SPEC = TileSpec(tile=28, overlap=14)


def run_cheap(src: Path, dst: Path, model: CountingIdentity | None = None, **kw):
    # batches of one: the model sees exactly the tiles there are, no padding
    return denoise_tree(
        src, dst, BatchPredictor(model or CountingIdentity(), batch_size=1), CHEAP_SPEC, **kw
    )


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def small_tree(root: Path, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(noisy_gray(28, 28)).save(root / f"{i:02d}.png")


def test_an_output_folder_holding_the_input_is_refused_and_the_input_untouched(tmp_path):
    d = tmp_path / "d"
    noisy = d / "noisy"
    (noisy / "noisy").mkdir(parents=True)
    Image.fromarray(noisy_gray(28, 28)).save(noisy / "img.png")
    Image.fromarray(noisy_gray(28, 28)).save(noisy / "noisy" / "img.png")
    (noisy / ".notes.part").write_text("a user's notes")
    os.symlink(d, tmp_path / "link-to-d")
    before = snapshot(tmp_path)
    for out in (
        d,
        tmp_path,
        tmp_path / "link-to-d",
    ):  # a parent, a grandparent, a parent through a symlink
        with pytest.raises(ConfigError) as err:
            run_cheap(noisy, out)
        assert "contains the input folder" in str(err.value) and "\n" not in str(err.value)
    assert snapshot(tmp_path) == before
    # an output folder inside the input stays allowed
    assert check_folders(noisy, noisy / "cleaned")[1].root == (noisy / "cleaned").resolve()


def test_a_users_part_files_in_the_output_folder_survive_a_run(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    small_tree(src, 3)
    (out / "sub").mkdir(parents=True)
    mine = {
        out / ".notes.part": "notes",
        out / "sub" / ".x.part": "x",
        out / ".00.png.999.part": "old style",
    }
    for path, text in mine.items():
        path.write_text(text)
    assert [r.status for r in run_cheap(src, out)] == ["denoised"] * 3
    assert {p: p.read_text() for p in mine} == mine


def test_an_output_subfolder_symlinked_into_the_input_is_not_written_through(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    small_tree(src / "sub", 2)
    Image.fromarray(noisy_gray(28, 28)).save(src / "top.png")
    out.mkdir()
    os.symlink(src / "sub", out / "sub")
    before = snapshot(src)
    results = {r.path: r for r in run_cheap(src, out)}
    assert results["top.png"].status == "denoised"
    assert {results[f"sub/{i:02d}.png"].status for i in range(2)} == {"failed"}
    assert "symlink" in results["sub/00.png"].error
    assert snapshot(src) == before


def test_only_dead_runs_temporary_files_are_removed(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    small_tree(src, 2)
    (out / "sub").mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = temp_path(out / "sub" / "00.png", pid=sleeper.pid)
        dead = temp_path(out / "sub" / "01.png", pid=dead_pid())
        elsewhere_new = temp_path(out / "02.png", pid=sleeper.pid, host="abc123")
        elsewhere_old = temp_path(out / "03.png", pid=sleeper.pid, host="abc123")
        for path in (live, dead, elsewhere_new, elsewhere_old):
            path.write_bytes(b"half an image")
        two_days_ago = time.time() - 2 * 86400
        os.utime(elsewhere_old, (two_days_ago, two_days_ago))
        run_cheap(src, out)
        assert live.exists() and elsewhere_new.exists()
        assert not dead.exists() and not elsewhere_old.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize(
    "name",
    ["a" * 246 + ".png", "\u00e9" * 123 + ".png", "\u732b" * 82 + ".png"],
    ids=["ascii", "two-byte", "three-byte"],
)
def test_a_250_byte_file_name_is_denoised(tmp_path, name):
    assert len(name.encode()) == 250
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    twin = name[:-5] + "b.png"  # the same first 245 bytes, one character apart
    if len(twin.encode()) <= 255:
        Image.fromarray(noisy_gray(28, 28)).save(src / twin)
    Image.fromarray(noisy_gray(28, 28)).save(src / name)
    results = run_cheap(src, out)
    assert results and all(r.status == "denoised" for r in results), results
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / name)), np.asarray(Image.open(src / name))
    )
    tmp = temp_path(out / name)
    assert (
        len(os.fsencode(tmp.name)) <= 255
        and tmp.name.startswith(".")
        and tmp.name.endswith(".denoise.part")
    )
    tmp.name.encode("utf-8")  # cut at a character boundary: still valid UTF-8
    assert temp_path(out / name) != temp_path(out / twin) != temp_path(out / twin)


def test_an_input_replaced_by_an_older_file_is_redone(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    small_tree(src, 3)
    run_cheap(src, out)
    Image.fromarray(noisy_gray(28, 28)).save(src / "01.png")  # as `cp -p` or `rsync -t` leave it:
    old = time.time() - 3600  # new content, an mtime older than the output's
    os.utime(src / "01.png", (old, old))
    results = {r.path: r for r in run_cheap(src, out)}
    assert {p: r.status for p, r in results.items()} == {
        "00.png": "skipped",
        "01.png": "denoised",
        "02.png": "skipped",
    }
    assert results["00.png"].error == "output is up to date"
    assert "input changed" in results["01.png"].reason
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "01.png")), np.asarray(Image.open(src / "01.png"))
    )


def test_a_corrupt_output_newer_than_its_input_is_redone(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    small_tree(src, 3)
    run_cheap(src, out)
    good = (out / "02.png").read_bytes()
    with open(out / "02.png", "r+b") as fh:
        fh.truncate(len(good) // 2)
    future = time.time() + 60
    os.utime(out / "02.png", (future, future))
    results = {r.path: r for r in run_cheap(src, out)}
    assert {p: r.status for p, r in results.items()} == {
        "00.png": "skipped",
        "01.png": "skipped",
        "02.png": "denoised",
    }
    assert "output" in results["02.png"].reason and "record" in results["02.png"].reason
    assert (out / "02.png").read_bytes() == good


def test_an_output_without_a_record_is_kept_unless_overwrite(tmp_path):
    """A file in OUT that denoise did not make (no record) is the user's: kept."""
    src, out = tmp_path / "in", tmp_path / "out"
    small_tree(src, 2)
    out.mkdir()
    (out / "00.png").write_bytes(b"someone else's file, newer than the input")
    results = {r.path: r for r in run_cheap(src, out)}
    assert (
        results["00.png"].status == "skipped" and "not made by denoise" in results["00.png"].error
    )
    assert (out / "00.png").read_bytes() == b"someone else's file, newer than the input"
    assert results["01.png"].status == "denoised"
    results = {r.path: r for r in run_cheap(src, out, overwrite=True)}
    assert results["00.png"].status == "denoised"
    Image.open(out / "00.png").load()


def test_a_rerun_skips_everything_without_running_the_model(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    small_tree(src / "sub", 6)
    first = CountingIdentity()
    assert [r.status for r in run_cheap(src, out, first)] == ["denoised"] * 6
    assert first.tiles == 6
    journal_before = (out / JOURNAL_NAME).read_bytes()
    outputs_before = snapshot(out)
    again = CountingIdentity()
    results = run_cheap(src, out, again)
    assert [(r.status, r.error) for r in results] == [("skipped", "output is up to date")] * 6
    assert again.tiles == 0
    assert snapshot(out) == outputs_before and (out / JOURNAL_NAME).read_bytes() == journal_before
    assert [r.status for r in run_cheap(src, out, again, overwrite=True)] == ["denoised"] * 6


FOLDER_RUN = """
import json
import sys
from denoiser.folder import BatchPredictor, count, denoise_tree
from denoiser.imaging.tiling import TileSpec

class Identity:
    def predict_on_batch(self, x):
        return x

results = denoise_tree(sys.argv[1], sys.argv[2], BatchPredictor(Identity(), batch_size=4),
                       TileSpec(tile=28, overlap=14))
print(json.dumps(count(results)))
"""


def folder_run(src: Path, out: Path, failpoints: str) -> subprocess.Popen:
    """A folder run in a process of its own, with ``failpoints`` in its environment."""
    return subprocess.Popen(
        [sys.executable, "-c", FOLDER_RUN, str(src), str(out)],
        env={**os.environ, "DENOISE_FAILPOINTS": failpoints},
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_kill_9_after_an_output_then_a_rerun_denoises_each_file_once(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    small_tree(src, 30)
    killed = folder_run(src, out, "folder.after_output=kill@5")
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -9, stderr.decode()[-2000:]
    made = {p.name for p in out.glob("*.png")}
    journal = out / JOURNAL_NAME  # records are written in batches: the killed one's are lost
    recorded = set(parse_journal(journal.read_bytes())) if journal.exists() else set()
    assert 5 <= len(made) < 30 and recorded < made  # the 5th output was renamed, never recorded

    model = CountingIdentity()
    results = {r.path: r for r in run_cheap(src, out, model)}
    redone = {p for p, r in results.items() if r.status == "denoised"}
    assert {p for p, r in results.items() if r.status == "skipped"} == recorded
    assert redone == {f"{i:02d}.png" for i in range(30)} - recorded and model.tiles == len(redone)
    for i in range(30):  # every output decodes and is its input, denoised
        name = f"{i:02d}.png"
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / name)), np.asarray(Image.open(src / name))
        )
    assert not list(out.rglob("*.denoise.part"))
    assert {r.path for r in run_cheap(src, out) if r.status != "skipped"} == set()


def test_two_runs_into_one_output_folder_at_once_lose_nothing(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    small_tree(src, 20)
    # the first run's writes are slow: its temporary files are alive while the second starts and cleans up
    runs = [folder_run(src, out, "folder.before_rename=sleep:0.3")]
    deadline = time.monotonic() + 120
    while not list(out.glob("*.denoise.part")) and time.monotonic() < deadline:
        time.sleep(0.02)
    runs.append(folder_run(src, out, ""))
    for proc in runs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        counts = json.loads(stdout)
        assert counts["failed"] == 0 and counts["total"] == 20
    lines = (out / JOURNAL_NAME).read_text().splitlines()
    assert sorted(json.loads(line)["output"] for line in lines) == [
        f"{i:02d}.png" for i in range(20)
    ]
    assert not list(out.rglob("*.denoise.part"))
    model = CountingIdentity()
    assert {r.status for r in run_cheap(src, out, model)} == {"skipped"} and model.tiles == 0


def test_kill_9_before_a_rename_leaves_a_temporary_file_the_rerun_removes(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    small_tree(src, 12)
    killed = folder_run(src, out, "folder.before_rename=kill@3")
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -9, stderr.decode()[-2000:]
    assert list(out.glob("*.denoise.part"))  # the killed writer's, under no final name
    results = {r.path: r.status for r in run_cheap(src, out)}
    assert set(results.values()) <= {"denoised", "skipped"} and len(results) == 12
    assert not list(out.rglob("*.denoise.part"))
    for i in range(12):
        name = f"{i:02d}.png"
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / name)), np.asarray(Image.open(src / name))
        )


def test_a_torn_or_garbled_journal_line_is_ignored_and_later_lines_kept(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    small_tree(src, 3)
    run_cheap(src, out)
    with open(out / JOURNAL_NAME, "ab") as fh:
        fh.write(
            b'{"output": "00.png", "input": "00.png", "input_si'
        )  # a line cut short by a crash
    assert {r.status for r in run_cheap(src, out)} == {"skipped"}
    with open(out / JOURNAL_NAME, "ab") as fh:
        fh.write(b'\xff garbage {"output": "01.png", "input"')
    Image.fromarray(noisy_gray(28, 28)).save(
        src / "02.png"
    )  # its new record goes after the torn line
    assert {r.path: r.status for r in run_cheap(src, out)}["02.png"] == "denoised"
    assert {r.status for r in run_cheap(src, out)} == {"skipped"}
    assert len((out / JOURNAL_NAME).read_text().splitlines()) == 3  # compacted: one line per output


def test_two_inputs_with_one_output_name_never_share_it(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(np.full((16, 16), 40, np.uint8)).save(src / "x.jpg")
    Image.fromarray(np.full((16, 16), 200, np.uint8)).save(src / "x.png")
    results = denoise_tree(
        src, dst, BatchPredictor(CountingIdentity(), batch_size=1), CHEAP_SPEC, fmt="png"
    )
    by_path = {r.path: r for r in results}
    assert by_path["x.jpg"].status == "denoised"
    assert (
        by_path["x.png"].status == "failed"
        and "already the output of x.jpg" in by_path["x.png"].error
    )
    assert sorted(p.name for p in dst.iterdir() if not p.name.startswith(".")) == ["x.png"]


def test_small_grey_pngs_written_directly_decode_to_the_same_pixels_as_pillows():
    rng = np.random.default_rng(3)
    for h, w in [(1, 1), (1, 97), (28, 28), (64, 3), (128, 128), (77, 113)]:
        pixels = (rng.random((h, w)) * 256).astype(np.uint8)
        mine = small_grey_png(pixels)
        with Image.open(io.BytesIO(mine)) as img:
            img.load()
            assert img.mode == "L" and img.size == (w, h)
            np.testing.assert_array_equal(np.asarray(img), pixels)
        # what the folder run writes for such an image: this writer up to 128x128, Pillow above
        assert encode_image(Image.fromarray(pixels), "PNG") == mine
    big = Image.fromarray((rng.random((129, 128)) * 256).astype(np.uint8))
    with Image.open(io.BytesIO(encode_image(big, "PNG"))) as img:
        np.testing.assert_array_equal(np.asarray(img), np.asarray(big))


def _first_idat(png: bytes) -> bytes:
    pos = 8
    while True:
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        if png[pos + 4 : pos + 8] == b"IDAT":
            return png[pos + 8 : pos + 8 + length]
        pos += 12 + length


def test_photo_pngs_are_written_at_a_fast_zlib_level_and_lossless():
    # zlib's default level (6) took 40 ms to write a 512x512 grey photograph, more
    # than the model took to denoise it; level 4 writes it in a third of that, at
    # the same size within a few percent (README.md: photographs on AMX). The zlib header says
    # which: FLEVEL 1 is levels 2-5, 2 is the default.
    rng = np.random.default_rng(4)
    smooth = np.cumsum(rng.normal(0, 1, (512, 512 * 3)), axis=1).reshape(512, 512, 3)
    smooth = np.clip(128 + smooth, 0, 255).astype(np.uint8)
    for img in (Image.fromarray(smooth), Image.fromarray(smooth[..., 0])):
        png = encode_image(img, "PNG")
        assert _first_idat(png)[1] >> 6 == 1
        with Image.open(io.BytesIO(png)) as back:
            np.testing.assert_array_equal(np.asarray(back), np.asarray(img))


def _png(
    w: int,
    h: int,
    scanlines: bytes,
    *,
    colour: int = 0,
    depth: int = 8,
    interlace: int = 0,
    before: list[tuple[bytes, bytes]] = (),
    parts: int = 1,
) -> bytes:
    """A PNG of these filtered scanlines, the chunks ``before`` ahead of the
    pixels, the zlib stream cut into ``parts`` IDAT chunks."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
        )

    stream = zlib.compress(scanlines, 6)
    cut = [len(stream) * i // parts for i in range(parts + 1)]
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, interlace))
        + b"".join(chunk(k, d) for k, d in before)
        + b"".join(chunk(b"IDAT", stream[a:b]) for a, b in zip(cut, cut[1:], strict=False))
        + chunk(b"IEND", b"")
    )


def _filtered(pixels: np.ndarray, kinds: list[int]) -> bytes:
    """Grey 8-bit rows under PNG filter ``kinds[y]`` (0 None ... 4 Paeth)."""
    out = bytearray()
    up = [0] * pixels.shape[1]
    for row, kind in zip(pixels.astype(int).tolist(), kinds, strict=True):
        out.append(kind)
        for x, v in enumerate(row):
            a, b, c = (row[x - 1], up[x], up[x - 1]) if x else (0, up[x], 0)
            p = a + b - c
            pred = (
                [0, a, b, (a + b) // 2][kind]
                if kind < 4
                else min((abs(p - a), 0, a), (abs(p - b), 1, b), (abs(p - c), 2, c))[2]
            )
            out.append((v - pred) % 256)
        up = row
    return bytes(out)


def _adam7(pixels: np.ndarray) -> bytes:
    """Grey 8-bit scanlines of an interlaced PNG (filter None)."""
    out = bytearray()
    for x0, y0, dx, dy in [
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ]:
        for row in pixels[y0::dy, x0::dx]:
            if row.size:
                out += b"\0" + row.tobytes()
    return bytes(out)


def _decoded(decode, data: bytes):
    """What a decoder makes of ``data``: the planes, or the error it reports."""
    try:
        img = decode(data)
    except ImageError as exc:
        return str(exc)
    planes = [
        p if p is None else (p.dtype, p.shape, p.tobytes())
        for p in (img.luma, img.chroma, img.alpha)
    ]
    return img.mode, img.size, img.format, img.max_value, planes


def test_small_grey_pngs_decoded_without_pillow_give_pillows_pixels():
    rng = np.random.default_rng(7)

    def same(data: bytes, fast: bool | None) -> None:
        """Both decoders agree; ``fast``: whether Pillow is bypassed (None: either)."""
        assert fast is None or (small_grey_pixels(data) is not None) == fast
        assert _decoded(decode_image, data) == _decoded(decode_with_pillow, data)

    def pillow_png(img: Image.Image, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG", **kw)
        return buf.getvalue()

    for h, w in [(1, 1), (1, 97), (28, 28), (64, 3), (128, 128), (77, 113)]:
        pixels = (rng.random((h, w)) * 256).astype(np.uint8)
        smooth = np.add.outer(np.arange(h), np.arange(w)).astype(np.uint8)
        same(small_grey_png(pixels), True)
        same(pillow_png(Image.fromarray(pixels)), None)  # Pillow chooses the filters
        same(pillow_png(Image.fromarray(smooth)), None)
        few = rng.integers(0, 8, (h, w)).astype(np.uint8)  # ties in Paeth's choice
        slow_rows = min(h, max(1, 64 // w))
        for image, kinds in itertools.product(
            (pixels, few),
            (
                [0] * h,
                [1] * h,
                [2] * h,
                [y % 3 for y in range(h)],
                [int(k) for k in rng.integers(0, 5, h)],  # Average and Paeth: fast only if few
                [3] + [4] * (slow_rows - 1) + [0] * (h - slow_rows),  # as many as are fast
                [0] * (h - 1) + [4],
            ),
        ):
            for parts in (1, 3):
                data = _png(w, h, _filtered(image, kinds), parts=parts)
                with Image.open(io.BytesIO(data)) as img:  # the test's own writer is right
                    np.testing.assert_array_equal(np.asarray(img), image)
                slow = sum(k in (3, 4) for k in kinds) * w
                same(data, slow <= 64)
                assert small_grey_pixels(data) is None or np.array_equal(
                    small_grey_pixels(data), image
                )
        inert = [(b"gAMA", (45455).to_bytes(4, "big")), (b"pHYs", bytes(9))]
        same(_png(w, h, _filtered(pixels, [0] * h), before=inert), True)

    pixels = (rng.random((28, 28)) * 256).astype(np.uint8)
    plain = _png(28, 28, _filtered(pixels, [0] * 28))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: Pillow turns it upright
    info = PngInfo()
    info.add_text("Comment", "hello")
    interlaced = _png(28, 28, _adam7(pixels), interlace=1)
    with Image.open(io.BytesIO(interlaced)) as img:  # the test's interlaced writer is right
        np.testing.assert_array_equal(np.asarray(img), pixels)
    odd = [
        pillow_png(Image.fromarray(pixels), exif=exif.tobytes()),
        pillow_png(Image.fromarray(pixels), transparency=7),
        pillow_png(Image.fromarray(pixels), pnginfo=info),
        pillow_png(Image.fromarray(pixels).convert("P")),
        pillow_png(Image.fromarray(pixels).convert("1")),
        pillow_png(Image.fromarray(pixels).convert("LA")),
        pillow_png(Image.fromarray(pixels).convert("RGB")),
        pillow_png(Image.fromarray(pixels.astype(np.uint16) * 257)),
        pillow_png(Image.fromarray((rng.random((129, 128)) * 256).astype(np.uint8))),
        interlaced,
        _png(28, 28, _filtered(pixels, [5] + [0] * 27)),  # no such filter
        _png(28, 28, _filtered(pixels[:27], [0] * 27)),  # a row short
        _png(28, 28, _filtered(pixels, [0] * 28) + b"\0" * 29),  # a row too many
        _png(0, 28, b""),
        plain + b"trailing",
        plain[:-20],
        plain[:40],
        plain[:-13] + bytes([plain[-13] ^ 1]) + plain[-12:],  # a damaged IDAT checksum
        plain[:20] + b"\x01" + plain[21:],  # a damaged header
        plain[:33] + plain[-12:],  # no pixels
        plain[:-12],  # no end
        b"\x89PNG\r\n\x1a\n",
        b"not an image",
    ]
    for data in odd:
        same(data, False)


def test_journal_lines_are_json_of_the_records_fields():
    from dataclasses import asdict

    from denoiser.folder import OutputRecord, format_record, parse_journal

    for name in ["a.png", "sub/b c.png", 'q"uote\\.png', "é/ü.png", "\udcff.png", "tab\t.png"]:
        record = OutputRecord(name, name + ".jpg", 12, "ab" * 32, 3456, "cd" * 32)
        line = format_record(record)
        assert line == json.dumps(asdict(record)).encode("ascii") + b"\n"
        assert parse_journal(line) == {name: record}


def test_chunks_end_at_a_number_of_files_or_of_input_bytes(tmp_path):
    from denoiser.folder import plan_folder

    src = tmp_path / "in"
    src.mkdir()
    for i in range(7):
        Image.fromarray(noisy_gray(20, 20)).save(src / f"s{i}.png")
    for i in range(3):  # large noisy images: about 1.6 MB each as PNG
        Image.fromarray(noisy_gray(1300, 1300)).save(src / f"big{i}.png")
    plan = plan_folder(src, tmp_path / "out", chunk_files=4)
    assert sorted(sum(plan.chunks, [])) == sorted(p.name for p in src.iterdir())
    big = [[name for name in chunk if name.startswith("big")] for chunk in plan.chunks]
    assert all(len(b) <= 2 for b in big)  # 4 MB of input at most, past a chunk's first file
    assert all(len(chunk) <= 4 for chunk in plan.chunks) and len(plan.chunks) >= 3


def test_without_a_chunk_size_each_worker_gets_about_four_chunks_within_bounds(tmp_path):
    from denoiser.folder import CHUNK_FILES_RANGE, auto_chunk_files, plan_folder

    low, high = CHUNK_FILES_RANGE
    assert auto_chunk_files(10_000, 2) == 1024  # 1,250 would be over the bound
    assert auto_chunk_files(10_000, 13) == 193  # 52 chunks: 4 for each of 13 workers
    assert auto_chunk_files(100, 2) == low and auto_chunk_files(0, 4) == low
    assert auto_chunk_files(10**6, 1000) == 250

    src = tmp_path / "in"
    src.mkdir()
    for i in range(300):
        (src / f"{i:03d}.png").write_bytes(small_grey_png(np.full((8, 8), i % 256, np.uint8)))
    plan = plan_folder(src, tmp_path / "out", workers=2)
    assert [len(c) for c in plan.chunks] == [64, 64, 64, 64, 44]


@pytest.mark.parametrize("name", [JOURNAL_NAME, ".denoise-journal.lock"])
def test_a_journal_or_lock_symlinked_into_the_input_is_not_written_through(tmp_path, name):
    src, out = tmp_path / "in", tmp_path / "out"
    small_tree(src, 3)
    out.mkdir()
    victim = src / "00.png"
    before = victim.read_bytes()
    (out / name).symlink_to(victim)
    results = run_cheap(src, out)
    assert [r.status for r in results] == ["denoised"] * 3
    assert victim.read_bytes() == before
    assert not (out / name).is_symlink() and (out / name).is_file()


def test_a_journal_hard_linked_into_the_input_gets_a_copy_of_its_own(tmp_path):
    """`cp -al clean clean2` shares the journal's inode: appending to it would
    change the input folder's journal."""
    src, clean, clean2 = tmp_path / "in", tmp_path / "clean", tmp_path / "clean2"
    small_tree(src, 3)
    run_cheap(src, clean)
    subprocess.run(["cp", "-al", str(clean), str(clean2)], check=True)
    before = {p.name: p.read_bytes() for p in clean.iterdir()}
    results = run_cheap(clean, clean2, overwrite=True, pattern="*.png")
    assert [r.status for r in results] == ["denoised"] * 3
    assert {p.name: p.read_bytes() for p in clean.iterdir()} == before
    assert (clean2 / JOURNAL_NAME).stat().st_nlink == 1
    assert (clean / JOURNAL_NAME).stat().st_nlink == 1
    # the first folder's journal still skips everything on a rerun
    assert [r.status for r in run_cheap(src, clean)] == ["skipped"] * 3


def test_decoded_pixels_in_flight_stay_within_the_budget(tmp_path, monkeypatch):
    """Memory is bounded by decoded pixels, not encoded bytes: with a budget
    of three images, never more than three are decoded and not yet written
    (an image larger than the budget still goes through, alone)."""
    import denoiser.folder.pipeline as folder

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(src / f"{i:02d}.png")
    Image.fromarray(rng.integers(0, 256, (160, 160), dtype=np.uint8)).save(src / "big.png")
    budgets = []

    class Recorded(folder.PixelBudget):
        def __init__(self, limit):
            super().__init__(limit)
            budgets.append(self)

    monkeypatch.setattr(folder, "PixelBudget", Recorded)
    monkeypatch.setattr(folder, "PIXELS_IN_FLIGHT", 3 * 64 * 64)
    # a reader's task (up to 16 files, ending after TASK_BYTES of input) is the
    # budget's unit: large images, the ones that matter, come one to a task
    monkeypatch.setattr(folder, "TASK_BYTES", 1)
    results = run_cheap(src, out)
    assert [r.status for r in results] == ["denoised"] * 13
    (budget,) = budgets
    assert budget.peak == 160 * 160 or 2 * 64 * 64 <= budget.peak <= 3 * 64 * 64
    assert budget.used == 0 and budget.waiting == 0
