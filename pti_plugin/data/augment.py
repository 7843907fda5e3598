"""Image augmentations of one training sample (kohya's ``flip_aug``, ``color_aug``, ``random_crop``).

:func:`draw_augmentation` takes every random number from the sample's generator (seeded by seed,
stage, step, slot) in a fixed block, so what a sample gets does not depend on which options are
on elsewhere; :func:`augmented_pixels` applies it. Order as kohya: resize to cover the bucket and
crop (centred, or at a random place with ``random_crop``), colour, then flip.

- ``flip_aug``: horizontal flip with probability 1/2.
- ``color_aug`` (kohya's hue jitter): with probability 0.33, either a hue shift uniform in ±8
  OpenCV hue units (±16°) or a gamma uniform in [0.95, 1.05], one or the other with probability
  1/2. The gamma acts on values normalised to [0, 1] (kohya raises the raw 0–255 values to the
  power, which mostly saturates or darkens the image; that is not reproduced).
- ``random_crop``: the crop window of the resize-to-cover is placed uniformly at random instead of
  centred (with or without buckets; kohya without buckets crops the unresized image instead).
- ``face_crop_aug_range`` (an image whose name gives a face box, no buckets): kohya's face crop replaces the
  resize-to-cover and its crop (``face_crop.py``); a random one takes :data:`face_crop.FACE_DRAWS` more numbers
  after the block, and ``random_crop`` then moves the face crop (kohya's style-training jitter).
- ``resize_interpolation``: the filter of the resize (``buckets.resample_filter``; unset: Lanczos).

Colour, crop and a random face crop change the pixels at every draw, so they cannot use cached latents (refused
at start-up with ``cache_latents``, as kohya does for the first two); a flip-only sample can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .buckets import fit_to_bucket
from .face_crop import FACE_DRAWS, is_random, item_face_box
from .images import read_image

HUE_SHIFT_LIMIT = 8.0  # OpenCV hue units (2 degrees each), as kohya
COLOR_AUG_PROBABILITY = 0.33
GAMMA_RANGE = (0.95, 1.05)


@dataclass(frozen=True)
class Augmentation:
    """What one draw does to the image: flip, crop placement (fractions of the slack), hue, gamma, and the uniform
    numbers of a random face crop (``face_crop.face_crop_box``)."""

    flip: bool = False
    crop: tuple[float, float] | None = None
    hue_shift: float = 0.0
    gamma: float = 1.0
    face: tuple[float, ...] | None = None

    @property
    def cacheable(self) -> bool:
        """Whether the latent cache (image and its flip) can serve this draw."""
        return self.crop is None and self.hue_shift == 0.0 and self.gamma == 1.0 and self.face is None

    def describe(self) -> str:
        parts = ["flip"] if self.flip else []
        if self.crop is not None:
            parts.append(f"crop@{self.crop[0]:.2f},{self.crop[1]:.2f}")
        if self.hue_shift:
            parts.append(f"hue{self.hue_shift:+.1f}")
        if self.gamma != 1.0:
            parts.append(f"gamma{self.gamma:.3f}")
        if self.face is not None:
            parts.append("face@" + ",".join(f"{u:.2f}" for u in self.face))
        return " ".join(parts) or "-"


def draw_augmentation(item: Any, generator: torch.Generator) -> Augmentation:
    """The augmentation of one draw of ``item``; always takes 6 numbers from ``generator`` (the flip first), and
    :data:`FACE_DRAWS` more for an image whose face crop is random (``face_crop.is_random``)."""
    u = torch.rand(6, generator=generator).tolist()
    flip = bool(item.flip_aug and u[0] < 0.5)
    face_crop = getattr(item, "face_box", None) is not None  # the face crop places the crop itself
    crop = (u[1], u[2]) if getattr(item, "random_crop", False) and not face_crop else None
    face = tuple(torch.rand(FACE_DRAWS, generator=generator).tolist()) if face_crop and is_random(item) else None
    hue, gamma = 0.0, 1.0
    if getattr(item, "color_aug", False) and u[3] <= COLOR_AUG_PROBABILITY:
        if u[4] > 0.5:
            hue = (2.0 * u[5] - 1.0) * HUE_SHIFT_LIMIT
        else:
            gamma = GAMMA_RANGE[0] + (GAMMA_RANGE[1] - GAMMA_RANGE[0]) * u[5]
    return Augmentation(flip, crop, hue, gamma, face)


def adjust_color(array: np.ndarray, hue_shift: float, gamma: float) -> np.ndarray:
    """uint8 [H, W, 3]: hue rotated by ``hue_shift`` OpenCV units, then gamma on [0, 1] values."""
    if hue_shift:
        image = Image.fromarray(np.ascontiguousarray(array)).convert("HSV")
        hsv = np.asarray(image).astype(np.int32)
        hsv[..., 0] = np.round(hsv[..., 0] + hue_shift * 256.0 / 180.0).astype(np.int32) % 256
        image = Image.frombytes("HSV", image.size, hsv.astype(np.uint8).tobytes())
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if gamma != 1.0:
        array = np.clip(np.round(255.0 * (array / 255.0) ** gamma), 0, 255).astype(np.uint8)
    return array


def augmented_pixels(item: Any, augmentation: Augmentation, image: Image.Image | None = None) -> torch.Tensor:
    """``item``'s image (``image`` when given: it as :func:`read_image` reads it) fitted to its bucket with
    ``augmentation`` applied: float32 [3, H, W] in [-1, 1]."""
    image = read_image(item.path) if image is None else image
    array = fit_to_bucket(image, item.bucket, augmentation.crop, getattr(item, "resize_interpolation", None),
                          item_face_box(item, image.size, augmentation.face))
    if augmentation.hue_shift or augmentation.gamma != 1.0:
        array = adjust_color(array, augmentation.hue_shift, augmentation.gamma)
    if augmentation.flip:
        array = array[:, ::-1]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
