"""One call that loads a PTI result (LoRA + pivot embedding) into a diffusers ``StableDiffusionPipeline``.

diffusers converts a kohya LoRA only when EVERY key starts with ``lora_unet_``/``lora_te_`` (a
``bundle_emb.*`` key makes ``load_lora_weights`` reject the file), and ``load_textual_inversion``
cannot read a bundled embedding. ``load_pti`` splits the file and hands each part to diffusers' own
loader, so the result is exactly what diffusers itself would build.
"""

from __future__ import annotations

import os

from .formats.embedding import bundled_embeddings, load_embedding
from .formats.kohya_lora import BUNDLE_PREFIX, LoraFormatError, load_lora, unexpected_keys


def load_pti(
    pipe,
    lora_path: str | os.PathLike,
    token: str | None = None,
    embedding_path: str | os.PathLike | None = None,
    adapter_name: str | None = None,
) -> str | None:
    """Load a kohya LoRA file (ours or anyone's, SD1.5) and its embedding into ``pipe``; return the token.

    LoRA keys go through ``pipe.load_lora_weights`` (as ``adapter_name``, diffusers' default name
    when None). The embedding comes from ``embedding_path`` when given, else from the LoRA's bundle
    (``bundle_emb.<name>.string_to_param.*`` or OneTrainer's ``.clip_l``); it is added with
    ``pipe.load_textual_inversion`` under ``token``: a bundled name picks that embedding; with a
    single bundled embedding any other ``token`` renames it; None keeps the bundled name.
    A multi-vector embedding is typed as the single token in prompts (diffusers expands it).
    Returns the token added, or None when the file bundles no embedding and none was given.
    Raises ``LoraFormatError`` naming the first key no SD1.5 module takes, and
    ``EmbeddingFormatError`` for an embedding of the wrong width, before ``pipe`` is changed.
    """
    tensors, _ = load_lora(lora_path)
    bad = unexpected_keys(tensors)
    if bad:
        raise LoraFormatError(f"{lora_path}: unexpected key {bad[0]!r} ({len(bad)} keys no SD1.5 module takes)")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = None
    if embedding_path is not None:
        vectors = load_embedding(embedding_path, expected_dim=width, token=token)
        token = token or os.path.splitext(os.path.basename(embedding_path))[0]
    elif bundled := bundled_embeddings(tensors):
        if token not in bundled and len(bundled) > 1:
            raise LoraFormatError(f"{lora_path}: bundles embeddings {sorted(bundled)}; pass token= to choose one")
        name = token if token in bundled else next(iter(bundled))
        vectors = load_embedding(lora_path, expected_dim=width, token=name)
        token = token or name

    lora = {k: v for k, v in tensors.items() if not k.startswith(BUNDLE_PREFIX)}
    if lora:
        pipe.load_lora_weights(lora, adapter_name=adapter_name)
    if vectors is None:
        return None
    pipe.load_textual_inversion({token: vectors}, token=token)
    return token
