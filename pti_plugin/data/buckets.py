"""Aspect-ratio buckets (kohya's scheme) and the resize-and-crop that fits an image to one."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .dataset_keys import RESIZE_INTERPOLATIONS


def make_buckets(
    max_area: int, min_reso: int, max_reso: int, step: int
) -> list[tuple[int, int]]:
    """Bucket sizes (width, height), multiples of ``step``, with area <= ``max_area``: kohya's square bucket (the
    largest square side, at least ``step``) and every width in [``min_reso``, ``max_reso``] with its tallest height
    in that range, both ways round. The square bucket is there whatever the range, so the list is never empty."""
    side = max(step, math.isqrt(max_area) // step * step)
    buckets = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def choose_bucket(
    size: tuple[int, int], buckets: list[tuple[int, int]], no_upscale: bool, max_area: int, step: int
) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``size``'s (width, height).

    With ``no_upscale``, an image smaller than ``max_area`` gets its own bucket: its size rounded
    down to ``step`` multiples.
    """
    width, height = size
    if no_upscale and width * height <= max_area:
        return max(step, width // step * step), max(step, height // step * step)
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def crop_box(image_size: tuple[int, int], bucket: tuple[int, int], crop: tuple[float, float] | None = None) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top): how an image of ``image_size`` (w, h) is resized to cover
    ``bucket`` (w, h) and where the bucket-sized window is cut from it.

    The crop is centred, or with ``crop = (fx, fy)`` (uniform numbers in [0, 1), ``random_crop``)
    placed at ``floor(f * (slack + 1))`` pixels, each offset equally likely.
    """
    (width, height), (target_w, target_h) = image_size, bucket
    scale = max(target_w / width, target_h / height)
    new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    if crop is None:
        return new_w, new_h, (new_w - target_w) // 2, (new_h - target_h) // 2
    left = min(int(crop[0] * (new_w - target_w + 1)), new_w - target_w)
    top = min(int(crop[1] * (new_h - target_h + 1)), new_h - target_h)
    return new_w, new_h, left, top


def resample_filter(interpolation: str | None) -> Image.Resampling:
    """The PIL filter of a ``resize_interpolation`` name (``dataset_keys.RESIZE_INTERPOLATIONS``); unset: Lanczos."""
    return Image.Resampling[RESIZE_INTERPOLATIONS[interpolation or "lanczos"]]


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int], crop: tuple[float, float] | None = None,
                  interpolation: str | None = None, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Resize ``image`` to cover ``bucket`` and crop it (see :func:`crop_box`; ``box``: another such box, a face
    crop's) with the ``interpolation`` filter (:func:`resample_filter`): uint8 array [H, W, 3]."""
    new_w, new_h, left, top = box or crop_box(image.size, bucket, crop)
    target_w, target_h = bucket
    resized = image.convert("RGB").resize((new_w, new_h), resample_filter(interpolation))
    return np.asarray(resized.crop((left, top, left + target_w, top + target_h)), dtype=np.uint8)


def size_conditioning(image_size: tuple[int, int], bucket: tuple[int, int], crop: tuple[float, float] | None = None) -> tuple[int, ...]:
    """SDXL's six size numbers for one sample, as kohya computes them: ``original_size`` (h, w) of the image
    file, ``crops_coords_top_left`` (top, left) of the bucket window in the resized image, ``target_size``
    (h, w) of the bucket. An unknown ``image_size`` ((0, 0)) counts as the bucket itself."""
    if image_size[0] <= 0 or image_size[1] <= 0:
        image_size = bucket
    _, _, left, top = crop_box(image_size, bucket, crop)
    return (image_size[1], image_size[0], top, left, bucket[1], bucket[0])
