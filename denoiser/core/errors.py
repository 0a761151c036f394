"""Specific exceptions, so callers (the CLI above all) can turn any failure into
one clear line and an exit code instead of a traceback."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its class name when it
    has none: what one-line reports of foreign errors quote."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class DenoiseError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = 1


class ConfigError(DenoiseError, ValueError):
    """A parameter is invalid; raised before any work starts. ``field``: the
    config field at fault (``noise.kind``), for a caller that names it in its
    own words (the CLI adds its flag)."""

    exit_code = 2

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field


class DownloadError(DenoiseError):
    """A file could not be fetched (HTTP error, missing mirror file, network)."""


class ChecksumError(DownloadError):
    """A fetched file does not match its expected checksum."""


class IDXFormatError(DenoiseError):
    """An IDX file is malformed (magic, dimensions, size, counts)."""


class ShardError(DenoiseError):
    """A Parquet shard set is missing, incomplete or inconsistent."""


class ModelError(DenoiseError):
    """A model cannot be built, loaded or found."""


class ModelNotFound(ModelError, ConfigError):
    """The model asked for (a version, folder or file) does not exist: a usage error."""

    exit_code = 2


class ModelMismatch(ModelError, ConfigError):
    """A model that loads but cannot denoise these images (channels, output
    shape): refused before any image is read, a usage error."""

    exit_code = 2


class ImageError(DenoiseError):
    """An image cannot be read, decoded or written."""


def look_up(table: Mapping[str, T], name: str, what: str, error: type[DenoiseError]) -> T:
    """``table[name]``; else ``error`` in one line naming the unknown ``what``
    and the known names (sorted), for the registries of names (datasets,
    architectures)."""
    try:
        return table[name]
    except KeyError:
        raise error(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}") from None
