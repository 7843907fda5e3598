"""H3 read along a second axis, the character's private detail drawn to size (stated after a look).

**Why a second axis.** On toy world v2 every condition learns the character's coarse look at learning
rates where none of them leaks position yet, so at matched *coarse* reconstruction (the verdict's
axis, :mod:`.h3_summary`) the conditions cannot differ. The private detail, a white dot at the disc's
centre, is the part of the look only the LoRA can learn, and without a regulariser it is learned over
the same rates as position. Counted only when drawn to size
(:func:`~pti_plugin.toy_world.detectors.has_true_size_detail`: LoRAs trained under pivot locality draw white
*holes* that :func:`~pti_plugin.toy_world.detectors.has_detail` accepts), it gives a reconstruction axis along
which a regulariser could show "the same look for less leakage".

**What is read.** Per condition and training seed, along the learning rates (lr 0: the pivot alone):
the training-cell fraction and the drift where the seed's mean true-size detail first reaches each of
:data:`DETAIL_TARGETS` (:func:`~.h3_summary.matched_per_seed` with ``axis``), with the excess over the
null and the paired difference against ``none`` (:func:`~.h3_summary.matched_entries`); the highest
true-size detail the seed reaches at any rate; and per rate the two-level intervals of both.

**How far to trust it.** The axis and its targets were chosen *after* an exploratory look at the
re-run cells' images (``analysis/detail_size.py``), and the targets where the pivot-locality
variants still get to. Its intervals are honest about sampling, not about that choice: read it as a
hypothesis for the next protocol, never as H3's verdict.

**Confirmatory tests** (``docs/method.md``), each stated with its rule before its runs on training seeds
never used before, and read only over those seeds: :data:`CONFIRMATORY` (leakage where the detail
first reaches 0.5) and :data:`CEILING_TEST` (the best detail a seed reaches while its leakage stays
under the null's upper bound).

Only cells whose images were read carry ``true_size_detail``
(:func:`~.protocol_sections.measured_h3_cells`; the archive keeps it from then on); a condition with a
cell without it is listed under ``not_measured``.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..metrics.replication import same_lr, seed_level_interval, two_level_bootstrap
from .h1_summary import per_seed_curves, seed_matrix
from .h3_summary import (REFERENCE, group_conditions, interval_or_none, matched_entries, matched_per_seed,
                         null_training_cells, paired_against)
from .protocol_report import fmt

AXIS = "true_size_detail"
DETAIL_TARGETS = (0.25, 0.5)
#: The confirmatory test of this axis, stated before its runs on fresh training seeds (docs/method.md):
#: the condition, its seeds, the target it is read at, and how many seeds must reach it for "supported".
CONFIRMATORY = {"variant": "half_angle", "weight": 0.1, "seeds": (5, 6, 7, 8, 9), "target": 0.5, "min_seeds": 3}
CONFIRMATORY_RULE = (f"`{CONFIRMATORY['variant']}` w{CONFIRMATORY['weight']:g}, training-cell fraction minus no "
                     f"regulariser's where the true-size detail first reaches {CONFIRMATORY['target']:g}, paired over "
                     f"training seeds: supported when at least {CONFIRMATORY['min_seeds']} seeds reach it and the 95% "
                     "interval lies below 0, refuted when the interval lies at or above 0, inconclusive otherwise "
                     "(also when fewer than 2 seeds pair: one difference gives no interval)")
#: The second confirmatory test, stated before its runs on training seeds 10-14 (docs/method.md): per seed and
#: condition, the highest true-size detail among its cells at ``lrs`` (0: the pivot alone) whose training-cell
#: fraction is at most ``ceiling`` (the upper end of the committed null's 95% interval, 0.469).
CEILING_TEST = {"variant": "half_angle", "weight": 0.1, "seeds": (10, 11, 12, 13, 14),
                "lrs": (0.0, 3e-4, 4e-4, 5e-4, 7e-4), "ceiling": 0.47, "min_paired": 4}
CEILING_RULE = (f"`{CEILING_TEST['variant']}` w{CEILING_TEST['weight']:g} minus no regulariser, paired over training "
                "seeds, in the highest true-size detail a seed reaches at lr "
                + ", ".join(f"{lr:g}" for lr in CEILING_TEST["lrs"])
                + f" while its training-cell fraction is at most {CEILING_TEST['ceiling']:g}: supported when at least "
                f"{CEILING_TEST['min_paired']} seeds pair and the 95% interval lies above 0, refuted when it lies at or "
                "below 0, inconclusive otherwise")


def _label(condition: tuple[str, float | None]) -> str:
    variant, weight = condition
    return variant if weight is None else f"{variant} (w {weight:g})"


def _measured(groups: dict[float, list[dict]]) -> bool:
    return all(AXIS in cell for members in groups.values() for cell in members)


def detail_rows(groups: dict[float, list[dict]], draws: int) -> list[dict]:
    """Per learning rate: the true-size detail and the training-cell fraction, two-level intervals."""
    return [{"lr": lr, "n_seeds": len(members),
             AXIS: interval_or_none(lambda: two_level_bootstrap(seed_matrix(members, AXIS), draws)),
             "in_training_cell": interval_or_none(lambda: two_level_bootstrap(seed_matrix(members, "in_training_cell"), draws))}
            for lr, members in groups.items()]


def detail_axis_summary(null: dict | None, cells: list[dict], draws: int = 2000) -> dict:
    """The module docstring's readings over ``cells`` (with their lr-0 pivot cells), ``null`` as in
    :func:`~.h3_summary.summarise_h3`."""
    null_a = null_training_cells(null)
    grouped = group_conditions(cells)
    measured = {condition: groups for condition, groups in grouped.items() if _measured(groups)}
    per_seed = {condition: {"leakage": matched_per_seed(groups, "in_training_cell", DETAIL_TARGETS, axis=AXIS),
                            "drift": matched_per_seed(groups, "drift", DETAIL_TARGETS, axis=AXIS)}
                for condition, groups in measured.items()}
    reference = next((per_seed[c] for c in measured if c[0] == REFERENCE), None)
    conditions = []
    for (variant, weight), groups in measured.items():
        reached = np.nanmax(per_seed_curves(groups, AXIS), axis=1)  # [training seeds]
        against = None if variant == REFERENCE else reference
        conditions.append({"variant": variant, "weight": weight, "seeds": len(reached),
                           "lrs": sorted(lr for lr in groups if lr > 0),
                           "reached": interval_or_none(lambda: seed_level_interval(reached, draws)),
                           "matched": matched_entries(per_seed[(variant, weight)], DETAIL_TARGETS, null_a, against, draws),
                           "rows": detail_rows(groups, draws)})
    return {"axis": AXIS, "targets": list(DETAIL_TARGETS), "conditions": conditions,
            "null_training_cells": None if null_a is None else two_level_bootstrap(null_a, draws).to_dict(),
            "not_measured": [_label(c) for c in grouped if c not in measured],
            "n_cells": sum(1 for c in cells if c["lr"] > 0 and (c["variant"], c["weight"]) in measured)}


def _over_seeds(entry: dict, key: str) -> str:
    """``entry[key]`` formatted; an interval over one training seed (no spread to resample; for a paired
    difference, one seed paired) as its value alone."""
    value = entry.get(key)
    if value and value.get("n_paired", entry["seeds_reaching"]) == 1:
        return f"{value['estimate']:.2f} (1 seed)"
    return fmt(entry.get(key), 2)


def _rates_read(condition: dict) -> str:
    """The LoRA learning rates a condition's row rests on: how many, and from which to which."""
    lrs = condition.get("lrs", [])
    return f"{len(lrs)}: {lrs[0]:g} to {lrs[-1]:g}" if len(lrs) > 1 else ", ".join(f"{lr:g}" for lr in lrs) or "none"


