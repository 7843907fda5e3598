"""H3's part of the research protocol's report: the verdict, the tables and the plot.

Reads :func:`~.h3_summary.summarise_h3`'s summary (also as reloaded from ``h3_summary.json``).

**The verdict** (:data:`VERDICT_RULE`) is read at matched coarse reconstruction
:data:`~.h3_summary.CHOICE_COARSE` for the user's variant (``half_angle``) at its chosen weight:
the paired difference of the training-cell fraction against no regulariser, per training seed,
with its two-level interval (:mod:`.h3_intervals`). Before the interval is read, the comparison must be
one: it is *untestable* when most paired seeds reach the matched reconstruction below the first trained
LoRA rate (between the pivot alone and the lowest rate: the reading interpolates toward a LoRA that has
barely trained) or most paired differences are exactly 0 (both sides read the same images). Beside it,
the small-sample check: the same rule on Student's t over the paired seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..metrics.replication import same_lr
from ..toy_world.detectors import detail_size, detect, is_true_size
from ..toy_world.world import CHARACTER_CELLS
from .h3_intervals import MIN_SEEDS, has_interval
from .h3_summary import CHOICE_COARSE, MATCHED_COARSE
from .protocol_report import SMALL_SAMPLE_CHECK, fmt

METHOD_VARIANT = "half_angle"
VERDICT_RULE = (f"`{METHOD_VARIANT}` at its chosen weight, training-cell fraction minus no regulariser's at matched "
                f"coarse {CHOICE_COARSE:g}, paired over training seeds: untestable when in most paired seeds a side "
                "reaches it below the first trained LoRA rate (between the pivot alone and the lowest rate) or most "
                "paired differences are exactly 0; otherwise supported when the 95% interval lies below 0, not "
                f"supported when it lies at or above 0, inconclusive when it contains 0 or fewer than {MIN_SEEDS} "
                "seeds pair (no interval is given over fewer)")


def seeds_text(entry: dict | None, digits: int = 2) -> str:
    """``entry`` formatted: its interval with 3 or more seeds, else the seeds' own values
    (``-0.25, -0.22 (2 seeds)``); ``n/a`` without one."""
    if not entry or entry.get("estimate") is None:
        return "n/a"
    if has_interval(entry):
        return fmt(entry, digits)
    values = list((entry.get("per_seed") or {}).values()) or [entry["estimate"]]
    return ", ".join(f"{v:.{digits}f}" for v in values) + f" ({len(values)} seed{'s' if len(values) != 1 else ''})"


def student_text(entry: dict | None, digits: int = 3) -> str:
    """``entry``'s Student's t interval formatted, or ``n/a``."""
    return fmt((entry or {}).get("student"), digits)


def _label(variant: str, weight) -> str:
    return variant if weight is None else f"{variant} (w {weight:g})"


def _difference(summary: dict) -> tuple[dict, dict, dict]:
    """The chosen weight's record of :data:`METHOD_VARIANT`, its matched-coarse entry and the paired difference
    there ({} where missing)."""
    record = summary["variants"].get(METHOD_VARIANT) or {}
    entry = (record.get("matched") or {}).get(f"{CHOICE_COARSE:g}") or {}
    return record, entry, entry.get("leakage_minus_none") or {}


def untestable(difference: dict) -> str | None:
    """Why :data:`VERDICT_RULE` cannot test ``difference`` (a sentence), or None when it can."""
    n, why = difference.get("n_paired", 0), []
    if 2 * difference.get("below_first_rate", 0) > n:
        why.append(f"in {difference['below_first_rate']} of {n} paired seeds a side reaches coarse {CHOICE_COARSE:g} "
                   "below the first trained LoRA rate, between the pivot alone and the lowest rate")
    if 2 * difference.get("zero_differences", 0) > n:
        why.append(f"{difference['zero_differences']} of the {n} paired differences are exactly 0")
    return "; ".join(why) or None


def verdict(summary: dict) -> str:
    """:data:`VERDICT_RULE` applied to ``summary``."""
    record, entry, difference = _difference(summary)
    n = difference.get("n_paired", 0)
    if not has_interval(difference) or min(n, entry.get("seeds_reaching", 0)) < MIN_SEEDS:
        return (f"inconclusive (fewer than {MIN_SEEDS} training seeds pair at the matched reconstruction: "
                f"{seeds_text(difference, 3)})")
    basis = f" (weight {record['chosen']['weight']:g}, {n} training seeds paired)" if record.get("chosen") else ""
    why = untestable(difference)
    if why:
        return f"untestable: {why}; the paired difference reads {fmt(difference)}{basis}"
    return f"{_reading(difference)}{basis}"


def verdict_check(summary: dict) -> str:
    """The small-sample check of :func:`verdict`: the paired difference's Student's t interval and the rule's
    reading on it (a sentence), or "" where the summary has none."""
    _, _, difference = _difference(summary)
    student = difference.get("student")
    if student is None or difference.get("n_paired", 0) < MIN_SEEDS:
        return ""
    word = "untestable" if untestable(difference) else _reading(student).split(':')[0]
    return f"Small-sample check ({SMALL_SAMPLE_CHECK}): {fmt(student)}; the rule reads **{word}** with it. "


def _reading(difference: dict) -> str:
    """:data:`VERDICT_RULE`'s reading of one interval of the paired difference, with the interval."""
    if difference["hi"] < 0:
        return f"supported: {fmt(difference)}"
    if difference["lo"] >= 0:
        return f"not supported: {fmt(difference)}"
    return f"inconclusive: {fmt(difference)} contains 0"


