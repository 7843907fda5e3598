"""Textual-inversion embeddings: our standalone file, the bundle inside a LoRA, and reading others'.

Which tensor names a family writes is its :class:`~pti_plugin.models.family.EmbeddingLayout`
(one tensor per text encoder); the writers and :func:`load_embeddings` take it, SD1.5's by default.
SDXL's standalone file holds ``clip_l`` ``[n, 768]`` and ``clip_g`` ``[n, 1280]`` (AUTOMATIC1111's
SDXL format), bundled as ``bundle_emb.<token>.clip_l`` / ``.clip_g``. For SD1.5 our standalone
embedding (``<token>.safetensors``) holds exactly one tensor, ``emb_params`` ``[num_vectors, width]``: AUTOMATIC1111 (which names the embedding after the file), Forge, ComfyUI
(``embedding:<token>``, which takes the file's first tensor) and diffusers
(``load_textual_inversion(path, token=...)``) all read it. Inside a LoRA the same vectors sit under
``bundle_emb.<token>.string_to_param.*``, which AUTOMATIC1111 loads as an embedding named
``<token>``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic_io import save_safetensors_atomic
from ..models.family import EMBEDDING_KEYS, STANDALONE_KEY, EmbeddingLayout, embedding_layout
from ..safe_load import check_safetensors, safe_torch_load
from .kohya_lora import BUNDLE_PREFIX


class EmbeddingFormatError(ValueError):
    """An embedding file we cannot read or whose shape does not fit; the message names the file."""


def _per_encoder(vectors: torch.Tensor | Sequence[torch.Tensor], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``{key: [n, d_i]}`` for the layout's keys, one tensor per text encoder (a single tensor for one encoder)."""
    tensors = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
    if len(tensors) != len(keys):
        raise ValueError(f"this model family stores {len(keys)} embedding tensor(s) ({', '.join(keys)}), got {len(tensors)}")
    for t in tensors:
        if t.dim() != 2:
            raise ValueError(f"embedding vectors must be [num_vectors, width], got shape {tuple(t.shape)}")
    return {key: t.detach() for key, t in zip(keys, tensors)}


def save_embedding(
    path: str | os.PathLike, vectors: torch.Tensor | Sequence[torch.Tensor], metadata: Mapping[str, str] | None = None,
    layout: EmbeddingLayout | None = None,
) -> None:
    """Write the pivot vectors (``[n, d]``, or one tensor per text encoder) as a standalone embedding in the
    family's layout (SD1.5: one tensor, ``emb_params``), atomically."""
    layout = layout or embedding_layout("sd15")
    save_safetensors_atomic(path, _per_encoder(vectors, layout.standalone_keys), dict(metadata) if metadata else None)


def bundle_embedding_keys(
    token: str, vectors: torch.Tensor | Sequence[torch.Tensor], layout: EmbeddingLayout | None = None
) -> dict[str, torch.Tensor]:
    """The LoRA-file entries that bundle the pivot vectors as embedding ``token`` (``bundle_emb.<token>.<key>``,
    SD1.5: A1111's ``string_to_param.*``)."""
    if "." in token:
        raise ValueError(f"a bundled embedding's token may not contain '.', got {token!r}")
    layout = layout or embedding_layout("sd15")
    return {f"{BUNDLE_PREFIX}{token}.{key}": t for key, t in _per_encoder(vectors, layout.bundle_keys).items()}


def bundled_embedding_parts(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Every ``bundle_emb.<name>.<part>`` of a LoRA's tensors: ``{name: {part: tensor}}`` (SDXL: parts
    ``clip_l`` and ``clip_g``; SD1.5: ``string_to_param.*``)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            name, _, part = key[len(BUNDLE_PREFIX) :].partition(".")
            found.setdefault(name, {})[part] = tensor
    return found


