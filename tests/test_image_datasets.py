"""Image-folder datasets: a user's folder built here (sizes, modes, a bad file, a
nested folder), the registered train400 + set12 served over HTTP on 127.0.0.1,
and patch shard sets read back by the shard readers."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from denoiser.config import DataConfig
from denoiser.core.errors import ChecksumError, ConfigError
from denoiser.data import datasets
from denoiser.data.datasets import fetch_dataset
from denoiser.data.image_datasets import (
    build_image_splits,
    dataset_slug,
    load_grey,
    split_by_content,
)
from denoiser.data.shards import (
    iter_batches,
    load_split,
    read_manifest,
    split_image_shape,
    write_shard_set,
)

MIRROR = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
NOISE = {"kind": "awgn", "level": [0.0, 55.0], "density": "uniform", "applied": "in_training"}


def _rng_image(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.add.outer(np.linspace(0, 200, h), np.linspace(0, 50, w))
    return np.clip(base + rng.normal(0, 10, (h, w)), 0, 255).astype(np.uint8)


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    """A folder of 14 images of several sizes and modes, one nested folder, one bad file."""
    folder = tmp_path / "photos"
    (folder / "nested" / "deeper").mkdir(parents=True)
    for i in range(8):
        Image.fromarray(_rng_image(i, 48 + 4 * i, 64 - 2 * i)).save(folder / f"grey_{i}.png")
    rgb = np.stack([_rng_image(20 + c, 60, 52) for c in range(3)], axis=-1)
    Image.fromarray(rgb).save(folder / "colour.jpg", quality=95)
    Image.fromarray(rgb).save(folder / "nested" / "colour.png")
    Image.fromarray(_rng_image(30, 50, 70).astype(np.uint16) * 257).save(folder / "deep16.png")
    Image.fromarray(_rng_image(31, 44, 41)).save(folder / "nested" / "deeper" / "small.tif")
    Image.fromarray(_rng_image(32, 20, 30)).save(
        folder / "nested" / "tiny.png"
    )  # below a 40x40 patch
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))
    }


def test_a_folder_is_a_dataset_and_a_bad_file_is_reported_and_skipped(photos, tmp_path, caplog):
    assert DataConfig(dataset=str(photos)).dataset == str(photos)
    assert DataConfig(dataset=photos.as_uri(), test_dataset="set12").test_dataset == "set12"
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.*train400"):
        DataConfig(dataset="cifar")
    with pytest.raises(ValueError, match="test_dataset applies to image-folder datasets"):
        DataConfig(dataset="mnist", test_dataset="set12")

    cache = tmp_path / "downloads" / dataset_slug(str(photos))
    assert cache.name.startswith("folder-photos-")
    with caplog.at_level("WARNING", logger="denoiser.data.image_datasets"):
        manifest = fetch_dataset(str(photos), None, cache)
    assert (
        manifest["kind"] == "images"
        and manifest["test"] is None
        and manifest["held_out_test"] == 0.1
    )
    assert sorted(manifest["files"]) == sorted(
        [f"grey_{i}.png" for i in range(8)]
        + [
            "colour.jpg",
            "deep16.png",
            "nested/colour.png",
            "nested/deeper/small.tif",
            "nested/tiny.png",
        ]
    )
    assert [(s["name"], s["reason"]) for s in manifest["skipped"]] == [
        ("broken.png", "not an image Pillow can read")
    ]
    assert any(
        r.getMessage() == "broken.png: not an image Pillow can read; skipped"
        for r in caplog.records
    )
    modes = {n: r["mode"] for n, r in manifest["files"].items()}
    assert (
        modes["colour.jpg"] == "RGB"
        and modes["grey_0.png"] == "L"
        and modes["deep16.png"].startswith("I")
    )
    assert (
        manifest["files"]["deep16.png"]["width"],
        manifest["files"]["deep16.png"]["height"],
    ) == (70, 50)

    # grey uint8 from the luma the folder denoiser reads
    np.testing.assert_array_equal(load_grey(cache / "grey_3.png"), _rng_image(3, 60, 58))
    deep = load_grey(cache / "deep16.png")
    assert deep.dtype == np.uint8 and np.abs(deep.astype(int) - _rng_image(30, 50, 70)).max() <= 1

    again = fetch_dataset(str(photos), None, cache)
    assert {r["status"] for r in again["files"].values()} == {"cached"}
    assert [s["name"] for s in again["skipped"]] == ["broken.png"]

    Image.fromarray(_rng_image(99, 48, 64)).save(photos / "grey_0.png")  # the user changes a file
    (photos / "new.png").write_bytes((photos / "grey_1.png").read_bytes())
    third = fetch_dataset(str(photos), None, cache)
    assert sorted(n for n, r in third["files"].items() if r["status"] == "fetched") == [
        "grey_0.png",
        "new.png",
    ]

    (cache / "nested" / "colour.png").write_bytes(b"damaged")
    fourth = fetch_dataset(str(photos), None, cache)
    assert [n for n, r in fourth["files"].items() if r["status"] == "fetched"] == [
        "nested/colour.png"
    ]


def test_nothing_readable_is_fatal_in_one_line(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    with pytest.raises(
        Exception, match=r"no readable image \(first: a.png: empty file \(0 bytes\)\); 1 skipped"
    ):
        fetch_dataset(str(folder), None, tmp_path / "cache")


def test_split_is_by_content_not_by_name_or_position():
    shas = {f"f{i}.png": hashlib.sha256(str(i).encode()).hexdigest() for i in range(200)}
    split = split_by_content(shas, 0.1, 0.1)
    counts = {s: list(split.values()).count(s) for s in ("train", "validation", "test")}
    assert 8 <= counts["test"] <= 35 and 8 <= counts["validation"] <= 35
    renamed = split_by_content({f"x{n}": s for n, s in shas.items()}, 0.1, 0.1)
    assert all(renamed[f"x{n}"] == split[n] for n in shas)
    more = split_by_content({**shas, "extra.png": hashlib.sha256(b"extra").hexdigest()}, 0.1, 0.1)
    assert all(more[n] == split[n] for n in shas)
    small = split_by_content({n: shas[n] for n in list(shas)[:3]}, 0.1, 0.1)
    assert sorted(small.values()) == ["test", "train", "validation"]


def test_patch_shards_are_byte_identical_across_runs_and_readable(photos, tmp_path):
    manifest = fetch_dataset(str(photos), None, tmp_path / "cache")
    runs = []
    for name in ("a", "b"):
        splits, meta = build_image_splits(manifest, 0.2, patch_size=24, patches_per_image=5)
        runs.append(
            write_shard_set(
                tmp_path / name, splits, NOISE, shard_rows=12, seed=7, meta=meta, workers=2
            )
        )
    a, b = runs
    assert digests(a) == digests(b) and len(digests(a)) > 3
    splits, meta = build_image_splits(manifest, 0.2, patch_size=24, patches_per_image=5)
    other = write_shard_set(tmp_path / "c", splits, NOISE, shard_rows=12, seed=8, meta=meta)
    assert digests(other) != digests(a)

    m = read_manifest(a)
    assert (
        m["kind"] == "patches"
        and m["image_shape"] == [24, 24, 1]
        and m["noise"]["applied"] == "in_training"
    )
    assert m["patches_per_image"] == 5 and m["splits"]["train"]["patches_per_image"] == 5
    assert m["skipped"][0]["name"] == "broken.png" and m["too_small"] == ["nested/tiny.png"]
    by_split = {
        s: [e["name"] for e in m["images"] if e["split"] == s]
        for s in ("train", "validation", "test")
    }
    assert all(by_split.values()) and sum(map(len, by_split.values())) == 13
    assert m["splits"]["train"]["rows"] == 5 * (
        len(by_split["train"]) - ("nested/tiny.png" in by_split["train"])
    )
    assert split_image_shape(m, "train") == [24, 24, 1] and split_image_shape(m, "test") is None

    import pyarrow.parquet as pq

    assert pq.read_schema(a / "train-00000.parquet").names == [
        "clean",
        "height",
        "width",
        "index",
        "label",
    ]
    batches = list(iter_batches(a, "train", batch_rows=4))
    assert set(batches[0]) == {"clean"} and batches[0]["clean"].shape == (4, 24, 24, 1)
    train = np.concatenate([b["clean"] for b in batches])
    assert len(train) == m["splits"]["train"]["rows"]
    rows = load_split(a, "train")
    assert set(rows["height"]) == {24} and set(rows["label"]) == {0}
    # each patch is a flip/rotation of a window of its source image
    first = m["images"][int(rows["index"][0])]
    source = load_grey(Path(manifest["dir"]) / first["name"])
    windows = np.lib.stride_tricks.sliding_window_view(source, (24, 24))
    patch = rows["clean"][0, ..., 0]
    orientations = [np.rot90(patch, k) for k in range(4)] + [
        np.rot90(patch[:, ::-1], k) for k in range(4)
    ]
    assert any((windows == o).all(axis=(-1, -2)).any() for o in orientations)

    test = load_split(a, "test")
    assert isinstance(test["clean"], list) and len(test["clean"]) == len(by_split["test"])
    for img, h, w, idx in zip(
        test["clean"], test["height"], test["width"], test["index"], strict=True
    ):
        entry = m["images"][int(idx)]
        assert img.shape == (h, w, 1) == (entry["height"], entry["width"], 1)
        np.testing.assert_array_equal(img[..., 0], load_grey(Path(manifest["dir"]) / entry["name"]))
    streamed = [x for batch in iter_batches(a, "test", batch_rows=2) for x in batch["clean"]]
    assert [x.shape for x in streamed] == [x.shape for x in test["clean"]]


# --------------------------------------------------------------------------- train400 + set12 over HTTP


@pytest.fixture()
def mirror_copy(tmp_path: Path) -> Path:
    if not (MIRROR / "train400" / "SHA256SUMS").exists():
        pytest.fail(f"datasets mirror not found at {MIRROR}")
    root = tmp_path / "mirror"
    for name in ("train400", "set12"):
        shutil.copytree(MIRROR / name, root / name)
    return root


@pytest.fixture()
def served_mirror(mirror_copy):
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(mirror_copy))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", hits, mirror_copy
    server.shutdown()
    server.server_close()


def test_train400_and_set12_from_a_mirror_root_over_http(served_mirror, tmp_path, monkeypatch):
    url, hits, _ = served_mirror
    monkeypatch.setenv(datasets.SOURCE_ENV, url)
    cache = tmp_path / "downloads" / "train400"
    manifest = fetch_dataset("train400", None, cache)
    assert len(manifest["files"]) == 400 and manifest["skipped"] == []
    assert manifest["test"]["dataset"] == "set12" and len(manifest["test"]["files"]) == 12
    assert manifest["files"]["test_001.png"]["source"] == url + "train400/"
    assert {(r["width"], r["height"], r["mode"]) for r in manifest["files"].values()} == {
        (180, 180, "L")
    }
    hits.clear()
    again = fetch_dataset("train400", None, cache)
    assert hits == [] and {
        r["status"] for part in (again, again["test"]) for r in part["files"].values()
    } == {"cached"}


def test_a_tampered_image_is_refused_in_one_line_naming_it(served_mirror, tmp_path):
    url, _, root = served_mirror
    blob = bytearray((root / "set12" / "05.png").read_bytes())
    blob[200] ^= 0xFF
    (root / "set12" / "05.png").write_bytes(bytes(blob))
    with pytest.raises(
        ChecksumError, match=r"^05.png: sha256 [0-9a-f]{64} does not match SHA256SUMS"
    ) as err:
        fetch_dataset("set12", url, tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").glob("05.png*")) and not list(
        (tmp_path / "cache").glob(".*.part")
    )
    # a mirror whose SHA256SUMS agrees with the tampered file is still checked against the registry
    sums = (root / "set12" / "SHA256SUMS").read_text().splitlines()
    digest = hashlib.sha256(bytes(blob)).hexdigest()
    (root / "set12" / "SHA256SUMS").write_text(
        "\n".join(f"{digest}  05.png" if line.endswith("05.png") else line for line in sums) + "\n"
    )
    with pytest.raises(
        ChecksumError, match=r"^05.png: sha256 [0-9a-f]{64} does not match the expected "
    ):
        fetch_dataset("set12", url + "set12/", tmp_path / "cache")


def test_http_folder_needs_sha256sums_and_one_mirror_root_serves_mnist(served_mirror, tmp_path):
    url, _, root = served_mirror
    (root / "set12" / "SHA256SUMS").unlink()
    with pytest.raises(
        ConfigError, match=r"set12/: a folder of images served over HTTP needs a SHA256SUMS"
    ):
        fetch_dataset(url + "set12/", None, tmp_path / "cache")
    user = fetch_dataset(
        url + "train400", None, tmp_path / "user"
    )  # a user's folder over HTTP, with sums
    assert len(user["files"]) == 400 and user["dataset"].startswith("folder-train400-")
    assert json.loads((tmp_path / "user" / "manifest.json").read_text())["complete"] is True

    # the mirror root of ../shared/datasets serves MNIST as well (its folder per dataset)
    manifest = fetch_dataset("mnist", str(MIRROR), tmp_path / "mnist")
    assert (
        Path(manifest["files"]["train_images"]["source"]).resolve() == (MIRROR / "mnist").resolve()
    )


# --------------------------------------------------------------------------- tasks


def test_mnist_shard_folders_keep_their_keys(tmp_path):
    from denoiser.config import NoiseConfig
    from denoiser.data.datasets import DATASETS, ROLES
    from tasks.corrupt import shard_dir_for

    mnist = {
        "dataset": "mnist",
        "files": {r: {"payload_sha256": DATASETS["mnist"].files[r].payload_sha256} for r in ROLES},
    }
    # the keys of the shard sets written before image datasets existed
    assert (
        Path(shard_dir_for(mnist, NoiseConfig(), str(tmp_path), None, None)).name
        == "mnist-175005f1530951ef"
    )
    assert (
        Path(shard_dir_for(mnist, NoiseConfig(), str(tmp_path), 300, 50)).name
        == "mnist-2d006cda525220f2"
    )
    speckle = NoiseConfig(kind="speckle", level=(0.1, 0.5), copies=2)
    assert (
        Path(shard_dir_for(mnist, speckle, str(tmp_path), None, None)).name
        == "mnist-e16653f589112ed5"
    )


def test_download_and_patch_tasks_on_a_folder(prefect_harness, photos, tmp_path):
    from prefect import flow

    from denoiser.request import default_noise_for
    from tasks.corrupt import shard_dir_for, write_noisy_shards
    from tasks.download import download_dataset

    data = DataConfig(dataset=str(photos), test_dataset=str(photos / "nested"))
    noise = default_noise_for(data).model_copy(update={"patch_size": 24, "patches_per_image": 3})
    store = str(tmp_path / "store")

    @flow
    def prepare() -> list[tuple[str, object]]:
        """Each task's state name and value."""
        fetched = download_dataset(data, store, return_state=True)
        written = write_noisy_shards(fetched.result(), noise, store, return_state=True)
        return [(state.name, state.result()) for state in (fetched, written)]

    (fetched, dataset), (written, out) = prepare()
    assert (fetched, written) == ("Completed", "Completed")
    (fetched, again), (written, same) = prepare()  # found in the store and verified: reused
    assert (fetched, written, same) == ("Cached", "Cached", out)
    assert {r["status"] for part in (again, again["test"]) for r in part["files"].values()} == {
        "cached"
    }
    manifest = read_manifest(out)
    assert manifest["kind"] == "patches" and manifest["noise"] == {
        "kind": "awgn",
        "level": [0.0, 55.0],
        "density": "uniform",
        "applied": "in_training",
    }
    assert manifest["test_dataset"] == str(photos / "nested") and manifest["held_out_test"] is None
    assert (
        manifest["splits"]["test"]["images"] == 3
    )  # the nested folder's images, tiny one included
    assert {e["split"] for e in manifest["images"] if e["source"] == "test"} == {"test"}
    assert Path(out).name.startswith(dataset["dataset"] + "-")
    bigger = noise.model_copy(update={"patch_size": 32})
    assert shard_dir_for(dataset, bigger, store, None, None) != Path(out)

    Image.fromarray(_rng_image(77, 50, 50)).save(photos / "added.png")  # the user's folder changes
    (fetched, changed), (written, other) = prepare()
    assert (fetched, written) == ("Completed", "Completed") and other != out
    assert [n for n, r in changed["files"].items() if r["status"] != "cached"] == ["added.png"]


