"""Reading images of any kind users keep into planes for the model, and
writing the result back in the image's own mode, depth and format.

A decoded image is its luminance (BT.601 Y) and, for colour images, its
chroma (Cb, Cr offsets): a grey model denoises the luminance of a grey image;
colour images are given to a model as RGB (:func:`rgb_pixels`) and written
back from RGB (:func:`rebuild_rgb_image`). Alpha is carried through
untouched, 16-bit stays 16-bit, EXIF orientation is applied so the output is
upright.
"""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from denoiser.core.errors import ImageError
from denoiser.core.faults import failpoint
from denoiser.core.files import host_tag

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
_FORMAT_BY_SUFFIX = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".gif": "GIF",
}


@dataclass
class LoadedImage:
    """One decoded image: the plane to denoise plus what is needed to rebuild it."""

    mode: str
    size: tuple[int, int]  # (width, height)
    format: str | None
    luma: np.ndarray  # float32 (H, W) in [0, 1]
    chroma: np.ndarray | None = None  # float32 (H, W, 2): Cb, Cr offsets, for colour images
    alpha: np.ndarray | None = None  # the original alpha plane, untouched
    palette_image: object | None = None  # for "P" images: the original, to reuse its palette
    max_value: int = 255


# RGB -> Y (BT.601), B - Y and R - Y: one matrix product per pixel
_TO_YCC = np.array(
    [[0.299, 0.587, 0.114], [-0.299, -0.587, 0.886], [0.701, -0.587, -0.114]], np.float32
).T
# (Cb, Cr) offsets -> what they add to R, G and B (Y is added to each)
_FROM_CHROMA = np.array([[0.0, -0.114 / 0.587, 1.0], [1.0, -0.299 / 0.587, 0.0]], np.float32)


def _rgb_to_ycc(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Y, (Cb, Cr) offsets) of (H, W, 3) RGB: one matrix product per pixel."""
    ycc = np.matmul(np.asarray(rgb, np.float32), _TO_YCC)
    return ycc[..., 0], ycc[..., 1:]


def _ycc_to_rgb(y: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_rgb_to_ycc`: (H, W, 3) RGB."""
    return np.matmul(np.asarray(chroma, np.float32), _FROM_CHROMA) + np.asarray(y)[..., None]


def rgb_pixels(loaded: LoadedImage) -> np.ndarray:
    """The image as (H, W, 3) float32 RGB in [0, 1] (a grey image repeated in
    each channel), for colour models and colour metrics."""
    if loaded.chroma is None:
        return np.repeat(loaded.luma[..., None], 3, axis=-1)
    return _ycc_to_rgb(loaded.luma, loaded.chroma).astype(np.float32)


COLOUR_CHROMA = 0.01  # mean |Cb|, |Cr| above this (about 2.5 levels of 8 bits): not a grey image


def is_colour(loaded: LoadedImage) -> bool:
    """Whether an image holds colour: a grey image saved as RGB (chroma about 0) does not."""
    return chroma_share(loaded) > COLOUR_CHROMA


def chroma_share(loaded: LoadedImage) -> float:
    """Mean absolute chroma (Cb and Cr offsets, [0, 1] units): about 0 for a
    grey image stored as RGB, larger for a colour photograph."""
    if loaded.chroma is None:
        return 0.0
    return float(np.mean(np.abs(loaded.chroma)))


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Decode one file; every failure is an ImageError naming what is wrong."""
    return decode_image(read_bytes(path))


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes, read once (to hash them and decode them from memory); an
    ImageError if they cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise read_error(exc) from None


def read_error(exc: OSError) -> ImageError:
    """Why a file could not be read, as the report says it."""
    if isinstance(exc, PermissionError):
        return ImageError("permission denied")
    if isinstance(exc, IsADirectoryError):
        return ImageError("not a regular file")
    return ImageError(f"cannot read: {exc.strerror or exc}")


def image_pixels(data: bytes) -> int:
    """How many pixels an encoded image holds, from its header alone (a PNG's
    IHDR, else Pillow's lazy open); 0 when the header cannot tell (the decode
    then says why)."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        w, h = struct.unpack(">II", data[16:24])
        return w * h
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Exception:  # noqa: BLE001 - not an image Pillow knows: decoding reports it
        return 0
    return w * h


