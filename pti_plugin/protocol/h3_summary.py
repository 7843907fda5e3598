"""H3's statistics over the cells of :mod:`.h3_variants`: leakage and drift at matched reconstruction.

A *condition* is a (variant, weight) pair; along its learning rates every training seed gives a
curve of coarse reconstruction (the seed's mean ``coarse``) and one of each per-image score's mean.

**Matched reconstruction.** Per seed, the training-cell fraction (``in_training_cell``, the
position leakage) and ``drift`` are read off where the seed's coarse curve reaches
:data:`MATCHED_COARSE`, first on the way up the learning rates, lr 0 being the pivot alone
(:func:`~pti_plugin.metrics.curves.value_at_first_crossing`: linear interpolation on the crossing
segment; NaN where the seed's curve does not reach the target, and that seed is left out). The leakage is
reported as excess over H1's null (the base model with the init word, set ``a``, whose images share
the cells' sampling seeds: paired image by image) and as a paired difference against ``none``: per
training seed the variant's value minus ``none``'s. Every such reading has a two-level interval that
resamples the training seeds and the sampling seeds they share (:mod:`.h3_intervals`), none with fewer
than :data:`~.h3_intervals.MIN_SEEDS` seeds (their values instead), and Student's t beside it. Each
paired difference also counts its pairs that are exactly 0 and those where a side reaches the target
below its first trained rate (between the pivot alone and the lowest LoRA rate): H3's verdict reads
such a comparison as untestable (:mod:`.h3_lines`).

**A rate's figures** (each per-image score's mean over the training seeds of their means over images) have
a two-level interval that resamples the sampling seeds once per draw for all training seeds
(:func:`~.null_excess.over_shared_images`): the seeds draw image ``j`` from the same sampling seed, and where
their pivots are alike nearly the same image, so resampling each seed's images apart would count those as
independent (on the committed cells, intervals a median 1.4x to 2x too narrow).

**The weight of a variant** (:data:`CHOICE_RULE`): on the training seeds every one of its weights
has (extra seeds added to one weight's condition must not decide), among its weights whose curves
reach coarse :data:`CHOICE_COARSE` in the most of those seeds, the one with the lowest mean leakage
there (ties: the smaller weight).

**The highest safe learning rate** of a condition: going up from its lowest rate, the last rate
whose training-cell fraction is *not distinguishable from the null*: its excess over the null (per
training seed its mean minus the null's on the same sampling seeds, two-level, :mod:`.h3_intervals`)
has a 95% interval that reaches 0. That is a failure to detect leakage, not evidence of none; the
report prints the excess beside it. The graded appearance error there is given with it (None when the
lowest rate is already distinguishable). (Asking the condition's own interval to nest inside the
null's would fail for sampling noise alone: two intervals of equal width rarely nest.)
The search also stops at a rate that has *lost the look*: its coarse reconstruction's 95% interval
reaches down to the pivot alone's estimate (the lr 0 row, LoRA off) after a lower rate's did not (that
interval resamples the shared sampling seeds, as every rate's figures do; the rule was added after the runs).
There the run is broken, not safe: its layout falls back into the null because it no longer draws
what it was taught (on this world, the lr 1e-2 runs). ``stopped_at`` says which rate ended the
search and why.

**Position entropy** beside the training-cell fraction: per training seed, the normalised entropy of
the 3x3 histogram of the cells where its neutral images put the object (``cell``: per image
``3 * row + col``, None without an object; :func:`~pti_plugin.toy_world.detectors.position_entropy`), with an interval
over training seeds; the null's from its images, resampled. A collapse onto one cell that no training
image uses (seen at the highest rates) leaves the training-cell fraction near the null but drops the
entropy.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ..metrics.curves import value_at_first_crossing
from ..metrics.replication import resampled_interval, seed_level_interval, two_level_bootstrap
from ..toy_world.detectors import position_entropy
from .h1_summary import float_array, null_summary, per_seed_curves, seed_matrix
from .h3_intervals import ImageDraws, PerSeed, over_seeds, paired
from .null_excess import image_count, null_reading, over_shared_images, paired_excess

MATCHED_COARSE = (0.5, 0.8, 0.9)
CHOICE_COARSE = 0.8
CHOICE_RULE = (f"per variant, on the training seeds all its weights have, among its weights whose curves reach "
               f"coarse {CHOICE_COARSE} in the most of those seeds, "
               f"the lowest mean training-cell fraction at matched coarse {CHOICE_COARSE} (ties: the smaller weight)")
#: Per-image scores summarised at each learning rate.
SCORES = ("coarse", "in_training_cell", "appearance_error", "drift", "drift_cell", "drift_unrelated", "drift_class",
          "class_character")
REFERENCE = "none"
#: Why the highest-safe-rate search stopped (:func:`highest_safe_lr`).
OUTSIDE_NULL = "leakage above the null"
LOST_THE_LOOK = "look lost: coarse no better than the pivot alone"


def group_conditions(cells: list[dict]) -> dict[tuple[str, float | None], dict[float, list[dict]]]:
    """Cells by (variant, weight), then by learning rate (ascending), each list in seed order."""
    out: dict[tuple[str, float | None], dict[float, list[dict]]] = {}
    for cell in sorted(cells, key=lambda c: (c["lr"], c["seed"])):
        out.setdefault((cell["variant"], cell["weight"]), {}).setdefault(cell["lr"], []).append(cell)
    return out


def matched_per_seed(groups: dict[float, list[dict]], key: str,
                     targets: tuple[float, ...] = MATCHED_COARSE, axis: str = "coarse") -> dict[int, np.ndarray]:
    """Per training seed, ``key``'s mean read off where the seed's ``axis`` curve (its mean along the
    learning rates) reaches each target (``[len(targets)]``, NaN where it does not)."""
    seeds = sorted({c["seed"] for members in groups.values() for c in members})  # per_seed_curves' row order
    with warnings.catch_warnings():  # a seed without any object has no training-cell fraction: NaN
        warnings.simplefilter("ignore", category=RuntimeWarning)
        values = value_at_first_crossing(per_seed_curves(groups, axis), per_seed_curves(groups, key), targets)
    return dict(zip(seeds, values))


def interval_or_none(compute) -> dict | None:
    """``compute()``'s interval as a dict; None when it has no finite value to work on."""
    try:
        return compute().to_dict()
    except ValueError:
        return None