def test_bsd432_is_cbsd432s_files_read_in_grey_and_tested_on_set12(tmp_path):
    """A registered entry may take another's files (``images_of``): bsd432
    fetches CBSD432's files from its mirror folder, checked against its sums,
    and cuts grey patches (their luma) for a grey photo model."""
    from denoiser.core.catalog import IMAGE_DATASETS
    from denoiser.domains import domain_for_dataset

    if not (MIRROR / "cbsd432" / "SHA256SUMS").exists():
        pytest.fail(f"datasets mirror not found at {MIRROR}")
    grey, colour = IMAGE_DATASETS["bsd432"], IMAGE_DATASETS["cbsd432"]
    assert grey.files() == colour.files() and grey.origin == colour.origin
    assert domain_for_dataset("bsd432").name == "photos" and grey.test == "set12"
    manifest = fetch_dataset("bsd432", str(MIRROR), tmp_path / "cache")
    assert len(manifest["files"]) == 432 and manifest["skipped"] == []
    assert manifest["test"]["dataset"] == "set12" and len(manifest["test"]["files"]) == 12
    assert {r["source"] for r in manifest["files"].values()} == {str(MIRROR / "cbsd432")}
    assert {r["sha256"] for r in manifest["files"].values()} == set(colour.files().values())
    splits, meta = build_image_splits(manifest, 0.1, 32, 2, train_limit=4)
    picked = splits["train"].images
    first = np.asarray(picked[0])
    assert first.ndim == 2 and np.array_equal(first, load_grey(picked.paths[0]))
    assert np.asarray(Image.open(picked.paths[0])).ndim == 3  # the file itself is RGB
