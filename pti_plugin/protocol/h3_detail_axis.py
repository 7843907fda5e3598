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
under the null's upper bound). Each verdict's interval is two-level (:mod:`.h3_intervals`; the rules
were stated over training seeds, and the figures committed before this was so are over training seeds
alone), and beside it the small-sample check: the same rule read on Student's t over the paired seeds.

Only cells whose images were read carry ``true_size_detail``
(:func:`~.protocol_sections.measured_h3_cells`; the archive keeps it from then on); a condition with a
cell without it is listed under ``not_measured``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from ..metrics.replication import same_lr, two_level_bootstrap
from .h1_summary import per_seed_curves, seed_matrix
from .h3_intervals import MIN_SEEDS, ImageDraws, PerSeed, over_seeds, paired
from .h3_summary import (REFERENCE, group_conditions, image_count, image_tensor, interval_or_none, matched_entries,
                         matched_readings, null_reading, null_training_cells)
from .h3_lines import seeds_text
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
                     f"(also when fewer than {MIN_SEEDS} seeds pair: no 95% interval is given over fewer; stated as fewer than 2 "
                     "before the runs, tightened after them where the runs had one pair)")
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
    :func:`~.h3_summary.summarise_h3`; every reading over training seeds is two-level (:mod:`.h3_intervals`)."""
    null_a = null_training_cells(null)
    grouped = group_conditions(cells)
    measured = {condition: groups for condition, groups in grouped.items() if _measured(groups)}
    images = ImageDraws.make(image_count(cells, null_a), draws)
    null_draws = null_reading(null_a, images)
    readings = {condition: matched_readings(groups, ("in_training_cell", "drift"), DETAIL_TARGETS, images, axis=AXIS)
                for condition, groups in measured.items()}
    reference = next((readings[c] for c in measured if c[0] == REFERENCE), None)
    conditions = []
    for (variant, weight), groups in measured.items():
        reached = highest_reached(groups, images)
        against = None if variant == REFERENCE else reference
        conditions.append({"variant": variant, "weight": weight, "seeds": len(reached.seeds),
                           "lrs": sorted(lr for lr in groups if lr > 0), "reached": over_seeds(reached),
                           "matched": matched_entries(readings[(variant, weight)], DETAIL_TARGETS, null_draws, against),
                           "rows": detail_rows(groups, draws)})
    return {"axis": AXIS, "targets": list(DETAIL_TARGETS), "conditions": conditions,
            "null_training_cells": None if null_a is None else two_level_bootstrap(null_a, draws).to_dict(),
            "not_measured": [_label(c) for c in grouped if c not in measured],
            "n_cells": sum(1 for c in cells if c["lr"] > 0 and (c["variant"], c["weight"]) in measured)}


def highest_reached(groups: dict[float, list[dict]], images: ImageDraws) -> PerSeed:
    """Per training seed, the highest mean true-size detail over its learning rates, and on each draw's images."""
    seeds = tuple(sorted({c["seed"] for members in groups.values() for c in members}))
    with warnings.catch_warnings():  # a seed without a cell at some rate: NaN there
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return PerSeed(seeds, np.nanmax(per_seed_curves(groups, AXIS), axis=1),
                       np.nanmax(images.means(image_tensor(groups, AXIS, images.width)), axis=1))


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
             "pivot alone); 95% intervals two-level (training seeds, and the sampling seeds every cell and the null "
             f"share: the excess over the null and the differences are paired image by image), none from fewer than "
             f"{MIN_SEEDS} seeds (their values instead). A condition's highest detail is over the learning "
             "rates read so far. The targets were chosen after seeing where the pivot-locality variants get to: "
             "a hypothesis for the next protocol, not H3's verdict.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for condition in sorted(summary["conditions"], key=lambda c: c["variant"] != REFERENCE):
        for target, entry in condition["matched"].items():
            figures = [seeds_text(entry.get(key)) for key in ("leakage", "leakage_excess", "leakage_minus_none",
                                                              "drift_minus_none")]
            lines.append(f"| {_label((condition['variant'], condition['weight']))} | {condition['seeds']} | "
                         f"{_rates_read(condition)} | {seeds_text(condition['reached'])} | {target} | "
                         f"{entry['seeds_reaching']} | " + " | ".join(figures) + " |")
    if summary["not_measured"]:
        lines += ["", "Not on this axis (cells archived without their images read): "
                  + ", ".join(summary["not_measured"]) + "."]
    return lines


