"""Reading training images defensively: one RGB image or a reason to reject the file.

Treatment (documented in the README, "When things go wrong"):
- EXIF orientation is applied; greyscale, CMYK and 16-bit images are converted to 8-bit RGB;
  transparent images (RGBA, LA, palette with transparency) are composited on white;
- rejected, with the reason: unreadable/truncated/not-an-image files (0-byte files, text named
  ``.png``, broken symlinks and loops), special files (named pipes, sockets, devices: never opened,
  so a pipe cannot block the scan), images over PIL's decompression-bomb limit, and images whose
  shorter side is below ``MIN_SIDE`` pixels.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MIN_SIDE = 8


class ImageRejected(ValueError):
    """The file cannot be used as a training image; the message says why."""


def read_image(path: Path) -> Image.Image:
    """The image at ``path`` as an 8-bit RGB PIL image (orientation applied), or ImageRejected.

    Only regular files (or symlinks to them) are opened: a named pipe, socket or device with an
    image extension is rejected without being opened (opening a pipe would block forever).
    """
    return _to_rgb(open_oriented(path))


def open_oriented(path: Path) -> Image.Image:
    """The image at ``path`` as PIL loads it (any mode, alpha kept), EXIF orientation applied, or ImageRejected
    (the checks of :func:`read_image`)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ImageRejected(f"not a readable image ({exc.strerror})") from exc
    if not stat.S_ISREG(mode):
        raise ImageRejected(f"not a regular file ({_file_kind(mode)}); only image files are read")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"over PIL's decompression-bomb limit ({exc})") from exc
    except Exception as exc:  # PIL raises many types for unreadable files
        raise ImageRejected(f"not a readable image ({type(exc).__name__}: {exc})") from exc
    if min(image.size) < MIN_SIDE:
        raise ImageRejected(f"too small ({image.width}x{image.height}; the shorter side must be >= {MIN_SIDE} px)")
    return image


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")]
    return next((name for test, name in kinds if test(mode)), "a special file")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
