"""Folders in object storage (moto's S3 server on loopback): ``denoise folder
s3://bucket/noisy s3://bucket/clean`` in this process and in chunks on a
2-process Dask cluster gives the same objects and report as a local run;
reruns skip by the journal, which lives in the bucket; bad locations are one
line."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from denoiser.folder import JOURNAL_NAME, JOURNAL_PARTS, BatchPredictor, count, denoise_tree
from denoiser.imaging.tiling import TileSpec
from tests.faults.harness import tail
from tests.test_dask_folder import finish, report_rows, start
from tests.test_folder import CountingIdentity, build_folder, identity_model, save_model

pytest.importorskip("s3fs")

CHEAP = TileSpec(tile=28, overlap=14)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return (
        save_model(tmp_path_factory.mktemp("model") / "identity", identity_model()) / "model.keras"
    )


def upload(s3, root: Path, url: str) -> set[str]:
    """The regular files of ``root`` with UTF-8 names (what a bucket can hold) as objects."""
    fs = s3.fs()
    sent = set()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            continue
        if stat.S_ISREG(path.lstat().st_mode):
            fs.pipe_file(f"{url.removeprefix('s3://')}/{rel}", path.read_bytes())
            sent.add(rel)
    return sent


def objects(s3, url: str) -> dict[str, str]:
    """sha256 of every object under ``url`` but the journal."""
    fs = s3.fs()
    base = url.removeprefix("s3://")
    fs.invalidate_cache()
    return {
        p[len(base) + 1 :]: hashlib.sha256(fs.cat_file(p)).hexdigest()
        for p in fs.find(base)
        if not p[len(base) + 1 :].startswith(".denoise-journal")
    }


def mirror(src: Path, dst: Path, names: set[str]) -> None:
    for rel in names:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes((src / rel).read_bytes())


def test_bucket_to_bucket_is_the_local_run_and_reruns_skip_by_the_journal_in_the_bucket(
    s3, tmp_path
):
    bucket = s3.bucket("folders")
    src = tmp_path / "in"
    build_folder(src)
    names = upload(s3, src, f"s3://{bucket}/noisy")
    local_in = tmp_path / "local-in"
    mirror(src, local_in, names)

    local = denoise_tree(
        local_in, tmp_path / "local-out", BatchPredictor(CountingIdentity()), CHEAP
    )
    model = CountingIdentity()
    remote = denoise_tree(
        f"s3://{bucket}/noisy", f"s3://{bucket}/clean", BatchPredictor(model), CHEAP
    )
    strip = lambda rs: sorted((r.path, r.status, r.error, r.reason, r.width) for r in rs)  # noqa: E731
    assert strip(remote) == strip(local)
    made = objects(s3, f"s3://{bucket}/clean")
    on_disk = {
        p.relative_to(tmp_path / "local-out").as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (tmp_path / "local-out").rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    assert made == on_disk and len(made) == count(remote)["denoised"] > 5
    assert all(r.output.startswith(f"s3://{bucket}/clean/") for r in remote if r.output)

    # the journal is in the bucket, compacted into one object; a rerun reads nothing twice
    fs = s3.fs()
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/clean/{JOURNAL_NAME}")
    assert not fs.find(f"{bucket}/clean/{JOURNAL_PARTS}")
    again = CountingIdentity()
    rerun = denoise_tree(
        f"s3://{bucket}/noisy", f"s3://{bucket}/clean", BatchPredictor(again), CHEAP
    )
    assert again.tiles == 0
    assert {r.status for r in rerun if r.path in made} == {"skipped"}

    # a replaced input and a damaged output are made again, nothing else
    Image.fromarray(np.full((28, 28), 99, np.uint8)).save(local_in / "gray.png")
    fs.pipe_file(f"{bucket}/noisy/gray.png", (local_in / "gray.png").read_bytes())
    fs.pipe_file(f"{bucket}/clean/odd.png", b"damaged")
    third = {
        r.path: r
        for r in denoise_tree(
            f"s3://{bucket}/noisy",
            f"s3://{bucket}/clean",
            BatchPredictor(CountingIdentity()),
            CHEAP,
        )
    }
    assert {p for p, r in third.items() if r.status == "denoised"} == {"gray.png", "odd.png"}
    assert "input changed" in third["gray.png"].reason
    assert "does not match its record" in third["odd.png"].reason
    fs.invalidate_cache()
    got = np.asarray(Image.open(fs.open(f"{bucket}/clean/gray.png")))
    assert (got == 99).all()


def test_local_input_into_a_bucket_and_a_bucket_into_a_local_folder(s3, tmp_path):
    bucket = s3.bucket("mixed")
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 30), i * 50, np.uint8)).save(src / f"{i}.png")
    up = denoise_tree(src, f"s3://{bucket}/out", BatchPredictor(CountingIdentity()), CHEAP)
    assert count(up)["denoised"] == 5
    down = denoise_tree(
        f"s3://{bucket}/out", tmp_path / "back", BatchPredictor(CountingIdentity()), CHEAP
    )
    assert count(down)["denoised"] == 5
    for i in range(5):
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "back" / f"{i}.png")),
            np.asarray(Image.open(src / f"{i}.png")),
        )


def run_cli(args: list[str], tmp: Path, api: str, s3) -> tuple[int, str, str]:
    return finish(start(args, tmp, api, extra_env=s3.env()))


def test_denoise_folder_bucket_to_bucket_on_two_workers_matches_the_in_process_run(
    s3, prefect_api, model_file, tmp_path
):
    bucket = s3.bucket("sweep")
    src = tmp_path / "in"
    build_folder(src)
    upload(s3, src, f"s3://{bucket}/noisy")
    one = run_cli(
        ["folder", f"s3://{bucket}/noisy", f"s3://{bucket}/one", "--model", str(model_file)],
        tmp_path,
        prefect_api,
        s3,
    )
    many = run_cli(
        [
            "folder",
            f"s3://{bucket}/noisy",
            f"s3://{bucket}/many",
            "--model",
            str(model_file),
            "--workers",
            "2",
            "--chunk-files",
            "3",
        ],
        tmp_path,
        prefect_api,
        s3,
    )
    assert one[0] == many[0] == 1, (tail(one[2]), tail(many[2]))  # bad files: exit 1 both ways
    made_one, made_many = objects(s3, f"s3://{bucket}/one"), objects(s3, f"s3://{bucket}/many")
    assert made_one == made_many and len(made_one) >= 10
    assert report_rows(one[1]) == report_rows(many[1])
    assert f"output: s3://{bucket}/many" in many[1]
    assert not list(tmp_path.glob("s3:*"))  # nothing written to a local folder named after the URL


@pytest.mark.parametrize("client", ["obstore", "s3fs"])
def test_a_remote_tree_reads_writes_and_fails_alike_through_either_client(s3, monkeypatch, client):
    """Objects go through obstore when it is installed, else through s3fs: the
    same bytes and the same OSErrors (what the folder report is made from)."""
    import denoiser.folder.trees as trees

    if client == "s3fs":
        monkeypatch.setattr(trees, "_has_obstore", lambda: False)
    bucket = s3.bucket("either")
    tree = trees.open_tree(f"s3://{bucket}/t", "output", must_exist=False)
    assert (tree.objects is not None) == (client == "obstore")
    data = os.urandom(3000)
    tree.write(tree.path("a/b.png"), data)
    assert tree.read(tree.path("a/b.png")) == data
    assert s3.fs().cat_file(f"{bucket}/t/a/b.png") == data  # the same object for s3fs
    assert tree.matches(tree.path("a/b.png"), 3000, hashlib.sha256(data).hexdigest())
    assert not tree.matches(tree.path("a/b.png"), 3000, "0" * 64)
    assert not tree.matches(tree.path("gone.png"), 3000, "0" * 64)
    with pytest.raises(FileNotFoundError):
        tree.read(tree.path("gone.png"))
    assert tree.listing() == {"a/b.png": 3000}


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("missing bucket", "bucket does not exist"),
        ("empty prefix", "does not exist (no object under it)"),
        ("wrong credentials", "access denied; check the AWS credentials"),
        ("unreachable endpoint", "cannot reach the object-storage endpoint"),
    ],
)
def test_a_bad_location_in_object_storage_is_one_line(s3, tmp_path, model_file, case, says):
    from tests.faults.harness import free_port

    bucket = s3.bucket("lines")
    s3.fs().pipe_file(f"{bucket}/noisy/a.png", b"not read")
    where = f"s3://{bucket}/noisy"
    env = {**os.environ, **s3.env(), "DENOISE_STORE": str(tmp_path / "store")}
    if case == "missing bucket":
        where = "s3://no-such-bucket/noisy"
    if case == "empty prefix":
        where = f"s3://{bucket}/nothing-here"
    checks = pytest.MonkeyPatch()
    if case == "wrong credentials":
        import moto.settings

        # moto checks signatures against its IAM users until undone: no such key
        checks.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
        env.update(AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG1", AWS_SECRET_ACCESS_KEY="wrong")
    if case == "unreachable endpoint":
        env.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_MAX_ATTEMPTS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "folder", where, f"s3://{bucket}/out"]
        + ["--model", str(model_file)],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
    )
    checks.undo()  # what follows signs with the test's own fake key
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], proc.stderr
    print(lines[0])
    fs = s3.fs()
    fs.invalidate_cache()
    assert not fs.find(f"{bucket}/out")
    assert not list(tmp_path.glob("s3:*")) and not (tmp_path / "store").exists()


def test_relative_locations_resolve_against_denoise_home_on_a_worker(tmp_path, monkeypatch):
    """A deployment's flow run may work in a temporary folder: its relative store
    and inbox resolve against $DENOISE_HOME (the folder deployed from)."""
    from artifacts.store import resolve_store_root
    from denoiser.core.errors import ConfigError
    from denoiser.folder.trees import resolve_location

    project, elsewhere = tmp_path / "project", tmp_path / "tmp-run"
    project.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("DENOISE_STORE", raising=False)
    assert resolve_store_root(None) == str(elsewhere / "store")  # no DENOISE_HOME: the cwd
    monkeypatch.setenv("DENOISE_HOME", str(project))
    assert resolve_store_root(None) == str(project / "store")
    assert resolve_location("inbox/noisy") == str(project / "inbox" / "noisy")
    assert resolve_location(str(tmp_path / "abs")) == str(tmp_path / "abs")
    assert resolve_location("s3://bucket/inbox/") == "s3://bucket/inbox"
    monkeypatch.setenv("DENOISE_HOME", str(tmp_path / "not-on-this-machine"))
    with pytest.raises(ConfigError, match="not a folder on this machine"):
        resolve_store_root(None)
    assert resolve_store_root("s3://bucket/denoise") == "s3://bucket/denoise"


def test_a_mixed_folder_bucket_to_bucket_goes_to_each_images_model(s3, tmp_path):
    """Colour, grey and digit images in a bucket: each to its domain's model,
    as a local run routes them; the journal in the bucket says which."""
    from denoiser.folder import parse_journal
    from tests.test_routing import ALL_OWN, build_mixed_folder, identity, router_of, train_tiny

    bucket = s3.bucket("routes")
    src = tmp_path / "in"
    build_mixed_folder(src)
    upload(s3, src, f"s3://{bucket}/noisy")
    models = {"grey": train_tiny(1, 0), "colour": train_tiny(3, 1), "digits": identity(1)}
    router = router_of(models, ALL_OWN)
    local = denoise_tree(src, tmp_path / "out", router)
    remote = denoise_tree(f"s3://{bucket}/noisy", f"s3://{bucket}/clean", router)
    strip = lambda rs: sorted((r.path, r.status, r.model, r.route) for r in rs)  # noqa: E731
    assert strip(remote) == strip(local)
    assert {r.route for r in remote} == {"colour", "grey"}
    made = objects(s3, f"s3://{bucket}/clean")
    assert made == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (tmp_path / "out").iterdir()
        if not p.name.startswith(".")
    }
    journal = parse_journal(s3.fs().cat_file(f"{bucket}/clean/{JOURNAL_NAME}"))
    assert {k: (r.model, r.route) for k, r in journal.items()} == {
        r.path: (r.model, r.route) for r in local
    }
    rerun = denoise_tree(f"s3://{bucket}/noisy", f"s3://{bucket}/clean", router)
    assert {r.status for r in rerun} == {"skipped"}


def test_a_real_model_applied_bucket_to_bucket_gives_the_local_run(s3, tmp_path):
    """The model is applied, not the input copied: every object is its input's
    negative (a real Keras model, 1 - x), byte for byte the local run's output."""
    from tests.test_dask_folder import assert_negatives, build_gray_pictures, negative_model

    bucket = s3.bucket("negatives")
    src = tmp_path / "in"
    pictures = build_gray_pictures(src)
    assert upload(s3, src, f"s3://{bucket}/noisy") == set(pictures)
    model = BatchPredictor(negative_model())
    local = denoise_tree(src, tmp_path / "local-out", model, CHEAP)
    remote = denoise_tree(f"s3://{bucket}/noisy", f"s3://{bucket}/clean", model, CHEAP)
    assert count(local)["denoised"] == count(remote)["denoised"] == len(pictures)
    assert_negatives(tmp_path / "local-out", pictures)
    made = objects(s3, f"s3://{bucket}/clean")
    assert made == {
        name: hashlib.sha256((tmp_path / "local-out" / name).read_bytes()).hexdigest()
        for name in pictures
    }
