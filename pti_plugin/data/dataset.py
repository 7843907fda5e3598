"""The training images: kohya folders or a kohya ``dataset_config`` TOML, scanned once at start-up.

Sources (exactly one): ``train_data_dir`` — a kohya folder of ``<repeats>_<name>`` subfolders of
images with caption files, optionally with ``reg_data_dir`` (the same layout, regularisation
images); a folder's ``<name>`` is kohya's ``class_tokens``, the caption of its images without a caption
file (a training folder's only where it names the token string; else the template); or
``train_data_dir`` with ``in_json`` (kohya's fine-tuning metadata, ``dataset_repeats``); or a
``dataset_config`` with ``[general]``, ``[[datasets]]`` and ``[[datasets.subsets]]`` levels, where
a key set at an outer level is the default of the inner ones and the preset's top-level keys are
the defaults of ``[general]`` (kohya: the config file wins over the command line).

kohya semantics kept: dataset-level keys (``resolution``, buckets, ``batch_size``,
``skip_image_resolution``) cannot be set in a subset; ``image_dir``, ``is_reg``, ``metadata_file``,
``alpha_mask``, ``conditioning_data_dir`` only in a subset (a masked, ``conditioning_data_dir`` subset only
with ``masked_loss``, and not beside unmasked ones in a dataset: see ``masks.py``); DreamBooth-style and
``metadata_file`` subsets cannot share a dataset; a subset repeating an earlier subset's ``image_dir``
(``metadata_file``) in the same dataset is ignored with a warning (in another dataset it is used again,
e.g. at another resolution); a subset with ``num_repeats < 1`` is ignored with a warning. Regularisation
images are balanced per dataset as kohya does (:func:`balance_reg_repeats`). Documented kohya keys that are not implemented are
refused by name, naming the file, with the list of supported keys — never silently ignored.
This module reads the sources into :class:`Subset` s (schema and checks); :mod:`.scanning` reads
their images into :class:`ImageItem` s and :mod:`.dataset_stats` reports on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..config import Config, ConfigError
from .buckets import bucket_range
from .captions import CaptionError, CaptionOptions, names_token_once
from ..text_files import path_not_found, read_toml_file
from .dataset_keys import (CAPTION_KEYS, DATASET_KEYS, REFUSED_DATASET_KEYS, SUBSET_KEYS, SUBSET_ONLY_KEYS,
                           TOP_LEVEL_KEYS, face_range, optional_size_pair, size_pair)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Image types kohya does not read either (without its optional plugins): such files are named in a warning.
UNREAD_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".jxl", ".heic", ".heif", ".jfif")


def image_files(folder: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """The files of ``folder`` with one of ``extensions`` (any case), sorted; hidden names (``.name.png``, macOS's
    ``._name.png`` copies) are left out, as kohya's ``glob`` leaves them out."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in extensions and not p.name.startswith("."))


@dataclass(frozen=True)
class Subset:
    """A folder of images (or a metadata file) and how to read it."""

    image_dir: Path
    num_repeats: int
    caption_extension: str
    class_tokens: str | None
    flip_aug: bool
    resolution: tuple[int, int]
    bucket_settings: tuple[bool, int, int, int, bool]  # enable, min, max, step, no_upscale
    is_reg: bool = False
    caption_options: CaptionOptions = CaptionOptions()
    color_aug: bool = False
    random_crop: bool = False
    metadata_file: Path | None = None
    dataset_index: int = 0
    skip_image_resolution: tuple[int, int] | None = None
    where: str = ""
    alpha_mask: bool = False  # the images' alpha channel is the loss mask (``masks.py``)
    conditioning_data_dir: Path | None = None  # masked_loss: the folder of the images' mask files (``masks.py``)
    validation_split: float = 0.0  # kohya: the fraction of its images held out for the validation loss
    validation_seed: int | None = None  # kohya: the seed of that split (None: the run's seed); ``validation_split.py``
    resize_interpolation: str | None = None  # kohya's filter name (``buckets.resample_filter``); None: Lanczos
    face_crop_aug_range: tuple[float, float] | None = None  # kohya's face crop (``face_crop.py``), without buckets
    mask_interpolation: str | None = None  # its conditioning_data_dir masks' filter: its dataset's (``masks.py``)
    kohya_folder: bool = False  # a ``<repeats>_<name>`` subfolder of train_data_dir / reg_data_dir (:func:`folder_class`)

    @property
    def name(self) -> str:
        """kohya's name of the subset (tag-frequency key): the folder's name, or the metadata file's."""
        return self.metadata_file.name if self.metadata_file is not None else self.image_dir.name


