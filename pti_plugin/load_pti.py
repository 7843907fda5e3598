"""One call that loads a PTI result (LoRA + pivot embedding) into a diffusers SD1.5 or SDXL pipeline.

diffusers converts a kohya LoRA only when EVERY key starts with ``lora_unet_``/``lora_te_``/
``lora_te1_``/``lora_te2_`` (a ``bundle_emb.*`` key makes ``load_lora_weights`` reject the file),
and ``load_textual_inversion`` cannot read a bundled embedding. ``load_pti`` splits the file and
hands each part to diffusers' own loaders, so the result is exactly what diffusers itself would
build. An SDXL embedding goes in with one ``load_textual_inversion`` call per text encoder
(``clip_l`` into ``text_encoder``/``tokenizer``, ``clip_g`` into ``text_encoder_2``/``tokenizer_2``).
"""

from __future__ import annotations

import contextlib
import os

from .formats.embedding import bundled_embedding_parts, load_embeddings
from .formats.file_family import FILE_FAMILIES, file_formats, pipeline_family, text_encoder_names
from .formats.kohya_lora import BUNDLE_PREFIX, LoraFormatError, load_lora, unexpected_keys
from .library_noise import NEW_TOKEN_INIT, NO_TEXT_ENCODER_LORA, dropped
from .models.pivot import pool_at_end_of_text


def load_pti(
    pipe,
    lora_path: str | os.PathLike,
    token: str | None = None,
    embedding_path: str | os.PathLike | None = None,
    adapter_name: str | None = None,
) -> str | None:
    """Load a kohya LoRA file (ours or anyone's, SD1.5 or SDXL, as ``pipe`` is) and its embedding into
    ``pipe``; return the token.

    LoRA keys go through ``pipe.load_lora_weights`` (as ``adapter_name``, diffusers' default name
    when None). The embedding comes from ``embedding_path`` when given, else from the LoRA's bundle
    (SD1.5: ``bundle_emb.<name>.string_to_param.*`` or OneTrainer's ``.clip_l``; SDXL:
    ``bundle_emb.<name>.clip_l`` and ``.clip_g``); it is added with ``pipe.load_textual_inversion``
    (once per text encoder) under ``token``: a bundled name picks that embedding; with a single
    bundled embedding any other ``token`` renames it; None keeps the bundled name.
    A multi-vector embedding is typed as the single token in prompts (diffusers expands it).
    Returns the token added, or None when the file bundles no embedding and none was given.
    Raises ``LoraFormatError`` naming the first key no module of the pipeline's family takes, and
    ``EmbeddingFormatError`` for an embedding of the wrong width, before ``pipe`` is changed.
    """
    family = pipeline_family(pipe)
    table, layout = file_formats(family)
    encoders = text_encoder_names(table)
    tensors, _ = load_lora(lora_path)
    bad = unexpected_keys(tensors, table=table)
    if bad:
        raise LoraFormatError(f"{lora_path}: unexpected key {bad[0]!r} ({len(bad)} keys no {FILE_FAMILIES[family]} module takes)")
    widths = [getattr(pipe, name).get_input_embeddings().weight.shape[1] for name in encoders]
    vectors = None
    if embedding_path is not None:
        vectors = load_embeddings(embedding_path, layout, widths, token=token)
        token = token or os.path.splitext(os.path.basename(embedding_path))[0]
    elif bundled := bundled_embedding_parts(tensors):
        if token not in bundled and len(bundled) > 1:
            raise LoraFormatError(f"{lora_path}: bundles embeddings {sorted(bundled)}; pass token= to choose one")
        name = token if token in bundled else next(iter(bundled))
        vectors = load_embeddings(lora_path, layout, widths, token=name)
        token = token or name

    lora = {k: v for k, v in tensors.items() if not k.startswith(BUNDLE_PREFIX)}
    if lora:
        unet_only = not any(key.startswith("lora_te") for key in lora)  # kohya: lora_te_, lora_te1_, lora_te2_
        with dropped(*NO_TEXT_ENCODER_LORA) if unet_only else contextlib.nullcontext():
            pipe.load_lora_weights(lora, adapter_name=adapter_name)
    if vectors is None:
        return None
    for name, part in zip(encoders, vectors):
        tokenizer = getattr(pipe, name.replace("text_encoder", "tokenizer"))
        text_encoder = getattr(pipe, name)
        with dropped(*NEW_TOKEN_INIT):
            pipe.load_textual_inversion(part, token=token, text_encoder=text_encoder, tokenizer=tokenizer)
        pool_at_end_of_text(text_encoder, tokenizer)
    return token

