"""The embedded default: the model and dataset used when a preset says ``@embedded``.

The model is the trained toy-world model shipped in ``pti_plugin/toy_world/weights`` when present,
else a tiny random SD1.5-shaped model built once into the cache folder. The dataset is a small
generated toy-world character set, written once into the cache folder. The cache folder is
``$PTI_PLUGIN_CACHE`` or ``~/.cache/pti_plugin``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

SHIPPED_WEIGHTS = Path(__file__).parent / "toy_world" / "weights"
_TINY_MODEL_NAME = "tiny-sd15-random-v1"
_DATASET_NAME = "toy-character-v2"  # world v2: the character has its dot and v2 cells


def cache_dir() -> Path:
    return Path(os.environ.get("PTI_PLUGIN_CACHE", Path.home() / ".cache" / "pti_plugin")).expanduser()


def _build_once(name: str, builder) -> Path:
    """``cache_dir()/name``, built by ``builder(tmp_dir)`` into a temporary folder then renamed."""
    final = cache_dir() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        builder(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process built it first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_model_dir() -> Path:
    """The shipped toy-world model, else the cached tiny random model (built on first use)."""
    if (SHIPPED_WEIGHTS / "model_index.json").is_file():
        return SHIPPED_WEIGHTS
    from .models.tiny import build_tiny_sd

    return _build_once(_TINY_MODEL_NAME, lambda out: build_tiny_sd(out, seed=0))


def default_dataset_dir(token: str = "tok1") -> Path:
    """A generated toy-world character dataset in kohya layout (built on first use)."""
    from .toy_world.world import write_character_dataset

    return _build_once(f"{_DATASET_NAME}-{token}", lambda out: write_character_dataset(out, token=token))
