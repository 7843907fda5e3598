"""The training images: kohya folders or a kohya ``dataset_config`` TOML, scanned once at start-up.

A kohya folder holds ``<repeats>_<name>`` subfolders of images with ``.txt``/``.caption`` files.
A ``dataset_config`` has ``[general]``, ``[[datasets]]`` and ``[[datasets.subsets]]`` levels; a
key set at an outer level is the default of the inner ones. Keys kohya documents that are not
implemented are refused by name. Unreadable images are skipped with a warning naming the file;
the run fails only when no usable image remains.
"""

from __future__ import annotations

import logging
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from .buckets import choose_bucket, make_buckets
from .captions import read_caption, resolve_caption
from .images import ImageRejected, read_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: dataset_config keys implemented, per level (general and datasets also accept the subset keys as defaults).
_SUBSET_KEYS = {"image_dir", "num_repeats", "caption_extension", "class_tokens", "flip_aug"}
_DATASET_KEYS = {"resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"}
#: Keys kohya documents for dataset_config that are refused for now (never silently ignored).
_KOHYA_DATASET_KEYS = {
    "batch_size", "shuffle_caption", "keep_tokens", "keep_tokens_separator", "caption_separator",
    "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix", "caption_dropout_rate",
    "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "color_aug", "random_crop",
    "face_crop_aug_range", "is_reg", "metadata_file", "cache_info", "resize_interpolation", "alpha_mask",
    "conditioning_data_dir", "token_warmup_min", "token_warmup_step", "validation_seed", "validation_split",
    "max_token_length",
}


@dataclass(frozen=True)
class Subset:
    """A folder of images and how to read it."""

    image_dir: Path
    num_repeats: int
    caption_extension: str
    class_tokens: str | None
    flip_aug: bool
    resolution: tuple[int, int]
    bucket_settings: tuple[bool, int, int, int, bool]  # enable, min, max, step, no_upscale


@dataclass(frozen=True)
class ImageItem:
    """One usable image: its file, final caption (token string present once), bucket (w, h) and repeats."""

    path: Path
    caption: str
    bucket: tuple[int, int]
    num_repeats: int
    flip_aug: bool
    token_prepended: bool


def _resolution(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0], value[1]
    raise ConfigError(f"{where}: resolution must be an int or [width, height], got {value!r}")


def _subsets_from_folder(config: Config, root: Path) -> list[Subset]:
    settings = (config.enable_bucket, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps, config.bucket_no_upscale)
    subsets = []
    for child in sorted(root.iterdir()):
        try:
            child.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            logger.warning("ignoring %s: %s", child, exc)
            continue
        if not child.is_dir():
            continue
        match = re.match(r"^(\d+)_(.+)$", child.name)
        if not match:
            logger.warning("ignoring folder %s: kohya folders are named <repeats>_<name>", child)
            continue
        subsets.append(
            Subset(child, int(match.group(1)), config.caption_extension, None, config.flip_aug,
                   _resolution(config.resolution, "preset"), settings)
        )
    if not subsets:
        raise ConfigError(f"train_data_dir {root} has no <repeats>_<name> subfolders (kohya layout)")
    return subsets


