"""kohya's dataset, bucket, epoch and session keys of a LoRA's metadata (``train_network.py``), from a run's subsets
and scanned images.

kohya writes two forms. With a ``dataset_config``: ``ss_datasets``, a JSON list with one object per dataset (its
images, resolution, buckets, tag frequency and subsets) and ``ss_dataset_dirs`` (its training subsets, reg ones left
out, a name repeated across datasets suffixed `` (2)``, `` (3)`` ...). With folders (``train_data_dir``,
``reg_data_dir``) or ``in_json``: flat keys (``ss_resolution``, ``ss_enable_bucket``, ``ss_bucket_info``,
``ss_dataset_dirs``, ``ss_reg_dataset_dirs``, ...). Both forms have ``ss_num_train_images`` (training images x
repeats), ``ss_num_reg_images`` (reg images x their subset's repeats, before the balancing) and
``ss_num_batches_per_epoch``. Values are written as kohya's ``str(value)`` writes them (``"True"``, ``"None"``,
``"(512, 512)"``); the ``{...}``/``[...]`` ones are ``json.dumps``.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..data.dataset import ImageItem, Subset
from ..data.dataset_keys import face_range
from ..data.dataset_stats import tag_frequency


def _used(items: Sequence[ImageItem]) -> list[ImageItem]:
    """The images kohya registers in a dataset: every training image, the reg images its balancing draws."""
    return [item for item in items if item.num_repeats > 0]


def bucket_info(items: Sequence[ImageItem], enabled: bool) -> dict[str, Any] | None:
    """kohya's ``bucket_info`` of one dataset: None without buckets; else ``{"buckets": {i: {"resolution": (w, h),
    "count": images x repeats}}, "mean_img_ar_error": ...}``, ``i`` counting the buckets in use sorted by (w, h), the
    error the mean of ``|bucket w/h - image w/h|`` over the images (without repeats; an image of unknown size counts 0)."""
    if not enabled:
        return None
    counts: dict[tuple[int, int], int] = {}
    errors = []
    for item in _used(items):
        counts[item.bucket] = counts.get(item.bucket, 0) + item.num_repeats
        (width, height), (bucket_w, bucket_h) = item.image_size, item.bucket
        errors.append(bucket_w / bucket_h - width / height if width > 0 and height > 0 else 0.0)
    buckets = {i: {"resolution": reso, "count": counts[reso]} for i, reso in enumerate(sorted(counts))}
    return {"buckets": buckets, "mean_img_ar_error": float(np.mean(np.abs(np.array(errors)))) if errors else 0}


def _image_counts(counted: Sequence[tuple[Subset, int]]) -> tuple[int, int]:
    """kohya's ``num_train_images`` and ``num_reg_images`` of (subset, its image count) pairs: images x their subset's
    repeats (reg images: before the balancing)."""
    train = sum(s.num_repeats * n for s, n in counted if not s.is_reg)
    return train, sum(s.num_repeats * n for s, n in counted if s.is_reg)


def _dir_name(subset: Subset) -> str:
    """The name kohya's dataset-dir keys give a subset: its metadata file's base name, else its folder's."""
    return subset.metadata_file.name if subset.metadata_file is not None else subset.image_dir.name


def _bucket_settings(subset: Subset) -> tuple[bool, int | None, int | None, bool]:
    """A dataset's (enable_bucket, min_bucket_reso, max_bucket_reso, bucket_no_upscale) as kohya's dataset holds them:
    without buckets the range is None and no_upscale False."""
    enable, low, high, _, no_upscale = subset.bucket_settings
    return (True, low, high, bool(no_upscale)) if enable else (False, None, None, False)


def _subset_entry(subset: Subset, img_count: int) -> dict[str, Any]:
    """One subset of ``ss_datasets``, kohya's keys in kohya's order (an unset text option: None, as kohya's)."""
    options = subset.caption_options
    entry = {
        "img_count": img_count, "num_repeats": subset.num_repeats, "color_aug": bool(subset.color_aug),
        "flip_aug": bool(subset.flip_aug), "random_crop": bool(subset.random_crop),
        "shuffle_caption": bool(options.shuffle_caption), "keep_tokens": options.keep_tokens,
        "keep_tokens_separator": options.keep_tokens_separator, "secondary_separator": options.secondary_separator or None,
        "enable_wildcard": bool(options.enable_wildcard), "caption_prefix": options.caption_prefix or None,
        "caption_suffix": options.caption_suffix or None, "resize_interpolation": subset.resize_interpolation,
        "image_dir": subset.image_dir.name,
    }
    if subset.metadata_file is None:
        return entry | {"class_tokens": subset.class_tokens, "is_reg": bool(subset.is_reg)}
    return entry | {"metadata_file": subset.metadata_file.name}


