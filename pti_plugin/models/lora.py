"""LoRA adapters (peft) on the UNet and text encoders: attach, enable/disable, state.

Which modules take a LoRA is the model family's key table (``family.KeyTable.peft_targets``), the
same table that names them for kohya.
"""

from __future__ import annotations

import weakref

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

ADAPTER_NAME = "pti"
#: Each model's LoRA layers, found once as :func:`attach_lora` injects them: a regularised step switches the LoRA
#: off and on again, and finding the layers and their parameters by walking an SD1.5 UNet (~2600 modules, ~1000
#: parameters) cost ~20 ms of CPU a switch (peft replaces no layer module once injected).
_ATTACHED_LAYERS: weakref.WeakKeyDictionary[torch.nn.Module, list[BaseTunerLayer]] = weakref.WeakKeyDictionary()
#: The adapter parameters of those layers whose ``requires_grad`` peft's switch sets, found once too (walking them
#: at every switch was about half of a switch's CPU time on the SD1.5 UNet).
_SWITCHED_PARAMETERS: weakref.WeakKeyDictionary[torch.nn.Module, list[torch.nn.Parameter]] = weakref.WeakKeyDictionary()


def split_conv3x3(model: torch.nn.Module, paths: list[str]) -> tuple[list[str], list[str]]:
    """kohya's LoCon rule on ``paths`` of ``model``: (3x3 convolutions, which take conv_dim/conv_alpha;
    the 1x1 convolutions and linear layers, which take network_dim/network_alpha)."""
    modules = dict(model.named_modules())
    conv3x3 = [p for p in paths if isinstance(modules[p], torch.nn.Conv2d) and modules[p].kernel_size != (1, 1)]
    chosen = set(conv3x3)
    return conv3x3, [p for p in paths if p not in chosen]


def attach_lora(
    model: torch.nn.Module, targets: list[str], rank: int, alpha: float, overrides: dict[str, tuple[int, float]] | None = None
) -> None:
    """Inject a peft LoRA adapter named ``ADAPTER_NAME`` into ``targets`` of ``model`` (in place).

    ``overrides`` maps some target paths to their own (rank, alpha) (LoCon's conv_dim/conv_alpha).
    Initialisation is peft's (down: Kaiming-uniform, up: zeros, as kohya), so the model's
    output is unchanged until training moves the up weights. Adapter weights are float32.
    """
    if not targets:
        raise ValueError("no LoRA target modules found in the model")
    overrides = overrides or {}
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True,
        rank_pattern={f"^{k}$": r for k, (r, _) in overrides.items()},
        alpha_pattern={f"^{k}$": a for k, (_, a) in overrides.items()},
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for param in lora_parameters(model):
        param.data = param.data.float()
    _ATTACHED_LAYERS[model] = layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    _SWITCHED_PARAMETERS[model] = _switched_parameters(layers)


def _switched_parameters(layers: list[BaseTunerLayer]) -> list[torch.nn.Parameter]:
    """The adapter weights of ``layers`` whose ``requires_grad`` flags peft's ``enable_adapters`` sets."""
    return [p for layer in layers for name in layer.adapter_layer_names for p in getattr(layer, name).parameters()]


def lora_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    """The peft LoRA layers of ``model`` (empty when none is attached)."""
    found = _ATTACHED_LAYERS.get(model)
    return list(found) if found is not None else [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The LoRA adapter parameters of ``model`` in a fixed order (empty when none is attached)."""
    return [p for n, p in model.named_parameters() if f".{ADAPTER_NAME}." in n and ".lora_" in n]


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft-format LoRA weights: ``<module path>.lora_A.weight`` / ``.lora_B.weight``."""
    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def load_lora_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load peft-format LoRA weights (as ``lora_state_dict`` returns) into ``model``'s adapter."""
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"LoRA weights for modules the model does not have: {unexpected[:5]}")


def set_lora_enabled(model: torch.nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of ``model`` on or off, leaving ``requires_grad`` unchanged."""
    layers = lora_layers(model)
    switched = _SWITCHED_PARAMETERS.get(model)
    saved = [(p, p.requires_grad) for p in (_switched_parameters(layers) if switched is None else switched)]
    for layer in layers:
        layer.enable_adapters(enabled)
    for param, flag in saved:
        param.requires_grad_(flag)
