"""The pivot token: new tokenizer tokens whose embedding vectors are a separate trainable parameter.

``PivotEmbedding`` wraps the text encoder's token-embedding layer: it looks ids up in the frozen
base table and substitutes its own ``vectors`` at the pivot token ids. The base table never
receives a gradient, so every other row stays bit-identical by construction, and an optimizer
(8-bit included) holds state for ``[n, d]`` numbers only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..config import ConfigError
from ..data.captions import pivot_token_strings


class PivotEmbedding(nn.Module):
    """Token embedding with trainable rows for ``token_ids``.

    ``vectors``: float32 ``[n, d]`` parameter; ``init_vectors``: the initial values (buffer).
    """

    def __init__(self, base: nn.Embedding, token_ids: list[int], init: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.register_buffer("init_vectors", init.detach().clone().float(), persistent=False)
        self.vectors = nn.Parameter(init.detach().clone().float())
        self._detach = False

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """Inside the block the vectors are a fixed input: no gradient reaches them through this embedding."""
        previous, self._detach = self._detach, True
        try:
            yield
        finally:
            self._detach = previous

    @property
    def weight(self) -> torch.Tensor:
        """The base table (for code that reads ``get_input_embeddings().weight``)."""
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.base(input_ids)  # [B, L, d]
        match = input_ids[..., None] == self.token_ids  # [B, L, n]
        is_pivot = match.any(dim=-1, keepdim=True)  # [B, L, 1]
        which = match.to(torch.uint8).argmax(dim=-1)  # [B, L]
        vectors = self.vectors.detach() if self._detach else self.vectors
        pivot = vectors.to(embeds.dtype)[which]  # [B, L, d]
        return torch.where(is_pivot, pivot, embeds)

    def reset_init(self, vectors: torch.Tensor) -> None:
        """Start from ``vectors`` [n, d] (e.g. an embedding file): both the trained and the initial values."""
        with torch.no_grad():
            self.vectors.copy_(vectors.float())
            self.init_vectors.copy_(vectors.float())

    def distance_from_init(self) -> dict[str, float]:
        """L2 distance and angle (degrees, mean over vectors) from the initial vectors; current norm (read from
        the device at once: one sync)."""
        with torch.no_grad():
            v, v0 = self.vectors.float(), self.init_vectors
            cos = torch.nn.functional.cosine_similarity(v, v0, dim=-1).clamp(-1, 1)
            values = torch.stack([(v - v0).norm(), torch.rad2deg(torch.acos(cos)).mean(), v.norm(dim=-1).mean(),
                                  v0.norm(dim=-1).mean()]).tolist()
        return dict(zip(("pivot_l2_from_init", "pivot_angle_from_init_deg", "pivot_norm", "init_norm"), values))

    def renormalise_to_init(self) -> None:
        """Project each vector back to its initial vector's norm (``pivot_norm = "init"``)."""
        with torch.no_grad():
            scale = self.init_vectors.norm(dim=-1, keepdim=True) / self.vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            self.vectors.mul_(scale)

    def norm_penalty(self) -> torch.Tensor:
        """Squared deviation of each vector's norm from its initial norm, summed (``pivot_norm = "decay"``)."""
        return ((self.vectors.norm(dim=-1) - self.init_vectors.norm(dim=-1)) ** 2).sum()


def add_pivot_token(
    tokenizer, text_encoder: nn.Module, token: str, num_vectors: int, init_words: list[str]
) -> PivotEmbedding:
    """Add the pivot tokens to ``tokenizer`` and install a :class:`PivotEmbedding` in ``text_encoder``.

    Each init word must be a single token; one word initialises every vector, else one per vector.
    The new base-table rows are also set to the init vectors (they are never trained).
    """
    tokens = pivot_token_strings(token, num_vectors)
    vocab = tokenizer.get_vocab()
    for t in tokens:
        if t in vocab or f"{t}</w>" in vocab:  # CLIP's BPE stores whole words as "word</w>"
            raise ConfigError.at("token_string", f": {t!r} is already in the tokenizer's vocabulary; choose another token")
    if len(init_words) == 1:
        init_words = init_words * num_vectors
    if len(init_words) != num_vectors:
        raise ValueError(f"init_word gives {len(init_words)} words for {num_vectors} vectors")
    embedding = text_encoder.get_input_embeddings()
    init_ids = []
    for word in init_words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ConfigError.at("init_word", f": {word!r} is {len(ids)} tokens for this tokenizer; use a single-token word")
        init_ids.append(ids[0])
    tokenizer.add_tokens(tokens)
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        init = embedding.weight[init_ids].detach().clone().float()  # [n, d]
        embedding.weight[token_ids] = init.to(embedding.weight.dtype)
    embedding.weight.requires_grad_(False)
    pivot = PivotEmbedding(embedding, token_ids, init)
    text_encoder.set_input_embeddings(pivot)
    pool_at_end_of_text(text_encoder, tokenizer)
    return pivot


def pool_at_end_of_text(text_encoder: nn.Module, tokenizer) -> None:
    """Make transformers pool a CLIP encoder's output at the end-of-text token once tokens are added.

    Configs that say ``eos_token_id = 2`` (SDXL's published ones) make transformers pool at the highest token
    id, which after an added token is that token. Point it at the tokenizer's real EOS id, as A1111, ComfyUI
    and kohya pool; a config with the right id is left alone.
    """
    inner = getattr(text_encoder, "text_model", text_encoder)
    if getattr(inner, "eos_token_id", None) == 2 and tokenizer.eos_token_id not in (None, 2):
        inner.eos_token_id = text_encoder.config.eos_token_id = tokenizer.eos_token_id