def decode_image(data: bytes) -> LoadedImage:
    """Decode an encoded image held in memory; every failure is an ImageError.
    Images over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)
    are refused before decoding. Small 8-bit grey PNGs are decoded without
    Pillow (:func:`small_grey_pixels`), to the same pixels."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    from PIL import Image

    pixels = small_grey_pixels(data)
    if pixels is not None and not (Image.MAX_IMAGE_PIXELS and pixels.size > Image.MAX_IMAGE_PIXELS):
        h, w = pixels.shape
        return LoadedImage("L", (w, h), "PNG", pixels.astype(np.float32) / 255.0)
    return decode_with_pillow(data)


def decode_with_pillow(data: bytes) -> LoadedImage:
    """:func:`decode_image` by Pillow, for every kind of image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    try:
        if not data:
            raise ImageError("empty file (0 bytes)")
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            w, h = img.size
            if limit and w * h > limit:
                raise ImageError(
                    f"{w}x{h} image is over the decompression-bomb limit of {limit:,} pixels"
                )
            img.seek(0)  # GIF and multi-page TIFF: the first frame
            img.load()
            if img.getexif().get(0x0112, 1) != 1:  # only images that carry a rotation
                img = ImageOps.exif_transpose(img) or img
            return _to_planes(img, fmt)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"over the decompression-bomb limit ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc) or type(exc).__name__
        raise ImageError(f"cannot decode: {text}") from None


def _to_planes(img, fmt: str | None) -> LoadedImage:
    mode = img.mode
    size = img.size
    if mode in ("L", "1"):
        arr = np.asarray(img if mode == "L" else img.convert("L"), dtype=np.float32) / 255.0
        return LoadedImage(mode, size, fmt, arr)
    if mode == "LA":
        arr = np.asarray(img, dtype=np.float32)
        return LoadedImage(
            mode, size, fmt, arr[..., 0] / 255.0, alpha=np.asarray(img)[..., 1].copy()
        )
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.float32) / 65535.0
        return LoadedImage(mode, size, fmt, arr, max_value=65535)
    if mode == "I":  # 16-bit PNGs often open as 32-bit "I" holding 0..65535
        raw = np.asarray(img)
        top = 65535 if raw.max(initial=0) > 255 or fmt == "PNG" else 255
        return LoadedImage(
            mode, size, fmt, np.clip(raw, 0, top).astype(np.float32) / top, max_value=top
        )
    if mode == "F":
        raw = np.asarray(img, dtype=np.float32)
        return LoadedImage(mode, size, fmt, np.clip(raw, 0, 1), max_value=1)
    if mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        alpha = None
        palette_image = None
        if mode == "P":
            palette_image = img.copy()
            if "transparency" in img.info:
                rgba = img.convert("RGBA")
                alpha = np.asarray(rgba)[..., 3].copy()
                rgb = np.asarray(rgba)[..., :3]
            else:
                rgb = np.asarray(img.convert("RGB"))
        elif mode in ("RGBA", "PA"):
            rgba = np.asarray(img.convert("RGBA"))
            rgb, alpha = rgba[..., :3], rgba[..., 3].copy()
        else:
            rgb = np.asarray(img.convert("RGB"))
        y, chroma = _rgb_to_ycc(rgb.astype(np.float32) / 255.0)
        return LoadedImage(
            mode, size, fmt, y.astype(np.float32), chroma.astype(np.float32), alpha, palette_image
        )
    raise ImageError(f"unsupported image mode {mode!r}")


