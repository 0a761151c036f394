"""The domains: digits, grey photographs, colour photographs. Adding one is a
module defining a :class:`~denoiser.domains.base.Domain` plus its line in
:data:`DOMAINS` (and its datasets' ``domain`` in the catalog,
:mod:`denoiser.data.image_datasets`).

May import: ``denoiser.core``, ``denoiser.imaging``, ``denoiser.nets``,
``denoiser.config``, ``denoiser.data``, ``denoiser.folder``, ``denoiser.runtimes`` (and
itself).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from fnmatch import fnmatch

from denoiser.core.errors import ConfigError, DenoiseError
from denoiser.data.datasets import is_image_dataset
from denoiser.data.image_datasets import IMAGE_DATASETS
from denoiser.domains.base import Domain, Judged
from denoiser.domains.colour_photos import COLOUR_PHOTOS
from denoiser.domains.digits import DIGITS
from denoiser.domains.grey_photos import GREY_PHOTOS
from denoiser.folder import NOT_REGULAR, list_files
from denoiser.folder.routing import Denoiser, Router
from denoiser.folder.trees import open_tree
from denoiser.imaging.images import IMAGE_SUFFIXES, LoadedImage, decode_image

__all__ = [
    "DOMAINS",
    "Domain",
    "Judged",
    "by_domain",
    "domain_for_dataset",
    "domain_named",
    "domain_of_manifest",
    "image_domain",
    "survey_folder",
]

DOMAINS: dict[str, Domain] = {d.name: d for d in (DIGITS, GREY_PHOTOS, COLOUR_PHOTOS)}
#: the order images are tried in: the most particular domain first, digits last (any image)
RECOGNITION_ORDER = (COLOUR_PHOTOS, GREY_PHOTOS, DIGITS)


def domain_named(name: str) -> Domain:
    """The registered domain called ``name``; a one-line ConfigError otherwise."""
    if name not in DOMAINS:
        raise ConfigError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}")
    return DOMAINS[name]


def domain_for_dataset(name: str) -> Domain:
    """The domain a dataset's models learn: the catalog's word for a
    registered folder of images, grey photographs for a user's folder, digits
    for an IDX dataset."""
    if not is_image_dataset(name):
        return DIGITS
    spec = IMAGE_DATASETS.get(name)
    return domain_named(spec.domain) if spec is not None else GREY_PHOTOS


def domain_of_manifest(manifest: dict) -> Domain:
    """The domain a shard set (or a dataset manifest) teaches: the one it
    records, else a patch set's grey photographs or an IDX set's digits (sets
    written before domains were recorded)."""
    named = manifest.get("domain")
    if named in DOMAINS:
        return DOMAINS[named]
    return GREY_PHOTOS if manifest.get("kind") in ("patches", "images") else DIGITS


def image_domain(image: LoadedImage) -> str:
    """The name of the first domain (most particular first) that recognises ``image``."""
    return next(d.name for d in RECOGNITION_ORDER if d.recognises(image))


def survey_folder(folder, pattern: str = "*", sample: int = 16) -> frozenset[str] | None:
    """What a folder run needs to know before it loads models: the domains
    whose models its images go to (each recognised domain's
    ``folder_domain``; a local folder or an object-storage prefix), judged on
    the first ``sample`` of them (by path) that decode. None when the folder
    cannot be read; an image of a domain the sample missed gets its model
    when it is reached."""
    try:
        tree = open_tree(folder, "input", must_exist=True)
        files = list_files(tree)
    except (DenoiseError, OSError):
        return None
    domains: set[str] = set()
    judged = 0
    for rel in sorted(files):
        name = rel.rsplit("/", 1)[-1]
        suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if files[rel] == NOT_REGULAR or suffix not in IMAGE_SUFFIXES or not fnmatch(name, pattern):
            continue
        if judged >= sample:
            break
        try:
            image = decode_image(tree.read(tree.path(rel)))
        except (DenoiseError, OSError):
            continue
        judged += 1
        domains.add(DOMAINS[image_domain(image)].folder_domain)
    return frozenset(domains)


def by_domain(load: Callable[[str], Denoiser]) -> Router:
    """Each image through the model of its domain (:func:`image_domain`,
    then the domain's ``folder_domain``): ``load(domain)`` gives it, called
    once per domain (from any reader thread; its errors reach the image's
    verdict, and the next image of the domain tries again)."""
    loaded: dict[str, Denoiser] = {}
    lock = threading.Lock()

    def pick(image: LoadedImage) -> Denoiser:
        domain = DOMAINS[image_domain(image)].folder_domain
        with lock:
            if domain not in loaded:
                loaded[domain] = load(domain)
            return loaded[domain]

    return Router(pick)
