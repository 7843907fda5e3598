"""The ellipsoid check's result: its JSON form, its conventions and its centre file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .statistics import NormStats


@dataclass
class EllipsoidResult:
    """Everything the check measured. Arrays are numpy; ``to_json`` gives the JSON-ready dict."""

    index: int
    num_sentences: int
    dim: int
    clip_skip: int
    index_origin: NormStats
    index_centre: NormStats
    eos_origin: NormStats
    eos_centre: NormStats
    layernorm: dict
    verdict: dict
    threshold: float
    eos_factor: float
    #: per-index curves, ``[L]`` arrays (NaN where undefined) and counts
    curves: dict
    eos_position_counts: dict
    #: covariance context at the index and at EOS (see :func:`shell_context`)
    shell: dict
    #: distinct token prefixes ``0..index`` among the sentences with a word at the index (sentences
    #: sharing a prefix share their state there)
    distinct_at_index: int
    #: tensors for the centre file
    centre: torch.Tensor
    centre_all_tokens: torch.Tensor
    eos_centre_vector: torch.Tensor
    word_count: torch.Tensor
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    #: per-sentence radii about the centre at the index (sentences with a word there) and at EOS
    index_radii: np.ndarray
    eos_radii: np.ndarray
    #: the text encoder measured, by the pipeline's name (``text_encoder``; SDXL also ``text_encoder_2``)
    encoder: str = "text_encoder"

    def to_json(self) -> dict:
        def clean(values):
            return [None if v is None or not np.isfinite(v) else float(v) for v in values]

        curves = {
            "count": [int(c) for c in self.curves["count"]],
            **{
                f"{kind}_{stat}": clean(self.curves[kind][stat])
                for kind in ("origin", "centre")
                for stat in ("mean", "std", "cv")
            },
        }
        return {
            "index": self.index,
            "cv_about_centre": self.index_centre.cv,
            "eos_cv_about_centre": self.eos_centre.cv,
            "layernorm_whitened_norm_ratio": self.layernorm.get("whitened_norm_ratio_mean"),
            "cv_about_origin": self.index_origin.cv,
            "eos_cv_about_origin": self.eos_origin.cv,
            "verdict": self.verdict["label"],
            "supported": self.verdict["supported"],
            "verdict_line": self.verdict["line"],
            "rule": self.verdict["rule"],
            "threshold": self.threshold,
            "eos_factor": self.eos_factor,
            "limit": self.verdict["limit"],
            "num_sentences": self.num_sentences,
            "width": self.dim,
            "clip_skip": self.clip_skip,
            "at_index": {"origin": self.index_origin.to_dict(), "centre": self.index_centre.to_dict()},
            "at_eos": {"origin": self.eos_origin.to_dict(), "centre": self.eos_centre.to_dict()},
            "layernorm": self.layernorm,
            "shell_context": self.shell,
            "distinct_prefixes_at_index": self.distinct_at_index,
            "eos_position_counts": {str(k): v for k, v in sorted(self.eos_position_counts.items())},
            "per_index": curves,
            "conventions": CONVENTIONS,
        }


#: How token indices, padding and centres are defined (recorded in the JSON and the centre file).
CONVENTIONS = {
    "token_index": "0 = BOS (<|startoftext|>); words from 1; EOS at each sentence's first EOS id after BOS "
    "(76 when truncated); positions after EOS are padding (CLIP pads with the EOS id)",
    "per_index_samples": "sentences with a word (or BOS) at the index, i.e. index < EOS position; EOS and "
    "padding positions are excluded",
    "centre": "per index: mean UNet conditioning over the sentences with a word at that index; indices where "
    "no sentence has a word use the mean over all sentences (EOS/padding states)",
    "centre_all_tokens": "per index: mean over all sentences whatever the token there (word, EOS or padding), "
    "as the pivot-locality plugin's built-in estimate",
    "eos_centre": "mean EOS state, gathered at each sentence's EOS position",
    "std": "population standard deviation (ddof = 0); CV = std / mean",
    "conditioning": "final LayerNorm applied to the hidden state clip_skip layers from the end (kohya's clip_skip)",
}

#: The conventions of a family with several text encoders (SDXL), where they differ from :data:`CONVENTIONS`.
CONVENTIONS_PER_ENCODER = {
    **CONVENTIONS,
    "conditioning": "the family's UNet conditioning (SDXL: penultimate hidden states of both encoders, concatenated "
    "along the width, no final LayerNorm), measured per encoder on that encoder's slice of the width",
    "token_index": CONVENTIONS["token_index"] + "; positions found with each encoder's own token ids "
    "(SDXL's second tokenizer pads with '!', which is not counted as EOS)",
    "centre_file": "the centre of the concatenated states [L, d1 + d2]: each encoder's centre side by side, in order; "
    "layernorm_gamma = 1 and layernorm_beta = 0 (no final LayerNorm; metadata layernorm = false)",
}

#: What the check says for a family whose conditioning is not taken after a final LayerNorm.
NO_LAYERNORM_LINE = (
    "LayerNorm geometry does not apply: this family's conditioning is taken before any final LayerNorm, so the "
    "exact LayerNorm slerp (and its |xhat|/sqrt(d) check) has no exact answer here; the centered geometry's "
    "statistics decide: the norm CV about the centre at the index and at EOS, per encoder"
)


def overall_verdict(results: list[EllipsoidResult]) -> dict:
    """The verdict of a per-encoder check: supported when every encoder's is (the pivot-locality plugin
    slerps each encoder's slice about its own centre), not supported when any is not, else inconclusive."""
    labels = {r.encoder: r.verdict["label"] for r in results}
    states = [r.verdict["supported"] for r in results]
    if any(s is False for s in states):
        supported, label = False, "not supported"
    elif all(s is True for s in states):
        supported, label = True, "supported"
    else:
        supported, label = None, "inconclusive"
    detail = ", ".join(f"{name} {value}" for name, value in labels.items())
    index = results[0].index
    line = f"VERDICT: slerp about the centre at index {index} is {label.upper()} over the encoders ({detail})"
    return {"supported": supported, "label": label, "line": line, "per_encoder": labels}