def image_tensor(groups: dict[float, list[dict]], key: str, width: int) -> np.ndarray:
    """``[training seeds, learning rates, width]``: each cell's per-image ``key`` (NaN: no value, no image, or
    no cell), rows in :func:`~.h1_summary.per_seed_curves`' order, image ``j`` from sampling seed ``j``."""
    seeds = sorted({c["seed"] for cells in groups.values() for c in cells})
    out = np.full((len(seeds), len(groups), width), np.nan)
    for j, cells in enumerate(groups.values()):
        for c in cells:
            row = float_array(c[key])[:width]
            out[seeds.index(c["seed"]), j, :row.size] = row
    return out


def matched_readings(groups: dict[float, list[dict]], keys: tuple[str, ...], targets: tuple[float, ...],
                     images: ImageDraws, axis: str = "coarse") -> dict[str, list]:
    """Per key of ``keys``, one :class:`~.h3_intervals.PerSeed` per target: :func:`matched_per_seed` and the
    same reading on each draw's images; under ``"below"``, per target, whether each seed reaches it below
    the first trained rate (lr above 0), i.e. on the segment from the pivot alone."""
    seeds = tuple(sorted({c["seed"] for members in groups.values() for c in members}))
    x = images.means(image_tensor(groups, axis, images.width))  # [seeds, rates, draws]
    out: dict[str, list] = {}
    for key in keys:
        estimate = matched_per_seed(groups, key, targets, axis)
        y = images.means(image_tensor(groups, key, images.width))
        draws = np.stack([value_at_first_crossing(x[k].T, y[k].T, targets) for k in range(len(seeds))])
        out[key] = [PerSeed(seeds, np.array([estimate[s][j] for s in seeds]), draws[:, :, j])
                    for j in range(len(targets))]
    out["below"] = crossing_below_first_rate(groups, keys[0], targets, axis)
    return out


