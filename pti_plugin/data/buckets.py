"""Aspect-ratio buckets (kohya's scheme) and the resize-and-crop that fits an image to one."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def make_buckets(
    max_area: int, min_reso: int, max_reso: int, step: int
) -> list[tuple[int, int]]:
    """Bucket sizes (width, height), multiples of ``step``, with area <= ``max_area``."""
    buckets = set()
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


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
    """Resize ``image`` to cover ``bucket`` and centre-crop it: uint8 array [H, W, 3]."""
    target_w, target_h = bucket
    scale = max(target_w / image.width, target_h / image.height)
    new_w, new_h = max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale))
    resized = image.convert("RGB").resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    return np.asarray(resized.crop((left, top, left + target_w, top + target_h)), dtype=np.uint8)
