"""The ellipsoid check's measurement: encode a sentence set and take the statistics of
:mod:`pti_plugin.ellipsoid` (see the package docstring for every definition)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from .report import EllipsoidResult
from .statistics import (
    DEFAULT_EOS_FACTOR,
    DEFAULT_INDEX,
    DEFAULT_THRESHOLD,
    DEGENERATE_RADIUS,
    MIN_SAMPLES,
    eos_positions,
    gather_positions,
    norm_stats,
    shell_context,
    verdict,
    whitened_norm_ratio,
    word_mask,
)

logger = logging.getLogger(__name__)


@dataclass
class Encoder:
    """What the check needs of a model: its text encoders and tokenizers (one per encoder, in the
    family's order) and its family adapter (``models.family``)."""

    text_encoders: tuple[torch.nn.Module, ...]
    tokenizers: tuple[object, ...]
    family: object
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_base_model(cls, model, device: str | torch.device = "cpu") -> "Encoder":
        return cls(tuple(model.text_encoders), tuple(model.tokenizers), model.family, torch.device(device))

    def blocks(self) -> list["Block"]:
        """One :class:`Block` per text encoder: its slice of the conditioning's width (the family's
        ``conditioning_widths``) and its final LayerNorm where the conditioning ends with one."""
        widths = self.family.conditioning_widths(self.text_encoders)
        norms = self.family.final_layer_norms(self.text_encoders)
        names = tuple(getattr(self.family, "text_encoder_names", ())) or tuple(f"text_encoder_{k + 1}" for k in range(len(widths)))
        out, offset = [], 0
        for k, (name, width, ln) in enumerate(zip(names, widths, norms)):
            out.append(Block(k, name, slice(offset, offset + width), self.tokenizers[k],
                             ln if isinstance(ln, torch.nn.LayerNorm) else None))
            offset += width
        return out


@dataclass(frozen=True)
class Block:
    """One text encoder's share of the conditioning: ``index`` in the family's order, ``name`` (the
    pipeline's attribute name), ``part`` (its slice of the width), its tokenizer and its final
    LayerNorm (None where the conditioning is not taken after one, e.g. SDXL)."""

    index: int
    name: str
    part: slice
    tokenizer: object
    layer_norm: torch.nn.LayerNorm | None

    @property
    def width(self) -> int:
        return self.part.stop - self.part.start

    @property
    def eos_token_id(self) -> int:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError(f"the tokenizer of {self.name} has no eos_token_id: the EOS position cannot be found")
        return int(eos)

    def ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """This encoder's token ids ``[N, L]`` from the family's ``[N, L]`` (one encoder) or ``[N, E, L]``."""
        return input_ids if input_ids.dim() == 2 else input_ids[:, self.index]


def text_encoder_hash(text_encoder: torch.nn.Module) -> str:
    """Short identity of the text encoder weights: first 16 hex digits of a SHA-256 over its state
    dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(text_encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


@torch.no_grad()
def _encode_batch(enc: Encoder, block: Block, ids: torch.Tensor, use_ln: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``block``'s slice of the conditioning ``[B, L, d]``, its pre-LayerNorm state or None), float32 on the CPU."""
    ids = ids.to(enc.device)
    if use_ln:
        x = enc.family.pre_layernorm_states(enc.text_encoders, ids)[..., block.part]
        return block.layer_norm(x).float().cpu().contiguous(), x.float().cpu()
    return enc.family.encode(enc.text_encoders, ids).hidden_states[..., block.part].float().cpu().contiguous(), None


def analyse_per_encoder(
    model_or_encoder,
    sentences: list[str],
    index: int = DEFAULT_INDEX,
    threshold: float = DEFAULT_THRESHOLD,
    eos_factor: float = DEFAULT_EOS_FACTOR,
    batch_size: int = 64,
    cache_bytes: int = 1 << 30,
    min_samples: int = MIN_SAMPLES,
) -> list[EllipsoidResult]:
    """Run the check on ``sentences`` with a BaseModel or an :class:`Encoder`: one result per text
    encoder, each on that encoder's slice of the family's conditioning (SDXL: CLIP-L's 768 columns,
    then bigG's 1280), in the family's order.

    Per encoder, two passes over the batches (centres first, then norms about them); the first
    pass's outputs are kept in memory when they fit in ``cache_bytes``, else re-encoded.
    """
    enc = model_or_encoder if isinstance(model_or_encoder, Encoder) else Encoder.from_base_model(model_or_encoder)
    if not sentences:
        raise ValueError("the sentence set is empty")
    was_training = [te.training for te in enc.text_encoders]
    for te in enc.text_encoders:
        te.eval()
    try:
        ids_all = enc.family.tokenize(enc.tokenizers, list(sentences))
        return [_analyse(enc, block, ids_all, index, threshold, eos_factor, batch_size, cache_bytes, min_samples)
                for block in enc.blocks()]
    finally:
        for te, mode in zip(enc.text_encoders, was_training):
            te.train(mode)


def analyse(model_or_encoder, sentences: list[str], **options) -> EllipsoidResult:
    """:func:`analyse_per_encoder` for a family with one text encoder (SD1.5): its one result."""
    results = analyse_per_encoder(model_or_encoder, sentences, **options)
    if len(results) != 1:
        raise ValueError(f"the model has {len(results)} text encoders ({', '.join(r.encoder for r in results)}): "
                         "use analyse_per_encoder, which gives one result per encoder")
    return results[0]


def _analyse(enc, block, ids_all, index, threshold, eos_factor, batch_size, cache_bytes, min_samples) -> EllipsoidResult:
    family, ln = enc.family, block.layer_norm
    ids = block.ids(ids_all)
    n, length = ids.shape
    if not 0 <= index < length:
        raise ValueError(f"index {index} is outside the token range 0..{length - 1}")
    eos = eos_positions(ids, block.eos_token_id)
    mask = word_mask(eos, length)  # [N, L]
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    use_ln, recon_err = _layernorm_reconstruction(enc, block, ids_all[batches[0]])
    first = _first_pass(enc, block, ids_all, batches, mask, eos, index, use_ln, cache_bytes)

    count = mask.sum(0)  # [L]
    centre_all = first["sum_all"] / n
    centre = torch.where(count.unsqueeze(-1) > 0, first["sum_word"] / count.clamp_min(1).unsqueeze(-1), centre_all)
    centre_r = _radii_about(enc, block, ids_all, batches, centre, first["cache"], use_ln)
    curves, per = _per_index_curves(mask, first["origin_r"], centre_r)

    eos_vecs = first["eos_vecs"]
    eos_centre = eos_vecs.mean(0)
    eos_origin_r = eos_vecs.norm(dim=-1).numpy()
    eos_centre_r = (eos_vecs - eos_centre).norm(dim=-1).numpy()
    eos_o = norm_stats(eos_origin_r)
    eos_c = norm_stats(eos_centre_r, degenerate_below=DEGENERATE_RADIUS * (eos_o.mean or 0.0))

    sel = mask[:, index]
    shape = {"index": shell_context(first["index_vecs"][sel]), "eos": shell_context(eos_vecs)}
    layernorm = _layernorm_summary(ln, first["ratio"], mask, eos, index, recon_err, use_ln)
    result_verdict = verdict(per["centre"][index].cv, eos_c.cv, int(sel.sum()), threshold, eos_factor, index, min_samples)
    eos_counts: dict[int, int] = {}
    for p in eos.tolist():
        eos_counts[p] = eos_counts.get(p, 0) + 1
    return EllipsoidResult(
        index=index,
        num_sentences=n,
        dim=int(first["d"]),
        clip_skip=int(getattr(family, "clip_skip", 1)),
        index_origin=per["origin"][index],
        index_centre=per["centre"][index],
        eos_origin=eos_o,
        eos_centre=eos_c,
        layernorm=layernorm,
        verdict=result_verdict,
        threshold=threshold,
        eos_factor=eos_factor,
        curves=curves,
        eos_position_counts=eos_counts,
        shell=shape,
        distinct_at_index=int(torch.unique(ids[sel, : index + 1], dim=0).shape[0]) if sel.any() else 0,
        centre=centre.float(),
        centre_all_tokens=centre_all.float(),
        eos_centre_vector=eos_centre.float(),
        word_count=count.to(torch.int64),
        gamma=ln.weight.detach().float().cpu().clone() if ln is not None else None,
        beta=ln.bias.detach().float().cpu().clone() if ln is not None else None,
        index_radii=centre_r[sel, index].numpy(),
        eos_radii=eos_centre_r,
        encoder=block.name,
    )


def _layernorm_reconstruction(enc: Encoder, block: Block, ids0: torch.Tensor) -> tuple[bool, float | None]:
    """Is ``block``'s conditioning exactly the final LayerNorm of its pre-LayerNorm state? Checked on the
    first batch ``ids0``: (use the LayerNorm path, relative reconstruction error or None without one)."""
    ln = block.layer_norm
    if ln is None:
        return False, None
    with torch.no_grad():
        ref = enc.family.encode(enc.text_encoders, ids0.to(enc.device)).hidden_states[..., block.part].double().cpu()
    _h0, x0 = _encode_batch(enc, block, ids0, use_ln=True)
    gamma, beta = ln.weight.detach().double().cpu(), ln.bias.detach().double().cpu()
    x = x0.double()
    xhat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    recon_err = float((gamma * xhat + beta - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    use_ln = recon_err < 1e-4
    if not use_ln:
        logger.warning("the conditioning is not the final LayerNorm of the pre-LayerNorm state (relative error %.2e)", recon_err)
    return use_ln, recon_err


def _first_pass(enc, block, ids_all, batches, mask, eos, index, use_ln, cache_bytes) -> dict:
    """One pass over the batches: sums for the centres, norms about the origin, EOS and index states,
    the whitened norm ratio (with a LayerNorm) and the outputs while they fit in ``cache_bytes``
    (``cache`` None once they do not)."""
    family, ln = enc.family, block.layer_norm
    n, length = mask.shape
    d = None
    sum_word = sum_all = eos_vecs = index_vecs = None
    origin_r = torch.zeros(n, length, dtype=torch.float64)
    ratio = torch.full((n, length), float("nan"), dtype=torch.float64) if ln is not None else None
    cache: list[torch.Tensor] | None = []
    cached = 0
    for sl in batches:
        h, x = _encode_batch(enc, block, ids_all[sl], use_ln)
        d = h.shape[-1]
        if sum_word is None:
            sum_word = torch.zeros(length, d, dtype=torch.float64)
            sum_all = torch.zeros(length, d, dtype=torch.float64)
            eos_vecs = torch.zeros(n, d, dtype=torch.float64)
            index_vecs = torch.zeros(n, d, dtype=torch.float64)
        h64 = h.double()
        m = mask[sl].unsqueeze(-1)
        sum_word += (h64 * m).sum(0)
        sum_all += h64.sum(0)
        origin_r[sl] = h64.norm(dim=-1)
        eos_vecs[sl] = gather_positions(h64, eos[sl])
        index_vecs[sl] = h64[:, index]
        if ratio is not None:
            if x is None:
                with torch.no_grad():
                    x = family.pre_layernorm_states(enc.text_encoders, ids_all[sl].to(enc.device))[..., block.part].float().cpu()
            ratio[sl] = whitened_norm_ratio(x, ln.eps)
        if cache is not None:
            cached += h.numel() * h.element_size()
            if cached <= cache_bytes:
                cache.append(h)
            else:
                cache = None  # too large to keep: the second pass re-encodes
    return {"d": d, "sum_word": sum_word, "sum_all": sum_all, "origin_r": origin_r, "ratio": ratio,
            "eos_vecs": eos_vecs, "index_vecs": index_vecs, "cache": cache}


def _radii_about(enc, block, ids_all, batches, centre, cache, use_ln) -> torch.Tensor:
    """Second pass: ``|h[n, i] - centre[i]|`` ``[N, L]`` (float64), from ``cache`` or re-encoded."""
    n, length = ids_all.shape[0], centre.shape[0]
    centre_r = torch.zeros(n, length, dtype=torch.float64)
    for k, sl in enumerate(batches):
        h = cache[k] if cache is not None else _encode_batch(enc, block, ids_all[sl], use_ln)[0]
        centre_r[sl] = (h.double() - centre.unsqueeze(0)).norm(dim=-1)
    return centre_r


def _per_index_curves(mask, origin_r, centre_r) -> tuple[dict, dict]:
    """Per-index curves over the sentences with a word at the index: (``curves`` of ``[L]`` arrays,
    NaN where undefined, and ``per`` kind -> list of :class:`NormStats`)."""
    curves = {"count": mask.sum(0).numpy(), "origin": {}, "centre": {}}
    per = {"origin": [], "centre": []}
    for i in range(mask.shape[1]):
        sel = mask[:, i]
        o = norm_stats(origin_r[sel, i].numpy())
        c = norm_stats(centre_r[sel, i].numpy(), degenerate_below=DEGENERATE_RADIUS * (o.mean or 0.0))
        per["origin"].append(o)
        per["centre"].append(c)
    for kind in ("origin", "centre"):
        for stat in ("mean", "std", "cv"):
            curves[kind][stat] = np.array([getattr(s, stat) if getattr(s, stat) is not None else np.nan for s in per[kind]])
    return curves, per


def _layernorm_summary(ln, ratio, mask, eos, index, recon_err, use_ln) -> dict:
    """The LayerNorm structure figures (docs/method.md, "Where to interpolate, and how"); ``{"present": False}`` without one."""
    layernorm: dict = {"present": ln is not None}
    if ln is None:
        return layernorm
    valid = ratio[torch.isfinite(ratio)]
    layernorm.update(
        {
            "whitened_norm_ratio_mean": float(valid.mean()),
            "whitened_norm_ratio_min": float(valid.min()),
            "whitened_norm_ratio_max": float(valid.max()),
            "whitened_norm_ratio_at_index": float(ratio[mask[:, index], index].mean()) if mask[:, index].any() else None,
            "whitened_norm_ratio_at_eos": float(gather_positions(ratio.unsqueeze(-1), eos).mean()),
            "eps": float(ln.eps),
            "reconstruction_relative_error": recon_err,
            "conditioning_is_layernorm": bool(use_ln),
            "note": "consistency check, 1 by construction (|xhat| = sqrt(d var/(var+eps))); not evidence",
        }
    )
    return layernorm
