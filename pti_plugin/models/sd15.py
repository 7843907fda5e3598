"""The SD1.5 model family: one CLIP ViT-L/14 text encoder, its conditioning, and its LoRA key table.

Only this module (and ``single_file.py``, which it calls) knows SD1.5's shape; everything else asks
the adapter (see ``family.py``).

The key table is SD1.5's architecture written out (not read from the installed diffusers or
transformers, whose module names change between versions): kohya ``networks.lora`` adapts, in each
of the 16 ``Transformer2DModel``s, ``proj_in``, ``proj_out`` and the 10 attention/feed-forward
linears (192 UNet modules), the 72 attention and MLP linears of the text encoder, and with LoCon's
``conv_dim`` each ResNet block's ``conv1``, ``conv2``, ``time_emb_proj`` and ``conv_shortcut``
(where it has one) plus the down/upsampler convolutions (86 modules). kohya names a module
``lora_unet_<path>`` / ``lora_te_<path>`` with ``.`` replaced by ``_``; text-encoder paths keep
CLIP's ``text_model.`` prefix.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.weighted_captions import apply_weights, weighted_ids
from .family import (CLIP_WINDOW, CLIP_WINDOW_IDS, STANDALONE_KEY, TEXT_ENCODER_PREFIX, UNET_PREFIX, Conditioning,
                     EmbeddingLayout, KeyTable, LoadedComponents, LoraKey, check_max_token_length, register_family)
from .model_checks import FAMILY_FOLDERS, load_folder

_TEXT_ENCODER_PREFIX = TEXT_ENCODER_PREFIX + "_"  # one text encoder: lora_te_

_BLOCK_OUT_CHANNELS = (320, 640, 1280, 1280)
_LAYERS_PER_BLOCK = 2
_DOWN_HAS_ATTENTION = (True, True, True, False)
_UP_HAS_ATTENTION = (False, True, True, True)
#: The 10 linear layers of a ``BasicTransformerBlock`` that kohya's LoRA adapts.
_TRANSFORMER_BLOCK_LEAVES = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)
_TEXT_LAYERS = 12
_TEXT_LAYER_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _transformer_paths(transformer: str) -> list[str]:
    """``proj_in``, the block's 10 linears and ``proj_out`` of one ``Transformer2DModel`` (one block each in SD1.5)."""
    block = f"{transformer}.transformer_blocks.0"
    return [f"{transformer}.proj_in"] + [f"{block}.{leaf}" for leaf in _TRANSFORMER_BLOCK_LEAVES] + [f"{transformer}.proj_out"]


def _resnet_paths(resnet: str, in_channels: int, out_channels: int) -> list[str]:
    """What kohya adapts inside a ``ResnetBlock2D`` with ``conv_dim`` set (``conv_shortcut`` only where channels change)."""
    paths = [f"{resnet}.conv1", f"{resnet}.time_emb_proj", f"{resnet}.conv2"]
    if in_channels != out_channels:
        paths.append(f"{resnet}.conv_shortcut")
    return paths


def _unet_paths() -> tuple[list[str], list[str]]:
    """(attention paths, conv paths) of SD1.5's UNet, in diffusers/kohya dotted form."""
    attention, conv = [], []
    channels = _BLOCK_OUT_CHANNELS[0]
    skip_channels = [channels]  # channels of each skip connection, pushed in down order
    for b, (out, has_attn) in enumerate(zip(_BLOCK_OUT_CHANNELS, _DOWN_HAS_ATTENTION)):
        for i in range(_LAYERS_PER_BLOCK):
            conv += _resnet_paths(f"down_blocks.{b}.resnets.{i}", channels, out)
            channels = out
            if has_attn:
                attention += _transformer_paths(f"down_blocks.{b}.attentions.{i}")
            skip_channels.append(channels)
        if b < len(_BLOCK_OUT_CHANNELS) - 1:
            conv.append(f"down_blocks.{b}.downsamplers.0.conv")
            skip_channels.append(channels)
    for i in range(2):
        conv += _resnet_paths(f"mid_block.resnets.{i}", channels, channels)
    attention += _transformer_paths("mid_block.attentions.0")
    for b, (out, has_attn) in enumerate(zip(reversed(_BLOCK_OUT_CHANNELS), _UP_HAS_ATTENTION)):
        for i in range(_LAYERS_PER_BLOCK + 1):
            conv += _resnet_paths(f"up_blocks.{b}.resnets.{i}", channels + skip_channels.pop(), out)
            channels = out
            if has_attn:
                attention += _transformer_paths(f"up_blocks.{b}.attentions.{i}")
        if b < len(_BLOCK_OUT_CHANNELS) - 1:
            conv.append(f"up_blocks.{b}.upsamplers.0.conv")
    return attention, conv


