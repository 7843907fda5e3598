"""kohya's ``base_weights``: LoRA files merged into the base model's weights before training.

Each file of ``base_weights`` (a kohya-format LoRA: ``lora_unet_*``, ``lora_te_*`` / SDXL ``lora_te1_*`` and
``lora_te2_*``, with ``lora_down``/``lora_up``/``alpha``, LoCon convolutions too) is merged, with its multiplier
``m`` of ``base_weights_multiplier`` (1.0 when none is given), into the frozen weight of each module it names:
``W += m * (alpha / rank) * up @ down`` (kohya ``networks/lora.py``'s ``LoRAModule.merge_to``: a 1x1 convolution
as the linear product, a 3x3 one as ``conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)``). Which module a
key names is the family's key table (:func:`pti_plugin.formats.kohya_lora.kohya_to_peft`, the table that reads
``network_weights``). The trainer merges right after :func:`~pti_plugin.models.loading.load_base_model`, in float32,
before any LoRA is attached, any weight is cast to the mixed-precision dtype or mapped from a file
(``models/disk_mapping.py``): what the run trains on, switches the LoRA off to (the pivot-locality reference) and
maps is the merged model. The measurement scripts' run loader (``metrics/run_model.py``) merges the same files.
A top-level module, not one of ``models/``: the models never import the formats (``tests/test_import_layers.py``).

A file's bundled embeddings (``bundle_emb.*``) are not loaded: kohya's merge reads only the LoRA keys.
The file checks that need no model (missing file, no LoRA key, non-finite values, the multipliers' count) run at
start (:func:`pti_plugin.input_checks.check_starting_files`); keys of another family's LoRA and shape mismatches are
named as the model loads. Each file is read once: the merge takes the tensors the start-up check read
(:mod:`pti_plugin.checked_files`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .checked_files import take
from .config import ConfigError
from .text_files import path_not_found

logger = logging.getLogger(__name__)
KEY = "base_weights"


def multipliers_of(paths: Sequence[str], multipliers: Sequence[float]) -> list[float]:
    """Each file's multiplier: ``multipliers`` (one per file), or 1.0 each when none is given (kohya's default)."""
    if multipliers and len(multipliers) != len(paths):
        raise ConfigError.at("base_weights_multiplier", f" holds {len(multipliers)} value(s) for {len(paths)} base_weights "
                                                        f"file(s) {list(paths)}: give one multiplier per file (or none: "
                                                        "1.0 each)")
    return [float(m) for m in multipliers] if multipliers else [1.0] * len(paths)


def require_file(path: str) -> None:
    """``path`` is a regular file; else a ConfigError naming the key and the file."""
    if not Path(path).is_file():
        raise ConfigError.at(KEY, f": {path_not_found(path, 'file', kind='a kohya LoRA .safetensors file')}"
                             if not Path(path).exists() else f": {path} is not a regular file")


def read_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of the LoRA file ``path`` through the safe loader; its problems as ConfigError naming the key and
    the file."""
    from .formats.kohya_lora import load_lora

    require_file(path)
    try:
        return load_lora(path)[0]
    except ValueError as exc:  # BadSafetensorsError, naming the file
        raise ConfigError.at(KEY, f": {exc}") from None


def lora_delta(key: str, weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``up @ down`` in the shape of ``weight`` (float32), kohya's rule by the layer's kind; a shape that does not
    fit is a ValueError naming ``key`` (the module's ``lora_down.weight`` key)."""
    up, down = up.float(), down.float()
    rank = down.shape[0]
    kernel = tuple(weight.shape[2:])
    fits = (up.dim() == down.dim() == weight.dim() and up.shape[0] == weight.shape[0] and up.shape[1] == rank
            and down.shape[1] == weight.shape[1] and tuple(up.shape[2:]) in ((), (1, 1)) and tuple(down.shape[2:]) == kernel)
    if not fits:
        raise ValueError(f"key {key!r} (lora_down {list(down.shape)}, lora_up {list(up.shape)}) does not fit the "
                         f"model's weight {list(weight.shape)} (a LoRA for another model?)")
    if weight.dim() == 2:  # linear
        return up @ down
    if kernel == (1, 1):  # conv2d 1x1
        return (up.flatten(1) @ down.flatten(1)).unsqueeze(2).unsqueeze(3)
    return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)  # conv2d 3x3 (LoCon)


def merge_file(components: dict[str, nn.Module], table, path: str, multiplier: float) -> int:
    """Merge the LoRA file ``path`` times ``multiplier`` into ``components`` (by component name, the key table's);
    returns the number of modules changed. Keys another family's LoRA holds are a ConfigError naming the key."""
    from .formats.kohya_lora import LoraFormatError, kohya_to_peft

    try:
        states, alphas = kohya_to_peft(take(path, read_file), components, table)
    except LoraFormatError as exc:
        raise ConfigError.at(KEY, f": {path}: {exc} (a LoRA for another model family?)") from None
    deltas = []
    for component, state in states.items():
        modules = dict(components[component].named_modules())
        for peft_key, down in state.items():
            if not peft_key.endswith(".lora_A.weight"):
                continue
            module_path = peft_key[: -len(".lora_A.weight")]
            name = table.by_path(component, module_path).kohya_name
            weight = modules[module_path].weight
            try:
                delta = lora_delta(f"{name}.lora_down.weight", weight, state[f"{module_path}.lora_B.weight"], down)
            except ValueError as exc:
                raise ConfigError.at(KEY, f": {path}: {exc}") from None
            deltas.append((weight, delta * (multiplier * alphas[module_path] / down.shape[0])))
    for weight, delta in deltas:  # every shape checked first: a file is merged whole or not at all
        weight.data = (weight.data.float() + delta).to(weight.dtype)  # new storage: nothing shared is written
    return len(deltas)


def merge_base_weights(base, paths: Sequence[str], multipliers: Sequence[float]) -> None:
    """Merge every ``base_weights`` file into the loaded model ``base`` (a ``models.loading.BaseModel``) in order,
    naming them in its ``source`` (the start-up line); nothing when ``paths`` is empty."""
    if not paths:
        return
    components = {"unet": base.unet} | dict(zip(base.family.text_encoder_names, base.text_encoders))
    merged = []
    for path, multiplier in zip(paths, multipliers_of(paths, multipliers)):
        count = merge_file(components, base.family.key_table, path, multiplier)
        logger.info("base_weights: merged %s x %g into %d module(s) of the base model", path, multiplier, count)
        merged.append(f"{os.path.basename(path)} x {multiplier:g}")
    base.source += " merged with " + ", ".join(merged)


def base_weights_metadata(paths: Sequence[str], multipliers: Sequence[float]) -> dict[str, str]:
    """``pti_base_weights`` for the saved LoRA: ``[[file name, multiplier], ...]`` (kohya records no key for them);
    nothing when no file is merged."""
    if not paths:
        return {}
    return {"pti_base_weights": json.dumps([[os.path.basename(p), m] for p, m in zip(paths, multipliers_of(paths, multipliers))])}
