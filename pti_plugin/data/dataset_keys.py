"""The kohya dataset keys, each with its value check: the one table of what a ``dataset_config``
level may set (``data/dataset.py`` reads the file through it) and of how the preset's top-level
keys of the same names are checked (``config_checks.py``). No torch here, so configuration
checks stay light.

A check takes a value and returns it (sizes as ``(width, height)``) or raises ``ValueError`` with
the rule ("expects ..."); the caller names the key and where it was set.
"""

from __future__ import annotations

from typing import Any, Callable


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expects true or false")
    return value


def _int_at_least(low: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"expects an integer >= {low}")
        return value
    return check


def _latent_multiple(value: Any) -> int:
    """A side step of the image buckets: a multiple of 8, the VAE's downsampling factor (a side that is not one
    has no whole latent size)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 8 or value % 8:
        raise ValueError("expects a multiple of 8 (the VAE's downsampling factor)")
    return value


def _rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError("expects a number in [0, 1]")
    return float(value)


def _warmup_step(value: Any) -> float:
    """``token_warmup_step``: whole steps, or (kohya) a number below 1: that fraction of the stage's steps (0 = off)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError("expects a number >= 0 (steps, or below 1: a fraction of the stage's steps)")
    return value


def _below_one(value: Any) -> float:
    """A fraction in [0, 1): ``validation_split`` (1 would leave nothing to train on)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError("expects a number in [0, 1)")
    return float(value)


def _optional_seed(value: Any) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**63 - 1):
        raise ValueError(f"expects an integer between 0 and {2**63 - 1}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expects a string")
    return value


def _nonempty_text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expects a non-empty string")
    return value


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def file_extension(value: Any) -> str:
    """A file extension (``.txt``, ``txt``, ``.caption``): not empty, no path separator or space."""
    bare = value[1:] if isinstance(value, str) and value.startswith(".") else value
    if not isinstance(bare, str) or not bare or any(c in "/\\" or c.isspace() for c in bare):
        raise ValueError("must be a file extension such as '.txt'")
    return value


def size_pair(value: Any) -> tuple[int, int]:
    """An int side or ``[width, height]``, as ``(width, height)``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return value[0], value[1]
    raise ValueError("expects an int or [width, height]")


def optional_size_pair(value: Any) -> tuple[int, int] | None:
    return None if value is None else size_pair(value)


#: kohya's ``resize_interpolation`` names (``library/utils.py``: ``validate_interpolation_fn``), each with the PIL
#: filter that kohya's ``get_pil_interpolation`` gives it (``Image.Resampling`` member names). Unset: Lanczos.
RESIZE_INTERPOLATIONS: dict[str, str] = {
    "lanczos": "LANCZOS", "nearest": "NEAREST", "bilinear": "BILINEAR", "linear": "BILINEAR",
    "bicubic": "BICUBIC", "cubic": "BICUBIC", "area": "HAMMING", "box": "BOX",
}


def interpolation_name(value: Any) -> str | None:
    """``resize_interpolation``: unset (None) or one of kohya's names."""
    if value is not None and value not in RESIZE_INTERPOLATIONS:
        raise ValueError(f"expects one of {', '.join(RESIZE_INTERPOLATIONS)} (kohya's names)")
    return value


def face_range(value: Any) -> tuple[float, float] | None:
    """``face_crop_aug_range``: unset (None), or two numbers ``[lo, hi]`` with 0 < lo <= hi (kohya's command line
    writes them ``"lo,hi"``, read too): the crop's shorter side is lo to hi times the face's size."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        if not isinstance(parts, (list, tuple)) or len(parts) != 2 or any(isinstance(p, bool) for p in parts):
            raise TypeError
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError("expects two numbers [lo, hi] (kohya's \"lo,hi\")") from None
    if not 0.0 < lo <= hi < float("inf"):
        raise ValueError("expects two numbers [lo, hi] with 0 < lo <= hi")
    return lo, hi


#: Dataset-level keys ([general] and [[datasets]] only), with their checks.
DATASET_KEYS: dict[str, Callable[[Any], Any]] = {
    "resolution": size_pair,
    "enable_bucket": _bool,
    "min_bucket_reso": _int_at_least(8),
    "max_bucket_reso": _int_at_least(8),
    "bucket_reso_steps": _latent_multiple,
    "bucket_no_upscale": _bool,
    "batch_size": _int_at_least(1),
    "skip_image_resolution": optional_size_pair,
    "validation_split": _below_one,  # kohya: the fraction of each subset held out (``validation_split.py``)
    "validation_seed": _optional_seed,  # kohya: the seed of that split (unset: ``seed``)
}
#: The caption options of a subset (the fields of ``captions.CaptionOptions``), with their checks.
CAPTION_KEYS: dict[str, Callable[[Any], Any]] = {
    "shuffle_caption": _bool,
    "keep_tokens": _int_at_least(0),
    "caption_separator": _nonempty_text,
    "keep_tokens_separator": _text,
    "secondary_separator": _text,
    "enable_wildcard": _bool,
    "caption_prefix": _text,
    "caption_suffix": _text,
    "caption_dropout_rate": _rate,
    "caption_dropout_every_n_epochs": _int_at_least(0),
    "caption_tag_dropout_rate": _rate,
    "token_warmup_min": _int_at_least(0),
    "token_warmup_step": _warmup_step,
}
#: Subset keys that may also be set at [general] and [[datasets]] level (defaults of their subsets).
SUBSET_KEYS: dict[str, Callable[[Any], Any]] = {
    "num_repeats": _int_at_least(0),
    "caption_extension": file_extension,
    "class_tokens": _optional_text,
    "flip_aug": _bool,
    "color_aug": _bool,
    "random_crop": _bool,
    "resize_interpolation": interpolation_name,  # kohya: a subset's own, else its dataset's, else the top-level one
    "face_crop_aug_range": face_range,  # applied without buckets only, as kohya (``face_crop.py``)
} | CAPTION_KEYS
#: Keys of [[datasets.subsets]] only (as in kohya; ``alpha_mask``'s default is the preset's top-level key, kohya's ``--alpha_mask``).
SUBSET_ONLY_KEYS: dict[str, Callable[[Any], Any]] = {
    "image_dir": _nonempty_text,
    "is_reg": _bool,
    "metadata_file": _nonempty_text,
    "alpha_mask": _bool,
    "conditioning_data_dir": _nonempty_text,
}
#: Keys kohya documents for dataset_config that pti-plugin refuses, with the reason.
REFUSED_DATASET_KEYS: dict[str, str] = {
    "cache_info": "image sizes and captions are read at every start (no metadata_cache.json)",
    "network_multiplier": "per-dataset LoRA multipliers are not implemented",
    "max_token_length": "a top-level preset key, not a dataset option",
    "prior_loss_weight": "a top-level preset key, not a dataset option",
    "debug_dataset": "use python -m pti_plugin.dataset_preview",
}
#: The preset's top-level keys that are the defaults of [general] (same names, same checks).
TOP_LEVEL_KEYS = [k for k in list(DATASET_KEYS) + list(SUBSET_KEYS) if k not in ("batch_size", "num_repeats", "class_tokens")]