def lr_table(summary: dict) -> list[str]:
    head = ["condition", "lr", "seeds", "coarse", "graded error", "training cells", "excess over null (paired)",
            "indistinguishable from null", "position entropy", "drift, unrelated prompts", "class drift", "`a character` draws the character"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for condition in summary["conditions"]:
        for row in condition["rows"]:
            lines.append(f"| {_label(condition['variant'], condition['weight'])} | {row['lr']:g} | {row['n_seeds']} | "
                         f"{fmt(row['coarse'], 2)} | {fmt(row['appearance_error'])} | {fmt(row['in_training_cell'], 2)} | "
                         f"{fmt(row.get('training_cell_excess'), 2)} | "
                         f"{_yes_no(row['inside_null'])} | {fmt(row.get('position_entropy'), 2)} | {fmt(row.get('drift_unrelated'), 2)} | {fmt(row.get('drift_class'), 2)} | "
                         f"{fmt(row.get('class_character'), 2)} |")
    return lines


def _yes_no(flag: bool | None) -> str:
    return "n/a" if flag is None else "yes" if flag else "no"


def matched_table(summary: dict) -> list[str]:
    head = ["condition", "matched coarse", "seeds reaching", "training cells", "excess over null",
            "minus none (paired)", "drift minus none"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for condition in summary["conditions"]:
        for target in MATCHED_COARSE:
            entry = condition["matched"][f"{target:g}"]
            lines.append(f"| {_label(condition['variant'], condition['weight'])} | {target:g} | {entry['seeds_reaching']} | "
                         + " | ".join(seeds_text(entry.get(key)) for key in ("leakage", "leakage_excess",
                                                                             "leakage_minus_none", "drift_minus_none"))
                         + " |")
    return lines


#: The rate at which :func:`condition_table` reads each condition's leakage and drift: where no regulariser leaks.
READ_AT_LR = 1e-3


def _row_at(condition: dict, lr: float) -> dict:
    return next((row for row in condition["rows"] if same_lr(row["lr"], lr)), {})


def condition_table(summary: dict) -> list[str]:
    """One row per condition: its highest safe rate with the look and the unrelated prompts' drift there,
    the rate that stopped the search and why, its leakage and drift at :data:`READ_AT_LR`, and its paired
    difference with no regulariser at matched coarse; the weight each variant's rule chose is marked."""
    at = f"{READ_AT_LR:g}"
    head = ["condition", "training seeds", "highest safe lr", "excess over null there", "graded error there",
            "unrelated-prompt drift there", "search stopped at", f"training-cell excess at {at}",
            f"graded error at {at}", f"unrelated-prompt drift at {at}", f"class drift at {at}",
            f"minus none at matched coarse {CHOICE_COARSE:g}"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for condition in sorted(summary["conditions"], key=lambda c: c["variant"] != "none"):  # none first, the reference
        chosen = (summary["variants"].get(condition["variant"], {}).get("chosen") or {}).get("weight")
        mark = " (chosen)" if condition["weight"] is not None and condition["weight"] == chosen else ""
        safe, row = condition["highest_safe_lr"], _row_at(condition, READ_AT_LR)
        at_safe = {} if safe["lr"] is None else _row_at(condition, safe["lr"])
        seeds = max((r["n_seeds"] for r in condition["rows"] if r["lr"] > 0), default=0)
        lines.append(f"| {_label(condition['variant'], condition['weight'])}{mark} | {seeds} | "
                     f"{'none' if safe['lr'] is None else format(safe['lr'], 'g')} | "
                     f"{fmt(at_safe.get('training_cell_excess'), 2)} | {fmt(safe['appearance_error'])} | "
                     f"{fmt(at_safe.get('drift_unrelated'), 2)} | {_stopped(safe.get('stopped_at'))} | "
                     f"{fmt(row.get('training_cell_excess'), 2)} | {fmt(row.get('appearance_error'))} | "
                     f"{fmt(row.get('drift_unrelated'), 2)} | {fmt(row.get('drift_class'), 2)} | "
                     f"{seeds_text(condition['matched'][f'{CHOICE_COARSE:g}'].get('leakage_minus_none'), 3)} |")
    return lines


def _safe_excess(summary: dict, variant: str, weight, lr: float | None) -> str:
    """``: not distinguishable from the null (excess x [lo, hi])`` for a condition's highest safe rate, or ""."""
    condition = next((c for c in summary["conditions"] if (c["variant"], c["weight"]) == (variant, weight)), None)
    row = {} if condition is None or lr is None else _row_at(condition, lr)
    excess = row.get("training_cell_excess")
    return "" if excess is None else f": not distinguishable from the null (excess {fmt(excess, 2)})"


def _stopped(stopped_at: dict | None) -> str:
    """``highest_safe_lr``'s ``stopped_at`` as a cell: the rate and the reason, or "none" when every rate passed."""
    return "none" if not stopped_at else f"{stopped_at['lr']:g} ({stopped_at['reason']})"


def h3_lines(summary: dict) -> list[str]:
    """The H3 section's Markdown lines."""
    lines = [f"**Verdict: {verdict(summary)}.** {verdict_check(summary)}Rule: {VERDICT_RULE}.", ""]
    null = summary.get("null_training_cells")
    if null:
        entropy = summary.get("null_position_entropy")
        lines.append(f"- Null (base model, init word): training cells {fmt(null, 2)}"
                     + ("" if entropy is None else f", position entropy {fmt(entropy, 2)}")
                     + "; a learning rate's leakage is *not distinguishable from the null* when its excess over "
                     "the null (per training seed, its share minus the null's on the same sampling seeds: paired "
                     "image by image) has a 95% interval reaching 0, a failure to detect leakage rather than "
                     "evidence of none; the *highest safe* rate is the last one, going up, not distinguishable "
                     "from the null before a rate that is or one that lost the look (coarse no better than the "
                     "pivot alone's after a lower rate's was). Position entropy: per training seed, of its "
                     "images' 3x3 cells (1 = uniform), interval over seeds alone.")
    lines.append(f"- Weight per variant: {summary['choice_rule']}.")
    key = f"{CHOICE_COARSE:g}"
    for variant, record in summary["variants"].items():
        chosen, safe = record.get("chosen") or {}, record.get("highest_safe_lr") or {}
        paired = ((record.get("matched") or {}).get(key) or {}).get("leakage_minus_none")
        against = "" if paired is None else f"; training cells minus none's at matched coarse {key}: {seeds_text(paired, 3)}"
        lines.append(f"- `{variant}`: weight {chosen.get('weight')}; highest safe learning rate {safe.get('lr')}"
                     f"{_safe_excess(summary, variant, chosen.get('weight'), safe.get('lr'))} (graded error there "
                     f"{fmt(safe.get('appearance_error'))}){against}.")
    lines += ["", "Per condition (the weight each variant's rule chose is marked; two-level 95% intervals, the "
              "paired difference over training seeds and their shared sampling seeds):", "", *condition_table(summary)]
    lines += ["", "Per learning rate (lr 0 is the pivot alone, LoRA off; two-level 95% intervals):", "",
              *lr_table(summary), "", "At matched coarse reconstruction (per training seed, interpolated along the "
              "learning rate; two-level intervals over training seeds and their shared sampling seeds, none from "
              f"fewer than {MIN_SEEDS} seeds: their values instead):", "", *matched_table(summary)]
    return lines


def pivot_lr_position(conditions: list[dict]) -> float:
    """Where a log learning-rate axis draws lr 0 (the pivot alone): a third of the smallest measured rate."""
    rates = [r["lr"] for c in conditions for r in c["rows"] if r["lr"] > 0]
    return min(rates, default=1e-4) / 3


def errorbar_rows(ax, rows: list[dict], x_key: str | None, y_key: str, label: str, zero_at: float, style: dict) -> None:
    """Estimates of ``y_key`` against ``x_key``'s (or the learning rate, lr 0 drawn at ``zero_at``), both ways'
    intervals, drawn in ``style`` (matplotlib's colour, marker, linestyle)."""
    rows = [r for r in rows if r[y_key] and (x_key is None or r[x_key])]
    y = [r[y_key]["estimate"] for r in rows]
    yerr = [[e - r[y_key]["lo"] for e, r in zip(y, rows)], [r[y_key]["hi"] - e for e, r in zip(y, rows)]]
    if x_key is None:
        ax.errorbar([r["lr"] or zero_at for r in rows], y, yerr=yerr, capsize=2, label=label, **style)
        return
    x = [r[x_key]["estimate"] for r in rows]
    xerr = [[e - r[x_key]["lo"] for e, r in zip(x, rows)], [r[x_key]["hi"] - e for e, r in zip(x, rows)]]
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, capsize=2, label=label, **style)


def panel_styles(conditions: list[dict]) -> list[dict]:
    """Within one variant's panel: no regulariser in black, each other condition its own colour, marker and line."""
    shapes = (("s", "--"), ("^", ":"), ("D", "-."), ("v", "-"))
    styles, k = [], 0
    for c in conditions:
        if c["variant"] == "none":
            styles.append({"color": "black", "marker": "o", "linestyle": "-"})
            continue
        marker, line = shapes[k % len(shapes)]
        styles.append({"color": f"C{k % 10}", "marker": marker, "linestyle": line})
        k += 1
    return styles


def variant_panels(conditions: list[dict]) -> list[tuple[str, list[dict]]]:
    """One panel per variant other than no regulariser: its conditions, after no regulariser's (the reference drawn
    in every panel), so that no panel draws more than a variant's weights and the reference."""
    reference = [c for c in conditions if c["variant"] == "none"]
    variants = [v for v in dict.fromkeys(c["variant"] for c in conditions) if v != "none"] or ["none"]
    return [(v, reference + [c for c in conditions if c["variant"] == v and v != "none"]) for v in variants]


def panel_legends(fig, axes) -> None:
    """Each column's legend below its bottom panel, outside every axes, so that no data is covered."""
    for column in range(axes.shape[1]):
        handles, labels = axes[0, column].get_legend_handles_labels()
        if handles:
            axes[-1, column].legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3),
                                    ncol=1, frameon=False)


