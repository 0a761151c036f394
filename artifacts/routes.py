"""Which model of the store denoises the images of each domain in a folder
run: the production model of the domain itself; else a model of a domain
whose images it can take with a channel adaptation (colour photographs
through the grey photo model channel by channel, grey photographs through
the colour model); else whatever :func:`~artifacts.resolution.resolve_model`
gives (the overall production model, warned about); a store without any
model is its one-line error. :func:`domain_mismatch` says which model to use
instead when a model learned another domain than the images'.
"""

from __future__ import annotations

import os

from artifacts.builtin import builtin_model
from artifacts.registry import ModelRef, production_model
from artifacts.resolution import resolve_model
from denoiser.core.errors import ModelError
from denoiser.domains import DOMAINS, RECOGNITION_ORDER

#: the domains a folder's images go to (each domain's ``folder_domain``), the most particular first
FOLDER_DOMAINS = tuple(dict.fromkeys(d.folder_domain for d in RECOGNITION_ORDER))


def models_by_domain(store_root: str | os.PathLike, model: str | None = None) -> dict:
    """domain -> the :class:`ModelRef` that denoises its images; with
    ``model`` (a version, folder or file) that one for every domain."""
    if model is not None:
        ref = resolve_model(store_root, model)
        return dict.fromkeys(FOLDER_DOMAINS, ref)
    own: dict[str, ModelRef] = {}
    anything: ModelRef | None = None  # what resolve_model gives when a domain has no model
    error: ModelError | None = None
    for domain in FOLDER_DOMAINS:
        try:
            ref = resolve_model(store_root, None, domain)
        except ModelError as exc:  # no model for this domain (or none at all)
            error = exc
            continue
        anything = anything or ref
        if ref.domain == domain:
            own[domain] = ref
    if anything is None:
        raise error or ModelError(f"no trained model in {store_root}")
    return {d: _own_or_fallback(d, own, anything) for d in FOLDER_DOMAINS}


def _own_or_fallback(domain: str, own: dict[str, ModelRef], anything: ModelRef) -> ModelRef:
    if domain in own:
        return own[domain]
    return next((own[f] for f in DOMAINS[domain].fallbacks if f in own), anything)


def one_pass_warnings(routes: dict[str, dict], domains) -> list[str]:
    """For a run asked to self-ensemble: one line naming the models of the
    folder's images (their summaries in ``routes``) that run one pass, whose
    domain's images have an up (digits)."""
    one_pass = sorted(
        {routes[d]["version"] for d in domains or () if not routes[d]["self_ensemble"]}
    )
    if not one_pass:
        return []
    return [
        f"--self-ensemble: model {', '.join(one_pass)} learned images with an up "
        "(digits); it runs one pass"
    ]


def route_warnings(store_root, routes: dict, domains) -> list[str]:
    """One line per domain of the folder's images whose model learned
    images it cannot take as they are meant (digits for photographs, or the
    reverse); a model of one of the domain's fallbacks (the other photo
    domain's) is not warned about."""
    lines = []
    for domain in sorted(domains or ()):
        ref = routes.get(domain)
        if ref is None or (domain in DOMAINS and DOMAINS[domain].takes_model_of(ref.domain)):
            continue
        line = domain_mismatch(store_root, ref, domain)
        if line and line not in lines:
            lines.append(line)
    return lines


def primary_domain(domains) -> str | None:
    """The domain whose model the report names first: the most particular of
    the folder's (colour photographs, then grey ones, then digits)."""
    return next((d for d in FOLDER_DOMAINS if d in (domains or ())), None)


def domain_mismatch(
    store_root: str | os.PathLike | None, ref: ModelRef, images_domain: str | None
) -> str | None:
    """One line when ``ref`` learned another domain than the images': which
    model to use instead (the production model of the images' domain, or how
    to train one); None when they match or the images' domain is unknown."""
    if images_domain not in DOMAINS or ref.domain == images_domain:
        return None
    try:
        better = production_model(store_root, images_domain)
    except ModelError:
        better = None
    if better is not None and better.domain != images_domain:
        better = None
    if better is None:
        try:
            better = builtin_model(images_domain)
        except ModelError:
            better = None
    advice = (
        f"use {better.version}, the {better.status} model for {images_domain} (--model {better.version})"
        if better is not None
        else DOMAINS[images_domain].train_hint
    )
    return (
        f"model {ref.version} was trained on {DOMAINS[ref.domain].words} but these images look "
        f"like {DOMAINS[images_domain].words}; {advice}"
    )
