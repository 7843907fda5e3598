"""Agreement between two measurements of the same runs: Pearson and Spearman correlation.

The research bench uses it to ask whether a model-internal metric (e.g. the attention-based
leakage score) ranks runs as the ground truth does. Pairs where either value is missing or not
finite are dropped; ``n`` says how many remained. Spearman's rho is Pearson's r of the ranks,
ties sharing their mean rank. Below 3 pairs, or when one side is constant, both are nan.

:func:`within_group_spearman` asks the same inside groups (runs of one learning rate), leaving
out the agreement the groups alone would give.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .replication import resampled_interval


def _finite(x: Sequence, y: Sequence) -> list[int]:
    """Indices of the pairs where both values are present and finite."""
    return [k for k, (a, b) in enumerate(zip(x, y, strict=True))
            if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))]


def _pairs(x: Sequence, y: Sequence, keep: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The values of the pairs ``keep`` (default: the finite ones) as two float64 arrays."""
    keep = _finite(x, y) if keep is None else keep
    return (np.array([float(x[k]) for k in keep], dtype=np.float64),
            np.array([float(y[k]) for k in keep], dtype=np.float64))


def _cluster_members(labels: Sequence | None, kept: list[int]) -> list[np.ndarray] | None:
    """Index arrays (into the kept pairs) of each label among ``labels[kept]``, in order of first appearance;
    None without labels. A pair labelled None is a cluster of its own."""
    if labels is None:
        return None
    names = [labels[k] if labels[k] is not None else ("unlabelled", k) for k in kept]
    order = list(dict.fromkeys(names))
    index = {name: i for i, name in enumerate(order)}
    members: list[list[int]] = [[] for _ in order]
    for position, name in enumerate(names):
        members[index[name]].append(position)
    return [np.array(m, dtype=np.int64) for m in members]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        out[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return out


def correlation(x: Sequence, y: Sequence) -> dict[str, float | int]:
    """``{"pearson", "spearman", "n"}`` of the finite pairs of ``x`` and ``y`` (equal lengths)."""
    a, b = _pairs(x, y)
    return {"pearson": _pearson(a, b), "spearman": _pearson(ranks(a), ranks(b)), "n": int(len(a))}


def correlation_interval(x: Sequence, y: Sequence, draws: int = 2000, level: float = 0.95, seed: int = 0,
                         clusters: Sequence | None = None) -> dict:
    """:func:`correlation` plus a percentile bootstrap interval on Spearman's rho (``spearman_lo``,
    ``spearman_hi``) from ``draws`` resamples of the pairs, or, with ``clusters`` (pair k's unit of
    replication, e.g. its run's training seed), of whole clusters; resamples where one side is constant
    are left out. Both ends are nan below 3 pairs."""
    out = correlation(x, y)
    kept = _finite(x, y)
    a, b = _pairs(x, y, kept)
    if len(a) < 3:
        return out | {"spearman_lo": float("nan"), "spearman_hi": float("nan")}
    rho = resampled_interval(len(a), lambda p: _pearson(ranks(a[p]), ranks(b[p])), draws, level, seed,
                             clusters=_cluster_members(clusters, kept))
    return out | {"spearman_lo": rho.lo, "spearman_hi": rho.hi}


def _mean_rho_within(a: np.ndarray, b: np.ndarray, members: list[np.ndarray]) -> tuple[float, int, int]:
    """Spearman's rho inside each group of indices ``members``, averaged with weights = pairs per group
    over the groups where it is defined; also the pairs and groups it is over."""
    rhos = [(_pearson(ranks(a[m]), ranks(b[m])), len(m)) for m in members]
    kept = [(rho, n) for rho, n in rhos if math.isfinite(rho)]
    if not kept:
        return float("nan"), 0, 0
    total = sum(n for _, n in kept)
    return sum(rho * n for rho, n in kept) / total, total, len(kept)


def _within_resample(members: list[np.ndarray], n: int):
    """``rho(a, b, p)``: :func:`_mean_rho_within` of the resampled pairs ``p`` (indices into ``n`` pairs), each
    drawn pair counted in the group ``members`` puts it in."""
    labels = np.empty(n, dtype=np.int64)  # [pairs] group index
    for g, member in enumerate(members):
        labels[member] = g

    def rho(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> float:
        return _mean_rho_within(a, b, [p[labels[p] == g] for g in range(len(members))])[0]

    return rho


def within_group_spearman(x: Sequence, y: Sequence, groups: Sequence, draws: int = 2000, level: float = 0.95,
                          seed: int = 0, clusters: Sequence | None = None) -> dict:
    """Spearman's rho of ``x`` and ``y`` inside each group (``groups[k]``: the group of pair k, e.g. a run's
    learning rate; None leaves the pair out), averaged over the groups with weights = their pairs.

    It asks whether ``x`` ranks items *that share a group* as ``y`` does, leaving out the agreement the
    groups alone would give (runs at a low rate sitting low on both). A group counts where its rho is
    defined (at least 3 finite pairs, neither side constant). Interval: percentile bootstrap over
    ``draws`` resamples of the pairs within each group, or, with ``clusters`` (pair k's unit of
    replication, e.g. its run's training seed), of whole clusters across the groups. Returns ``{"spearman", "spearman_lo",
    "spearman_hi", "n", "groups"}`` (``n``: pairs in the groups that count); nan where no group counts.
    """
    finite = [k for k in _finite(x, y) if groups[k] is not None]
    a, b = _pairs(x, y, finite)
    members = _cluster_members(groups, finite)  # [groups] indices into the finite pairs
    within = _within_resample(members, len(finite))
    estimate, n, counted = _mean_rho_within(a, b, members)
    out = {"spearman": estimate, "n": n, "groups": counted, "spearman_lo": float("nan"), "spearman_hi": float("nan")}
    if counted == 0:
        return out
    clustered = _cluster_members(clusters, finite)
    rho = resampled_interval(len(a), lambda p: within(a, b, p), draws, level, seed,
                             strata=None if clustered else members, clusters=clustered)
    return out | {"spearman_lo": rho.lo, "spearman_hi": rho.hi}


def paired_spearman_difference(x_fewer: Sequence, y_fewer: Sequence, x_more: Sequence, y_more: Sequence,
                               draws: int = 2000, level: float = 0.95, seed: int = 0,
                               groups: Sequence | None = None) -> dict:
    """Spearman's rho of ``(x_more, y_more)`` minus that of ``(x_fewer, y_fewer)``, pair k being the same run
    on both sides (e.g. a metric and its ground truth scored with more and with fewer sampling seeds, or two
    versions of a metric against one truth). Only the runs finite on all four are kept. With ``groups``
    (run k's group, e.g. its learning rate; None leaves the run out) each rho is the within-group one of
    :func:`within_group_spearman`. Interval: percentile bootstrap over ``draws`` resamples of the runs
    (within each group, with ``groups``), each resample drawing the same runs for both sides. Returns
    ``{"fewer", "more", "difference", "difference_lo", "difference_hi", "n"}``."""
    kept = sorted(set(_finite(x_fewer, y_fewer)) & set(_finite(x_more, y_more)))
    if groups is not None:
        kept = [k for k in kept if groups[k] is not None]
    a1, b1 = _pairs(x_fewer, y_fewer, kept)
    a2, b2 = _pairs(x_more, y_more, kept)
    members = None if groups is None else _cluster_members(groups, kept)

    def pooled(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> float:
        return _pearson(ranks(a[p]), ranks(b[p]))

    rho = pooled if members is None else _within_resample(members, len(kept))

    everything = np.arange(len(kept))
    difference = resampled_interval(len(kept), lambda p: rho(a2, b2, p) - rho(a1, b1, p), draws, level, seed,
                                    strata=members)
    return {"fewer": rho(a1, b1, everything), "more": rho(a2, b2, everything), "difference": difference.estimate,
            "difference_lo": difference.lo, "difference_hi": difference.hi, "n": len(kept)}