def h3_plot(summary: dict, path: Path) -> None:
    """:func:`h3_figure` written to ``path``."""
    import matplotlib.pyplot as plt

    fig = h3_figure(summary)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def h3_figure(summary: dict):
    """Per variant (a column; no regulariser drawn in each as the reference): leakage against reconstruction
    (coarse, and the graded error that does not saturate: the Pareto views), and the graded error and drift
    against the learning rate; error bars are the two-level 95% intervals, grey the null's band; each column's
    legend below it, outside every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = variant_panels(summary["conditions"])
    fig, axes = plt.subplots(4, len(panels), figsize=(3.4 * len(panels), 13), squeeze=False, sharey="row")
    zero_at = pivot_lr_position(summary["conditions"])
    null = summary.get("null_training_cells")
    lr_label = f"LoRA lr (lr 0 at {zero_at:.2g})"
    for column, (variant, conditions) in enumerate(panels):
        ax = axes[:, column]
        for condition, style in zip(conditions, panel_styles(conditions)):
            label, rows = _label(condition["variant"], condition["weight"]), condition["rows"]
            errorbar_rows(ax[0], rows, "coarse", "in_training_cell", label, zero_at, style)
            errorbar_rows(ax[1], rows, "appearance_error", "in_training_cell", label, zero_at, style)
            errorbar_rows(ax[2], rows, None, "appearance_error", label, zero_at, style)
            drift = "drift_unrelated" if rows and rows[0].get("drift_unrelated") else "drift"
            errorbar_rows(ax[3], rows, None, drift, label, zero_at, style)
        if null:
            for a in ax[:2]:
                a.axhspan(null["lo"], null["hi"], color="grey", alpha=0.3, label="null 95%" if a is ax[0] else None)
        ax[0].set_title(variant, fontsize=9)
        ax[0].set(xlabel="coarse reconstruction")
        ax[1].set(xlabel="graded appearance error (lower = better)")
        ax[1].invert_xaxis()
        ax[2].set(xscale="log", xlabel=lr_label)
        ax[3].set(xscale="log", xlabel=lr_label)
    for row, label in enumerate(("leakage (objects in a training cell)", "leakage (objects in a training cell)",
                                 "graded appearance error", "drift of unrelated prompts")):
        axes[row, 0].set_ylabel(label, fontsize=8)
    panel_legends(fig, axes)
    fig.suptitle("H3: each variant against no regulariser along the LoRA learning rate (means over training seeds, "
                 "95% two-level intervals)", fontsize=10)
    fig.tight_layout()
    return fig


def image_readings(images: np.ndarray) -> dict[str, list]:
    """Per image of ``images`` (uint8 ``[n, 32, 32, 3]``): ``cell``, the 3x3 cell where the detector finds the
    object (``3 * row + col``, None where it finds none); ``true_size_detail`` (0/1:
    :func:`~pti_plugin.toy_world.detectors.has_true_size_detail`, the private dot drawn to size); and
    ``detail_pixels``, the near-white pixels of the detail found
    (:func:`~pti_plugin.toy_world.detectors.detail_size`; None where there is none; not archived)."""
    found = [detect(image) for image in images]
    sizes = [detail_size(image, f) for image, f in zip(images, found)]
    return {"cell": [_cell_of(f) for f in found], "true_size_detail": [int(is_true_size(s)) for s in sizes],
            "detail_pixels": sizes}


def detected_cells(images: np.ndarray) -> list[int | None]:
    """:func:`image_readings`' ``cell`` list alone."""
    return [_cell_of(detect(image)) for image in images]