def save_result_centre_file(path, result: EllipsoidResult | list[EllipsoidResult], metadata: dict) -> Path:
    """Write the centres of ``result`` (one per text encoder, or a single one) as a centre file
    (:mod:`pti_plugin.centre_file`) with ``metadata``.

    Several encoders' centres are put side by side along the width, in order, which is the centre of
    the family's concatenated conditioning ``[L, d1 + d2]`` (the pivot-locality plugin slices it per
    encoder itself); the metadata then lists each encoder's name and width. Encoders without a final
    LayerNorm get gamma = 1 and beta = 0 (recorded as ``layernorm: false``).
    """
    from ..centre_file import save_centre_file

    results = result if isinstance(result, list) else [result]
    gamma = torch.cat([r.gamma if r.gamma is not None else torch.ones(r.dim) for r in results])
    beta = torch.cat([r.beta if r.beta is not None else torch.zeros(r.dim) for r in results])
    several = len(results) > 1
    meta = {
        "layernorm": all(r.gamma is not None for r in results),
        "clip_skip": results[0].clip_skip,
        "studied_index": results[0].index,
        "conventions": CONVENTIONS_PER_ENCODER if several else CONVENTIONS,
        **({"encoders": [{"name": r.encoder, "width": r.dim} for r in results]} if several else {}),
        **metadata,
    }
    extra = {
        "centre_all_tokens": torch.cat([r.centre_all_tokens for r in results], dim=-1),
        "eos_centre": torch.cat([r.eos_centre_vector for r in results]),
        "word_count": results[0].word_count,
    }
    centre = torch.cat([r.centre for r in results], dim=-1)
    return save_centre_file(path, centre, gamma, beta, meta, extra_tensors=extra)