def rebuild_image(loaded: LoadedImage, luma: np.ndarray):
    """A PIL image in the input's mode from the denoised luminance."""
    from PIL import Image

    luma = np.clip(np.asarray(luma, dtype=np.float32), 0.0, 1.0)
    mode = loaded.mode
    if mode in ("L", "1"):
        img = Image.fromarray(np.rint(luma * 255).astype(np.uint8))
        return img.convert("1") if mode == "1" else img
    if mode == "LA":
        return Image.merge(
            "LA",
            [Image.fromarray(np.rint(luma * 255).astype(np.uint8)), Image.fromarray(loaded.alpha)],
        )
    if mode.startswith("I;16"):
        return Image.fromarray(np.rint(luma * 65535).astype(np.uint16))  # mode I;16
    if mode == "I":
        return Image.fromarray(np.rint(luma * loaded.max_value).astype(np.int32))
    if mode == "F":
        return Image.fromarray(luma.astype(np.float32))
    return _rebuild_colour(loaded, _ycc_to_rgb(luma, loaded.chroma))


def rebuild_rgb_image(loaded: LoadedImage, rgb: np.ndarray):
    """A PIL image in the input's mode from denoised (H, W, 3) RGB, alpha and
    palette kept as :func:`rebuild_image` keeps them (a grey input gets the
    mean of the channels, in its own depth)."""
    rgb = np.asarray(rgb, dtype=np.float32)
    if loaded.chroma is None:
        return rebuild_image(loaded, rgb.mean(axis=-1))
    return _rebuild_colour(loaded, rgb)


def _rebuild_colour(loaded: LoadedImage, rgb: np.ndarray):
    """A colour image's PIL image in its own mode from (H, W, 3) RGB in [0, 1]."""
    from PIL import Image

    mode = loaded.mode
    rgb8 = np.rint(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)
    if mode == "P":
        if loaded.alpha is not None:  # a transparent palette image: octree keeps the alpha
            rgba = Image.fromarray(np.dstack([rgb8, loaded.alpha]))
            return rgba.quantize(method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        return Image.fromarray(rgb8).quantize(
            palette=loaded.palette_image, dither=Image.Dither.NONE
        )
    if loaded.alpha is not None:
        rgba = Image.fromarray(np.dstack([rgb8, loaded.alpha]))
        return rgba if mode == "RGBA" else rgba.convert(mode)
    img = Image.fromarray(rgb8)
    return img if mode == "RGB" else img.convert(mode)


def encode_rgb_output(loaded: LoadedImage, rgb: np.ndarray, fmt: str) -> bytes:
    """The image denoised as (H, W, 3) RGB, in the input's mode, encoded as ``fmt``."""
    return encode_image(rebuild_rgb_image(loaded, rgb), fmt)


def encode_output(loaded: LoadedImage, luma: np.ndarray, fmt: str) -> bytes:
    """The denoised image, in the input's mode, encoded as ``fmt``: what
    :func:`rebuild_image` then :func:`encode_image` give, without Pillow for
    small grey PNGs."""
    if loaded.mode == "L" and fmt == "PNG" and luma.size <= SMALL_PNG_PIXELS:
        clipped = np.minimum(np.maximum(np.asarray(luma, dtype=np.float32), 0.0), 1.0)
        return small_grey_png(np.rint(clipped * 255).astype(np.uint8))
    return encode_image(rebuild_image(loaded, luma), fmt)


def output_format(source: str | os.PathLike, loaded_format: str | None, fmt: str) -> str:
    """The format an output is written in: PNG for ``fmt`` png, else the input's."""
    if fmt == "png":
        return "PNG"
    return loaded_format or _FORMAT_BY_SUFFIX.get(Path(source).suffix.lower(), "PNG")


SMALL_PNG_PIXELS = 128 * 128  # up to this size Pillow's fixed cost per PNG dominates
#: zlib level of the PNGs written above that size: the default's size within a
#: few percent in a third of its time (README.md: photographs on AMX)
PNG_LEVEL = 4


def encode_image(img, fmt: str) -> bytes:
    """Encoded bytes; JPEG/WebP at high quality since the point is fidelity.
    Small 8-bit grey PNGs are written directly (:func:`small_grey_png`)."""
    if fmt == "PNG" and img.mode == "L" and img.width * img.height <= SMALL_PNG_PIXELS:
        return small_grey_png(np.asarray(img))
    buf = io.BytesIO()
    options = {
        "JPEG": {"quality": 95},
        "WEBP": {"quality": 95},
        "PNG": {"optimize": False, "compress_level": PNG_LEVEL},
        "TIFF": {"compression": "tiff_deflate"},
    }.get(fmt, {})
    if fmt == "JPEG" and img.mode not in ("L", "RGB", "CMYK"):
        img = img.convert("RGB")
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = _png_chunk(b"IEND", b"")


def small_grey_png(pixels: np.ndarray) -> bytes:
    """An 8-bit grey PNG of ``pixels`` (uint8, H x W), unfiltered rows in one
    zlib stream: for small images a fifth of what Pillow's encoder costs (it
    sets up a compressor per image); any PNG reader gets the same pixels."""
    h, w = pixels.shape
    rows = np.zeros((h, w + 1), np.uint8)  # each row: filter type 0, then its pixels
    rows[:, 1:] = pixels
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _PNG_END
    )