def _cell_of(found) -> int | None:
    return None if found.row is None else 3 * found.row + found.col


def cell_counts(cells: list[int | None]) -> np.ndarray:
    """``[3, 3]`` counts of :func:`detected_cells`' cells; images without an object are not counted."""
    return np.bincount([c for c in cells if c is not None], minlength=9).reshape(3, 3).astype(np.int64)


def cell_histograms(counts: dict[str, dict[float, np.ndarray]], path: Path) -> None:
    """One 3x3 heat map per (condition, learning rate): where the neutral generations put the object,
    pooled over training and sampling seeds; the training images' cells are outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    labels = list(counts)
    lrs = sorted({lr for per_lr in counts.values() for lr in per_lr})
    fig, axes = plt.subplots(len(labels), len(lrs), figsize=(1.8 * len(lrs), 1.9 * len(labels)), squeeze=False)
    for i, label in enumerate(labels):
        for j, lr in enumerate(lrs):
            ax = axes[i, j]
            ax.set_xticks([]), ax.set_yticks([])
            grid = counts[label].get(lr)
            if grid is None:
                ax.set_axis_off()
                continue
            share = grid / max(grid.sum(), 1)
            ax.imshow(share, vmin=0, vmax=0.5, cmap="viridis")
            for row, col in CHARACTER_CELLS:
                ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
            for (row, col), value in np.ndenumerate(share):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white")
            if i == 0:
                ax.set_title(f"lr {lr:g}" if lr else "pivot (lr 0)", fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle("Where the object lands (neutral prompts; red: the training images' cells; chance 1/9 per cell)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
