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
from pathlib import Path

from .atomic_io import non_finite_keys
from .formats.embedding import EmbeddingFormatError, bundled_embedding_parts, load_embeddings
from .formats.file_family import FILE_FAMILIES, file_formats, foreign_file_hint, pipeline_family, text_encoder_names
from .formats.kohya_lora import BUNDLE_PREFIX, TEXT_ENCODER_PREFIX, UNET_PREFIX, LoraFormatError, load_lora, unexpected_keys
from .library_noise import NEW_TOKEN_INIT, NO_TEXT_ENCODER_LORA, NO_UNET_LORA, dropped
from .models.pivot import pool_at_end_of_text


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not {what} file (pass the file inside it)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file ({what} file was expected)")
    return path


def _read_lora(lora_path: str | os.PathLike, family: str, table) -> dict:
    """The LoRA file's tensors; a missing path, a folder, a file that is not a ``.safetensors``, keys no module of
    ``family`` takes and NaN/inf values are refused with a message naming the file."""
    path = _existing_file(lora_path, "a LoRA")
    if path.suffix != ".safetensors":
        raise LoraFormatError(f"{path}: not a .safetensors file; load_pti reads a kohya LoRA .safetensors "
                              "(an embedding .pt/.bin goes in as embedding_path=)")
    tensors, _ = load_lora(path)
    bad = unexpected_keys(tensors, table=table)
    if bad:
        raise LoraFormatError(f"{path}: unexpected key {bad[0]!r} ({len(bad)} keys no {FILE_FAMILIES[family]} module "
                              f"takes){foreign_file_hint(tensors, family)}")
    broken = non_finite_keys(tensors)
    if broken:
        raise LoraFormatError(f"{path}: tensor {broken[0]!r} holds NaN or infinite values ({len(broken)} tensors do): "
                              "the file is broken")
    return tensors


def _check_free(pipe, encoders, token, vectors, source, adapter_name: str | None) -> None:
    """Refuse, before ``pipe`` changes, a token its tokenizers already hold (diffusers would refuse it after the
    LoRA went in) or an adapter name already in use; NaN/inf embedding vectors."""
    if adapter_name is not None and any(adapter_name in names for names in pipe.get_list_adapters().values()):
        raise ValueError(f"{source}: adapter name {adapter_name!r} is already in use in this pipeline; "
                         "pass another adapter_name=")
    if vectors is None:
        return
    if any(not bool(v.isfinite().all()) for v in vectors):
        raise EmbeddingFormatError(f"{source}: the embedding's vectors hold NaN or infinite values: the file is broken")
    taken = (token, f"{token}_1") if vectors[0].shape[0] > 1 else (token,)  # diffusers names extra vectors tok_1, ...
    for name in encoders:
        tokenizer = name.replace("text_encoder", "tokenizer")
        clash = [t for t in taken if t in getattr(pipe, tokenizer).get_vocab()]
        if clash:
            raise ValueError(f"{source}: token {clash[0]!r} is already in this pipeline's {tokenizer} (was the file "
                             "loaded into it before?); pass token= with another name, or use a fresh pipeline")


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
    Raises ``LoraFormatError`` naming the first key no module of the pipeline's family takes (saying when the
    file is an embedding, a peft or LyCORIS file, or of the other family), a non-``.safetensors`` file or NaN/inf
    values; ``EmbeddingFormatError`` for an embedding of the wrong width or with NaN/inf;
    ``ValueError`` for a token the pipeline's tokenizers already hold (the file loaded twice) or an
    ``adapter_name`` in use; ``FileNotFoundError``/``IsADirectoryError`` for a missing file or a folder; all
    before ``pipe`` is changed.
    """
    family = pipeline_family(pipe)
    table, layout = file_formats(family)
    encoders = text_encoder_names(table)
    tensors = _read_lora(lora_path, family, table)
    widths = [getattr(pipe, name).get_input_embeddings().weight.shape[1] for name in encoders]
    vectors = None
    if embedding_path is not None:
        _existing_file(embedding_path, "an embedding")
        vectors = load_embeddings(embedding_path, layout, widths, token=token)
        token = token or os.path.splitext(os.path.basename(embedding_path))[0]
    elif bundled := bundled_embedding_parts(tensors):
        if token not in bundled and len(bundled) > 1:
            raise LoraFormatError(f"{lora_path}: bundles embeddings {sorted(bundled)}; pass token= to choose one")
        name = token if token in bundled else next(iter(bundled))
        vectors = load_embeddings(lora_path, layout, widths, token=name)
        token = token or name
    _check_free(pipe, encoders, token, vectors, embedding_path or lora_path, adapter_name)

    lora = {k: v for k, v in tensors.items() if not k.startswith(BUNDLE_PREFIX)}
    if lora:
        unet_only = not any(key.startswith(TEXT_ENCODER_PREFIX) for key in lora)  # kohya: lora_te_, lora_te1_, lora_te2_
        text_only = not any(key.startswith(UNET_PREFIX) for key in lora)  # kohya's network_train_text_encoder_only
        notice = NO_TEXT_ENCODER_LORA if unet_only else NO_UNET_LORA if text_only else None
        with dropped(*notice) if notice else contextlib.nullcontext():
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