def bundled_embeddings(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every single-encoder embedding bundled in a LoRA's tensors, by name.

    Reads ``bundle_emb.<name>.string_to_param.*`` (A1111, ours) and ``bundle_emb.<name>.clip_l``
    (OneTrainer); an SDXL bundle's ``clip_g`` is read by :func:`load_embeddings`.
    """
    found = {}
    for name, parts in bundled_embedding_parts(tensors).items():
        for part in ("string_to_param.*", "clip_l"):
            if part in parts:
                found[name] = parts[part]
                break
    return found


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    check_safetensors(path)
    return load_file(str(path))


def _from_safetensors(path: Path, token: str | None, tensors: Mapping[str, torch.Tensor] | None = None
                      ) -> torch.Tensor:
    tensors = _read_safetensors(path) if tensors is None else tensors
    bundled = bundled_embeddings(tensors)
    if token is not None and token in bundled:
        return bundled[token]
    for key in (STANDALONE_KEY, "string_to_param.*", "clip_l"):
        if key in tensors:
            return tensors[key]
    if bundled:
        if token is None and len(bundled) == 1:
            return next(iter(bundled.values()))
        raise EmbeddingFormatError(f"{path}: bundles embeddings {sorted(bundled)}; pass token= to choose one (got {token!r})")
    if len(tensors) == 1:  # diffusers' learned_embeds.safetensors: {token: tensor}
        return next(iter(tensors.values()))
    raise EmbeddingFormatError(f"{path}: no embedding found among keys {sorted(tensors)[:5]}")


def _from_pickle(path: Path, data: Any = None) -> torch.Tensor:
    data = safe_torch_load(path) if data is None else data
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, Mapping):
        if "string_to_param" in data:  # A1111 .pt: {'string_to_param': {'*': tensor}, 'name': ...}
            params = data["string_to_param"]
            if "*" in params:
                return params["*"]
            raise EmbeddingFormatError(f"{path}: string_to_param has no '*' entry (keys {list(params)})")
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:  # diffusers learned_embeds.bin: {token: tensor}
            return tensors[0]
    raise EmbeddingFormatError(f"{path}: not an embedding (expected string_to_param or a single tensor)")


def load_embedding(path: str | os.PathLike, expected_dim: int | None = None, token: str | None = None,
                   contents: Any = None) -> torch.Tensor:
    """Read an embedding file -> ``[num_vectors, width]`` tensor (dtype as stored).

    Reads safetensors (``emb_params``; ``string_to_param.*``; ``clip_l``; a LoRA's
    ``bundle_emb.<token>.string_to_param.*`` or OneTrainer's ``bundle_emb.<token>.clip_l``; a single
    tensor under any name), A1111 ``.pt`` (``string_to_param['*']``) and diffusers
    ``learned_embeds.bin`` (``{token: tensor}``) through ``safe_torch_load``. ``token`` picks a
    bundled embedding when a file holds several. ``expected_dim`` is the text encoder's width:
    a mismatch (an SD2 or SDXL embedding on SD1.5) raises ``EmbeddingFormatError`` naming the file
    and both widths. ``contents``: the file as already read (a safetensors file's tensors, a pickle's object), not
    read again.
    """
    path = Path(path)
    vectors = _from_safetensors(path, token, contents) if path.suffix == ".safetensors" else _from_pickle(path, contents)
    vectors = vectors.detach()
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2 or not vectors.is_floating_point():
        raise EmbeddingFormatError(
            f"{path}: embedding has shape {tuple(vectors.shape)} and dtype {vectors.dtype}, expected [n, width] float"
        )
    if expected_dim is not None and vectors.shape[1] != expected_dim:
        hints = {768: " (an SD1.x embedding?)", 1024: " (an SD2 embedding?)", 1280: " (an SDXL embedding?)"}
        hint = hints.get(vectors.shape[1], "")
        raise EmbeddingFormatError(
            f"{path}: embedding vectors are {vectors.shape[1]} wide{hint}, but this model's text encoder takes {expected_dim}"
        )
    return vectors


def _pick_bundle(path: Path, bundles: Mapping[str, object], token: str | None) -> str:
    if token in bundles:
        return token
    if len(bundles) == 1:
        return next(iter(bundles))
    raise EmbeddingFormatError(f"{path}: bundles embeddings {sorted(bundles)}; pass token= to choose one (got {token!r})")


def load_embeddings(
    path: str | os.PathLike, layout: EmbeddingLayout, expected_dims: Sequence[int] | None = None, token: str | None = None,
    contents: Any = None,
) -> tuple[torch.Tensor, ...]:
    """Read an embedding for a family with ``layout`` -> one ``[num_vectors, width_i]`` tensor per text encoder.

    One encoder (SD1.5): every format :func:`load_embedding` reads. Several (SDXL): a safetensors file
    holding the layout's standalone tensors (``clip_l``, ``clip_g``) or a LoRA bundling them
    (``bundle_emb.<token>.clip_l`` / ``.clip_g``; ``token`` picks one of several bundles).
    ``expected_dims`` are the text encoders' widths; a mismatch, a missing tensor or tensors with
    different vector counts raise ``EmbeddingFormatError`` naming the file. ``contents``: as :func:`load_embedding`'s.
    """
    dims = list(expected_dims) if expected_dims is not None else [None] * len(layout.standalone_keys)
    if len(layout.standalone_keys) == 1:
        return (load_embedding(path, dims[0], token, contents),)
    path = Path(path)
    keys = layout.standalone_keys
    if path.suffix != ".safetensors":
        raise EmbeddingFormatError(f"{path}: an embedding for this model family is a .safetensors file holding {', '.join(keys)}")
    tensors = _read_safetensors(path) if contents is None else contents
    bundles = bundled_embedding_parts(tensors)
    if all(k in tensors for k in keys):
        found = [tensors[k] for k in keys]
    elif bundles:
        name = _pick_bundle(path, bundles, token)
        keys = layout.bundle_keys
        missing = [k for k in keys if k not in bundles[name]]
        if missing:
            raise EmbeddingFormatError(f"{path}: bundled embedding {name!r} lacks {', '.join(missing)} (has {sorted(bundles[name])})")
        found = [bundles[name][k] for k in keys]
    else:
        raise EmbeddingFormatError(f"{path}: no {', '.join(keys)} tensors among keys {sorted(tensors)[:5]}")
    vectors = tuple(t.detach().unsqueeze(0) if t.dim() == 1 else t.detach() for t in found)
    for key, t, dim in zip(keys, vectors, dims):
        if t.dim() != 2 or not t.is_floating_point():
            raise EmbeddingFormatError(f"{path}: {key} has shape {tuple(t.shape)} and dtype {t.dtype}, expected [n, width] float")
        if dim is not None and t.shape[1] != dim:
            raise EmbeddingFormatError(f"{path}: {key} vectors are {t.shape[1]} wide, but this model's text encoder takes {dim}")
    if len({t.shape[0] for t in vectors}) != 1:
        raise EmbeddingFormatError(f"{path}: {', '.join(keys)} hold different numbers of vectors {[t.shape[0] for t in vectors]}")
    return vectors


__all__ = [  # EMBEDDING_KEYS, STANDALONE_KEY: facts of the families' layouts (models.family), re-exported
    "EMBEDDING_KEYS", "EmbeddingFormatError", "STANDALONE_KEY", "bundle_embedding_keys", "bundled_embedding_parts",
    "bundled_embeddings", "load_embedding", "load_embeddings", "save_embedding",
]
