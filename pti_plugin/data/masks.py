"""Loss masks (kohya's masked loss): a weight in [0, 1] per pixel of a training image, which follows the image
through its bucket resize, crop and flip, is downsampled to the latent's size as kohya does, and multiplies the
main loss per element before the per-sample mean (``diffusion_loss.apply_loss_mask``).

Two sources, as kohya sd-scripts:

- ``alpha_mask`` (a subset key, or the top-level default of every subset): the image's alpha channel / 255. An
  image without one gets an all-ones mask (kohya's ``load_image(path, alpha=True)`` converts it to RGBA, alpha
  255); a warning names such images, and images transparent everywhere. The pixels the VAE encodes are the image
  composited on white, with or without ``alpha_mask`` (``images.py``; kohya keeps the raw RGB under the alpha).
- ``masked_loss = true`` with a subset's ``conditioning_data_dir``: the file of the same stem there (any image
  extension), its red channel / 255 (kohya's ``apply_masked_loss`` reads channel 0 of the conditioning image and
  maps it from [-1, 1] back to [0, 1]). It must have its image's size (EXIF orientation applied to both); a missing
  mask, a mask with no image and two masks for one image are refused at start, naming the key and the file.

A mask is resized with the image's own crop box (:func:`buckets.crop_box`, or the face crop's, 8-bit as the image),
so ``random_crop``, the bucket crop and ``face_crop_aug_range`` cut the mask where they cut the image (kohya crops an
alpha mask with its image; it centres the conditioning image whatever the crop), and flipped with it. Its filter
(:func:`mask_filter`) is kohya's: an alpha mask takes its image's ``resize_interpolation`` (kohya resizes the RGBA
image, then takes its alpha); a mask file takes its dataset's
(``Subset.mask_interpolation``: kohya's ControlNet-style dataset resizes the conditioning image with the dataset's
filter, not a subset's own); unset, Lanczos either way. ``latents.py`` turns it into the latent-sized mask the loss
uses (and caches it with the latents).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import ConfigError, first_of
from .augment import augmented_pixels
from .buckets import crop_box, resample_filter
from .dataset import IMAGE_EXTENSIONS, ImageItem, Subset, image_files
from .face_crop import item_face_box
from .images import ImageRejected, _to_rgb, open_oriented, read_image

logger = logging.getLogger(__name__)


def has_mask(item: Any) -> bool:
    """Whether ``item``'s loss is masked (``alpha_mask``, or a mask file of ``conditioning_data_dir``)."""
    return bool(getattr(item, "alpha_mask", False)) or getattr(item, "mask_path", None) is not None


def alpha_channel(image: Image.Image) -> Image.Image | None:
    """The alpha channel of a PIL image (mode "L"), or None when it has none."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        return image.convert("RGBA").getchannel("A")
    return None


def mask_image(item: ImageItem, image: Image.Image | None = None) -> Image.Image:
    """``item``'s mask at its image's size, mode "L": the red channel of its mask file, else its alpha channel (all
    255 without one) — of ``image`` when given (the item's image as :func:`images.open_oriented` reads it)."""
    if item.mask_path is not None:
        mask = open_oriented(item.mask_path)
        if mask.mode in ("I;16", "I;16B", "I;16L", "I"):
            mask = _to_rgb(mask)  # 16-bit greyscale scaled to 8 bits, as training images are
        return mask.convert("RGB").getchannel("R")
    image = open_oriented(item.path) if image is None else image
    alpha = alpha_channel(image)
    return alpha if alpha is not None else Image.new("L", image.size, 255)


def mask_filter(item: ImageItem) -> Image.Resampling:
    """The PIL filter ``item``'s mask is resized with (:func:`buckets.resample_filter`): a mask file's
    ``mask_interpolation`` (its dataset's ``resize_interpolation``), else the image's own ``resize_interpolation``."""
    return resample_filter(item.mask_interpolation if item.mask_path is not None else item.resize_interpolation)


def fitted_mask(item: ImageItem, augmentation: Any, image: Image.Image | None = None) -> torch.Tensor | None:
    """float32 [H, W] in [0, 1] at ``item``'s bucket size (W, H): its mask (:func:`mask_image`, of ``image`` when
    given) resized (:func:`mask_filter`) and cropped as the image is for ``augmentation`` (``crop``, ``face``,
    ``flip``), or None for an item without a mask."""
    if not has_mask(item):
        return None
    mask = mask_image(item, image)
    box = item_face_box(item, mask.size, augmentation.face)
    new_w, new_h, left, top = box or crop_box(mask.size, item.bucket, augmentation.crop)
    width, height = item.bucket
    resized = mask.resize((new_w, new_h), mask_filter(item))
    array = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.uint8)
    if augmentation.flip:
        array = array[:, ::-1]
    return torch.from_numpy(array.copy()).float() / 255.0