@dataclass(frozen=True)
class ImageItem:
    """One usable image: its file, caption (token string present once for training images; the
    first line when there are several), bucket (w, h), repeats (for a regularisation image: after
    kohya's balancing; 0 = never drawn), the options of its subset and the image's own size (w, h;
    (0, 0) when unknown), which SDXL's size conditioning reads."""

    path: Path
    caption: str
    bucket: tuple[int, int]
    num_repeats: int
    flip_aug: bool
    token_prepended: bool
    is_reg: bool = False
    caption_lines: tuple[str, ...] = ()
    caption_options: CaptionOptions = CaptionOptions()
    color_aug: bool = False
    random_crop: bool = False
    subset_name: str = ""
    dataset_index: int = 0
    subset_index: int = 0
    image_size: tuple[int, int] = (0, 0)
    alpha_mask: bool = False  # the loss mask is the image's alpha channel
    mask_path: Path | None = None  # the loss mask is this file's red channel (conditioning_data_dir)
    resize_interpolation: str | None = None  # the resize filter's name (``buckets.resample_filter``); None: Lanczos
    face_box: tuple[int, int, int, int] | None = None  # (cx, cy, w, h) from the name, with face_crop_aug_range only
    face_crop_aug_range: tuple[float, float] | None = None  # the subset's [lo, hi] (``face_crop.py``)
    mask_interpolation: str | None = None  # the filter of its mask file (``masks.mask_filter``); None: Lanczos
    #: where the caption came from: "file" (its caption file), else (no usable caption file) "folder" (its kohya
    #: folder's name, kohya's class_tokens), "class_tokens", "affixes" (caption_prefix/suffix alone), "template",
    #: "folder_template" (the template: its kohya folder's name does not name the token) or "no_class_template" (the
    #: template: its kohya folder ``10`` / ``10_`` has no class part, kohya's empty caption); ``dataset_stats`` says so
    caption_source: str = "file"


def folder_class(folder: Path) -> str:
    """kohya's class_tokens of a ``<repeats>_<name>`` folder: ``<name>``, the folder's name after its first "_"."""
    return folder.name.partition("_")[2]


def _resolution(value: Any, where: str) -> tuple[int, int]:
    try:
        return size_pair(value)
    except ValueError:
        raise ConfigError(f"{where}: resolution must be an int or [width, height], got {value!r}") from None


def _caption_options(values: dict[str, Any]) -> CaptionOptions:
    return CaptionOptions(**{key: values[key] for key in CAPTION_KEYS})


def _top_level(config: Config) -> dict[str, Any]:
    """The preset's values of the dataset keys (the defaults of [general])."""
    values = {key: getattr(config, key) for key in TOP_LEVEL_KEYS}
    values["resolution"] = tuple(config.resolution) if isinstance(config.resolution, list) else config.resolution
    return values | {"num_repeats": 1, "class_tokens": None, "batch_size": None, "alpha_mask": config.alpha_mask}


