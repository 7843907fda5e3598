"""Scanning the subsets' images once at start-up: each usable image with its captions and bucket.

Unreadable images are skipped with a warning naming the file; the run fails only when no usable
training image remains. Regularisation images are balanced per dataset as kohya does
(:func:`balance_reg_repeats`). Loss masks (``alpha_mask``, ``conditioning_data_dir``) are found and checked
here too (``masks.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, first_of
from .buckets import choose_bucket, make_buckets
from .captions import caption_file, count_token, read_caption_lines, resolve_lines, resolve_reg_lines
from .dataset import IMAGE_EXTENSIONS, UNREAD_IMAGE_EXTENSIONS, ImageItem, Subset, folder_class, image_files
from .dataset_stats import dataset_notes
from .face_crop import face_box_of
from .images import ImageRejected
from .masks import attach_loss_masks, scan_read
from .validation_split import split_validation
from ..text_files import read_user_text

logger = logging.getLogger(__name__)


def _metadata_entries(subset: Subset) -> list[tuple[Path | None, str, list[str] | None]]:
    """(image path or None, key, caption lines or None) of each entry of kohya's metadata JSON."""
    assert subset.metadata_file is not None
    try:
        metadata = json.loads(read_user_text(subset.metadata_file))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{subset.where}: metadata_file {subset.metadata_file} is not valid JSON: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{subset.where}: metadata_file {subset.metadata_file} {exc}") from None
    if not isinstance(metadata, dict):
        raise ConfigError(f"{subset.where}: metadata_file {subset.metadata_file} must map image keys to "
                          '{"caption": ..., "tags": ...} objects')
    options = subset.caption_options
    entries = []
    for key, record in metadata.items():
        if not isinstance(record, dict):
            raise ConfigError(f"{subset.where}: metadata_file entry {key!r} must be an object with caption/tags")
        candidates = [Path(key), subset.image_dir / key] + [subset.image_dir / f"{key}{ext}" for ext in IMAGE_EXTENSIONS]
        path = next((p for p in candidates if p.is_file()), None)
        caption, tags = record.get("caption"), record.get("tags")
        if caption is None:
            caption, tags = tags, None
        lines = [line.strip() for line in (caption or "").split("\n") if line.strip()]
        if not options.enable_wildcard:
            lines = lines[:1]
        if tags:
            tags = tags.replace("\n", options.caption_separator)
            lines = [f"{line}{options.caption_separator}{tags}" for line in lines] or [tags]
        entries.append((path, key, lines or None))
    return entries


def _image_entries(subset: Subset) -> list[tuple[Path | None, str, list[str] | None]]:
    if subset.metadata_file is not None:
        return _metadata_entries(subset)
    paths = image_files(subset.image_dir)
    if not paths:
        logger.warning("no image (%s) in %s", ", ".join(IMAGE_EXTENSIONS), subset.image_dir)
    if unread := [p.name for p in image_files(subset.image_dir, UNREAD_IMAGE_EXTENSIONS)]:
        logger.warning("%d file(s) in %s are of an image type that is not read (as kohya; convert them to one of %s): %s",
                       len(unread), subset.image_dir, ", ".join(IMAGE_EXTENSIONS), first_of(unread, 5))
    wildcard = subset.caption_options.enable_wildcard
    files = [caption_file(p, subset.caption_extension) for p in paths]  # each image's, looked up once
    entries = [(p, p.name, read_caption_lines(file, all_lines=wildcard)) for p, file in zip(paths, files)]
    _note_caption_case(subset, files)
    if paths and all(lines is None for *_, lines in entries):
        _warn_other_caption_files(subset, paths)
    return entries


def _note_caption_case(subset: Subset, files: list[Path | None]) -> None:
    """Say once which caption files (``files``: the images' :func:`caption_file`) were found by a name in another
    letter case (``a.TXT`` for ``.txt``)."""
    ext = subset.caption_extension
    found = [f.name for f in files if f and not f.name.endswith(ext if ext.startswith(".") else "." + ext)]
    if found:
        logger.warning("%d caption file(s) in %s differ from caption_extension %r only in letter case (%s): read, as "
                       "on Windows (kohya on Linux would not read them); rename them to end in %r to silence this",
                       len(found), subset.image_dir, ext, first_of(found, 3), ext)