# chunks before the pixels that change nothing in what Pillow decodes (no
# orientation, transparency, palette or animation)
_INERT_CHUNKS = frozenset((b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"tIME"))
SLOW_FILTER_PIXELS = 64  # pixels in Average or Paeth rows unfiltered here; more: Pillow is faster


def small_grey_pixels(data: bytes) -> np.ndarray | None:
    """The pixels (uint8, H x W) of a PNG that is 8-bit grey, not interlaced,
    at most SMALL_PNG_PIXELS, and holds nothing but its pixels (and the
    chunks in ``_INERT_CHUNKS``), decoded with zlib alone: Pillow's fixed cost
    per image is most of the decoding time of small images. None for any
    other image, and for anything unusual in this one (a bad checksum, a
    truncated or overlong stream, trailing bytes, many Average or Paeth
    rows): Pillow then decodes it, or says what is wrong with it."""
    size = len(data)
    if size < 57 or data[:8] != _PNG_SIGNATURE or data[8:16] != b"\x00\x00\x00\rIHDR":
        return None
    w, h, depth, colour, method, filtering, interlace, crc = struct.unpack_from(
        ">IIBBBBBI", data, 16
    )
    if (depth, colour, method, filtering, interlace) != (8, 0, 0, 0, 0):
        return None
    if not (0 < w and 0 < h and w * h <= SMALL_PNG_PIXELS):
        return None
    if zlib.crc32(data[12:29]) != crc:
        return None
    idat: list[bytes] = []
    pos = 33
    while True:
        if pos + 12 > size:
            return None
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > size or zlib.crc32(data[pos + 4 : end - 4]) != int.from_bytes(
            data[end - 4 : end], "big"
        ):
            return None
        if kind == b"IDAT":
            idat.append(data[pos + 8 : end - 4])
        elif kind == b"IEND" and idat and end == size:
            break
        elif idat or kind not in _INERT_CHUNKS:  # after the pixels only their end
            return None
        pos = end
    stride = w + 1  # a filter type byte, then the row
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(b"".join(idat), h * stride + 1)
    except zlib.error:
        return None
    if len(raw) != h * stride or not inflater.eof or inflater.unused_data:
        return None
    pixels = np.frombuffer(raw, np.uint8).reshape(h, stride)[:, 1:].copy()
    filters = raw[::stride]  # each row's filter type
    if filters.count(0) != h:
        if max(filters) > 4 or (filters.count(3) + filters.count(4)) * w > SLOW_FILTER_PIXELS:
            return None
        _unfilter(pixels, filters)
    return pixels