def pixels_and_mask(item: ImageItem, augmentation: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One draw's :func:`augment.augmented_pixels` and :func:`fitted_mask`, its image decoded once: with
    ``alpha_mask`` the mask is the alpha of the image the pixels come from (a mask file is read on its own)."""
    if not getattr(item, "alpha_mask", False) or item.mask_path is not None:
        return augmented_pixels(item, augmentation), fitted_mask(item, augmentation)
    image = open_oriented(item.path)
    return augmented_pixels(item, augmentation, _to_rgb(image)), fitted_mask(item, augmentation, image)


def scan_read(path: Path, alpha: bool) -> tuple[tuple[int, int], int | None]:
    """The start-up scan's one read of an image: its size as :func:`images.read_image` reads it (its checks:
    ImageRejected) and, with ``alpha`` (``alpha_mask``), the largest value of its alpha channel (None without one, or
    without ``alpha``), which :func:`attach_loss_masks` warns from."""
    if not alpha:
        return read_image(path).size, None
    image = open_oriented(path)
    size = _to_rgb(image).size
    channel = alpha_channel(image)
    return size, None if channel is None else channel.getextrema()[1]


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A [H, W] mask at the latent's ``size`` (h, w), [1, h, w]: kohya's area interpolation (``apply_masked_loss``;
    block means, the bucket being a multiple of the VAE's factor)."""
    return F.interpolate(mask[None, None], size=tuple(size), mode="area")[0]


def stack_masks(masks: list[torch.Tensor | None]) -> torch.Tensor | None:
    """One batch's masks [b, 1, h, w], all ones for a sample without a mask (kohya); None when no sample has one."""
    shape = next((m.shape for m in masks if m is not None), None)
    if shape is None:
        return None
    return torch.stack([m if m is not None else torch.ones(shape) for m in masks])


def _mask_files(subset: Subset, items: list[ImageItem]) -> dict[Path, Path]:
    """Image path -> its mask file in ``subset``'s conditioning_data_dir, every rule checked (kohya's and sizes)."""
    folder = subset.conditioning_data_dir
    assert folder is not None
    where = f"{subset.where}: conditioning_data_dir {folder}"
    files = image_files(folder)
    by_stem: dict[str, list[Path]] = {}
    for file in files:
        by_stem.setdefault(file.stem, []).append(file)
    stems = {p.stem for p in image_files(subset.image_dir)}
    extra = [f.name for f in files if f.stem not in stems]
    if extra:
        raise ConfigError(f"{where} has {len(extra)} mask file(s) named after no image of {subset.image_dir} "
                          f"(kohya refuses extra conditioning images): {first_of(extra, 5)}")
    missing = [i.path.name for i in items if i.path.stem not in by_stem]
    if missing:
        raise ConfigError(f"{where} has no mask for {len(missing)} image(s) (a mask is the file of the image's name, any "
                          f"of {', '.join(IMAGE_EXTENSIONS)}): {first_of(missing, 5)}")
    found = {}
    for item in items:
        candidates = by_stem[item.path.stem]
        if len(candidates) > 1:
            raise ConfigError(f"{where} has {len(candidates)} masks for {item.path.name} "
                              f"({', '.join(c.name for c in candidates)}): keep one")
        try:
            size = open_oriented(candidates[0]).size
        except ImageRejected as exc:
            raise ConfigError(f"{where}: mask {candidates[0].name} of {item.path.name}: {exc}") from None
        if size != tuple(item.image_size):
            raise ConfigError(f"{where}: mask {candidates[0].name} is {size[0]}x{size[1]} while its image {item.path} is "
                              f"{item.image_size[0]}x{item.image_size[1]}: a mask must have its image's size (as in kohya)")
        found[item.path] = candidates[0]
    return found


def _warn_alpha(subset: Subset, items: list[ImageItem], alpha_peaks: dict[tuple[int, Path], int | None]) -> None:
    """``alpha_mask`` on images without alpha (all-ones masks, kohya's rule) or transparent everywhere: a warning.
    ``alpha_peaks``: (subset index, path) -> the image's largest alpha (None without alpha), read by :func:`scan_read`."""
    without, clear = [], []
    for item in items:
        peak = alpha_peaks[item.subset_index, item.path]
        if peak is None:
            without.append(item.path.name)
        elif peak == 0:
            clear.append(item.path.name)
    if without:
        logger.warning("alpha_mask (%s): %d image(s) have no alpha channel: their loss mask is all ones (as in kohya): %s",
                       subset.where, len(without), first_of(without, 5))
    if clear:
        logger.warning("alpha_mask (%s): %d image(s) are transparent everywhere (alpha 0): their loss is 0, they train "
                       "nothing: %s", subset.where, len(clear), first_of(clear, 5))


def attach_loss_masks(subsets: list[Subset], items: list[ImageItem],
                      alpha_peaks: dict[tuple[int, Path], int | None]) -> list[ImageItem]:
    """``items`` (of ``subsets``, by ``subset_index``) with their subset's mask source: ``alpha_mask``, or the mask
    file of its ``conditioning_data_dir`` (which then takes the place of ``alpha_mask``) with the subset's
    ``mask_interpolation``, each checked. ``items`` itself when no subset masks. ``alpha_peaks``: (subset index,
    path) -> the largest alpha of each image of an ``alpha_mask`` subset, as the scan read it (:func:`scan_read`),
    for the warnings."""
    if not any(s.alpha_mask or s.conditioning_data_dir is not None for s in subsets):
        return items
    files: dict[tuple[int, Path], Path] = {}
    for index, subset in enumerate(subsets):
        own = [i for i in items if i.subset_index == index]
        if subset.conditioning_data_dir is not None:
            files |= {(index, path): mask for path, mask in _mask_files(subset, own).items()}
        elif subset.alpha_mask:
            _warn_alpha(subset, own, alpha_peaks)
    return [dataclasses.replace(i, mask_path=files.get((i.subset_index, i.path)),
                                alpha_mask=subsets[i.subset_index].alpha_mask and (i.subset_index, i.path) not in files,
                                mask_interpolation=subsets[i.subset_index].mask_interpolation
                                if (i.subset_index, i.path) in files else None)
            for i in items]