def _warn_other_caption_files(subset: Subset, paths: list[Path]) -> None:
    """No image of ``subset`` has a ``caption_extension`` file: when its images have caption files of another
    common extension, say so (the run would otherwise caption every image as one without a caption file)."""
    if subset.class_tokens:
        got = f"{'the folder name' if subset.kohya_folder else 'class_tokens'} {subset.class_tokens!r}"
    else:
        got = "caption_template, or caption_prefix/caption_suffix alone" if not subset.is_reg else \
            "caption_template, with init_word for the token"
    for other in (".txt", ".caption", ".tags"):
        found = sum(p.with_suffix(other).is_file() for p in paths)
        if other != subset.caption_extension and found:
            logger.warning("no %s caption file beside the %d image(s) of %s, but %d %s file(s), which are not read: "
                           "each image is captioned as one without a caption file (here: %s); set caption_extension "
                           "= %r to read them", subset.caption_extension, len(paths), subset.image_dir, found, other,
                           got, other)
            return


def _image_options(subset: Subset, path: Path, size: tuple[int, int]) -> dict[str, Any]:
    """An image's size and its subset's ``resize_interpolation``; with ``face_crop_aug_range``, the face box its name
    gives (``face_crop.py``): a bad one, or an image smaller than the crop, is a ConfigError naming the file (kohya
    fails on both). SDXL's original size of a face-cropped image is the crop's, as kohya's (``image_size``)."""
    options = {"image_size": tuple(size), "resize_interpolation": subset.resize_interpolation}
    if subset.face_crop_aug_range is None:
        return options
    try:
        box = face_box_of(path)
    except ValueError as exc:
        raise ConfigError(f"{subset.where}: face_crop_aug_range: {path}: {exc}") from None
    if box is None:
        return options
    width, height = subset.resolution
    if size[0] < width or size[1] < height:
        raise ConfigError(f"{subset.where}: face_crop_aug_range: {path} is {size[0]}x{size[1]}, smaller than the "
                          f"resolution {width}x{height} on a side; the face crop never enlarges (kohya fails on it)")
    return options | {"face_box": box, "face_crop_aug_range": subset.face_crop_aug_range, "image_size": (width, height)}


def _caption_source(subset: Subset, lines: list[str] | None, token: str) -> str:
    """Where an image's caption comes from (``ImageItem.caption_source``); ``lines``: its caption file's, or None."""
    if lines is not None:
        return "file"
    if subset.class_tokens:
        return "folder" if subset.kohya_folder else "class_tokens"
    options = subset.caption_options
    if not subset.is_reg and count_token(f"{options.caption_prefix} {options.caption_suffix}", token) == 1:
        return "affixes"
    if not subset.kohya_folder:
        return "template"
    return "folder_template" if folder_class(subset.image_dir) else "no_class_template"


def balance_reg_repeats(train_entries: int, reg_items: list[ImageItem]) -> list[ImageItem]:
    """kohya's balancing of one dataset's regularisation images against its training entries.

    Each reg image is taken in order with its own repeats until the reg entries reach the training
    entries (images after that are left out: repeats 0); when one pass is not enough, further passes
    add one repeat per image until they do. A dataset without training images uses no reg image.
    """
    repeats = [0] * len(reg_items)
    n, first = 0, True
    while n < train_entries and reg_items:
        for i, item in enumerate(reg_items):
            if first:
                repeats[i] = item.num_repeats
                n += item.num_repeats
            else:
                repeats[i] += 1
                n += 1
            if n >= train_entries:
                break
        first = False
    return [dataclasses.replace(item, num_repeats=r) for item, r in zip(reg_items, repeats)]


def scan_images(config: Config, subsets: list[Subset], log_notes: bool = True) -> list[ImageItem]:
    """The images training draws from (:func:`scan_images_and_held_out`, without the held-out ones)."""
    return scan_images_and_held_out(config, subsets, log_notes)[0]