def _datasets(subsets: Sequence[Subset], items: Sequence[ImageItem], counts: Counter, batch_size: int) -> dict[str, str]:
    """``ss_datasets`` and ``ss_dataset_dirs`` (kohya's dataset_config form); ``counts``: images per subset index."""
    datasets, dirs = [], {}
    for dataset_index in sorted({s.dataset_index for s in subsets}):
        indices = [i for i, s in enumerate(subsets) if s.dataset_index == dataset_index and counts[i]]
        if not indices:
            continue
        own = [item for item in items if item.dataset_index == dataset_index]
        first = subsets[indices[0]]
        enable, low, high, _ = _bucket_settings(first)
        train, reg = _image_counts([(subsets[i], counts[i]) for i in indices])
        entries = []
        for i in indices:
            subset, count = subsets[i], counts[i]
            entries.append(_subset_entry(subset, count))
            if subset.is_reg:
                continue
            name, n = _dir_name(subset), 2
            while name in dirs:  # kohya: a folder of several datasets, suffixed
                name, n = f"{_dir_name(subset)} ({n})", n + 1
            dirs[name] = {"n_repeats": subset.num_repeats, "img_count": count}
        datasets.append({
            "is_dreambooth": first.metadata_file is None, "batch_size_per_device": batch_size,
            "num_train_images": train, "num_reg_images": reg, "resolution": first.resolution, "enable_bucket": enable,
            "min_bucket_reso": low, "max_bucket_reso": high, "tag_frequency": tag_frequency(own),
            "bucket_info": bucket_info(own, enable), "resize_interpolation": first.mask_interpolation,
            "subsets": entries,
        })
    return {"ss_datasets": json.dumps(datasets), "ss_dataset_dirs": json.dumps(dirs)}


def _flat(config: Any, subsets: Sequence[Subset], items: Sequence[ImageItem], counts: Counter,
          global_batch: int) -> dict[str, str]:
    """kohya's flat dataset keys (folders or ``in_json``: one dataset, the preset's settings); ``counts``: images per
    subset index."""
    dirs: dict[str, dict[str, int]] = {}
    reg_dirs: dict[str, dict[str, int]] = {}
    for index, subset in enumerate(subsets):
        count = counts[index]
        if count:  # kohya: a subset without images is not one of its dataset's
            (reg_dirs if subset.is_reg else dirs)[_dir_name(subset)] = {"n_repeats": subset.num_repeats, "img_count": count}
    enable, low, high, no_upscale = _bucket_settings(subsets[0])
    return {
        "ss_batch_size_per_device": str(config.train_batch_size), "ss_total_batch_size": str(global_batch),
        "ss_resolution": str(tuple(subsets[0].resolution)), "ss_color_aug": str(bool(config.color_aug)),
        "ss_flip_aug": str(bool(config.flip_aug)), "ss_random_crop": str(bool(config.random_crop)),
        "ss_shuffle_caption": str(bool(config.shuffle_caption)), "ss_enable_bucket": str(enable),
        "ss_bucket_no_upscale": str(no_upscale), "ss_min_bucket_reso": str(low), "ss_max_bucket_reso": str(high),
        "ss_keep_tokens": str(config.keep_tokens), "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs), "ss_bucket_info": json.dumps(bucket_info(items, enable)),
    }


def kohya_dataset_metadata(config: Any, subsets: Sequence[Subset], items: Sequence[ImageItem], steps_per_epoch: int,
                           global_batch: int) -> dict[str, str]:
    """kohya's dataset keys of a run (see the module docstring): ``subsets`` as the scan read them (``items``' subset
    indices), ``items`` the training and reg images (the held-out ones not among them: kohya counts its training
    dataset's), ``steps_per_epoch`` optimizer steps, each ``gradient_accumulation_steps`` batches on every process:
    ``ss_num_batches_per_epoch`` counts one process's batches (kohya's ``len(train_dataloader)``); ``global_batch`` the
    images of one optimizer step over every process (the trainer's, kohya's ``ss_total_batch_size``). The tag frequency
    (``ss_tag_frequency``) is :func:`~pti_plugin.data.dataset_stats.tag_frequency`'s, written with the other keys."""
    counts = Counter(item.subset_index for item in items)
    train, reg = _image_counts([(subset, counts[index]) for index, subset in enumerate(subsets)])
    meta = {"ss_num_train_images": str(train), "ss_num_reg_images": str(reg),
            "ss_num_batches_per_epoch": str(steps_per_epoch * config.gradient_accumulation_steps),
            "ss_face_crop_aug_range": str(face_range(config.face_crop_aug_range))}
    if config.dataset_config:
        return meta | _datasets(subsets, items, counts, config.train_batch_size)
    return meta | _flat(config, subsets, items, counts, global_batch)


def session_metadata(started_at: float) -> dict[str, str]:
    """kohya's ``ss_session_id`` (a random integer in [0, 2**32] naming the run's process: a resumed run gets another;
    drawn from the system's entropy, leaving the seeded generators alone) and ``ss_training_started_at``."""
    return {"ss_session_id": str(random.SystemRandom().randint(0, 2**32)), "ss_training_started_at": str(started_at)}


__all__ = ["bucket_info", "kohya_dataset_metadata", "session_metadata"]
