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


def save_result_centre_file(path, result: EllipsoidResult, metadata: dict) -> Path:
    """Write ``result``'s centres as a centre file (:mod:`pti_plugin.centre_file`) with ``metadata``.

    Encoders without a final LayerNorm get gamma = 1 and beta = 0 (recorded as ``layernorm: false``).
    """
    from ..centre_file import save_centre_file

    d = result.dim
    gamma = result.gamma if result.gamma is not None else torch.ones(d)
    beta = result.beta if result.beta is not None else torch.zeros(d)
    meta = {
        "layernorm": result.gamma is not None,
        "clip_skip": result.clip_skip,
        "studied_index": result.index,
        "conventions": CONVENTIONS,
        **metadata,
    }
    extra = {
        "centre_all_tokens": result.centre_all_tokens,
        "eos_centre": result.eos_centre_vector,
        "word_count": result.word_count,
    }
    return save_centre_file(path, result.centre, gamma, beta, meta, extra_tensors=extra)
