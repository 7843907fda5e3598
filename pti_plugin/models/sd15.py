"""The SD1.5 model family: how conditioning is built from the text encoder, and its LoRA targets.

A family adapter holds what differs between model families (text encoders, conditioning,
LoRA targets); the trainer asks the adapter and never branches on the family itself.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import text_encoder_lora_targets, unet_lora_targets


def final_layer_norm(text_encoder: nn.Module) -> nn.LayerNorm:
    """The CLIP text encoder's final LayerNorm (under ``text_model.`` in transformers < 5)."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


class SD15Family:
    """SD1.x: one CLIP ViT-L/14 text encoder; the UNet reads its (LayerNorm-ed) per-token states."""

    name = "sd15"
    base_model_version = "sd_v1"

    def __init__(self, clip_skip: int = 1):
        if clip_skip < 1:
            raise ValueError("clip_skip must be >= 1")
        self.clip_skip = clip_skip

    def tokenize(self, tokenizer, captions: list[str]) -> torch.Tensor:
        """Token ids ``[B, 77]`` (int64), padded and truncated as at inference."""
        return tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def pre_layernorm_states(self, text_encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden state ``clip_skip`` layers from the end, before the final LayerNorm: ``[B, 77, d]``."""
        output = text_encoder(input_ids, output_hidden_states=True)
        return output.hidden_states[-self.clip_skip]

    def encode(self, text_encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """UNet conditioning ``[B, 77, d]``: the final LayerNorm of the ``clip_skip`` layer's state."""
        if self.clip_skip == 1:
            return text_encoder(input_ids).last_hidden_state
        return final_layer_norm(text_encoder)(self.pre_layernorm_states(text_encoder, input_ids))

    def unet_lora_targets(self, unet: nn.Module) -> list[str]:
        return unet_lora_targets(unet)

    def text_encoder_lora_targets(self, text_encoder: nn.Module) -> list[str]:
        return text_encoder_lora_targets(text_encoder)
