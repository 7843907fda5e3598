"""Capture the UNet's cross-attention probabilities for chosen token positions, output untouched.

:func:`capture_cross_attention` wraps the processor of every cross-attention module (``attn2`` of
each transformer block) in :class:`CaptureProcessor`. The wrapper first calls the original
processor (SDPA, xformers, plain — whatever was installed) and returns its output unchanged, so
the UNet's output is bit-identical with and without capture (tested). It then recomputes the
attention probabilities of that layer in float32 — ``softmax(q kᵀ · scale)`` from the module's
own ``to_q``/``to_k`` (LoRA included) — and hands them to a :class:`TokenAttentionCollector`,
which keeps, per batch row, the probability mass that each query pixel gives to the subject's
token positions (weighted by ``token_weights``), averaged over heads and summed over calls
(layers and denoising steps) at each layer's native resolution.

``collector.heatmaps((H, W))`` then averages every call's map, upsampled bilinearly to the
latent size ``H x W``: one heatmap per batch row, each layer call weighted equally
(``collector.heatmaps((H, W), pixels=n)``: the layers of one resolution only). With
``timestep_range = (low, high)`` only the UNet calls whose timestep lies in ``low..high`` are recorded
(e.g. the noise levels where a model decides positions).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F


class TokenAttentionCollector:
    """Accumulates cross-attention maps of selected tokens.

    ``token_weights``: ``[B, L]`` (L = the conditioning's length, 77 for SD1.5): the weight of each key token for each batch row (e.g.
    ``1/n`` at the n subject positions, 0 elsewhere; an all-zero row, such as the unconditional
    half of a classifier-free-guidance batch, gives a zero map).
    """

    def __init__(self, token_weights: torch.Tensor):
        self.token_weights = token_weights.float()
        self.sums: dict[int, torch.Tensor] = {}  # pixels N -> [B, N] summed maps
        self.counts: dict[int, int] = {}  # pixels N -> number of calls
        self.enabled = True

    @torch.no_grad()
    def add(self, probs: torch.Tensor) -> None:
        """Add one call's probabilities ``[B, heads, N, L]`` (float32)."""
        if probs.shape[0] != self.token_weights.shape[0]:
            raise ValueError(f"attention batch {probs.shape[0]} != token_weights rows {self.token_weights.shape[0]}")
        weights = self.token_weights.to(probs.device)
        maps = torch.einsum("bhnl,bl->bn", probs, weights) / probs.shape[1]  # [B, N]
        n = maps.shape[1]
        if n in self.sums:
            self.sums[n] += maps
            self.counts[n] += 1
        else:
            self.sums[n] = maps.clone()
            self.counts[n] = 1

    @property
    def calls(self) -> int:
        return sum(self.counts.values())

    @property
    def resolutions(self) -> list[int]:
        """The query-pixel counts of the layers recorded so far, largest (finest) first."""
        return sorted(self.sums, reverse=True)

    def heatmaps(self, latent_hw: tuple[int, int], pixels: int | None = None) -> torch.Tensor:
        """Mean map over every recorded call, each upsampled to ``latent_hw``: ``[B, H, W]`` (CPU float32).
        ``pixels``: only the calls of the layers with that many query positions (one UNet resolution)."""
        if not self.sums:
            raise RuntimeError("no cross-attention call was recorded (does the UNet have attn2 modules?)")
        if pixels is not None and pixels not in self.sums:
            raise ValueError(f"no cross-attention layer with {pixels} positions was recorded (recorded: {self.resolutions})")
        height, width = latent_hw
        kept = list(self.sums) if pixels is None else [pixels]  # in recording order
        total = None
        for n in kept:
            h, w = layer_grid(n, height, width)
            grid = self.sums[n].reshape(-1, 1, h, w)
            if (h, w) != (height, width):
                grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
            total = grid if total is None else total + grid
        return (total[:, 0] / sum(self.counts[n] for n in kept)).float().cpu()


