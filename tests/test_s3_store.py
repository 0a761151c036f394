"""The store on object storage, against moto's real S3 server: staging and
pushing, shards read straight from the bucket, the registry's compare-and-swap
under racing writers (threads and processes), and bad buckets, credentials
and endpoints as one line."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from artifacts.registry import read_registry, update_registry
from artifacts.store import Store, StoreError, local_copy
from denoiser.core.files import file_sha256
from denoiser.data.shards import iter_batches, load_split, verify_shard_set


def _upload_tree(fs, local, url):
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{url[5:]}/{p.relative_to(local).as_posix()}")


def test_a_stage_pushes_what_it_made_and_not_hidden_or_unchanged_files(s3, tmp_path):
    s3.bucket("bkt")
    store = Store.at("s3://bkt/store/")
    assert store.url == "s3://bkt/store" and store.remote
    with store.stage() as stage:
        folder = stage.pull(stage.shards_root / "set")
        (folder / "a.parquet").write_bytes(b"a" * 10)
        (folder / "sub").mkdir()
        (folder / "sub" / "b.bin").write_bytes(b"b")
        (folder / ".a.parquet.123.part").write_bytes(b"half")  # a writer's temporary file
        (folder / "manifest.json").write_text("{}")
        where = stage.push(folder)
        staged_root = stage.url
    assert where == "s3://bkt/store/shards/set"
    assert not os.path.exists(staged_root)  # the stage is gone
    assert store.sizes(where) == {"a.parquet": 10, "sub/b.bin": 1, "manifest.json": 2}

    fs = s3.fs()
    before = fs.info("bkt/store/shards/set/a.parquet")["LastModified"]
    with store.stage() as stage:
        folder = stage.pull(where)
        assert (folder / "a.parquet").read_bytes() == b"a" * 10
        (folder / "c.bin").write_bytes(b"c")
        stage.push(folder)
    fs.invalidate_cache()
    assert fs.info("bkt/store/shards/set/a.parquet")["LastModified"] == before  # not uploaded again
    assert fs.cat_file("bkt/store/shards/set/c.bin") == b"c"


def test_manifests_are_pushed_after_everything_else(s3, tmp_path, monkeypatch):
    s3.bucket("bkt")
    store = Store.at("s3://bkt/s")
    order = []
    fs = store.fs
    real = fs.put_file
    monkeypatch.setattr(
        fs,
        "put_file",
        lambda lpath, rpath, **kw: (
            order.append(rpath.rsplit("/", 1)[-1]),
            real(lpath, rpath, **kw),
        ),
    )
    with store.stage() as stage:
        folder = stage.pull(stage.models_root / "v1")
        for name in ("model.json", "metrics.json", "model.keras", "zz.png"):
            (folder / name).write_bytes(b"x")
        stage.push(folder)
    assert order[-1] == "model.json" and sorted(order) == [
        "metrics.json",
        "model.json",
        "model.keras",
        "zz.png",
    ]


def test_shards_are_read_straight_from_the_bucket(s3, tiny_shards):
    s3.bucket("bkt")
    url = "s3://bkt/store/shards/tiny"
    _upload_tree(s3.fs(), tiny_shards, url)
    assert verify_shard_set(url) == []
    local = load_split(tiny_shards, "test")
    remote = load_split(url, "test")
    np.testing.assert_array_equal(local["noisy"], remote["noisy"])
    rows = sum(len(b["clean"]) for b in iter_batches(url, "train", batch_rows=7))
    assert rows == 56
    # a damaged shard in the bucket is found by its size or checksum
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    first = manifest["shards"][0]["file"]
    s3.fs().pipe_file(f"bkt/store/shards/tiny/{first}", b"not parquet")
    assert verify_shard_set(url) == [first]


def _register_many(store_url: str, prefix: str, count: int) -> None:
    for i in range(count):
        name = f"{prefix}-{i:03d}"

        def add(state, name=name):
            state["versions"][name] = {"psnr": int(name.rsplit("-", 1)[1])}
            best = max(state["versions"], key=lambda v: (state["versions"][v]["psnr"], v))
            state["production"] = best
            return state, None

        update_registry(store_url, add)


def test_racing_threads_lose_no_version_and_readers_always_see_valid_json(s3):
    s3.bucket("bkt")
    url = "s3://bkt/race"
    stop = threading.Event()
    reads, bad = [], []

    def reader():
        fs = Store(url).fs
        while not stop.is_set():
            try:
                raw = fs.cat_file("bkt/race/models/registry.json")
            except FileNotFoundError:
                continue
            reads.append(1)
            try:
                json.loads(raw)
            except ValueError as exc:
                bad.append(str(exc))

    threads = [threading.Thread(target=_register_many, args=(url, f"t{k}", 15)) for k in range(4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    state = read_registry(url)
    assert len(state["versions"]) == 60
    assert state["production"] == max(
        state["versions"], key=lambda v: (state["versions"][v]["psnr"], v)
    )
    assert reads and not bad


def _process_entry(store_url: str, prefix: str, count: int, env: dict) -> None:
    os.environ.update(env)
    _register_many(store_url, prefix, count)


def test_racing_processes_lose_no_version(s3):
    s3.bucket("bkt")
    url = "s3://bkt/race-procs"
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_process_entry, args=(url, f"p{k}", 20, s3.env())) for k in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(read_registry(url)["versions"]) == 60


def test_a_remote_model_file_is_fetched_once_into_the_local_cache(s3, tmp_path, monkeypatch):
    s3.bucket("bkt")
    monkeypatch.setenv("DENOISE_CACHE", str(tmp_path / "cache"))
    s3.fs().pipe_file("bkt/s/models/v1/model.keras", b"weights")
    sha = file_sha256("s3://bkt/s/models/v1/model.keras")
    path = local_copy("s3://bkt/s/models/v1/model.keras", sha)
    assert path.read_bytes() == b"weights" and str(path).startswith(str(tmp_path / "cache"))
    s3.fs().rm("bkt/s/models/v1/model.keras")
    assert (
        local_copy("s3://bkt/s/models/v1/model.keras", sha) == path
    )  # the cached copy, no request


def test_a_missing_bucket_is_one_line(s3):
    with pytest.raises(StoreError, match="s3://no-such-bucket/x: the bucket does not exist"):
        Store.at("s3://no-such-bucket/x").check()


@pytest.mark.parametrize(
    "case",
    ["missing bucket", "no endpoint", "unknown scheme", "no credentials", "wrong credentials"],
)
def test_the_cli_turns_a_bad_store_into_one_line_and_exit_2(s3, tmp_path, case, monkeypatch):
    from tests.faults.harness import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "DENOISE_"))}
    store = "s3://no-such-bucket/store"
    if case == "no endpoint":
        s3.bucket("bkt")
        store = "s3://bkt/store"
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens
        env["AWS_MAX_ATTEMPTS"] = "1"
    if case == "unknown scheme":
        store = "nosuchfs://bucket/store"
    if case == "no credentials":
        s3.bucket("bkt")
        store = "s3://bkt/store"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(key)
        (tmp_path / "home").mkdir()
        env.update(HOME=str(tmp_path / "home"), AWS_EC2_METADATA_DISABLED="true")
    if case == "wrong credentials":
        import moto.settings

        s3.bucket("bkt")
        store = "s3://bkt/store"
        # moto checks signatures against its IAM users from now on: no such key
        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
        env.update(AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG1", AWS_SECRET_ACCESS_KEY="wrong")
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "models", "--store", store],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    expected = {
        "missing bucket": "bucket does not exist",
        "no endpoint": "cannot reach",
        "unknown scheme": "nosuchfs",
        "no credentials": "no AWS credentials",
        "wrong credentials": "access denied; check the AWS credentials",
    }[case]
    assert expected in lines[0], lines[0]
    print(lines[0])
    assert [
        p.name for p in tmp_path.iterdir() if p.name != "home"
    ] == []  # nothing written, no local folder named "s3:"


def _put_version(fs, bucket_path: str, version: str, psnr: float) -> None:
    from tests.test_registry import version_card

    fs.pipe(
        {
            f"{bucket_path}/models/{version}/model.keras": b"weights",
            f"{bucket_path}/models/{version}/model.json": json.dumps(
                version_card(version, psnr)
            ).encode(),
        }
    )


def test_two_trainings_registering_and_a_promote_loop_on_one_bucket(s3):
    """The local store's race tests (tests/test_registry.py), on S3: two
    processes register interleaved versions while a third reads the registry
    as fast as it can; then one registers while another promotes by hand in a loop."""
    from tests.test_registry import race_register_and_promote, race_two_registrars

    s3.bucket("bkt")
    fs, url = s3.fs(), "s3://bkt/shared"
    rng = np.random.default_rng(13)
    psnrs = [float(x) / 100 for x in rng.permutation(np.arange(1500, 2500))[:40]]
    names = [f"20260101-000000-unet-{i:04d}" for i in range(40)]
    for name, psnr in zip(names, psnrs, strict=True):
        _put_version(fs, "bkt/shared", name, psnr)
    race_two_registrars(url, names, psnrs)
    more = [f"20270101-000000-unet-{i:04d}" for i in range(20)]
    for i, name in enumerate(more):
        _put_version(fs, "bkt/shared", name, 20.0 + i / 100)
    state = race_register_and_promote(url, names[:3], more)
    assert sorted(state["versions"]) == sorted(names + more)


def test_a_push_keeps_users_hidden_files_and_drops_only_writers_temporary_files(s3):
    s3.bucket("bkt")
    store = Store.at("s3://bkt/s")
    with store.stage() as stage:
        folder = stage.pull(stage.downloads("mine"))
        (folder / ".thumbs").mkdir()
        (folder / ".thumbs" / "a.png").write_bytes(b"png")
        (folder / ".b.png.abc123-77-beef.part").write_bytes(b"half")
        (folder / ".manifest.json.77.tmp").write_bytes(b"{")
        (folder / "manifest.json").write_text("{}")
        stage.push(folder)
    assert store.sizes("s3://bkt/s/downloads/mine") == {".thumbs/a.png": 3, "manifest.json": 2}


def test_a_rebuilt_set_retracts_its_manifest_before_replacing_shards(s3, monkeypatch):
    s3.bucket("bkt")
    store = Store.at("s3://bkt/s")
    with store.stage() as stage:
        folder = stage.pull(stage.shards_root / "set")
        (folder / "train-00000.parquet").write_bytes(b"old")
        (folder / "manifest.json").write_text('{"v": 1}')
        stage.push(folder, last=("manifest.json",), retract=True)
    events = []
    fs = store.fs
    real_put, real_rm = fs.put_file, fs.rm_file
    monkeypatch.setattr(
        fs,
        "put_file",
        lambda lp, rp, **kw: (
            events.append(("put", rp.rsplit("/", 1)[-1])),
            real_put(lp, rp, **kw),
        ),
    )
    monkeypatch.setattr(
        fs,
        "rm_file",
        lambda rp, **kw: (events.append(("rm", rp.rsplit("/", 1)[-1])), real_rm(rp, **kw)),
    )
    with store.stage() as stage:
        folder = stage.pull("s3://bkt/s/shards/set")
        (folder / "train-00000.parquet").write_bytes(b"new!")
        (folder / "manifest.json").write_text('{"v": 2}')
        stage.push(folder, last=("manifest.json",), retract=True)
    assert events == [
        ("rm", "manifest.json"),
        ("put", "train-00000.parquet"),
        ("put", "manifest.json"),
    ]
    # a manifest rewritten with the same bytes (same content, new mtime) is not uploaded again
    events.clear()
    with store.stage() as stage:
        folder = stage.pull("s3://bkt/s/shards/set")
        (folder / "manifest.json").write_text('{"v": 2}')
        stage.push(folder, last=("manifest.json",), retract=True)
    assert events == []


def test_a_remote_version_without_its_card_is_not_listed(s3):
    from artifacts.registry import list_models
    from artifacts.resolution import resolve_model
    from denoiser.core.errors import ModelError

    s3.bucket("bkt")
    _put_version(s3.fs(), "bkt/s", "20260101-000000-unet-0001", 21.0)
    s3.fs().pipe_file(
        "bkt/s/models/20260101-000000-unet-0002/model.keras", b"weights"
    )  # push cut short
    assert [m.version for m in list_models("s3://bkt/s")] == ["20260101-000000-unet-0001"]
    with pytest.raises(ModelError, match="not found"):
        resolve_model("s3://bkt/s", "20260101-000000-unet-0002")


def test_a_card_that_cannot_be_read_stops_a_registration(s3, monkeypatch):
    import artifacts.registry as registry
    from denoiser.core.errors import ModelError

    s3.bucket("bkt")
    _put_version(s3.fs(), "bkt/s", "20260101-000000-unet-0001", 21.0)
    real = registry.open_read

    def flaky(location):
        if str(location).endswith("model.json"):
            raise ConnectionError("connection reset by peer")
        return real(location)

    monkeypatch.setattr(registry, "open_read", flaky)
    with pytest.raises(ModelError, match="cannot read the model card"):
        registry.register_model("s3://bkt/s", "s3://bkt/s/models/20260101-000000-unet-0001")
    assert not s3.fs().exists("bkt/s/models/registry.json")  # no decision taken on an unread card