def detail_axis_lines(summary: dict) -> list[str]:
    """The Markdown of :func:`detail_axis_summary`: one row per condition and target."""
    head = ["condition", "training seeds", "learning rates read", "highest true-size detail reached", "target",
            "seeds reaching", "training cells there", "excess over null", "minus none (paired)", "drift minus none"]
    lines = ["**Secondary axis, stated after an exploratory look: the private detail drawn to size** "
             f"({summary['n_cells']} LoRA cells whose images were read). Per training seed, the training-cell "
             "fraction where its true-size detail first reaches the target along the learning rates (lr 0: the "
             "pivot alone); intervals over training seeds. A condition's highest detail is over the learning "
             "rates read so far. The targets were chosen after seeing where the pivot-locality variants get to: "
             "a hypothesis for the next protocol, not H3's verdict.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for condition in sorted(summary["conditions"], key=lambda c: c["variant"] != REFERENCE):
        for target, entry in condition["matched"].items():
            figures = [_over_seeds(entry, "leakage"), fmt(entry.get("leakage_excess"), 2),  # the excess resamples the null too
                       _over_seeds(entry, "leakage_minus_none"), _over_seeds(entry, "drift_minus_none")]
            lines.append(f"| {_label((condition['variant'], condition['weight']))} | {condition['seeds']} | "
                         f"{_rates_read(condition)} | {fmt(condition['reached'], 2)} | {target} | "
                         f"{entry['seeds_reaching']} | " + " | ".join(figures) + " |")
    if summary["not_measured"]:
        lines += ["", "Not on this axis (cells archived without their images read): "
                  + ", ".join(summary["not_measured"]) + "."]
    return lines


def detail_axis_plot(summary: dict, path, verdict: str | None = None) -> None:
    """Leakage against the true-size detail per condition along its learning rates (two-level 95%
    intervals both ways; the null's training-cell interval, when the summary has one, as a grey band);
    ``verdict``, a line giving the confirmatory tests' verdicts, goes under the title."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .h3_lines import condition_styles, errorbar_rows

    fig, ax = plt.subplots(figsize=(7, 5))
    for condition, style in zip(summary["conditions"], condition_styles(summary["conditions"])):
        errorbar_rows(ax, condition["rows"], AXIS, "in_training_cell", _label((condition["variant"], condition["weight"])),
                      0.0, style)
    null = summary["null_training_cells"]
    if null:
        ax.axhspan(null["lo"], null["hi"], color="grey", alpha=0.3, label="null 95%")
    for target in summary["targets"]:
        ax.axvline(target, color="black", linewidth=0.6, linestyle=":")
    ax.set(xlabel="share of neutral images with the private detail drawn to size",
           ylabel="objects in a training cell (leakage)")
    ax.legend(fontsize=7)
    title = "H3, secondary axis (stated after a look): leakage against the true-size detail"
    if verdict is not None:
        title += "\n" + textwrap.fill(verdict, 110)
    ax.set_title(title, fontsize=8 if verdict else 9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stated_groups(test: dict, cells: list[dict]) -> tuple[dict | None, dict | None]:
    """A confirmatory ``test``'s condition and no regulariser, each grouped by learning rate over the cells of
    the test's stated training seeds; None for a side without cells or with a cell whose images were not read."""
    grouped = group_conditions([c for c in cells if c["seed"] in test["seeds"]])
    sides = (grouped.get((test["variant"], test["weight"])), grouped.get((REFERENCE, None)))
    return tuple(groups if groups is not None and _measured(groups) else None for groups in sides)


def confirmatory_verdict(cells: list[dict], draws: int = 2000) -> str | None:
    """:data:`CONFIRMATORY_RULE` on the cells of its stated training seeds (lr-0 pivots included); None
    where they hold no cell of its condition."""
    condition, reference = _stated_groups(CONFIRMATORY, cells)
    if condition is None:
        return None
    targets = (CONFIRMATORY["target"],)
    leakage = matched_per_seed(condition, "in_training_cell", targets, axis=AXIS)  # {seed: [1]}
    reaching = int(sum(np.isfinite(v[0]) for v in leakage.values()))
    difference = None if reference is None else paired_against(
        leakage, matched_per_seed(reference, "in_training_cell", targets, axis=AXIS), 0, draws)
    basis = f"{reaching} of {len(leakage)} training seeds reach {CONFIRMATORY['target']:g}"
    if difference is None:
        return f"inconclusive: no paired difference ({basis})"
    basis += f", {difference['n_paired']} paired"
    if difference["n_paired"] < 2:  # one difference has no spread: its "interval" is the value itself
        return f"inconclusive: {fmt(difference)}, no interval over one paired seed ({basis})"
    if difference["hi"] < 0 and reaching >= CONFIRMATORY["min_seeds"]:
        return f"supported: {fmt(difference)} ({basis})"
    if difference["lo"] >= 0:
        return f"refuted: {fmt(difference)} ({basis})"
    return f"inconclusive: {fmt(difference)} ({basis})"


def detail_under_ceiling(groups: dict[float, list[dict]], lrs: tuple[float, ...], ceiling: float) -> dict[int, float]:
    """Per training seed: the highest mean true-size detail among its cells at ``lrs`` whose mean training-cell
    fraction is at most ``ceiling`` (0 where none is; a cell without objects has no fraction and does not
    count); NaN for a seed that lacks a cell at one of ``lrs``."""
    stated = {lr: members for lr, members in groups.items() if any(same_lr(lr, x) for x in lrs)}
    seeds = sorted({c["seed"] for members in stated.values() for c in members})  # per_seed_curves' row order
    detail = per_seed_curves(stated, AXIS)  # [seeds, rates]
    with warnings.catch_warnings():  # a cell without any object has no training-cell fraction: NaN
        warnings.simplefilter("ignore", category=RuntimeWarning)
        leakage = per_seed_curves(stated, "in_training_cell")
    complete = len(stated) == len(lrs) and np.isfinite(detail).all(axis=1)
    under = np.where(np.nan_to_num(leakage, nan=np.inf) <= ceiling, detail, 0.0).max(axis=1)
    return {seed: float(value) if ok else float("nan") for seed, value, ok in zip(seeds, under, complete)}


def ceiling_verdict(cells: list[dict], draws: int = 2000) -> str | None:
    """:data:`CEILING_RULE` on the cells of its stated training seeds and rates (lr-0 pivots included); None
    where they hold no measured cell of its condition or of no regulariser."""
    condition, reference = _stated_groups(CEILING_TEST, cells)
    if condition is None or reference is None:
        return None
    readings = [detail_under_ceiling(groups, CEILING_TEST["lrs"], CEILING_TEST["ceiling"])
                for groups in (condition, reference)]
    difference = paired_against(*({s: np.array([v]) for s, v in r.items()} for r in readings), 0, draws)
    means = ", ".join(f"{name} {np.nanmean(list(r.values())):.2f}"
                      for name, r in zip((f"w{CEILING_TEST['weight']:g}", REFERENCE), readings))
    per_seed = ", ".join(f"{seed} {readings[0][seed]:.2f} vs {readings[1].get(seed, float('nan')):.2f}"
                         for seed in sorted(readings[0]))
    basis = (f"{0 if difference is None else difference['n_paired']} paired seeds; mean detail under the ceiling "
             f"{means}; per seed {per_seed}")
    if difference is None or difference["n_paired"] < CEILING_TEST["min_paired"]:
        return f"inconclusive: {fmt(difference)} ({basis})"
    if difference["lo"] > 0:
        return f"supported: {fmt(difference)} ({basis})"
    if difference["hi"] <= 0:
        return f"refuted: {fmt(difference)} ({basis})"
    return f"inconclusive: {fmt(difference)} ({basis})"
