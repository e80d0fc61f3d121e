"""Still images: decode any common format to a BGR uint8 array, orientation applied.

Pillow reads the file, with only the decoders of the image formats fer-batch accepts
(``discover.IMAGE_FORMATS``: JPEG, PNG, BMP/DIB, WebP, TIFF, GIF, PPM/PGM/PBM, TGA, JPEG 2000,
AVIF), never one picked from the file's content alone; EXIF orientation is applied; gray, palette, alpha (composited on
black), 16-bit, float and CMYK images are converted to 8-bit BGR. Images above
``MAX_IMAGE_PIXELS`` are refused from their header alone, before any pixel is allocated.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fer_batch.errors import DecodeError
from fer_batch.io.discover import IMAGE_FORMATS

log = logging.getLogger(__name__)

# Decompression-bomb guard. A decoded image needs 3 bytes per pixel, and conversion makes one
# or two copies: 100 MP is ~300 MB per copy. Raising the limit admits larger photos (medium
# format cameras reach 100-150 MP) at the cost of peak memory; lowering it protects small
# workers. Pillow's own guard (2 x 89 MP) would only stop larger files.
MAX_IMAGE_PIXELS = 100_000_000

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _rgb_to_bgr(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> contiguous BGR (numpy: no OpenCV in a process that only discovers)."""
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _gray_to_bgr(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def allowed_formats() -> tuple[str, ...]:
    """The Pillow formats images are opened with (those of ``IMAGE_FORMATS`` that this Pillow
    has: AVIF needs Pillow >= 11.3 built with libavif)."""
    Image.init()
    return tuple(sorted({f for fs in IMAGE_FORMATS.values() for f in fs} & set(Image.OPEN)))


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    path = Path(path)
    with _open(path) as im:
        w, h = im.size
        if _exif_orientation(im) in (5, 6, 7, 8):
            w, h = h, w
    return int(w), int(h)


def read_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 BGR array, EXIF orientation applied.

    Multi-frame files (animated GIF/WebP, multi-page TIFF) give their first frame.

    Raises:
        DecodeError: ``"<path>: <reason>"`` when the file is missing, unreadable, not an
            image, truncated, or larger than ``max_pixels`` (checked before decoding).
    """
    path = Path(path)
    with _open(path) as im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise DecodeError(f"{path}: image header gives an empty size {w}x{h}")
        if w * h > max_pixels:
            raise DecodeError(
                f"{path}: image is {w}x{h} ({w * h / 1e6:.0f} MP), above the {max_pixels / 1e6:.0f} MP limit "
                "(decompression-bomb guard); not decoded"
            )
        try:
            im.load()
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise DecodeError(f"{path}: truncated or corrupt image data ({e})") from e
        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception as e:  # broken EXIF must not lose a readable image
            log.warning("%s: ignoring unreadable EXIF orientation (%s)", path, e)
            oriented = im
        try:
            return to_bgr(oriented if oriented is not None else im)
        except (OSError, ValueError) as e:
            raise DecodeError(f"{path}: cannot convert image mode {im.mode!r} to BGR ({e})") from e


def to_bgr(im: Image.Image) -> np.ndarray:
    """A Pillow image of any mode as an (H, W, 3) uint8 BGR array.

    Alpha is composited on black (transparent areas become black, so no face is invented
    there); 16-bit and 32-bit integer gray are scaled from 0..65535; float images in 0..1 are
    scaled to 0..255, others clipped; CMYK, YCbCr, LAB, HSV, palette and 1-bit go through
    Pillow's RGB conversion.
    """
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(im.convert("RGBA"))
        alpha = rgba[:, :, 3:4].astype(np.uint16)
        rgb = ((rgba[:, :, :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
        return _rgb_to_bgr(rgb)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if arr.ndim == 3:  # e.g. a 16-bit multi-channel mode; keep the first channel
            arr = arr[:, :, 0]
        arr = arr.astype(np.int64)
        if mode == "I" and arr.max(initial=0) <= 255:
            gray = np.clip(arr, 0, 255).astype(np.uint8)
        else:
            gray = ((np.clip(arr, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return _gray_to_bgr(gray)
    if mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return _gray_to_bgr(gray)
    if mode == "L":
        return _gray_to_bgr(np.asarray(im))
    rgb = np.asarray(im if mode == "RGB" else im.convert("RGB"))
    return _rgb_to_bgr(rgb)


def check_nonempty_file(path: Path) -> int:
    """The file's size; DecodeError naming the file when it is missing, unstatable or empty."""
    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise DecodeError(f"{path}: no such file") from e
    except OSError as e:
        raise DecodeError(f"{path}: cannot stat file ({e.strerror or e})") from e
    if size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes)")
    return size


def _open(path: Path) -> Image.Image:
    """``Image.open`` with typed, readable errors (reads the header only)."""
    check_nonempty_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path, formats=allowed_formats())
    except Image.DecompressionBombError as e:
        raise DecodeError(f"{path}: image too large ({e}); decompression-bomb guard, not decoded") from e
    except UnidentifiedImageError as e:
        raise DecodeError(
            f"{path}: not an image in a format fer-batch reads ({', '.join(allowed_formats())}); "
            "its content is another format or damaged"
        ) from e
    except PermissionError as e:
        raise DecodeError(f"{path}: permission denied") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DecodeError(f"{path}: cannot read image header ({e})") from e


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block: treat as upright
        return 1
