"""LoRA adapters (peft) on the UNet and text encoder: targets, attach, enable/disable, state.

Targets default to kohya ``networks.lora`` for SD1.5: inside every UNet ``Transformer2DModel``,
the attention projections (q/k/v/out of attn1 and attn2), the feed-forward layers and
``proj_in``/``proj_out`` (12 modules per transformer, 192 on SD1.5); in the text encoder, the
attention projections and MLP layers of every encoder layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer

ADAPTER_NAME = "pti"

_UNET_TRANSFORMER_LEAVES = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)
_TEXT_ENCODER_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def unet_lora_targets(unet: torch.nn.Module) -> list[str]:
    """Module paths of ``unet`` that kohya's SD1.5 LoRA trains (``proj_in``, transformer blocks, ``proj_out``)."""
    targets = []
    for name, module in unet.named_modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        targets += [f"{name}.proj_in", f"{name}.proj_out"]
        for block_name, block in module.named_modules():
            if type(block).__name__ == "BasicTransformerBlock":
                targets += [f"{name}.{block_name}.{leaf}" for leaf in _UNET_TRANSFORMER_LEAVES]
    return sorted(targets)


def unet_conv_lora_targets(unet: torch.nn.Module) -> tuple[list[str], list[str]]:
    """kohya's LoCon extension (``network_args = ["conv_dim=..."]``): layers of every ResNet block and
    down/upsampler. Returns (3x3 convolutions, which take conv_dim/conv_alpha; the 1x1 convolutions and
    linear layers, which take network_dim/network_alpha)."""
    conv3x3, other = [], []
    for name, module in unet.named_modules():
        if type(module).__name__ not in ("ResnetBlock2D", "Downsample2D", "Upsample2D"):
            continue
        for child_name, child in module.named_modules():
            path = f"{name}.{child_name}"
            if isinstance(child, torch.nn.Conv2d):
                (conv3x3 if child.kernel_size != (1, 1) else other).append(path)
            elif isinstance(child, torch.nn.Linear):
                other.append(path)
    return sorted(conv3x3), sorted(other)


def text_encoder_lora_targets(text_encoder: torch.nn.Module) -> list[str]:
    """Module paths of ``text_encoder`` (a CLIPTextModel) that kohya's LoRA trains."""
    return sorted(
        name
        for name, _ in text_encoder.named_modules()
        if ".layers." in name and name.endswith(_TEXT_ENCODER_LEAVES)
    )


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
    saved = [(p, p.requires_grad) for p in lora_parameters(model)]
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)
    for param, flag in saved:
        param.requires_grad_(flag)


@contextlib.contextmanager
def lora_disabled(*models: torch.nn.Module) -> Iterator[None]:
    """Run the block with the LoRA of ``models`` off (the frozen base model), then switch it back on."""
    for model in models:
        set_lora_enabled(model, False)
    try:
        yield
    finally:
        for model in models:
            set_lora_enabled(model, True)