def _kohya_name(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


@functools.cache
def sd15_key_table() -> KeyTable:
    """SD1.5's LoRA key table (see the module docstring)."""
    attention, conv = _unet_paths()
    text = [f"text_model.encoder.layers.{i}.{leaf}" for i in range(_TEXT_LAYERS) for leaf in _TEXT_LAYER_LEAVES]
    keys = [LoraKey("unet", p, _kohya_name(UNET_PREFIX, p)) for p in attention]
    keys += [LoraKey("unet", p, _kohya_name(UNET_PREFIX, p), conv=True) for p in conv]
    keys += [LoraKey("text_encoder", p, _kohya_name(_TEXT_ENCODER_PREFIX, p)) for p in text]
    return KeyTable(keys, optional_prefixes={"text_encoder": "text_model."})


def final_layer_norm(text_encoder: nn.Module) -> nn.LayerNorm:
    """The CLIP text encoder's final LayerNorm (under ``text_model.`` in transformers < 5)."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm


@dataclass
class SD15Family:
    """SD1.x: one CLIP ViT-L/14 text encoder; the UNet reads its (LayerNorm-ed) per-token states.

    ``clip_skip`` (kohya's meaning) and ``max_token_length`` (75, or 150/225 by kohya's windows)
    shape the conditioning.
    """

    clip_skip: int = 1
    max_token_length: int = CLIP_WINDOW

    name = "sd15"
    pipeline_class_name = "StableDiffusionPipeline"
    text_encoder_names = ("text_encoder",)
    embedding_layout = EmbeddingLayout(standalone_keys=(STANDALONE_KEY,), bundle_keys=("string_to_param.*",))

    def __post_init__(self):
        if self.clip_skip < 1:
            raise ValueError("clip_skip must be >= 1")
        check_max_token_length(self.max_token_length)

    @property
    def key_table(self) -> KeyTable:
        return sd15_key_table()

    # ------------------------------------------------------------------ loading
    def load(self, path: Path, single_file_config: str = "", tokenizer_path: str = "") -> LoadedComponents:
        """A diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) or an
        original single file (see ``single_file.py``), offline."""
        if path.is_file():
            from .single_file import load_single_file

            unet, vae, text_encoder, tokenizer, scheduler = load_single_file(
                path, config_dir=single_file_config or None, tokenizer_path=tokenizer_path
            )
            return LoadedComponents(unet, vae, (text_encoder,), (tokenizer,), scheduler)
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        parts = load_folder(path, self.name, dict(zip(FAMILY_FOLDERS["sd15"], (
            UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDPMScheduler))))
        return LoadedComponents(parts["unet"], parts["vae"], (parts["text_encoder"],), (parts["tokenizer"],), parts["scheduler"])

    # ------------------------------------------------------------------ conditioning
    def tokenize(self, tokenizers: Sequence[object], captions: list[str]) -> torch.Tensor:
        """Token ids ``[B, max_token_length + 2]`` (int64): BOS, the caption padded/truncated, EOS.

        With 75 this is exactly the inference tokenisation (77 ids).
        """
        (tokenizer,) = tokenizers
        return tokenizer(
            captions, padding="max_length", max_length=self.max_token_length + 2, truncation=True, return_tensors="pt"
        ).input_ids

    def pre_layernorm_states(self, text_encoders: Sequence[nn.Module], input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden state ``clip_skip`` layers from the end, before the final LayerNorm: ``[B, L, d]``."""
        (te,) = text_encoders
        return self._windows(input_ids, lambda ids: te(ids, output_hidden_states=True).hidden_states[-self.clip_skip])

    def encode(self, text_encoders: Sequence[nn.Module], input_ids: torch.Tensor,
               sizes: torch.Tensor | None = None) -> Conditioning:
        """UNet conditioning: ``[B, L, d]``, the final LayerNorm of the ``clip_skip`` layer's state.

        ``L = max_token_length + 2``. Longer than 77 ids, the caption is encoded in windows of 75
        tokens, each framed by BOS/EOS, and the windows' states are concatenated keeping the first
        BOS and the last EOS (kohya's ``max_token_length`` 150/225 scheme).
        """
        (te,) = text_encoders
        if self.clip_skip == 1:
            return Conditioning(self._windows(input_ids, lambda ids: te(ids).last_hidden_state))
        return Conditioning(final_layer_norm(te)(self.pre_layernorm_states(text_encoders, input_ids)))

    def size_conditioning(self, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Nothing: SD1.5's UNet takes no size conditioning."""
        return {}

    def conditioning_widths(self, text_encoders: Sequence[nn.Module]) -> tuple[int, ...]:
        return tuple(int(te.config.hidden_size) for te in text_encoders)

    def final_layer_norms(self, text_encoders: Sequence[nn.Module]) -> tuple[nn.LayerNorm]:
        """The LayerNorm that ends SD1.5's conditioning (whatever ``clip_skip``): the exact slerp geometry holds."""
        return tuple(final_layer_norm(te) for te in text_encoders)

    def weighted_ids(self, tokenizers: Sequence[object], caption: str) -> tuple[list[int], list[float]]:
        """kohya's ``weighted_captions``: ``max_token_length + 2`` ids (as :meth:`tokenize`) and their weights."""
        (tokenizer,) = tokenizers
        return weighted_ids(tokenizer, caption, self.max_token_length + 2)

    def weigh(self, text_encoders: Sequence[nn.Module], cond: Conditioning, weights: torch.Tensor) -> Conditioning:
        """``cond`` with its rows times ``weights`` [B, L] (the windows' rows line up with the ids)."""
        return Conditioning(apply_weights(cond.hidden_states, weights), cond.added_cond_kwargs)

    def _windows(self, input_ids: torch.Tensor, run) -> torch.Tensor:
        if input_ids.shape[1] <= CLIP_WINDOW_IDS:
            return run(input_ids)
        bos, body, eos = input_ids[:, :1], input_ids[:, 1:-1], input_ids[:, -1:]  # body [B, 75 * k]
        chunks = []
        for i, start in enumerate(range(0, body.shape[1], CLIP_WINDOW)):
            window = body[:, start : start + CLIP_WINDOW]
            # A window after the caption's end holds only padding (EOS ids); keep the framing tokens.
            states = run(torch.cat([bos, window, eos], dim=1))  # [B, 77, d]
            # Only the first window keeps its BOS, only the last its EOS.
            first = 0 if i == 0 else 1
            last = None if start + CLIP_WINDOW >= body.shape[1] else -1
            chunks.append(states[:, first:last])
        return torch.cat(chunks, dim=1)


register_family(SD15Family.name, SD15Family)