def _subsets_from_dataset_config(config: Config, path: Path) -> list[Subset]:
    with open(path, "rb") as handle:
        try:
            raw = tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"dataset_config {path} is not valid TOML: {exc}") from exc
    supported = sorted(_SUBSET_KEYS | _DATASET_KEYS)

    def check(table: dict[str, Any], allowed: set[str], where: str) -> None:
        for key in table:
            if key in allowed:
                continue
            if key in _KOHYA_DATASET_KEYS:
                raise ConfigError(f"{path} {where}: kohya dataset option {key!r} is not supported yet; supported: {', '.join(supported)}")
            raise ConfigError(f"{path} {where}: unknown key {key!r}; supported: {', '.join(supported)}")

    for key in raw:
        if key not in ("general", "datasets"):
            raise ConfigError(f"{path}: unknown top-level key {key!r} (expected [general] and [[datasets]])")
    general = raw.get("general", {})
    check(general, _SUBSET_KEYS - {"image_dir"} | _DATASET_KEYS, "[general]")
    base = {
        "resolution": config.resolution, "enable_bucket": config.enable_bucket, "min_bucket_reso": config.min_bucket_reso,
        "max_bucket_reso": config.max_bucket_reso, "bucket_reso_steps": config.bucket_reso_steps,
        "bucket_no_upscale": config.bucket_no_upscale, "caption_extension": config.caption_extension,
        "flip_aug": config.flip_aug, "num_repeats": 1, "class_tokens": None,
    } | general
    subsets = []
    for d, dataset in enumerate(raw.get("datasets", [])):
        check({k: v for k, v in dataset.items() if k != "subsets"}, _SUBSET_KEYS - {"image_dir"} | _DATASET_KEYS, f"datasets.{d}")
        level = base | {k: v for k, v in dataset.items() if k != "subsets"}
        for s, subset in enumerate(dataset.get("subsets", [])):
            where = f"datasets.{d}.subsets.{s}"
            check(subset, _SUBSET_KEYS, where)
            merged = level | subset
            if "image_dir" not in merged:
                raise ConfigError(f"{path} {where}: image_dir is required")
            image_dir = Path(merged["image_dir"]).expanduser()
            if not image_dir.is_absolute():
                image_dir = (path.parent / image_dir).resolve()
            if not image_dir.is_dir():
                raise ConfigError(f"{path} {where}: image_dir not found: looked for {image_dir}")
            settings = (bool(merged["enable_bucket"]), int(merged["min_bucket_reso"]), int(merged["max_bucket_reso"]),
                        int(merged["bucket_reso_steps"]), bool(merged["bucket_no_upscale"]))
            subsets.append(
                Subset(image_dir, int(merged["num_repeats"]), str(merged["caption_extension"]), merged["class_tokens"],
                       bool(merged["flip_aug"]), _resolution(merged["resolution"], f"{path} {where}"), settings)
            )
    if not subsets:
        raise ConfigError(f"dataset_config {path} defines no [[datasets.subsets]]")
    return subsets


def load_subsets(config: Config, train_data_dir: Path | None = None) -> list[Subset]:
    """The subsets the config describes (``train_data_dir`` overrides the config's folder)."""
    if config.dataset_config:
        return _subsets_from_dataset_config(config, Path(config.dataset_config))
    return _subsets_from_folder(config, train_data_dir or Path(config.train_data_dir))


def scan_images(config: Config, subsets: list[Subset]) -> list[ImageItem]:
    """Every usable image of ``subsets`` with its caption and bucket; warns once about prepended tokens."""
    items: list[ImageItem] = []
    looked_at, rejected = 0, []
    for subset in subsets:
        width, height = subset.resolution
        enable, min_reso, max_reso, step, no_upscale = subset.bucket_settings
        buckets = make_buckets(width * height, min_reso, max_reso, step) if enable else [(width, height)]
        paths = sorted(p for p in subset.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            logger.warning("no image (%s) in %s", ", ".join(IMAGE_EXTENSIONS), subset.image_dir)
        looked_at += len(paths)
        for path in paths:
            try:
                size = read_image(path).size
            except ImageRejected as exc:
                logger.warning("skipping %s: %s", path, exc)
                rejected.append(f"{path.name}: {exc}")
                continue
            caption, prepended = resolve_caption(
                path, read_caption(path, subset.caption_extension), config.token_string, subset.class_tokens,
                config.caption_template,
            )
            bucket = choose_bucket(size, buckets, no_upscale, width * height, step) if enable else (width, height)
            items.append(ImageItem(path, caption, bucket, subset.num_repeats, subset.flip_aug, prepended))
    if not items:
        reasons = "".join(f"\n  {r}" for r in rejected)
        raise ConfigError(
            f"no usable training image in {', '.join(str(s.image_dir) for s in subsets)}: "
            f"looked at {looked_at} image file(s), rejected {len(rejected)}{reasons}"
        )
    prepended = sum(item.token_prepended for item in items)
    if prepended:
        logger.warning("%d caption(s) did not contain %r; it was prepended to them", prepended, config.token_string)
    return items
