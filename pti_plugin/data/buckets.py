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


def bucket_range(min_reso: int, max_reso: int, step: int) -> tuple[int, int]:
    """kohya's bucket range (``adjust_min_max_bucket_reso_by_steps``): ``min_bucket_reso`` rounded down and
    ``max_bucket_reso`` up to multiples of ``bucket_reso_steps``, so every bucket side is one."""
    return min_reso - min_reso % step, max_reso + (-max_reso) % step


def choose_bucket(
    size: tuple[int, int], buckets: list[tuple[int, int]], no_upscale: bool, max_area: int, step: int
) -> tuple[int, int]:
    """kohya's bucket of an image of ``size`` (width, height) (``BucketManager.select_bucket``).

    Without ``no_upscale``: the bucket of the image's own size when there is one, else the first of ``buckets``
    (sorted) whose width / height is nearest the image's. With ``no_upscale``: the image's size, or the size that
    scales it down to ``max_area`` (kohya's rounding), each side rounded down to a multiple of ``step`` — a side
    may round to 0 (an image side under ``step``), which the caller refuses (kohya fails on it).
    """
    width, height = size
    if no_upscale:
        return _no_upscale_bucket(width, height, max_area, step)
    if (width, height) in buckets:
        return width, height
    aspect = width / height
    return min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))  # min: the first of equal errors, as kohya's argmin


def _no_upscale_bucket(width: int, height: int, max_area: int, step: int) -> tuple[int, int]:
    if width * height > max_area:  # scaled down to the area; the side rounded to steps that keeps the aspect best
        aspect = width / height
        scaled_w = math.sqrt(max_area * aspect)
        by_w, by_h = _to_step(scaled_w, step), _to_step(max_area / scaled_w, step)
        h_of_w, w_of_h = _to_step(by_w / aspect, step), _to_step(by_h * aspect, step)
        error_w = abs(by_w / h_of_w - aspect) if h_of_w else math.inf
        error_h = abs(w_of_h / by_h - aspect) if by_h else math.inf
        width, height = (by_w, int(by_w / aspect + 0.5)) if error_w < error_h else (int(by_h * aspect + 0.5), by_h)
    return width - width % step, height - height % step


def _to_step(value: float, step: int) -> int:
    rounded = int(value + 0.5)
    return rounded - rounded % step


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


def size_conditioning(image_size: tuple[int, int], bucket: tuple[int, int], flip: bool = False) -> tuple[int, ...]:
    """SDXL's six size numbers for one sample, as kohya computes them (``BucketManager.get_crop_ltrb`` and the
    dataset's ``__getitem__``): ``original_size`` (h, w) of the image file, ``crops_coords_top_left`` (top, left)
    and ``target_size`` (h, w) of the bucket. An unknown ``image_size`` ((0, 0)) counts as the bucket itself.

    kohya's crop numbers are not the offset of the bucket window in the resized image (:func:`crop_box`) but the
    margins, whole pixels rounded down, of the image fitted *inside* the bucket and centred there (0 on the axis the
    fitted image fills). They do not follow ``random_crop``'s window
    (kohya: centred numbers whatever the crop); with ``flip`` the left number is the bucket width less the fitted
    image's right edge (kohya's mirror of the left margin).
    """
    if image_size[0] <= 0 or image_size[1] <= 0:
        image_size = bucket
    (width, height), (bucket_w, bucket_h) = image_size, bucket
    aspect = width / height
    if bucket_w / bucket_h > aspect:  # the bucket is wider: the image fills its height
        fitted_w, fitted_h = bucket_h * aspect, bucket_h
    else:
        fitted_w, fitted_h = bucket_w, bucket_w / aspect
    left, top = (bucket_w - fitted_w) // 2, (bucket_h - fitted_h) // 2
    if flip:
        left = bucket_w - (left + fitted_w)
    return (height, width, int(top), int(left), bucket_h, bucket_w)