def _make_subset(values: dict[str, Any], image_dir: Path, where: str, dataset_index: int,
                 metadata_file: Path | None = None, is_reg: bool = False, conditioning_data_dir: Path | None = None) -> Subset:
    settings = (values["enable_bucket"], *bucket_range(values["min_bucket_reso"], values["max_bucket_reso"],
                                                       values["bucket_reso_steps"]),
                values["bucket_reso_steps"], values["bucket_no_upscale"])
    return Subset(
        image_dir, values["num_repeats"], values["caption_extension"], values["class_tokens"], values["flip_aug"],
        _resolution(values["resolution"], where), settings, is_reg, _caption_options(values), values["color_aug"],
        values["random_crop"], metadata_file, dataset_index, optional_size_pair(values["skip_image_resolution"]), where,
        values["alpha_mask"], conditioning_data_dir,
        validation_split=values["validation_split"], validation_seed=values["validation_seed"],
        resize_interpolation=values["resize_interpolation"], face_crop_aug_range=face_range(values["face_crop_aug_range"]),
    )


def _subsets_from_folder(config: Config, root: Path, is_reg: bool = False) -> list[Subset]:
    """kohya's folder convention: ``<repeats>_<name>`` subfolders; ``name`` is the subset's ``class_tokens`` (the caption
    of its images without a caption file), as kohya; for a training folder only where it names the token once
    (with ``caption_prefix``/``caption_suffix``), else its images take the template (``dataset_stats`` says so). A
    folder without a name (``10``, ``10_``: kohya's empty class_tokens, an empty caption) has no class_tokens: its
    images without a caption file take the template, or the prefix/suffix alone where they name the token."""
    values = _top_level(config)
    options = _caption_options(values)
    subsets = []
    for child in sorted(root.iterdir()):
        try:
            child.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            logger.warning("ignoring %s: %s", child, exc)
            continue
        if not child.is_dir():
            continue
        name = folder_class(child)
        try:
            repeats = int(child.name.partition("_")[0])  # kohya: the repeats are the name up to its first "_"
        except ValueError:
            logger.warning("ignoring folder %s: kohya folders are named <repeats>_<name>", child)
            continue
        usable = name and (is_reg or names_token_once(name, config.token_string, options))  # "10", "10_": none
        folder_values = values | {"num_repeats": repeats, "class_tokens": name if usable else None}
        subsets.append(replace(_make_subset(folder_values, child, str(child), 0, is_reg=is_reg), kohya_folder=True))
    if not subsets:
        key = "reg_data_dir" if is_reg else "train_data_dir"
        raise ConfigError(f"{key} {root} has no <repeats>_<name> subfolders (kohya layout)")
    return subsets


def _check_table(table: dict[str, Any], allowed: dict[str, Callable[[Any], Any]], path: Path, where: str) -> dict[str, Any]:
    """``table`` with every value checked; refused and misplaced keys named with the reason."""
    supported = ", ".join(sorted(DATASET_KEYS | SUBSET_KEYS | SUBSET_ONLY_KEYS))
    checked = {}
    for key, value in table.items():
        if key in allowed:
            try:
                checked[key] = allowed[key](value)
            except ValueError as exc:
                raise ConfigError(f"{path} {where}: {key!r} {exc}, got {value!r}") from None
        elif key in REFUSED_DATASET_KEYS:
            raise ConfigError(f"{path} {where}: kohya dataset option {key!r} is not supported by pti-plugin "
                              f"({REFUSED_DATASET_KEYS[key]}); supported: {supported}")
        elif key in DATASET_KEYS:
            raise ConfigError(f"{path} {where}: {key!r} is a dataset option: set it in [[datasets]] or [general] (as in kohya)")
        elif key in SUBSET_ONLY_KEYS:
            raise ConfigError(f"{path} {where}: {key!r} belongs in a [[datasets.subsets]] table (as in kohya)")
        else:
            raise ConfigError(f"{path} {where}: unknown key {key!r}; supported: {supported}")
    return checked


def _check_buckets(values: dict[str, Any], path: Any, where: str) -> None:
    width, height = _resolution(values["resolution"], f"{path} {where}")
    if values["enable_bucket"]:
        low, high = _bucket_range(values, f"{path} {where}")
        if min(width, height) < low or max(width, height) > high:
            raise ConfigError(
                f"{path} {where}: resolution {width}x{height} must lie within min_bucket_reso "
                f"{low} and max_bucket_reso {high} (kohya's rule)")
    multiple = 64 if values["enable_bucket"] else 8
    if width % multiple or height % multiple:
        raise ConfigError(f"{path} {where}: resolution must be a multiple of {multiple}"
                          f"{' (enable_bucket)' if values['enable_bucket'] else ''}, got {width}x{height}")