def detail_axis_plot(summary: dict, path, verdict: str | None = None) -> None:
    """:func:`detail_axis_figure` written to ``path``."""
    import matplotlib.pyplot as plt

    fig = detail_axis_figure(summary, verdict)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def detail_axis_figure(summary: dict, verdict: str | None = None):
    """Leakage against the true-size detail along the learning rates, one panel per variant with no regulariser
    in each as the reference (two-level 95% intervals both ways; the null's training-cell interval, when the
    summary has one, as a grey band; each panel's legend below it, outside the panels); ``verdict``, a line giving
    the confirmatory tests' verdicts, goes under the title."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .h3_lines import errorbar_rows, panel_styles, variant_panels

    panels = variant_panels(summary["conditions"])
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.6 * rows), squeeze=False, sharex=True,
                             sharey=True)
    null = summary["null_training_cells"]
    for ax, (variant, conditions) in zip(axes.flat, panels):
        for condition, style in zip(conditions, panel_styles(conditions)):
            errorbar_rows(ax, condition["rows"], AXIS, "in_training_cell",
                          _label((condition["variant"], condition["weight"])), 0.0, style)
        if null:
            ax.axhspan(null["lo"], null["hi"], color="grey", alpha=0.3, label="null 95%")
        for target in summary["targets"]:
            ax.axvline(target, color="black", linewidth=0.6, linestyle=":")
        ax.set_title(variant, fontsize=9)
        ax.set(xlabel="true-size detail (share of neutral images)", ylabel="leakage (objects in a training cell)")
        ax.tick_params(labelbottom=True, labelleft=True)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    title = "H3, secondary axis (stated after a look): leakage against the true-size detail"
    if verdict is not None:
        title += "\n" + textwrap.fill(verdict, 40 * columns)
    fig.suptitle(title, fontsize=8 if verdict else 9)
    fig.tight_layout()
    return fig


def _stated_groups(test: dict, cells: list[dict]) -> tuple[dict | None, dict | None]:
    """A confirmatory ``test``'s condition and no regulariser, each grouped by learning rate over the cells of
    the test's stated training seeds; None for a side without cells or with a cell whose images were not read."""
    grouped = group_conditions([c for c in cells if c["seed"] in test["seeds"]])
    sides = (grouped.get((test["variant"], test["weight"])), grouped.get((REFERENCE, None)))
    return tuple(groups if groups is not None and _measured(groups) else None for groups in sides)


def small_sample_check(difference: dict, word: Callable[[dict], str]) -> str:
    """``; small-sample check ...``: Student's t interval of the paired seeds' differences and ``word``, the
    stated rule's reading, on it ("" with fewer than two pairs)."""
    student = difference.get("student")
    if student is None:
        return ""
    return (f"; small-sample check (Student's t over the {difference['n_paired']} paired seeds): {fmt(student)}, "
            f"which the rule reads as {word(student)}")


def _confirmatory_word(interval: dict, reaching: int) -> str:
    """:data:`CONFIRMATORY_RULE`'s reading of one interval of the paired difference."""
    if interval["hi"] < 0 and reaching >= CONFIRMATORY["min_seeds"]:
        return "supported"
    return "refuted" if interval["lo"] >= 0 else "inconclusive"


def confirmatory_verdict(cells: list[dict], draws: int = 2000) -> str | None:
    """:data:`CONFIRMATORY_RULE` on the cells of its stated training seeds (lr-0 pivots included), two-level
    (:mod:`.h3_intervals`), with the small-sample check beside it; None where they hold no cell of its condition."""
    condition, reference = _stated_groups(CONFIRMATORY, cells)
    if condition is None:
        return None
    targets = (CONFIRMATORY["target"],)
    images = ImageDraws.make(image_count([c for c in cells if c["seed"] in CONFIRMATORY["seeds"]]), draws)
    leakage = matched_readings(condition, ("in_training_cell",), targets, images, axis=AXIS)["in_training_cell"][0]
    reaching = int(np.isfinite(leakage.estimate).sum())
    difference = None if reference is None else paired(
        leakage, matched_readings(reference, ("in_training_cell",), targets, images, axis=AXIS)["in_training_cell"][0])
    basis = f"{reaching} of {len(leakage.seeds)} training seeds reach {CONFIRMATORY['target']:g}"
    if difference is None:
        return f"inconclusive: no paired difference ({basis})"
    basis += f", {difference['n_paired']} paired"
    if difference["n_paired"] < MIN_SEEDS:  # one difference has no spread, two a range, not a 95% interval
        return (f"inconclusive: {seeds_text(difference, 3)}, no interval from fewer than {MIN_SEEDS} paired seeds "
                f"({basis})")
    word = _confirmatory_word(difference, reaching)
    return f"{word}: {fmt(difference)} ({basis})" + small_sample_check(difference, lambda i: _confirmatory_word(i, reaching))