def _unfilter(pixels: np.ndarray, filters: bytes) -> None:
    """Undo the PNG filters of the rows of ``pixels`` (one byte per pixel), top to bottom."""
    up = np.zeros(pixels.shape[1], np.uint8)  # the row above the first
    for y, kind in enumerate(filters):
        row = pixels[y]
        if kind == 1:  # Sub: the running sum along the row, modulo 256
            np.cumsum(row, dtype=np.uint8, out=row)
        elif kind == 2:  # Up
            row += up
        elif kind == 3:
            row[:] = _average_row(row, up)
        elif kind == 4:
            row[:] = _paeth_row(row, up)
        up = row


def _average_row(row: np.ndarray, up: np.ndarray) -> list[int]:
    """A row under the Average filter, given the row above it, unfiltered."""
    out = []
    left = 0
    for f, b in zip(row.tolist(), up.tolist(), strict=True):
        left = (f + ((left + b) >> 1)) & 255
        out.append(left)
    return out


def _paeth_row(row: np.ndarray, up: np.ndarray) -> list[int]:
    """A row under the Paeth filter, given the row above it, unfiltered."""
    out = []
    a = c = 0  # left and upper left, 0 before the first pixel
    for f, b in zip(row.tolist(), up.tolist(), strict=True):
        pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - c - c)
        a = (f + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out.append(a)
        c = b
    return out


TEMP_SUFFIX = ".denoise.part"
NAME_MAX = 255  # bytes in one file name, on every common Linux file system
_TEMP_NAME = re.compile(
    rb"\.(?P<name>.*)\.(?P<host>[0-9a-f]{6})-(?P<pid>[0-9]{1,10})-[0-9a-f]{8}"
    + re.escape(TEMP_SUFFIX.encode()),
    re.DOTALL,
)


def _cut_utf8(raw: bytes, limit: int) -> bytes:
    """``raw`` cut to at most ``limit`` bytes, never inside a UTF-8 character."""
    if len(raw) <= limit:
        return raw
    end = limit
    while end > 0 and raw[end] & 0xC0 == 0x80:  # raw[end] continues the character before it
        end -= 1
    return raw[:end]


def temp_path(path: str | os.PathLike, pid: int | None = None, host: str | None = None) -> Path:
    """A unique temporary name beside ``path`` that is recognisably ours and says
    which process made it: ``.{name}.{host}-{pid}-{random}.denoise.part``, with
    the name cut so the whole stays within NAME_MAX bytes."""
    return Path(_temp_file(os.fspath(path), pid, host))


def _temp_file(path: str, pid: int | None = None, host: str | None = None) -> str:
    """:func:`temp_path` as a string."""
    folder, name = os.path.split(path)
    token = f"{host or host_tag()}-{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}"
    tail = f".{token}{TEMP_SUFFIX}".encode()
    name = os.fsdecode(b"." + _cut_utf8(os.fsencode(name), NAME_MAX - 1 - len(tail)) + tail)
    return os.path.join(folder, name)


def temp_owner(name: str | bytes) -> tuple[str, int] | None:
    """(host tag, pid) of a temporary file made by :func:`temp_path`, None for any other name."""
    match = _TEMP_NAME.fullmatch(os.fsencode(name))
    return (match["host"].decode(), int(match["pid"])) if match else None


def write_atomic(path: str | os.PathLike, data: bytes, sync: bool = True) -> None:
    """Write ``data`` to a temporary name beside ``path`` (see :func:`temp_path`),
    flush it to disk (unless ``sync`` is False: then the caller makes a batch
    durable at once), then rename: never a half-written file under the final name.
    A missing folder is made."""
    path = os.fspath(path)
    tmp = _temp_file(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(tmp, flags, 0o666)
    except (FileNotFoundError, NotADirectoryError):  # no folder yet (or a file in its place)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(tmp, flags, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        failpoint("folder.before_rename")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
