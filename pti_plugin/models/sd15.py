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

    def __init__(self, clip_skip: int = 1, max_token_length: int = 75):
        if clip_skip < 1:
            raise ValueError("clip_skip must be >= 1")
        if max_token_length not in (75, 150, 225):
            raise ValueError("max_token_length must be 75, 150 or 225")
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length

    def tokenize(self, tokenizer, captions: list[str]) -> torch.Tensor:
        """Token ids ``[B, max_token_length + 2]`` (int64): BOS, the caption padded/truncated, EOS.

        With 75 this is exactly the inference tokenisation (77 ids).
        """
        return tokenizer(
            captions, padding="max_length", max_length=self.max_token_length + 2, truncation=True, return_tensors="pt"
        ).input_ids

    def pre_layernorm_states(self, text_encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden state ``clip_skip`` layers from the end, before the final LayerNorm: ``[B, L, d]``."""
        return self._windows(input_ids, lambda ids: text_encoder(ids, output_hidden_states=True).hidden_states[-self.clip_skip])

    def encode(self, text_encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """UNet conditioning ``[B, L, d]``: the final LayerNorm of the ``clip_skip`` layer's state.

        ``L = max_token_length + 2``. Longer than 77 ids, the caption is encoded in windows of 75
        tokens, each framed by BOS/EOS, and the windows' states are concatenated keeping the first
        BOS and the last EOS (kohya's ``max_token_length`` 150/225 scheme).
        """
        if self.clip_skip == 1:
            return self._windows(input_ids, lambda ids: text_encoder(ids).last_hidden_state)
        return final_layer_norm(text_encoder)(self.pre_layernorm_states(text_encoder, input_ids))

    def _windows(self, input_ids: torch.Tensor, run) -> torch.Tensor:
        if input_ids.shape[1] <= 77:
            return run(input_ids)
        bos, body, eos = input_ids[:, :1], input_ids[:, 1:-1], input_ids[:, -1:]  # body [B, 75 * k]
        chunks = []
        for i, start in enumerate(range(0, body.shape[1], 75)):
            window = body[:, start : start + 75]
            # A window after the caption's end holds only padding (EOS ids); keep the framing tokens.
            states = run(torch.cat([bos, window, eos], dim=1))  # [B, 77, d]
            first = 0 if i == 0 else 1
            last = 77 if start + 75 >= body.shape[1] else 76
            chunks.append(states[:, first:last])
        return torch.cat(chunks, dim=1)

    def unet_lora_targets(self, unet: nn.Module) -> list[str]:
        return unet_lora_targets(unet)

    def text_encoder_lora_targets(self, text_encoder: nn.Module) -> list[str]:
        return text_encoder_lora_targets(text_encoder)