def _bucket_range(values: dict[str, Any], where: str) -> tuple[int, int]:
    """kohya's bucket range (:func:`buckets.bucket_range`), a warning when it moved, refused when the smallest side
    rounds down to 0 (kohya then fails dividing by it), except with ``bucket_no_upscale``, whose buckets are the
    images' own sizes (kohya makes no bucket list from the range then)."""
    given, step = (values["min_bucket_reso"], values["max_bucket_reso"]), values["bucket_reso_steps"]
    low, high = bucket_range(*given, step)
    if not low and not values["bucket_no_upscale"]:
        raise ConfigError(f"{where}: min_bucket_reso = {given[0]} is under bucket_reso_steps = {step}; kohya rounds it "
                          f"down to a multiple of the step, here 0: set min_bucket_reso to at least {step}")
    for key, old, new in (("min_bucket_reso", given[0], low), ("max_bucket_reso", given[1], high)):
        if old != new:
            logger.warning("%s: %s %d is not a multiple of bucket_reso_steps = %d: %d is used (as kohya)", where, key,
                           old, step, new)
    return low, high


def _subsets_from_dataset_config(config: Config, path: Path) -> tuple[list[Subset], list[int | None]]:
    """The subsets of a dataset_config and each dataset's batch_size (None when unset)."""
    try:
        raw = read_toml_file(path)
    except ValueError as exc:
        raise ConfigError(f"dataset_config {path} {exc}") from None
    for key in raw:
        if key not in ("general", "datasets"):
            raise ConfigError(f"{path}: unknown top-level key {key!r} (expected [general] and [[datasets]])")
    outer = DATASET_KEYS | SUBSET_KEYS
    general = _check_table(raw.get("general", {}), outer, path, "[general]")
    base = _top_level(config) | general
    subsets: list[Subset] = []
    batch_sizes: list[int | None] = []
    datasets = raw.get("datasets", [])
    if not isinstance(datasets, list):
        raise ConfigError(f"{path}: 'datasets' must be [[datasets]] tables")
    for d, dataset in enumerate(datasets):
        own = _check_table({k: v for k, v in dataset.items() if k != "subsets"}, outer, path, f"datasets.{d}")
        level = base | own
        _check_buckets(level, path, f"datasets.{d}")
        batch_sizes.append(level["batch_size"])
        kinds = set()
        for s, subset in enumerate(dataset.get("subsets", [])):
            where = f"datasets.{d}.subsets.{s}"
            merged = level | _check_table(subset, SUBSET_KEYS | SUBSET_ONLY_KEYS, path, where)
            metadata = merged.get("metadata_file")
            kinds.add("fine-tuning (metadata_file)" if metadata else "DreamBooth (image_dir)")
            if len(kinds) > 1:
                raise ConfigError(f"{path} datasets.{d}: DreamBooth-style subsets and metadata_file subsets cannot be "
                                  "mixed in one dataset (as in kohya): put them in separate [[datasets]]")
            if metadata and merged.get("is_reg"):
                raise ConfigError(f"{path} {where}: is_reg applies to image_dir subsets, not to metadata_file ones (as in kohya)")
            if "image_dir" not in merged and not metadata:
                raise ConfigError(f"{path} {where}: image_dir is required")
            image_dir = _relative_to(Path(merged["image_dir"]), path, f"{where}: image_dir") if "image_dir" in merged else None
            if image_dir is not None and not image_dir.is_dir():
                raise ConfigError(f"{path} {where}: image_dir {image_dir} is a file, not a folder" if image_dir.exists()
                                  else f"{path} {where}: {path_not_found(merged['image_dir'], 'image_dir', image_dir)}")
            metadata_file = _relative_to(Path(metadata), path, f"{where}: metadata_file") if metadata else None
            if metadata_file is not None and not metadata_file.is_file():
                raise ConfigError(f"{path} {where}: {path_not_found(metadata, 'metadata_file', metadata_file)}")
            conditioning = _conditioning_dir(config, subset, merged, image_dir, path, where)
            if s and (conditioning is None) != (subsets[-1].conditioning_data_dir is None):
                raise ConfigError(f"{path} datasets.{d}: conditioning_data_dir is set in some subsets and not in others: "
                                  "kohya's masked (ControlNet-style) subsets cannot share a dataset with others; split them")
            subsets.append(replace(_make_subset(merged, image_dir or metadata_file.parent, f"{path} {where}", d,
                                                metadata_file, bool(merged.get("is_reg", False)), conditioning),
                                   mask_interpolation=level["resize_interpolation"]))
    if not subsets:
        raise ConfigError(f"dataset_config {path} defines no [[datasets.subsets]]")
    return subsets, batch_sizes


