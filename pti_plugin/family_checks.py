"""Start-up checks of the data that depend on the base model's family, run once the subsets are read and before any
model loads (the family is read from the model's ``model_index.json`` or its safetensors header, or the preset's
``model_family``, as :func:`~pti_plugin.models.loading.load_base_model` will read it).

- :func:`check_bucket_steps`: kohya's ``verify_bucket_reso_steps`` — with buckets, ``bucket_reso_steps`` is a
  multiple of 64 for SD1.x (``train_network.py``, ``train_textual_inversion.py``) and of 32 for SDXL
  (``sdxl_train_network.py``, ``sdxl_train_textual_inversion.py``); kohya stops on another value, here it is a
  ``ConfigError`` naming the key (and the dataset of a ``dataset_config``). Without buckets the key is unused.
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import Config, ConfigError
from .data.dataset import Subset

#: kohya's required divisor of ``bucket_reso_steps`` per family, and the kohya script that requires it.
BUCKET_STEP_DIVISORS = {"sd15": (64, "train_network.py"), "sdxl": (32, "sdxl_train_network.py")}


def run_family(config: Config) -> str | None:
    """The family the run's base model will load as, or None where it cannot be read yet (the loader names why)."""
    from .models.loading import choose_family, resolve_model_path

    try:
        return choose_family(resolve_model_path(config.pretrained_model_name_or_path), config.model_family)[0]
    except (OSError, ValueError):
        return None


def check_bucket_steps(config: Config, subsets: Sequence[Subset]) -> None:
    """Refuse, as kohya does, a ``bucket_reso_steps`` that the family's bucket sides cannot take (module docstring)."""
    family = run_family(config)
    if family not in BUCKET_STEP_DIVISORS:
        return
    from .models.model_checks import FAMILY_NAMES

    divisor, script = BUCKET_STEP_DIVISORS[family]
    for subset in subsets:
        enabled, _, _, step, _ = subset.bucket_settings
        if not enabled or step % divisor == 0:
            continue
        tail = (f" = {step} is not a multiple of {divisor}: kohya's {script} refuses it for an {FAMILY_NAMES[family]} "
                f"model (its verify_bucket_reso_steps({divisor})); use a multiple of {divisor}")
        if config.dataset_config:
            raise ConfigError(f"dataset_config {config.dataset_config} datasets.{subset.dataset_index}: "
                              f"bucket_reso_steps{tail}")
        raise ConfigError.at("bucket_reso_steps", tail)
