"""The SDXL model family (SDXL 1.0, Illustrious, NoobAI, Pony): two text encoders, pooled and size conditioning.

Only this module (with ``sdxl_keys.py``, the architecture's key table, and ``single_file_sdxl.py``)
knows SDXL's shape; everything else asks the adapter (see ``family.py``).

SDXL conditions its UNet on (diffusers' ``StableDiffusionXLPipeline.encode_prompt``, kohya's
``sdxl_train_util``):

- per-token states ``[B, 77, 768 + 1280]`` (``[B, 152 | 227, ...]`` with kohya's longer windows, see
  :func:`window_ids`): the *penultimate* hidden states of CLIP ViT-L
  (``text_encoder``) and of OpenCLIP ViT-bigG (``text_encoder_2``, a ``CLIPTextModelWithProjection``),
  concatenated along the width. They are taken before any final LayerNorm, so the exact
  whitened-LayerNorm slerp does not apply: :meth:`SDXLFamily.final_layer_norms` says so (``None`` per
  encoder) and the pivot-locality plugin uses its ``centered`` geometry;
- ``text_embeds`` ``[B, 1280]``: the second encoder's pooled, projected output, taken at the
  end-of-text token (see :func:`eos_positions`);
- ``time_ids`` ``[B, 6]``: ``original_size (h, w) + crops_coords_top_left (top, left) + target_size (h, w)``,
  per sample from its image, bucket and flip, as kohya's (see ``data/buckets.py:size_conditioning``); without
  them (prompts without an image) the square ``default_size`` with no crop.

Token ids are ``[B, 2, 77]`` (``max_token_length + 2``): each tokenizer's ids, stacked (the two share CLIP's
BPE vocabulary; the second pads with ``!`` instead of EOS).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.weighted_captions import apply_weights, weighted_ids
from .family import (CLIP_WINDOW, CLIP_WINDOW_IDS, Conditioning, EmbeddingLayout, KeyTable, LoadedComponents,
                     check_max_token_length, register_family)
from .model_checks import FAMILY_FOLDERS, load_folder

logger = logging.getLogger(__name__)

#: The pipeline's names of the two encoders (and, with ``tokenizer``, the tokenizers), in order.
SDXL_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class SDXLFamily:
    """SDXL: two text encoders; see the module docstring.

    ``clip_skip`` other than 1 is ignored with a warning, as kohya's ``sdxl_train_util`` ignores it (SDXL's
    definition already takes the penultimate layer); ``max_token_length`` 75, or 150/225 by kohya's windows
    (:func:`window_ids`); ``default_size``: the ``time_ids`` size of prompts encoded without an image.
    """

    clip_skip: int = 1
    max_token_length: int = CLIP_WINDOW
    default_size: int = 1024
    #: each tokenizer's pad id (set by :meth:`load`; the second pads with ``!``, the first with EOS)
    pad_ids: tuple[int, ...] = ()

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoder_names = SDXL_TEXT_ENCODERS

    def __post_init__(self):
        if self.clip_skip != 1:
            logger.warning("clip_skip = %d is ignored for SDXL, as kohya ignores it: SDXL's conditioning is defined on "
                           "the penultimate layer of both encoders already (what 'clip skip 2' means for SDXL models)",
                           self.clip_skip)
            self.clip_skip = 1
        check_max_token_length(self.max_token_length)

    @property
    def key_table(self) -> KeyTable:
        from .sdxl_keys import sdxl_key_table

        return sdxl_key_table()

    @property
    def embedding_layout(self) -> EmbeddingLayout:
        from .sdxl_keys import SDXL_EMBEDDING_LAYOUT

        return SDXL_EMBEDDING_LAYOUT

    # ------------------------------------------------------------------ loading
    def load(self, path: Path, single_file_config: str = "", tokenizer_path: str = "") -> LoadedComponents:
        """A diffusers SDXL folder, or an original single file (``single_file_sdxl.py``), offline; records the
        tokenizers' pad ids (``pad_ids``), which kohya's windows (:func:`window_ids`) compare with."""
        parts = self._load_components(path, single_file_config, tokenizer_path)
        self.pad_ids = tuple(int(tok.pad_token_id) for tok in parts.tokenizers)
        return parts

    def _load_components(self, path: Path, single_file_config: str, tokenizer_path: str) -> LoadedComponents:
        if path.is_file():
            from .single_file_sdxl import load_sdxl_single_file

            return load_sdxl_single_file(path, single_file_config or None, tokenizer_path)
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        # kohya trains SDXL with DDPM's schedule; the folder's scheduler config (Euler for SDXL base) has
        # the same betas and says the prediction type.
        parts = load_folder(path, self.name, dict(zip(FAMILY_FOLDERS["sdxl"], (
            UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPTokenizer,
            DDPMScheduler))))
        return LoadedComponents(parts["unet"], parts["vae"], (parts["text_encoder"], parts["text_encoder_2"]),
                                (parts["tokenizer"], parts["tokenizer_2"]), parts["scheduler"])

    # ------------------------------------------------------------------ conditioning
    def tokenize(self, tokenizers: Sequence[object], captions: list[str]) -> torch.Tensor:
        """Token ids ``[B, 2, max_token_length + 2]`` (int64): each tokenizer's tokenisation, stacked (with 75: the
        inference tokenisation, 77 ids)."""
        ids = [tok(captions, padding="max_length", max_length=self.max_token_length + 2, truncation=True,
                   return_tensors="pt").input_ids for tok in tokenizers]
        return torch.stack(ids, dim=1)

    def encode(self, text_encoders: Sequence[nn.Module], input_ids: torch.Tensor,
               sizes: torch.Tensor | None = None) -> Conditioning:
        """``hidden_states`` [B, L, d1 + d2] (L = ``max_token_length + 2``), ``text_embeds`` [B, d_proj], ``time_ids``
        [B, 6] (see the module docstring); ``sizes`` [B, 6] are the time ids (default: ``default_size`` square, no
        crop). Longer than 77 ids, kohya's windows (:func:`window_ids`)."""
        te1, te2 = text_encoders
        if input_ids.shape[-1] > CLIP_WINDOW_IDS:
            return self._encode_windows(te1, te2, input_ids, sizes)
        out1 = te1(input_ids[:, 0], output_hidden_states=True)
        out2 = te2(input_ids[:, 1], output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # [B, 77, d1 + d2]
        pooled = te2.text_projection(out2.last_hidden_state[torch.arange(input_ids.shape[0]), eos_positions(input_ids)])
        return Conditioning(hidden, {"text_embeds": pooled, "time_ids": self._time_ids(sizes, input_ids.shape[0], pooled)})

    def _encode_windows(self, te1: nn.Module, te2: nn.Module, input_ids: torch.Tensor,
                        sizes: torch.Tensor | None) -> Conditioning:
        """kohya's ``max_token_length`` 150/225 for SDXL (``strategy_sdxl._get_hidden_states_sdxl``): each encoder's
        windows (:func:`window_ids`) encoded, their penultimate states stitched back to L rows (the first window's BOS,
        every window's 75 caption rows, the last window's final row); the pooled output is the first window's, at its
        first EOS."""
        batch, eos = input_ids.shape[0], input_ids[:, 0, -1:]  # the first tokenizer always ends with EOS
        if len(self.pad_ids) != 2:
            raise ValueError("the SDXL family encodes kohya's windows with its tokenizers' pad ids, which load() records")
        states = []
        for index, te in enumerate((te1, te2)):  # after the loop, windows and outputs are the second encoder's
            windows = window_ids(input_ids[:, index], eos, self.pad_ids[index])
            outputs = [te(ids, output_hidden_states=True) for ids in windows]
            rows = [out.hidden_states[-2][:, 1:-1] for out in outputs]  # each window's 75 caption rows
            first, last = outputs[0].hidden_states[-2][:, :1], outputs[-1].hidden_states[-2][:, -1:]
            states.append(torch.cat([first, *rows, last], dim=1))
        position = (windows[0] == eos).int().argmax(dim=-1)  # 0 when the window holds no EOS, as kohya
        pooled = te2.text_projection(outputs[0].last_hidden_state[torch.arange(batch), position])
        return Conditioning(torch.cat(states, dim=-1), {"text_embeds": pooled,
                                                        "time_ids": self._time_ids(sizes, batch, pooled)})

    def pad_opens_a_window(self, input_ids: torch.Tensor, anywhere: bool = False) -> torch.Tensor:
        """[B]: whether a window (:func:`window_ids`) of each caption's ids ``[B, 2, L]`` (L > 77) is one that training
        rules 2 changed (``rule_changes``): a window of a caption that fills L (the second tokenizer's ids end with EOS,
        not its pad id) opening with the second tokenizer's pad id, which now starts BOS EOS and was kept before (the
        caption's last id, EOS, was taken for the pad). ``anywhere``: the pad id at any place of such a caption (one
        whose tags move from draw to draw, so that any of its ids may open a window)."""
        ids, pad = input_ids[:, 1], self.pad_ids[1]
        body = ids[:, 1:-1]
        openers = body if anywhere else body[:, ::CLIP_WINDOW]
        return (ids[:, -1] != pad) & (openers == pad).any(dim=-1)

    def weighted_ids(self, tokenizers: Sequence[object], caption: str) -> tuple[list[list[int]], list[list[float]]]:
        """kohya's ``weighted_captions``: each tokenizer's ids (as :meth:`tokenize`, the second padding with its
        own pad token) and their weights, one list per tokenizer."""
        pairs = [weighted_ids(tok, caption, self.max_token_length + 2) for tok in tokenizers]
        return [ids for ids, _ in pairs], [weights for _, weights in pairs]

    def weigh(self, text_encoders: Sequence[nn.Module], cond: Conditioning, weights: torch.Tensor) -> Conditioning:
        """``cond`` with each encoder's share of the hidden states' width times its own weights (``weights``
        [B, 2, L]); ``text_embeds`` and ``time_ids`` unweighted (kohya's ``strategy_sdxl``)."""
        parts = cond.hidden_states.split(self.conditioning_widths(text_encoders), dim=-1)
        hidden = torch.cat([apply_weights(part, weights[:, i]) for i, part in enumerate(parts)], dim=-1)
        return Conditioning(hidden, cond.added_cond_kwargs)

    def _time_ids(self, sizes: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        if sizes is None:
            s = self.default_size
            sizes = torch.tensor([[s, s, 0, 0, s, s]]).expand(batch, 6)
        return self.size_conditioning(sizes)["time_ids"].to(device=like.device, dtype=like.dtype)

    def size_conditioning(self, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The UNet's extra conditioning for per-sample ``sizes`` [B, 6] (see :meth:`encode`)."""
        return {"time_ids": sizes.float()}

    def conditioning_widths(self, text_encoders: Sequence[nn.Module]) -> tuple[int, ...]:
        """Each encoder's share of the hidden states' width, in order (768, 1280 for SDXL)."""
        return tuple(int(te.config.hidden_size) for te in text_encoders)

    def pre_layernorm_states(self, text_encoders: Sequence[nn.Module], input_ids: torch.Tensor) -> None:
        """None: SDXL's conditioning does not end with a LayerNorm (the penultimate states are used as they are)."""
        return None

    def final_layer_norms(self, text_encoders: Sequence[nn.Module]) -> tuple[None, None]:
        """None per encoder: the exact LayerNorm slerp geometry does not apply to SDXL's conditioning."""
        return (None, None)


def eos_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Index [B] of each caption's end-of-text token in SDXL ids ``[B, 2, L]``.

    The first tokenizer pads with EOS, so its last id is EOS and the first position holding that id is
    the caption's end (the second tokenizer's ids have it at the same place). SDXL's published encoder
    configs say ``eos_token_id = 2``, with which transformers takes the pooled output at the highest
    token id, which once the pivot tokens are added is the pivot, not EOS; kohya works around this the
    same way. A1111 and ComfyUI pool at EOS.
    """
    first = input_ids[:, 0]  # [B, L]
    return (first == first[:, -1:]).int().argmax(dim=-1)


def window_ids(ids: torch.Tensor, eos: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """kohya's windows of one tokenizer's ids ``[B, L]`` (L = 75 k + 2; ``strategy_base._get_input_ids``): k windows
    ``[B, 77]``, each the BOS, 75 ids and the last id (EOS, or ``pad``, the tokenizer's pad id, when the caption is
    shorter than L); a window whose 75th id is neither EOS (``eos`` [B, 1]) nor ``pad`` ends with EOS, and one whose
    first id is ``pad`` starts BOS EOS (also where ``pad`` is the caption's own text, the second tokenizer's ``!``,
    in a caption that fills L). With a tokenizer that pads with EOS (the first) nothing changes: kohya's rule for
    such tokenizers keeps the windows as cut."""
    bos, body, last = ids[:, :1], ids[:, 1:-1], ids[:, -1:]
    windows = []
    for start in range(0, body.shape[1], CLIP_WINDOW):
        window = torch.cat([bos, body[:, start : start + CLIP_WINDOW], last], dim=1)
        runs_past = (window[:, -2:-1] != eos) & (window[:, -2:-1] != pad)
        window[:, -1:] = torch.where(runs_past, eos, window[:, -1:])
        window[:, 1:2] = torch.where(window[:, 1:2] == pad, eos, window[:, 1:2])
        windows.append(window)
    return windows


register_family(SDXLFamily.name, SDXLFamily)