def scan_images_and_held_out(config: Config, subsets: list[Subset],
                             log_notes: bool = True) -> tuple[list[ImageItem], list[ImageItem]]:
    """Every usable image of ``subsets`` with its captions and bucket: the training images, then the
    regularisation images (repeats balanced per dataset); and the training images ``validation_split`` holds out
    (``validation_split.py``), which are not among the first. Logs what is done to captions once
    (:func:`dataset_notes`) unless ``log_notes`` is false."""
    train: list[ImageItem] = []
    reg: list[ImageItem] = []
    looked_at, rejected, skipped_small = 0, [], 0
    alpha_peaks: dict[tuple[int, Path], int | None] = {}  # for alpha_mask's warnings (masks.scan_read)
    class_word = config.init_words[0]
    for subset_index, subset in enumerate(subsets):
        width, height = subset.resolution
        enable, min_reso, max_reso, step, no_upscale = subset.bucket_settings
        # kohya: bucket_no_upscale makes no bucket list (each image's bucket is its own size)
        buckets = make_buckets(width * height, min_reso, max_reso, step) if enable and not no_upscale else [(width, height)]
        entries = _image_entries(subset)
        looked_at += 0 if subset.is_reg else len(entries)
        for path, key, lines in entries:
            if path is None:
                logger.warning("skipping %s: metadata entry %r has no image in %s", subset.metadata_file, key, subset.image_dir)
                rejected.append(f"{key}: no image file for this metadata entry")
                continue
            try:
                size, alpha_peaks[subset_index, path] = scan_read(path, subset.alpha_mask)
            except ImageRejected as exc:
                logger.warning("skipping %s: %s", path, exc)
                rejected.append(f"{path.name}: {exc}")
                continue
            if subset.skip_image_resolution and size[0] * size[1] <= subset.skip_image_resolution[0] * subset.skip_image_resolution[1]:
                skipped_small += 1
                continue
            if subset.is_reg:
                resolved, prepended = resolve_reg_lines(lines, subset.class_tokens, class_word, config.caption_template), False
            else:
                resolved, prepended = resolve_lines(path, lines, config.token_string, subset.class_tokens,
                                                    config.caption_template, subset.caption_options)
            bucket = choose_bucket(size, buckets, no_upscale, width * height, step) if enable else (width, height)
            if not min(bucket):  # bucket_no_upscale: a side under bucket_reso_steps rounds to 0 (kohya fails on it)
                reason = (f"{size[0]}x{size[1]} has a side under bucket_reso_steps = {step} px (once scaled to the "
                          "resolution's area, when larger), which bucket_no_upscale cannot fit to a bucket (it never "
                          "enlarges)")
                logger.warning("skipping %s: %s", path, reason)
                rejected.append(f"{path.name}: {reason}")
                continue
            item = ImageItem(path, resolved[0], bucket, subset.num_repeats, subset.flip_aug, prepended, subset.is_reg,
                             tuple(resolved), subset.caption_options, subset.color_aug, subset.random_crop, subset.name,
                             subset.dataset_index, subset_index, **_image_options(subset, path, size),
                             caption_source=_caption_source(subset, lines, config.token_string))
            (reg if subset.is_reg else train).append(item)
    train, held_out = split_validation(config, subsets, train)  # before the reg balancing, as kohya
    if not train:
        reasons = "".join(f"\n  {r}" for r in rejected)
        folders = [str(s.image_dir) for s in subsets if not s.is_reg]
        small = f", skipped {skipped_small} at or under skip_image_resolution" if skipped_small else ""
        raise ConfigError(
            f"no usable training image in {', '.join(folders)}: looked at {looked_at} image file(s), rejected "
            f"{len(rejected)}{small}{reasons}" if folders else
            "no training subset: every subset left is a regularisation one (is_reg = true); subsets with num_repeats "
            "< 1 are ignored, as in kohya"
        )
    if skipped_small:
        logger.warning("%d image(s) skipped by skip_image_resolution", skipped_small)
    balanced: list[ImageItem] = []
    for dataset_index in sorted({i.dataset_index for i in train + reg}):
        train_entries = sum(i.num_repeats for i in train if i.dataset_index == dataset_index)
        dataset_reg = [i for i in reg if i.dataset_index == dataset_index]
        if dataset_reg:
            balanced += balance_reg_repeats(train_entries, dataset_reg)
            reg_entries = sum(i.num_repeats for i in dataset_reg)
            if train_entries == 0:
                logger.warning("dataset %d has regularisation images but no training image: they are not used", dataset_index)
            elif reg_entries > train_entries:
                logger.warning("dataset %d: %d regularisation entries for %d training entries: some reg images are not used "
                               "(as kohya)", dataset_index, reg_entries, train_entries)
    items = attach_loss_masks(subsets, train + balanced, alpha_peaks)  # alpha_mask, conditioning_data_dir: checked here
    held_out = attach_loss_masks(subsets, held_out, alpha_peaks) if held_out else []
    for note in dataset_notes(items, config.token_string, held_out) if log_notes else []:
        logger.warning(note)
    return items, held_out


def build_entries(items: list[ImageItem]) -> list[int]:
    """One entry (item index) per repeat of each image: the pool an epoch draws from."""
    return [i for i, item in enumerate(items) for _ in range(item.num_repeats)]


__all__ = ["balance_reg_repeats", "build_entries", "scan_images", "scan_images_and_held_out"]
