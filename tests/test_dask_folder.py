"""Folder denoising in chunks on a real Dask cluster (distributed.LocalCluster
of 2 worker processes, through prefect-dask) with a real Prefect server: the
same outputs and report as the in-process run, one Prefect server for all
workers, a worker killed with SIGKILL mid-run, and bad Dask options."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.faults.harness import command_line, denoise_env, descendants, free_port, tail
from tests.test_folder import build_folder, identity_model, save_model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return (
        save_model(tmp_path_factory.mktemp("model") / "identity", identity_model()) / "model.keras"
    )


def start(
    args: list[str],
    tmp: Path,
    api: str | None,
    failpoints: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    env = denoise_env(tmp / "store", tmp / "prefect-home", api, None, failpoints)
    env.update(extra_env or {})
    if api is None:
        env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=tmp,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def outputs(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def report_rows(stdout: str) -> list[dict]:
    path = next(
        line.split("report: ", 1)[1].strip()
        for line in stdout.splitlines()
        if line.startswith("report: ")
    )
    with open(path, newline="") as fh:
        return [
            {k: v for k, v in row.items() if k not in ("ms", "output")}
            for row in csv.DictReader(fh)
        ]


def progress_artifacts(api: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["denoise-progress"]))
        )


def test_chunks_on_two_workers_match_the_in_process_run(prefect_api, model_file, tmp_path):
    src = tmp_path / "in"
    expected = build_folder(src)
    before = {a.id for a in progress_artifacts(prefect_api)}
    code1, out1, err1 = finish(
        start(
            ["folder", str(src), str(tmp_path / "one"), "--model", str(model_file)],
            tmp_path,
            prefect_api,
        )
    )
    code2, out2, err2 = finish(
        start(
            [
                "folder",
                str(src),
                str(tmp_path / "many"),
                "--model",
                str(model_file),
                "--workers",
                "2",
                "--chunk-files",
                "3",
            ],
            tmp_path,
            prefect_api,
        )
    )
    assert code1 == code2 == 1, (
        tail(err1),
        tail(err2),
    )  # the corpus has bad files: exit 1 both ways
    one, many = outputs(tmp_path / "one"), outputs(tmp_path / "many")
    assert (
        one == many and len(one) == sum(v == "denoised" for v in expected.values()) + 1
    )  # + bomb.png
    assert report_rows(out1) == report_rows(out2)
    assert "distributed.scheduler" not in err2  # Dask's lifecycle lines only with --debug
    # each run moved its progress artifact to the end, the chunked one as chunks finished
    made = [a for a in progress_artifacts(prefect_api) if a.id not in before]
    assert len(made) == 2 and all(float(a.data) == 100.0 for a in made), made


def test_without_an_api_the_workers_share_the_commands_one_temporary_server(model_file, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        Image.fromarray(np.full((30, 30), i * 40, np.uint8)).save(src / f"{i}.png")
    code, out, err = finish(
        start(
            [
                "folder",
                str(src),
                str(tmp_path / "out"),
                "--model",
                str(model_file),
                "--workers",
                "2",
                "--chunk-files",
                "2",
            ],
            tmp_path,
            None,
        )
    )
    assert code == 0, tail(err)
    assert err.count("Starting temporary server") == 1, tail(err, 40)
    assert len(outputs(tmp_path / "out")) == 6


def _workers(pid: int) -> list[int]:
    return [
        p
        for p in descendants(pid)
        if "spawn_main" in command_line(p) or "distributed" in command_line(p)
    ]


def test_a_worker_killed_mid_run_loses_nothing(prefect_api, model_file, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(src / f"{i:02d}.png")
    out = tmp_path / "out"
    proc = start(
        [
            "folder",
            str(src),
            str(out),
            "--model",
            str(model_file),
            "--workers",
            "2",
            "--chunk-files",
            "4",
        ],
        tmp_path,
        prefect_api,
        failpoints="folder.after_output=sleep:0.3",
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(out.glob("*.png"))) < 6:
        assert proc.poll() is None, tail(proc.stderr.read())
        time.sleep(0.1)
    victims = _workers(proc.pid)
    assert victims, "no Dask worker process found"
    assert len(list(out.glob("*.png"))) < 40  # killed mid-run, not after it
    os.kill(victims[-1], signal.SIGKILL)
    code, stdout, err = finish(proc)
    assert code == 0, tail(err, 40)
    files = sorted(out.glob("*.png"))
    assert [p.name for p in files] == [f"{i:02d}.png" for i in range(40)]
    for p in files:  # every output whole
        with Image.open(p) as im:
            im.load()
            assert im.size == (48, 48)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".part")]
    rows = report_rows(stdout)
    assert len(rows) == 40 and all(r["status"] in ("denoised", "skipped") for r in rows)


@pytest.mark.parametrize("case", ["nothing listening", "no api", "both", "bad workers"])
def test_bad_dask_options_are_one_line_and_exit_2(model_file, tmp_path, prefect_api, case):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "a.png")
    address = f"tcp://127.0.0.1:{free_port()}"
    args = {
        "nothing listening": ["--dask-address", address],
        "no api": ["--dask-address", address],
        "both": ["--dask-address", address, "--workers", "2"],
        "bad workers": ["--workers", "0"],
    }[case]
    code, _, err = finish(
        start(
            ["folder", str(src), str(tmp_path / "out"), "--model", str(model_file), *args],
            tmp_path,
            None if case == "no api" else prefect_api,
        ),
        timeout=120,
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    expected = {
        "nothing listening": "no Dask scheduler answers",
        "no api": "PREFECT_API_URL",
        "both": "give one",
        "bad workers": "--workers must be between",
    }[case]
    assert expected in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_mixed_folder_on_two_workers_goes_to_each_images_model(prefect_api, tmp_path):
    """Colour, grey and digit images in chunks on two workers: each to its
    domain's model of the store, as the in-process pipeline routes them."""
    from denoiser.folder import denoise_tree
    from tests.test_routing import (
        ALL_OWN,
        build_mixed_folder,
        identity,
        make_store,
        router_of,
        train_tiny,
    )

    src = tmp_path / "in"
    build_mixed_folder(src)
    models = {"grey": train_tiny(1, 0), "colour": train_tiny(3, 1), "digits": identity(1)}
    make_store(tmp_path / "store", models)
    args = ["folder", str(src), str(tmp_path / "out"), "--workers", "2", "--chunk-files", "2"]
    code, out, err = finish(start(args, tmp_path, prefect_api))
    assert code == 0, tail(err, 40)
    rows = {r["path"]: (r["status"], r["model"], r["route"]) for r in report_rows(out)}
    local = denoise_tree(src, tmp_path / "local", router_of(models, ALL_OWN))
    assert rows == {r.path: (r.status, r.model, r.route) for r in local}
    assert {m for _, m, _ in rows.values()} == {"colour-v1", "grey-v1", "digits-v1"}
    for r in local:  # the same pixels, whichever process ran the model
        a = np.asarray(Image.open(tmp_path / "out" / r.path), float)
        b = np.asarray(Image.open(tmp_path / "local" / r.path), float)
        level = 1 if b.max() < 256 else 257  # one level of 8 bits
        assert a.shape == b.shape and np.abs(a - b).max() <= level, r.path