def _conditioning_dir(config: Config, table: dict[str, Any], merged: dict[str, Any], image_dir: Path | None, path: Path,
                      where: str) -> Path | None:
    """A subset's ``conditioning_data_dir`` (the folder of its images' masks for ``masked_loss``), with kohya's rules:
    only with ``masked_loss``, beside ``image_dir`` only (no ``metadata_file``, ``is_reg`` or ``alpha_mask``)."""
    if "conditioning_data_dir" not in merged:
        return None
    at = f"{path} {where}: conditioning_data_dir"
    if not config.masked_loss:
        raise ConfigError(f"{at} holds loss masks, read only with masked_loss = true (as in kohya): set it in the preset")
    for key in ("metadata_file", "is_reg", "alpha_mask"):
        if table.get(key):
            raise ConfigError(f"{at} cannot be combined with {key} = {table[key]!r} in one subset (kohya's masked subsets "
                              "take an image_dir and its masks only)")
    folder = _relative_to(Path(merged["conditioning_data_dir"]), path, f"{where}: conditioning_data_dir")
    if not folder.is_dir():
        raise ConfigError(f"{at} {folder} is a file, not a folder" if folder.exists() else
                          f"{path} {where}: {path_not_found(merged['conditioning_data_dir'], 'conditioning_data_dir', folder)}")
    if folder == image_dir:
        raise ConfigError(f"{at} is the image_dir itself: masks need their own folder (files named as their images)")
    return folder


def _relative_to(value: Path, config_file: Path, what: str) -> Path:
    """A dataset_config's path ``value`` (``what`` names its key): relative to the TOML's own folder, as the preset's
    paths are to their file (so a resume or a sweep reads it from anywhere). kohya reads it relative to the current
    folder: where it is missing beside the TOML but found there, that one is read, with a warning naming both."""
    value = value.expanduser()
    if value.is_absolute():
        return value
    beside = (config_file.parent / value).resolve()
    here = value.resolve()
    if not beside.exists() and here.exists():
        logger.warning("%s %s: %r is not found beside the dataset_config (%s) but in the current folder (%s), as kohya "
                       "reads it: that one is read; write the path relative to the dataset_config's folder, or absolute, "
                       "to read it from any folder", config_file, what, str(value), beside, here)
        return here
    return beside


def _drop_ignored(subsets: list[Subset]) -> list[Subset]:
    """kohya: subsets with num_repeats < 1, and repeats of an earlier subset of the same dataset, are ignored."""
    kept: list[Subset] = []
    for subset in subsets:
        if subset.num_repeats < 1:
            logger.warning("ignoring subset %s (%s): num_repeats is %d (< 1)", subset.name, subset.where, subset.num_repeats)
            continue
        key = subset.metadata_file or subset.image_dir
        if any(k.dataset_index == subset.dataset_index and (k.metadata_file or k.image_dir) == key for k in kept):
            logger.warning("ignoring subset %s (%s): it repeats an earlier subset of the same dataset (kohya uses the first)",
                           key, subset.where)
            continue
        kept.append(subset)
    return kept


