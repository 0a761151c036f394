"""The registered datasets and how a dataset's name is read: IDX datasets
(:data:`DATASETS`: MNIST, Fashion-MNIST) and folders of images
(:data:`IMAGE_DATASETS`: train400, set12, cbsd432, cset9), a folder of one's
own (a path or URL), and the patch defaults of image datasets. What the
configs check a name against, without importing the fetchers. The datasets
themselves are data: ``datasets.toml`` beside this module, and each image
dataset's checksums in ``sums/NAME.sha256``.

A leaf of the library: imports only errors (the CLI's start-up reads it).
"""

from __future__ import annotations

import os
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from denoiser.core.errors import ConfigError, look_up


def parse_sha256sums(text: str) -> dict[str, str]:
    """``sha256sum`` output as {name: sha256}; names may hold spaces and folders."""
    sums = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1].strip().lstrip("*")] = parts[0].lower()
    return sums


@dataclass(frozen=True)
class FileSpec:
    filename: str
    md5: str | None = None  # of the origin's .gz file
    payload_sha256: str | None = None  # of the decompressed IDX bytes (canonical)
    payload_bytes: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    origin: str
    files: dict[str, FileSpec]
    image_shape: tuple[int, int, int] = (28, 28, 1)
    classes: tuple[str, ...] = field(default_factory=lambda: tuple(str(i) for i in range(10)))


_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
#: the registered datasets, declared as data beside this module
CATALOG_FILE = Path(__file__).with_name("datasets.toml")
SUMS_DIR = Path(__file__).with_name("sums")  # an image dataset's ``sha256sum`` lines: NAME.sha256


def _idx_spec(name: str, entry: dict) -> DatasetSpec:
    files = {
        role: FileSpec(
            facts.get("filename", _IDX_NAMES[role]),
            facts.get("md5"),
            facts.get("payload_sha256"),
            facts.get("payload_bytes"),
        )
        for role, facts in entry["files"].items()
    }
    extra = {"classes": tuple(entry["classes"])} if "classes" in entry else {}
    return DatasetSpec(name=name, origin=entry["origin"], files=files, **extra)


def _image_spec(name: str, entry: dict, images: dict[str, dict]) -> ImageDatasetSpec:
    """An image dataset's entry; one with ``images_of`` takes that entry's
    files (origin, checksums, mirror folder) and reads them as its own domain."""
    entry = dict(entry)
    files_name = entry.pop("images_of", name)
    if files_name != name:
        entry = {"origin": images[files_name]["origin"], **entry}
    return ImageDatasetSpec(
        name=name, files_name=files_name, sums_file=SUMS_DIR / f"{files_name}.sha256", **entry
    )


def _read_catalog() -> tuple[dict[str, DatasetSpec], dict[str, ImageDatasetSpec]]:
    with CATALOG_FILE.open("rb") as f:
        catalog = tomllib.load(f)
    images = catalog.get("images", {})
    return (
        {name: _idx_spec(name, entry) for name, entry in catalog.get("idx", {}).items()},
        {name: _image_spec(name, entry, images) for name, entry in images.items()},
    )


def get_dataset(name: str) -> DatasetSpec:
    return look_up(DATASETS, name, "dataset", ConfigError)


def is_idx_dataset(name: str) -> bool:
    """Whether ``name`` is a registered IDX dataset: its files hold its own
    test images, so a test dataset does not apply to it, nor can it be one."""
    return name in DATASETS


def is_image_dataset(name: str) -> bool:
    """Whether ``name`` is a folder of images (a registered one or a path/URL)
    rather than an IDX dataset: the two are prepared and trained differently."""
    return name not in DATASETS and (name in IMAGE_DATASETS or is_location(name))


def check_dataset_name(name: str) -> str:
    """``name`` if it is a registered dataset or a folder path/URL; a one-line
    ValueError listing the registered names otherwise."""
    if name in DATASETS or name in IMAGE_DATASETS or is_location(name):
        return name
    known = ", ".join(sorted([*DATASETS, *IMAGE_DATASETS]))
    raise ValueError(
        f"unknown dataset {name!r}; known: {known}; or a folder of images "
        "(a path, file:// or http(s):// URL)"
    )


def test_dataset_of(name: str, given: str | None = None) -> str | None:
    """The images a folder-of-images dataset ``name`` is tested on: ``given``
    (a registered name or a folder), else the registered dataset's own test
    set; None for a folder of one's own (a held-out share of it is the test
    split then). A one-line ConfigError names an unknown test dataset."""
    spec = IMAGE_DATASETS.get(name)
    test_name = given or (spec.test if spec else None)
    if test_name is not None and test_name not in IMAGE_DATASETS and not is_location(test_name):
        raise ConfigError(
            f"unknown test dataset {test_name!r}; known: {', '.join(sorted(IMAGE_DATASETS))}; "
            "or a folder of images (a path, file:// or http(s):// URL)"
        )
    return test_name


DEFAULT_PATCH_SIZE = 40  # the literature's (DnCNN) training patch
DEFAULT_PATCHES_PER_IMAGE = 64
HELD_OUT_TEST_SHARE = 0.1  # of a user's folder, when no test dataset is given
SUMS_NAME = "SHA256SUMS"


@dataclass(frozen=True)
class ImageDatasetSpec:
    """A registered folder of images: where it comes from, what it holds."""

    name: str
    origin: str
    sums_file: Path  # ``sha256sum`` lines: the canonical checksums, read when fetching
    files_name: str  # whose files these are (the mirror's folder): its own name, or images_of
    test: str | None = None  # the registered dataset to test on
    description: str = ""
    domain: str = "photos"  # the domain (denoiser.domains) a model trained on it learns

    def files(self) -> dict[str, str]:
        return parse_sha256sums(self.sums_file.read_text(encoding="utf-8"))


DATASETS, IMAGE_DATASETS = _read_catalog()


def is_location(name: str) -> bool:
    """Whether ``name`` names a folder of images rather than a registered dataset."""
    scheme = urllib.parse.urlparse(name).scheme
    if scheme in ("http", "https", "file"):
        return True
    if scheme and len(scheme) > 1:
        return False
    return "/" in name or os.sep in name or name.startswith(("~", ".")) or Path(name).is_dir()