def crossing_below_first_rate(groups: dict[float, list[dict]], key: str, targets: tuple[float, ...],
                              axis: str) -> list[dict[int, bool]]:
    """Per target, per seed whose ``axis`` curve reaches it (on the points where ``key`` has a value, as
    :func:`matched_per_seed` reads it): whether the crossing falls below the lowest learning rate above 0."""
    seeds = sorted({c["seed"] for members in groups.values() for c in members})
    rates = np.array(list(groups), dtype=np.float64)
    first = min((lr for lr in rates if lr > 0), default=math.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        x, y = per_seed_curves(groups, axis), per_seed_curves(groups, key)
    at = value_at_first_crossing(x, np.where(np.isfinite(y), rates[None, :], np.nan), targets)  # the crossing's lr
    return [{s: bool(at[k, j] < first) for k, s in enumerate(seeds) if np.isfinite(at[k, j])}
            for j in range(len(targets))]


def paired_against(values: dict[int, np.ndarray], reference: dict[int, np.ndarray], index: int,
                   draws: int) -> dict | None:
    """:func:`~.h3_intervals.paired` of per-seed values whose images are not at hand (``values[seed][index]``
    minus ``reference[seed][index]``): its interval resamples the training seeds alone."""
    def reading(per_seed: dict[int, np.ndarray]) -> PerSeed:
        return PerSeed.without_images({s: float(v[index]) for s, v in per_seed.items()}, draws)

    return paired(reading(values), reading(reference))


def cells_entropy(cells: list[int | None]) -> float:
    """:func:`~pti_plugin.toy_world.detectors.position_entropy` of per-image cells (``3 * row + col`` or None)."""
    return position_entropy([divmod(c, 3) for c in cells if c is not None])


def null_entropy(cells: list[int | None], draws: int, seed: int = 0) -> dict:
    """The null's position entropy with a percentile interval over resampled images."""
    return resampled_interval(len(cells), lambda p: cells_entropy([cells[i] for i in p]), draws, seed=seed).to_dict()


def lr_rows(groups: dict[float, list[dict]], null: tuple[float, np.ndarray] | None, images: ImageDraws,
            draws: int) -> list[dict]:
    """One row per learning rate: each score's two-level interval (the sampling seeds resampled once for all
    training seeds: :func:`~.null_excess.over_shared_images`), the training-cell fraction's excess
    over the null (``null``: :func:`null_reading`; paired image by image, two-level) and whether it is not
    distinguishable from the null (``inside_null``: the excess's interval reaches 0 or below)."""
    rows = []
    for lr, members in groups.items():
        row = {"lr": lr, "n_seeds": len(members), "seeds": [c["seed"] for c in members]}
        for key in SCORES:  # a score some cell lacks (an older part) is left out of the row
            row[key] = (over_shared_images(tuple(row["seeds"]), seed_matrix(members, key), images)
                        if all(key in c for c in members) else None)
        row["training_cell_excess"] = (None if null is None else paired_excess(
            tuple(row["seeds"]), seed_matrix(members, "in_training_cell"), null, images))
        row["position_entropy"] = (interval_or_none(lambda: seed_level_interval(
            np.array([cells_entropy(c["cell"]) for c in members]), draws)) if all("cell" in c for c in members) else None)
        excess = row["training_cell_excess"]
        row["inside_null"] = None if excess is None else bool(excess["lo"] <= 0.0)
        rows.append(row)
    return rows


def _no_better_than_pivot(row: dict, pivot_alone: dict | None) -> bool:
    """``row`` (a learning rate above 0) reconstructs no better than the pivot alone: its coarse interval
    reaches down to the lr 0 row's estimate."""
    coarse, reference = row.get("coarse"), (pivot_alone or {}).get("coarse")
    return row["lr"] > 0 and coarse is not None and reference is not None and coarse["lo"] <= reference["estimate"]


def highest_safe_lr(rows: list[dict]) -> dict:
    """The last rate, going up from the lowest, whose training-cell fraction is inside the null and whose
    look is not lost (see the module docstring), with the graded appearance error there, and
    ``stopped_at``: the rate that ended the search and why (None when every rate passed). A rate too low
    to have learned the look yet (no better than the pivot before any rate was) has lost nothing."""
    pivot_alone = next((row for row in rows if row["lr"] == 0), None)
    safe, stopped_at, had_the_look = None, None, False
    for row in rows:
        no_better = _no_better_than_pivot(row, pivot_alone)
        reason = (OUTSIDE_NULL if not row["inside_null"]
                  else LOST_THE_LOOK if no_better and had_the_look else None)
        if reason is not None:
            stopped_at = {"lr": row["lr"], "reason": reason}
            break
        safe, had_the_look = row, had_the_look or (row["lr"] > 0 and not no_better)
    return {"lr": None if safe is None else safe["lr"],
            "appearance_error": None if safe is None else safe["appearance_error"],
            "stopped_at": stopped_at}


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def condition_summary(groups: dict[float, list[dict]], readings: dict[str, list], null: tuple[float, np.ndarray] | None,
                      reference: dict[str, list] | None, images: ImageDraws, draws: int) -> dict:
    """One (variant, weight): rows per rate, leakage and drift at matched coarse (``readings``: its
    :func:`matched_readings`; ``reference``: ``none``'s, or None; ``null``: :func:`null_reading`), the
    highest safe rate."""
    rows = lr_rows(groups, null, images, draws)
    return {"rows": rows, "matched": matched_entries(readings, MATCHED_COARSE, null, reference),
            "highest_safe_lr": highest_safe_lr(rows)}


def matched_entries(readings: dict[str, list], targets: tuple[float, ...], null: tuple[float, np.ndarray] | None,
                    reference: dict[str, list] | None) -> dict[str, dict]:
    """Per target (keyed ``f"{target:g}"``): how many seeds reach it, the leakage per seed, the seeds reaching it
    below the first trained rate, the leakage and drift over seeds (``readings``: :func:`matched_readings` of
    ``in_training_cell`` and ``drift`` at ``targets``), the leakage's excess over the null (paired image by
    image) and, with ``reference`` (``none``'s readings), the paired differences; each :func:`~.h3_intervals.over_seeds`."""
    matched = {}
    for j, target in enumerate(targets):
        leakage, drift, below = readings["in_training_cell"][j], readings["drift"][j], readings["below"][j]
        entry = {"seeds_reaching": int(np.isfinite(leakage.estimate).sum()),
                 "leakage_per_seed": {str(s): _finite_or_none(v) for s, v in zip(leakage.seeds, leakage.estimate)},
                 "below_first_rate": sorted(s for s, flag in below.items() if flag),
                 "leakage": over_seeds(leakage), "drift": over_seeds(drift)}
        if null is not None:
            entry["leakage_excess"] = over_seeds(leakage.minus_null(*null))
        if reference is not None:
            theirs = reference["below"][j]
            either = {s: below.get(s, False) or theirs.get(s, False) for s in set(below) | set(theirs)}
            entry["leakage_minus_none"] = paired(leakage, reference["in_training_cell"][j], either)
            entry["drift_minus_none"] = paired(drift, reference["drift"][j], either)
        matched[f"{target:g}"] = entry
    return matched


def choose_weight(conditions: list[dict]) -> dict | None:
    """:data:`CHOICE_RULE` over one variant's conditions (each with ``weight`` and ``matched``)."""
    key = f"{CHOICE_COARSE:g}"
    shared = set.intersection(*(set(c["matched"][key]["leakage_per_seed"]) for c in conditions))

    def rank(condition: dict) -> tuple:
        values = [v for seed, v in condition["matched"][key]["leakage_per_seed"].items()
                  if seed in shared and v is not None]
        weight = condition["weight"]
        return (-len(values), float(np.mean(values)) if values else math.inf, -math.inf if weight is None else weight)

    best = min(conditions, key=rank)
    reaching, mean, _ = rank(best)
    return None if reaching == 0 else {"weight": best["weight"], "mean_leakage": mean, "seeds_reaching": -reaching}


def null_training_cells(null: dict | None) -> np.ndarray | None:
    """The null's per-image training-cell flags (set ``a``) as one row, ``[1, images]``; None without a null."""
    return None if null is None else float_array(null["a"]["in_training_cell"])[None, :]


def summarise_h3(null: dict | None, cells: list[dict], draws: int = 2000) -> dict:
    """Everything above for the measured cells (a partial grid gives a partial summary). ``null``:
    H1's null part (:func:`~.h1_inversion.load_cells`), lists under ``a`` and ``b``."""
    null_a = null_training_cells(null)
    null_interval = None if null_a is None else two_level_bootstrap(null_a, draws)
    grouped = group_conditions(cells)
    images = ImageDraws.make(image_count(cells, null_a), draws)
    null_draws = null_reading(null_a, images)
    readings = {condition: matched_readings(groups, ("in_training_cell", "drift"), MATCHED_COARSE, images)
                for condition, groups in grouped.items()}
    reference = next((readings[c] for c in grouped if c[0] == REFERENCE), None)
    conditions = []
    for (variant, weight), groups in grouped.items():
        against = None if variant == REFERENCE else reference
        conditions.append({"variant": variant, "weight": weight}
                          | condition_summary(groups, readings[(variant, weight)], null_draws, against, images, draws))
    variants = {}
    for variant in dict.fromkeys(c["variant"] for c in conditions):
        own = [c for c in conditions if c["variant"] == variant]
        chosen = choose_weight(own)
        picked = next((c for c in own if chosen is not None and c["weight"] == chosen["weight"]), None)
        variants[variant] = {"chosen": chosen, "matched": None if picked is None else picked["matched"],
                             "highest_safe_lr": None if picked is None else picked["highest_safe_lr"]}
    return {"matched_coarse": list(MATCHED_COARSE), "choice_rule": CHOICE_RULE,
            "null": None if null is None else null_summary(null, draws),
            "null_training_cells": None if null_interval is None else null_interval.to_dict(),
            "null_position_entropy": None if null is None or "cell" not in null["a"] else null_entropy(null["a"]["cell"], draws),
            "conditions": conditions, "variants": variants}
