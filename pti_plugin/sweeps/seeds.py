"""Training seeds, the unit of replication: the seeds of a sweep's runs and the seed-mean of each point.

A sweep trains every (learning rate, variant) point ``N`` times (``--training_seeds N``); run ``k``
(k = 0..N-1) sets the preset's ``seed`` to ``base_seed + k``, where ``base_seed`` is the preset's
resolved seed. Run ``k``'s folder is the point's name with the suffix ``-s<k>`` for k >= 1; seed 0
keeps the unsuffixed name, so a sweep with ``N = 1`` is named as before seeds existed and raising
``N`` later reuses every run already trained (seed 0's run is the same run whatever ``N``).

The report then has one row per point: the mean over its training seeds of every number, and for
the scores a 95% bootstrap percentile interval over seeds
(:func:`pti_plugin.metrics.replication.seed_level_interval`). With few seeds that interval covers
the true mean far less often than 95% (:data:`COVERAGE_OF_95`): it says how far the runs spread,
not where the truth lies with 95% confidence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from pti_plugin.metrics.replication import seed_level_interval

#: How often a "95%" seed-level interval covered the true mean in simulation (normal run-to-run
#: spread, 2000 data sets per count), by number of training seeds: with 2 seeds the interval is the
#: range of the two runs. Checked by ``tests/test_training_seeds.py``.
COVERAGE_OF_95 = {2: 0.50, 3: 0.75, 5: 0.84}
#: Row keys that identify a run within its point, never averaged.
SEED_KEYS = ("training_seed", "seed")


def seed_suffix(training_seed: int) -> str:
    """The run-name suffix of training seed ``training_seed``: none for seed 0, ``-s<k>`` otherwise."""
    return f"-s{training_seed}" if training_seed else ""


def coverage_note(n_seeds: int) -> str:
    """One sentence on what a 95% interval over ``n_seeds`` training seeds covers."""
    figures = ", ".join(f"{share:.0%} with {n} seeds" for n, share in COVERAGE_OF_95.items())
    return (f"Intervals: the mean over {n_seeds} training seeds and its 95% bootstrap percentile interval over seeds. "
            f"With few seeds such an interval undercovers: in simulation it held the true mean in about {figures}.")


def format_interval(mean: float | None, lo: float | None, hi: float | None, fmt: str = ".2f") -> str:
    """``mean [lo, hi]`` (e.g. ``0.53 [0.41, 0.66]``); ``–`` when there is no mean."""
    if mean is None or not math.isfinite(mean):
        return "–"
    if lo is None or hi is None:
        return format(mean, fmt)
    return f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _point_row(members: list[dict], group_by: tuple[str, ...], with_interval: Callable[[str], bool]) -> dict:
    """The seed-mean row of one point's runs (see :func:`seed_means`)."""
    out = {key: members[0][key] for key in group_by}
    out["training_seeds"] = sorted({m.get("training_seed", 0) for m in members})
    keys = list(dict.fromkeys(k for m in members for k in m if k not in group_by and k not in SEED_KEYS))
    contributed = 0
    for key in keys:
        values = [m.get(key) for m in members if m.get(key) is not None]
        if not values:
            out[key] = None
        elif all(_is_number(v) for v in values):
            finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
            if finite.size == 0:
                out[key] = None
                continue
            contributed = max(contributed, int(finite.size))
            if with_interval(key):
                interval = seed_level_interval(finite)
                out[key], out[f"{key}_lo"], out[f"{key}_hi"] = interval.estimate, interval.lo, interval.hi
            else:
                out[key] = float(finite.mean())
        elif all(v == values[0] for v in values):
            out[key] = values[0]  # the same for every seed (a metric's name, the base model's value)
    out["n_seeds"] = contributed
    return out


def seed_means(rows: Iterable[dict], group_by: tuple[str, ...], with_interval: Callable[[str], bool]) -> list[dict]:
    """One row per point: the runs of ``rows`` that share the values of ``group_by`` (first-seen order).

    Each numeric key becomes the mean over the point's runs where it is finite (None when none is);
    keys for which ``with_interval(key)`` holds also get ``<key>_lo`` and ``<key>_hi``, the 95%
    interval of :func:`seed_level_interval` (collapsed onto the mean with one run). A non-numeric
    key is kept when every run has the same value and dropped otherwise (run names, folders).
    ``training_seeds`` lists the seeds grouped and ``n_seeds`` how many runs contributed a value.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in group_by), []).append(row)
    return [_point_row(members, group_by, with_interval) for members in groups.values()]