def under_ceiling(detail: np.ndarray, leakage: np.ndarray, ceiling: float) -> np.ndarray:
    """Along the last axis (the rates): the highest ``detail`` whose ``leakage`` is at most ``ceiling`` (0 where
    none is; a NaN leakage, a cell without objects, does not count)."""
    return np.where(np.nan_to_num(leakage, nan=np.inf) <= ceiling, detail, 0.0).max(axis=-1)


def detail_under_ceiling(groups: dict[float, list[dict]], lrs: tuple[float, ...], ceiling: float,
                         images: ImageDraws) -> PerSeed:
    """Per training seed: the highest mean true-size detail among its cells at ``lrs`` whose mean training-cell
    fraction is at most ``ceiling`` (:func:`under_ceiling`), and the same on each draw's images; NaN for a seed
    that lacks a cell at one of ``lrs``."""
    stated = {lr: members for lr, members in groups.items() if any(same_lr(lr, x) for x in lrs)}
    seeds = tuple(sorted({c["seed"] for members in stated.values() for c in members}))  # per_seed_curves' row order
    detail = per_seed_curves(stated, AXIS)  # [seeds, rates]
    with warnings.catch_warnings():  # a cell without any object has no training-cell fraction: NaN
        warnings.simplefilter("ignore", category=RuntimeWarning)
        leakage = per_seed_curves(stated, "in_training_cell")
    complete = np.isfinite(detail).all(axis=1) & (len(stated) == len(lrs))
    on_draws = under_ceiling(*(images.means(image_tensor(stated, key, images.width)).swapaxes(1, 2)
                               for key in (AXIS, "in_training_cell")), ceiling)  # [seeds, draws]
    return PerSeed(seeds, np.where(complete, under_ceiling(detail, leakage, ceiling), np.nan),
                   np.where(complete[:, None], on_draws, np.nan))


def _ceiling_word(interval: dict) -> str:
    """:data:`CEILING_RULE`'s reading of one interval of the paired difference."""
    return "supported" if interval["lo"] > 0 else "refuted" if interval["hi"] <= 0 else "inconclusive"


def ceiling_verdict(cells: list[dict], draws: int = 2000) -> str | None:
    """:data:`CEILING_RULE` on the cells of its stated training seeds and rates (lr-0 pivots included), two-level
    (:mod:`.h3_intervals`), with the small-sample check beside it; None where they hold no measured cell of its
    condition or of no regulariser."""
    condition, reference = _stated_groups(CEILING_TEST, cells)
    if condition is None or reference is None:
        return None
    images = ImageDraws.make(image_count([c for c in cells if c["seed"] in CEILING_TEST["seeds"]]), draws)
    readings = [detail_under_ceiling(groups, CEILING_TEST["lrs"], CEILING_TEST["ceiling"], images)
                for groups in (condition, reference)]
    difference = paired(*readings)
    means = ", ".join(f"{name} {np.nanmean(r.estimate):.2f}"
                      for name, r in zip((f"w{CEILING_TEST['weight']:g}", REFERENCE), readings))
    theirs = dict(zip(readings[1].seeds, readings[1].estimate))
    per_seed = ", ".join(f"{seed} {value:.2f} vs {theirs.get(seed, float('nan')):.2f}"
                         for seed, value in sorted(zip(readings[0].seeds, readings[0].estimate)))
    basis = (f"{0 if difference is None else difference['n_paired']} paired seeds; mean detail under the ceiling "
             f"{means}; per seed {per_seed}")
    if difference is None or difference["n_paired"] < CEILING_TEST["min_paired"]:
        return f"inconclusive: {seeds_text(difference, 3)} ({basis})"
    return (f"{_ceiling_word(difference)}: {fmt(difference)} ({basis})"
            + small_sample_check(difference, _ceiling_word))