def _check_cacheable(config: Config, subsets: list[Subset]) -> None:
    """kohya refuses color_aug / random_crop with cached latents: they change the pixels at every draw; so does a
    face crop with a range (``face_crop_aug_range`` lo < hi)."""
    if not (config.cache_latents or config.cache_latents_to_disk):
        return
    cache = "cache_latents_to_disk" if config.cache_latents_to_disk else "cache_latents"
    for subset in subsets:
        for key in ("color_aug", "random_crop"):
            if getattr(subset, key):
                raise ConfigError(
                    f"{subset.where}: {key} cannot be combined with {cache}: cached latents are encoded once, while "
                    f"{key} changes the pixels at every draw (kohya refuses this too); turn off one of them")
        face = subset.face_crop_aug_range
        if face is not None and face[0] != face[1]:
            raise ConfigError(
                f"{subset.where}: face_crop_aug_range = {list(face)} cannot be combined with {cache}: cached latents are "
                "encoded once, while a range draws the face crop's scale at every draw (kohya caches the image without "
                "its face crop); give lo = hi for a fixed face crop, or turn off the cache")


def _check_face_crops(subsets: list[Subset]) -> None:
    """kohya applies ``face_crop_aug_range`` only without buckets (with them it is ignored); here a face crop beside
    buckets is refused, naming the subset. Loss masks follow the face crop (``masks.fitted_mask``)."""
    for subset in subsets:
        if subset.face_crop_aug_range is not None and subset.bucket_settings[0]:
            raise ConfigError(f"{subset.where}: face_crop_aug_range applies only without buckets (kohya ignores it with "
                              "enable_bucket = true): turn off one of them")


def load_subsets(config: Config, train_data_dir: Path | None = None) -> list[Subset]:
    """The subsets the config describes (``train_data_dir`` overrides the config's folder)."""
    batch_sizes: list[int | None] = []
    if config.dataset_config:
        subsets, batch_sizes = _subsets_from_dataset_config(config, Path(config.dataset_config))
    elif config.in_json:
        image_dir = train_data_dir or Path(config.train_data_dir)
        values = _top_level(config) | {"num_repeats": config.dataset_repeats}
        subsets = [_make_subset(values, image_dir, f"in_json {config.in_json}", 0, Path(config.in_json))]
    else:
        subsets = _subsets_from_folder(config, train_data_dir or Path(config.train_data_dir))
        if config.reg_data_dir:
            subsets += _subsets_from_folder(config, Path(config.reg_data_dir), is_reg=True)
    if not config.dataset_config:
        _check_buckets(_top_level(config), "preset", "(top-level keys)")
    _check_cacheable(config, subsets)
    _check_face_crops(subsets)
    if config.masked_loss and not any(s.alpha_mask or s.conditioning_data_dir is not None for s in subsets):
        raise ConfigError.at("masked_loss", " = true, but no subset has masks: they come from a dataset_config subset's "
                             "conditioning_data_dir (or, with alpha_mask, from the images' alpha); kohya would train unmasked")
    sizes = {b for b in batch_sizes if b is not None}
    if len(sizes) > 1:
        raise ConfigError(f"dataset_config {config.dataset_config}: the datasets set different batch_size values "
                          f"({', '.join(str(b) for b in batch_sizes)}); pti-plugin draws every step from one pool of "
                          "same-bucket batches: use one batch_size")
    if sizes and sizes != {config.train_batch_size}:
        raise ConfigError(f"dataset_config {config.dataset_config} sets batch_size = {sizes.pop()}, the config "
                          f"train_batch_size = {config.train_batch_size}: build the config with build_config")
    return _drop_ignored(subsets)


__all__ = ["CaptionError", "IMAGE_EXTENSIONS", "ImageItem", "Subset", "folder_class", "image_files", "load_subsets"]
