"""kohya's ``face_crop_aug_range``: a crop of the image around the face its file name gives.

kohya (``library/train_util.py``: ``load_image_with_face_info``, ``crop_target``) reads the face's centre and size
from the image's file name, ``<anything>_<cx>_<cy>_<w>_<h>.<ext>`` (pixels of the image file), and, for a dataset
without buckets, crops the image around it instead of resizing the whole image:

- the image is scaled down (never up) by a factor drawn uniformly between the smallest that keeps the crop inside
  the image and faces of ``1 / hi`` and ``1 / lo`` of the crop's shorter side (``[lo, hi]``: the shorter side is lo
  to hi times the face's size); a fixed factor when ``lo == hi``;
- the crop is centred on the face, then, per axis (height first), moved by ``r1 + r2 - range`` pixels
  (``random_crop``; ``r1, r2`` uniform whole numbers in ``[0, range]``, ``range`` the larger distance from the face
  to the image's edges) or, when ``lo < hi`` and the face is over a tenth of the shorter side and at least 40 px, by
  a whole number in ``[(-face) // 20, face // 20]``; then kept inside the image.

Every random number is one of :data:`FACE_DRAWS` uniform numbers of the sample's generator (``augment.py``); an image
whose crop is fixed (``lo == hi`` without ``random_crop``) takes none, so its latent can be cached. An image exactly
the crop's size is used as it is (kohya's shortcut); one smaller than it on a side is refused at start-up (kohya
fails on it: the crop never upscales). A name with fewer than five ``_``-separated parts, or a centre ``cx`` of 0,
names no face: that image takes the usual resize and centre crop, as kohya's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The uniform numbers one random face crop takes: the scale, then two per axis (height, then width).
FACE_DRAWS = 5


def face_name_parts(path: Path) -> tuple[str, list[str]] | None:
    """kohya's reading of a face-box file name: ``(the name before the box, the box's four parts)`` when ``path``'s
    name has five or more ``_``-separated parts, else None. The caption falls back to the first's (kohya's
    ``read_caption``), the face crop reads the second (:func:`face_box_of`)."""
    parts = path.stem.split("_")
    return ("_".join(parts[:-4]), parts[-4:]) if len(parts) >= 5 else None


def face_box_of(path: Path) -> tuple[int, int, int, int] | None:
    """The face box ``(cx, cy, w, h)`` kohya reads from ``path``'s name, or None when the name gives none (fewer
    than five ``_``-separated parts, or ``cx`` <= 0). ValueError when the last four parts are not whole numbers
    (kohya fails on such a name) or the face has no size."""
    named = face_name_parts(path)
    if named is None:
        return None
    parts = named[1]
    try:
        cx, cy, w, h = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"its name ends in {'_'.join(parts)!r}, not the face box _cx_cy_w_h (whole numbers) that "
                         "face_crop_aug_range reads from a name of five or more '_'-separated parts") from None
    if cx <= 0:
        return None
    if max(w, h) <= 0:
        raise ValueError(f"its name's face box {cx}_{cy}_{w}_{h} has no size (w and h are 0)")
    return cx, cy, w, h


def is_random(item: Any) -> bool:
    """Whether ``item``'s face crop changes from draw to draw (``random_crop``, or a range with lo < hi)."""
    lo, hi = item.face_crop_aug_range
    return bool(item.random_crop) or lo != hi


def _randint(u: float, low: int, high: int) -> int:
    """A whole number uniform in ``[low, high]`` from the uniform number ``u`` in [0, 1)."""
    return low + min(int(u * (high - low + 1)), high - low)


def face_crop_box(size: tuple[int, int], target: tuple[int, int], face: tuple[int, int, int, int],
                  aug_range: tuple[float, float], random_crop: bool,
                  draws: tuple[float, ...] | None = None) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of kohya's face crop of an image of ``size`` (w, h) to ``target``
    (w, h), as :func:`buckets.crop_box` gives them. ``draws``: the :data:`FACE_DRAWS` uniform numbers of a random
    crop; None: the crop without its random parts (the smallest scale, centred on the face)."""
    (width, height), (target_w, target_h) = size, target
    if (width, height) == (target_w, target_h):
        return width, height, 0, 0
    cx, cy, face_w, face_h = face
    lo, hi = aug_range
    face_size, short = max(face_w, face_h), min(target_w, target_h)
    min_scale = min(1.0, max(target_h / height, target_w / width, short / (face_size * hi)))
    max_scale = min(1.0, max(min_scale, short / (face_size * lo)))
    scale = min_scale if min_scale >= max_scale or draws is None else min_scale + (max_scale - min_scale) * draws[0]
    new_w, new_h = int(width * scale + 0.5), int(height * scale + 0.5)
    if new_w < target_w or new_h < target_h:
        raise ValueError(f"a {width}x{height} image is smaller than the crop {target_w}x{target_h}")
    offsets = []
    for axis, (length, crop, centre) in enumerate(((new_h, target_h, int(cy * scale + 0.5)),
                                                   (new_w, target_w, int(cx * scale + 0.5)))):
        start = centre - crop // 2
        if draws is not None:
            first, second = draws[1 + 2 * axis], draws[2 + 2 * axis]
            if random_crop:
                reach = max(length - centre, centre)
                start += _randint(first, 0, reach) + _randint(second, 0, reach) - reach
            elif lo != hi and face_size > short // 10 and face_size >= 40:
                start += _randint(first, -face_size // 20, face_size // 20)
        offsets.append(max(0, min(start, length - crop)))
    return new_w, new_h, offsets[1], offsets[0]


def item_face_box(item: Any, size: tuple[int, int], draws: tuple[float, ...] | None) -> tuple[int, int, int, int] | None:
    """The crop box (:func:`face_crop_box`) of ``item``'s image of ``size`` for one draw, or None for an item without
    a face crop (the usual resize-to-cover and crop)."""
    if getattr(item, "face_box", None) is None:
        return None
    return face_crop_box(size, item.bucket, item.face_box, item.face_crop_aug_range, item.random_crop, draws)
