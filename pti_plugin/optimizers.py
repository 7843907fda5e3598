"""Optimizers by kohya name: torch's, bitsandbytes' 8-bit and paged ones, Adafactor, Prodigy.

``optimizer_args`` are kohya's ``"key=value"`` strings; values are Python literals
(``betas=(0.9,0.99)``, ``weight_decay=0.01``), else strings (:func:`parse_key_values`, which reads
``lr_scheduler_args`` too).
"""

from __future__ import annotations

import ast
from typing import Any

import torch

_BNB = {
    "adamw8bit": "AdamW8bit", "adam8bit": "Adam8bit", "lion8bit": "Lion8bit", "pagedadamw8bit": "PagedAdamW8bit",
    "pagedlion8bit": "PagedLion8bit", "pagedadamw": "PagedAdamW", "pagedadamw32bit": "PagedAdamW32bit",
    "lion": "Lion", "sgdnesterov8bit": "SGD8bit", "rmsprop8bit": "RMSprop8bit",
}
_TORCH = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "sgdnesterov": "SGD", "rmsprop": "RMSprop"}
SUPPORTED = sorted([
    "AdamW", "Adam", "SGD", "SGDNesterov", "RMSprop", "AdamW8bit", "Adam8bit", "Lion8bit", "Lion", "PagedAdamW8bit",
    "PagedLion8bit", "PagedAdamW", "PagedAdamW32bit", "SGDNesterov8bit", "RMSprop8bit", "Adafactor", "Prodigy",
])


def optimizer_key(name: str) -> str:
    """``optimizer_type`` as the builder reads it: kohya spelling, case and ``_`` ignored."""
    return name.lower().replace("_", "")


def is_supported_optimizer(name: str) -> bool:
    key = optimizer_key(name)
    return key in _BNB or key in _TORCH or key in ("adafactor", "prodigy")


def optimizer_package(name: str) -> tuple[str, str] | None:
    """(module, pip name) of the package optimizer ``name`` needs beyond torch, or None."""
    key = optimizer_key(name)
    if key in _BNB:
        return ("bitsandbytes", "bitsandbytes")
    return {"adafactor": ("transformers", "transformers"), "prodigy": ("prodigyopt", "prodigyopt")}.get(key)


def parse_key_values(args: list[str] | tuple[str, ...], strict: bool = False) -> dict[str, Any]:
    """kohya's ``"key=value"`` argument strings -> a dict, each value a Python literal (``ast.literal_eval``, as kohya
    reads them): ``["betas=(0.9,0.99)", "weight_decay=0.1"]`` -> ``{"betas": (0.9, 0.99), "weight_decay": 0.1}``.
    ``optimizer_args`` (not ``strict``): a value that is not a literal is kept as its string, a key given again
    replaces the first. ``strict`` (``lr_scheduler_args``): a ValueError names an entry whose key is not a name, is
    given twice, or whose value is not a literal."""
    parsed: dict[str, Any] = {}
    for item in args:
        key, eq, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not eq or (strict and not key.isidentifier()):
            raise ValueError(f"entry {item!r} is not key=value (e.g. \"gamma=0.5\")" if strict
                             else f"optimizer_args entries are key=value, got {item!r}")
        if strict and key in parsed:
            raise ValueError(f"entry {item!r}: {key} is given twice")
        try:
            parsed[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            if strict:
                raise ValueError(f"entry {item!r}: {text!r} is not a Python literal (kohya reads the values with "
                                 f"ast.literal_eval): quote a string, e.g. {key}='{text}'") from None
            parsed[key] = text
    return parsed


def build_optimizer(name: str, param_groups: list[dict[str, Any]], lr: float, args: list[str]) -> torch.optim.Optimizer:
    """The optimizer ``name`` (kohya spelling, case-insensitive) over ``param_groups``."""
    key = optimizer_key(name)
    kwargs = parse_key_values(args)
    if key in _BNB:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ValueError(f"optimizer_type {name!r} needs bitsandbytes (pip install bitsandbytes)") from exc
        cls = getattr(bnb.optim, _BNB[key])
        if key == "sgdnesterov8bit":
            kwargs.setdefault("nesterov", True)
            kwargs.setdefault("momentum", 0.9)
        return cls(param_groups, lr=lr, **kwargs)
    if key in _TORCH:
        if key == "sgdnesterov":
            kwargs.setdefault("nesterov", True)
            kwargs.setdefault("momentum", 0.9)
        return getattr(torch.optim, _TORCH[key])(param_groups, lr=lr, **kwargs)
    if key == "adafactor":
        from transformers.optimization import Adafactor

        kwargs.setdefault("relative_step", False)
        kwargs.setdefault("scale_parameter", False)
        kwargs.setdefault("warmup_init", False)
        return Adafactor(param_groups, lr=lr, **kwargs)
    if key == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as exc:
            raise ValueError("optimizer_type 'Prodigy' needs the prodigyopt package (pip install prodigyopt)") from exc
        return Prodigy(param_groups, lr=lr, **kwargs)
    raise ValueError(f"unknown optimizer_type {name!r}; supported: {', '.join(SUPPORTED)}")


def optimizer_args_problem(name: str, args: list[str]) -> str | None:
    """Why ``optimizer_args`` cannot build optimizer ``name`` (an unknown argument, a value of the wrong type or
    range, Adafactor's ``relative_step=True`` beside the learning rate every group has), found by building it over
    one throw-away parameter group as the trainer's are built; None when it builds."""
    try:
        build_optimizer(name, [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3}], 1e-3, args)
    except (TypeError, ValueError, RuntimeError) as exc:
        return f"{exc} (optimizer_type {name!r})"
    return None