# --------------------------------------------------------------------------- a model with an effect


def negative_model():
    """A real Keras model with a known, visible effect: each pixel becomes its
    negative (1 - x), so an output proves the model ran on it, and how."""
    import keras

    inputs = keras.Input((None, None, 1))
    out = keras.layers.Conv2D(
        1, 1, kernel_initializer=keras.initializers.Constant(-1.0), bias_initializer="ones"
    )(inputs)
    return keras.Model(inputs, out)


def build_gray_pictures(root: Path, count: int = 6) -> dict[str, np.ndarray]:
    """Grey PNGs of a few sizes (some larger than a tile); returns their pixels by name."""
    rng = np.random.default_rng(5)
    root.mkdir(parents=True)
    pictures = {}
    for i in range(count):
        pixels = rng.integers(0, 256, (28 + 9 * i, 40 + 5 * i), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"g{i}.png")
        pictures[f"g{i}.png"] = pixels
    return pictures


def assert_negatives(out: Path, pictures: dict[str, np.ndarray]) -> None:
    for name, pixels in pictures.items():
        got = np.asarray(Image.open(out / name)).astype(int)
        assert got.shape == pixels.shape, name
        assert np.abs(got - (255 - pixels.astype(int))).max() <= 1, name


@pytest.fixture(scope="module")
def negative_model_file(tmp_path_factory) -> Path:
    return (
        save_model(tmp_path_factory.mktemp("model") / "negative", negative_model()) / "model.keras"
    )


def test_a_real_model_is_applied_on_the_workers_as_in_process(
    prefect_api, negative_model_file, tmp_path
):
    """The identity model above cannot tell an applied model from a copied file:
    here every output must be its input's negative, on two workers as in process."""
    src = tmp_path / "in"
    pictures = build_gray_pictures(src)
    base = ["folder", str(src)]
    model = ["--model", str(negative_model_file)]
    code1, out1, err1 = finish(start([*base, str(tmp_path / "one"), *model], tmp_path, prefect_api))
    code2, out2, err2 = finish(
        start(
            [*base, str(tmp_path / "many"), *model, "--workers", "2", "--chunk-files", "2"],
            tmp_path,
            prefect_api,
        )
    )
    assert code1 == code2 == 0, (tail(err1), tail(err2))
    assert_negatives(tmp_path / "one", pictures)
    assert_negatives(tmp_path / "many", pictures)
    assert outputs(tmp_path / "many") == outputs(tmp_path / "one")
    assert len(outputs(tmp_path / "one")) == len(pictures)
    assert report_rows(out1) == report_rows(out2)
