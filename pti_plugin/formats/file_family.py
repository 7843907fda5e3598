"""Which model family a LoRA/embedding file or a diffusers pipeline is, and that family's file tables.

The readers (``load_pti``, ``python -m pti_plugin.inspect``) need a family's key table and embedding
layout without loading a model: SD1.5's come from its family, SDXL's from ``models/sdxl_keys.py``.
A table's component names are the diffusers pipeline's attribute names (``text_encoder``,
``text_encoder_2``; tokenizers ``tokenizer``, ``tokenizer_2``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..models.family import EMBEDDING_KEYS, EmbeddingLayout, KeyTable, embedding_layout, key_table
from .kohya_lora import BUNDLE_PREFIX, unexpected_keys

#: File families the readers know, with the name they print.
FILE_FAMILIES = {"sd15": "SD1.5", "sdxl": "SDXL"}


def file_formats(family: str) -> tuple[KeyTable, EmbeddingLayout]:
    """(key table, embedding layout) of ``family`` (``sd15`` or ``sdxl``)."""
    if family == "sdxl":
        from ..models.sdxl_keys import SDXL_EMBEDDING_LAYOUT, sdxl_key_table

        return sdxl_key_table(), SDXL_EMBEDDING_LAYOUT
    return key_table("sd15"), embedding_layout("sd15")


def text_encoder_names(table: KeyTable) -> tuple[str, ...]:
    """The text-encoder components of ``table`` in order (pipeline attributes; ``tokenizer*`` alike)."""
    return tuple(c for c in table.components if c != "unet")


def file_family(tensors: Mapping[str, torch.Tensor]) -> str:
    """``"sdxl"`` for a file whose LoRA keys SDXL's table takes more of than SD1.5's, or that holds an SDXL
    embedding (``clip_g``, standalone or bundled); else ``"sd15"``."""
    if any(k == "clip_g" or (k.startswith(BUNDLE_PREFIX) and k.endswith(".clip_g")) for k in tensors):
        return "sdxl"
    lora = [k for k in tensors if not k.startswith(BUNDLE_PREFIX)]
    fits = {name: len(lora) - len(unexpected_keys(lora, table=file_formats(name)[0])) for name in FILE_FAMILIES}
    return "sdxl" if fits["sdxl"] > fits["sd15"] else "sd15"


def pipeline_family(pipe) -> str:
    """``"sdxl"`` for a diffusers pipeline with a second text encoder, else ``"sd15"``."""
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"


def foreign_file_hint(tensors: Mapping[str, torch.Tensor], family: str) -> str:
    """Why a file's keys do not fit ``family``'s kohya LoRA, when its keys tell ("" when they do not):
    an embedding, a peft/diffusers-format LoRA, a base-model checkpoint, a LyCORIS LoHa/LoKr file, or a LoRA of
    the other family."""
    keys = list(tensors)
    if keys and (set(keys) <= EMBEDDING_KEYS or (len(keys) == 1 and not keys[0].startswith("lora_"))):
        return "; it is a textual-inversion embedding, not a LoRA (load_pti takes it as embedding_path=)"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "; it is a peft/diffusers-format LoRA, not kohya's (load it with pipe.load_lora_weights)"
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys):  # the original layout
        return "; it is a base-model checkpoint (a single-file model), not a LoRA or an embedding"
    if any(".hada_" in k or ".lokr_" in k for k in keys):
        return "; it is a LyCORIS LoHa/LoKr file: only kohya LoRA/LoCon (lora_down/lora_up) files are read"
    other = file_family(tensors)
    if other != family and any(k.startswith("lora_") for k in keys):
        return f"; it is an {FILE_FAMILIES[other]} file and this is an {FILE_FAMILIES[family]} model"
    return ""

