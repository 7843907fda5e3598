"""Choice-valued preset keys: the accepted values, and whether this machine can run the chosen one.

A value is accepted only when the trainer can run it; a choice that needs a package that is not
installed, or a GPU this machine lacks (``mixed_precision = "fp16"``), is refused by name at validation (before any model loads), never left to fail mid-run.
``xformers = true`` is the exception kohya users expect: without CUDA or the package it falls back
to PyTorch SDPA with a warning.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .config import ConfigError
from .lr_schedulers import scheduler_name_problem
from .models.family import MAX_TOKEN_LENGTHS
from .optimizers import SUPPORTED, is_supported_optimizer, optimizer_package
from .sampling import SAMPLERS

#: Top-level keys with a fixed set of values (stage-level optimizer/scheduler keys are checked below).
CHOICES: dict[str, tuple[Any, ...]] = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "save_precision": ("float", "fp16", "bf16"),
    "save_model_as": ("safetensors",),
    "log_with": ("", "tensorboard"),
    "pivot_norm": ("free", "init", "decay"),
    "sample_sampler": tuple(SAMPLERS),
    "max_token_length": MAX_TOKEN_LENGTHS,
    "nan_policy": ("stop", "skip"),
    "xformers": (False, True),
    "sdpa": (False, True),
    "model_family": ("auto", "sd15", "sdxl"),
    "loss_type": ("l2", "l1", "huber", "smooth_l1"),
    "huber_schedule": ("snr", "exponential", "constant"),
}
#: Why values kohya accepts are refused here: (key, values) -> the reason, added to the "must be one of" message.
_KOHYA_VALUES_REFUSED = {
    ("save_model_as", ("ckpt", "pt")): "those are pickles, which a UI can only load by running their code; "
                                       "every UI reads the LoRA and embedding as safetensors",
    ("save_model_as", ("diffusers", "diffusers_safetensors")): "those are kohya's formats for a whole fine-tuned model; "
                                                               "this trains a LoRA and an embedding",
}
#: Packages a choice needs (besides the install's own), and the pip name that brings them.
_NEEDS = {("log_with", "tensorboard"): (("tensorboard", "tensorboardX"), "tensorboard")}


def installed(*modules: str) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in modules)


def choice_problem(key: str, value: Any, runs_no_model: bool = False) -> ConfigError | None:
    """Why the top-level ``key = value`` cannot run here (None when it can). ``runs_no_model`` (a tool such as the
    dataset preview): a precision this machine's device cannot train in is not a problem."""
    if value not in CHOICES[key]:
        why = next((f" ({reason})" for (k, values), reason in _KOHYA_VALUES_REFUSED.items() if k == key and value in values), "")
        return ConfigError.at(key, f" must be one of {list(CHOICES[key])}, got {value!r}{why}")
    modules, pip = _NEEDS.get((key, value), ((), ""))
    if modules and not installed(*modules):
        return ConfigError.at(key, f' = "{value}" needs the {pip} package (pip install {pip})')
    if (key, value) == ("mixed_precision", "fp16") and not runs_no_model and not cuda_available():
        return ConfigError.at(key, ' = "fp16" needs a CUDA GPU (on CPU the half-precision UNet meets float32 inputs '
                                   'and fails); use "bf16" or "no" on CPU')
    return None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def optimizer_problem(where: str, optimizer: str | None, scheduler: str | None) -> ConfigError | None:
    """Why a stage's (or the top level's) optimizer/scheduler cannot run here (None when they can)."""
    if optimizer is not None:
        if not is_supported_optimizer(optimizer):
            return ConfigError.at(f"{where}optimizer_type", f": unknown optimizer {optimizer!r}; valid: {', '.join(SUPPORTED)}")
        package = optimizer_package(optimizer)
        if package and not installed(package[0]):
            return ConfigError.at(f"{where}optimizer_type", f": {optimizer!r} needs the {package[1]} package (pip install {package[1]})")
    if scheduler is not None and (problem := scheduler_name_problem(scheduler)):
        return ConfigError.at(f"{where}lr_scheduler", f": {problem}")
    return None
