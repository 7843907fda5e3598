"""The embedded default: the model and dataset used when a preset says ``@embedded``.

The model is the trained toy-world model shipped in ``pti_plugin/toy_world/weights`` when present,
else a tiny random SD1.5-shaped model built once into the cache folder (both in
:func:`pti_plugin.models.tiny.default_model_dir`, which the model loader resolves ``@embedded`` through). The dataset
is a small generated toy-world character set, written once into the cache folder. The cache folder is
``$PTI_PLUGIN_CACHE`` or ``~/.cache/pti_plugin`` (:mod:`pti_plugin.cache_folder`).
"""

from __future__ import annotations

from pathlib import Path

from .cache_folder import build_once, cache_dir
from .models.tiny import SHIPPED_WEIGHTS, default_model_dir

_DATASET_NAME = "toy-character-v2"  # world v2: the character has its dot and v2 cells


def default_dataset_dir(token: str = "tok1") -> Path:
    """A generated toy-world character dataset in kohya layout (built on first use)."""
    from .toy_world.world import write_character_dataset

    return build_once(f"{_DATASET_NAME}-{token}", lambda out: write_character_dataset(out, token=token))


__all__ = ["SHIPPED_WEIGHTS", "cache_dir", "default_dataset_dir", "default_model_dir"]
