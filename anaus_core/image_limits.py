"""Declared image sizes are checked before anything is decoded.

A PNG states its width and height in its first 24 bytes; a 12000 x 12000 PNG compresses to a
few kilobytes but decodes to 144 MB (and an RGB one, or a bigger claim, to gigabytes). Every
decoder of untrusted images in the toolkit reads the declared size first and refuses what is
above the limit, so memory is bounded by the limit, not by what a file claims.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import numpy as np

from anaus_core.errors import UserInputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SIDE = 16384
MAX_PIXELS = 100_000_000


class ImageTooLargeError(UserInputError):
    """An image declares more pixels than the toolkit decodes."""


def png_declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None when ``data`` is not a PNG."""
    if len(data) < 24 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", data, 16)
    return int(width), int(height)


def check_declared_size(width: int, height: int, *, what: str = "image", max_side: int = MAX_SIDE,
                        max_pixels: int = MAX_PIXELS) -> None:
    """Raise ``ImageTooLargeError`` when a declared size is above the limits."""
    if width > max_side or height > max_side or width * height > max_pixels:
        raise ImageTooLargeError(f"{what} declares {width}x{height} pixels, above the limit "
                                 f"({max_side} px per side, {max_pixels // 1_000_000} Mpx); not decoded")


def read_bounded_image(path: str | Path, *, mode: str = "L", max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image file after checking its declared size; a missing, corrupt or oversized
    file is a one-line ``UserInputError`` naming it."""
    from PIL import Image

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as handle:
                width, height = handle.size  # header only: nothing decoded yet
                check_declared_size(width, height, what=str(path), max_side=max_side, max_pixels=max_pixels)
                return np.asarray(handle.convert(mode))
    except UserInputError:
        raise
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserInputError(f"{path}: cannot be decoded as an image ({reason})") from None