def cross_attention_sides(unet_config: dict) -> tuple[int, ...]:
    """The latent sides of a ``UNet2DConditionModel`` config's cross-attention levels (square ``sample_size``
    latent), finest first: each down level whose block type has cross-attention (the up path mirrors it),
    then the mid block at the coarsest level when it has cross-attention. Each level halves the side."""
    side, sides = unet_config["sample_size"], []
    for level, block in enumerate(unet_config["down_block_types"]):
        if "CrossAttn" in block:
            sides.append(math.ceil(side / 2 ** level))
    if "CrossAttn" in (unet_config.get("mid_block_type") or ""):
        sides.append(math.ceil(side / 2 ** (len(unet_config["down_block_types"]) - 1)))
    return tuple(dict.fromkeys(sides))


def layer_grid(pixels: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) of a layer with ``pixels`` query positions in a UNet on a ``height x width`` latent.

    Each UNet level halves the size (rounding up, as a stride-2 convolution with padding 1 does).
    """
    h, w = height, width
    for _ in range(8):
        if h * w == pixels:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(f"a layer with {pixels} positions does not fit a {height}x{width} latent")


def attention_probabilities(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The probabilities ``[B, heads, N, L]`` (float32) of a diffusers ``Attention`` module's call."""
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    batch = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    context = encoder_hidden_states
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key = attn.to_k(context)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale  # [B, heads, N, L]
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
        scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1]).float()
    return scores.softmax(dim=-1)


class CaptureProcessor:
    """Wraps an attention processor: returns its output unchanged and records probabilities."""

    def __init__(self, inner, collector: TokenAttentionCollector):
        self.inner = inner
        self.collector = collector

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs)
        if encoder_hidden_states is not None and self.collector.enabled:
            with torch.no_grad():
                self.collector.add(attention_probabilities(attn, hidden_states, encoder_hidden_states, attention_mask))
        return out


def cross_attention_modules(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's cross-attention modules (``...attn2``), by name."""
    return [(name, m) for name, m in unet.named_modules() if name.endswith("attn2") and hasattr(m, "processor")]


def _timestep_of_call(args: tuple, kwargs: dict) -> float:
    """The timestep of a UNet call (``unet(sample, timestep, ...)``; one value for the whole batch)."""
    t = kwargs["timestep"] if "timestep" in kwargs else args[1]
    return float(torch.as_tensor(t).flatten()[0])


@contextlib.contextmanager
def capture_cross_attention(unet: torch.nn.Module, token_weights: torch.Tensor,
                            timestep_range: tuple[int, int] | None = None) -> Iterator[TokenAttentionCollector]:
    """Within the block, every cross-attention call of ``unet`` feeds the yielded collector.

    ``token_weights``: ``[B, L]`` as :class:`TokenAttentionCollector` takes it (B = the UNet's
    batch, including the unconditional rows under classifier-free guidance). ``timestep_range``:
    record only the UNet calls whose timestep lies in ``low..high`` (inclusive). The original
    processors are restored on exit.
    """
    collector = TokenAttentionCollector(token_weights)
    modules = cross_attention_modules(unet)
    if not modules:
        raise ValueError("the UNet has no cross-attention (attn2) modules")
    originals = [(m, m.processor) for _, m in modules]
    gate = None
    try:
        for module, processor in originals:
            module.set_processor(CaptureProcessor(processor, collector))
        if timestep_range is not None:
            low, high = timestep_range

            def gate_call(_module, args, kwargs):
                collector.enabled = low <= _timestep_of_call(args, kwargs) <= high

            gate = unet.register_forward_pre_hook(gate_call, with_kwargs=True)
        yield collector
    finally:
        if gate is not None:
            gate.remove()
        for module, processor in originals:
            module.set_processor(processor)


def subject_weights(positions: list[list[int]], length: int = 77) -> torch.Tensor:
    """``[B, length]`` weights: ``1/len(p)`` at each row's positions ``p`` (an empty list gives zeros)."""
    weights = torch.zeros(len(positions), length)
    for row, pos in enumerate(positions):
        if pos:
            weights[row, pos] = 1.0 / len(pos)
    return weights
