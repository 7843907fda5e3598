"""H3's part of the research protocol's report: the verdict, the tables and the plot.

Reads :func:`~.h3_summary.summarise_h3`'s summary (also as reloaded from ``h3_summary.json``).

**The verdict** (:data:`VERDICT_RULE`) is read at matched coarse reconstruction
:data:`~.h3_summary.CHOICE_COARSE` for the user's variant (``half_angle``) at its chosen weight:
the paired difference of the training-cell fraction against no regulariser, per training seed,
with its interval over seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..metrics.replication import same_lr
from ..toy_world.detectors import detail_size, detect, is_true_size
from ..toy_world.world import CHARACTER_CELLS
from .h3_summary import CHOICE_COARSE, MATCHED_COARSE
from .protocol_report import SMALL_SAMPLE_CHECK, fmt

METHOD_VARIANT = "half_angle"
VERDICT_RULE = (f"`{METHOD_VARIANT}` at its chosen weight, training-cell fraction minus no regulariser's at matched "
                f"coarse {CHOICE_COARSE:g}, paired over training seeds: supported when the 95% interval lies below 0, "
                "not supported when it lies at or above 0, inconclusive when it contains 0 or fewer than 2 seeds reach it")


def _label(variant: str, weight) -> str:
    return variant if weight is None else f"{variant} (w {weight:g})"


def verdict(summary: dict) -> str:
    """:data:`VERDICT_RULE` applied to ``summary``."""
    record = summary["variants"].get(METHOD_VARIANT) or {}
    entry = (record.get("matched") or {}).get(f"{CHOICE_COARSE:g}") or {}
    difference = entry.get("leakage_minus_none")
    if difference is None or entry.get("seeds_reaching", 0) < 2:
        return "inconclusive (too few training seeds reach the matched reconstruction)"
    basis = (f" (weight {record['chosen']['weight']:g}, {difference['n_paired']} training seeds paired)"
             if record.get("chosen") else "")
    return f"{_reading(difference)}{basis}"


def verdict_check(summary: dict) -> str:
    """The small-sample check of :func:`verdict`: the paired difference's Student's t interval and the rule's
    reading on it (a sentence), or "" where the summary has none."""
    record = summary["variants"].get(METHOD_VARIANT) or {}
    difference = ((record.get("matched") or {}).get(f"{CHOICE_COARSE:g}") or {}).get("leakage_minus_none") or {}
    student = difference.get("student")
    if student is None:
        return ""
    return (f"Small-sample check ({SMALL_SAMPLE_CHECK}): {fmt(student)}; the rule reads "
            f"**{_reading(student).split(':')[0]}** with it. ")


def _reading(difference: dict) -> str:
    """:data:`VERDICT_RULE`'s reading of one interval of the paired difference, with the interval."""
    if difference["hi"] < 0:
        return f"supported: {fmt(difference)}"
    if difference["lo"] >= 0:
        return f"not supported: {fmt(difference)}"
    return f"inconclusive: {fmt(difference)} contains 0"


def lr_table(summary: dict) -> list[str]:
    head = ["condition", "lr", "seeds", "coarse", "graded error", "training cells", "excess over null", "inside null",
            "position entropy", "drift, unrelated prompts", "class drift", "`a character` draws the character"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for condition in summary["conditions"]:
        for row in condition["rows"]:
            lines.append(f"| {_label(condition['variant'], condition['weight'])} | {row['lr']:g} | {row['n_seeds']} | "
                         f"{fmt(row['coarse'], 2)} | {fmt(row['appearance_error'])} | {fmt(row['in_training_cell'], 2)} | "
                         f"{fmt(row.get('training_cell_excess'), 2)} | "
                         f"{row['inside_null']} | {fmt(row.get('position_entropy'), 2)} | {fmt(row.get('drift_unrelated'), 2)} | {fmt(row.get('drift_class'), 2)} | "
                         f"{fmt(row.get('class_character'), 2)} |")
    return lines


def matched_table(summary: dict) -> list[str]:
    head = ["condition", "matched coarse", "seeds reaching", "training cells", "excess over null",
            "minus none (paired)", "drift minus none"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for condition in summary["conditions"]:
        for target in MATCHED_COARSE:
            entry = condition["matched"][f"{target:g}"]
            lines.append(f"| {_label(condition['variant'], condition['weight'])} | {target:g} | {entry['seeds_reaching']} | "
                         f"{fmt(entry['leakage'], 2)} | {fmt(entry.get('leakage_excess'), 2)} | "
                         f"{fmt(entry.get('leakage_minus_none'), 2)} | {fmt(entry.get('drift_minus_none'), 2)} |")
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
    head = ["condition", "training seeds", "highest safe lr", "graded error there",
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
                     f"{'none' if safe['lr'] is None else format(safe['lr'], 'g')} | {fmt(safe['appearance_error'])} | "
                     f"{fmt(at_safe.get('drift_unrelated'), 2)} | {_stopped(safe.get('stopped_at'))} | "
                     f"{fmt(row.get('training_cell_excess'), 2)} | {fmt(row.get('appearance_error'))} | "
                     f"{fmt(row.get('drift_unrelated'), 2)} | {fmt(row.get('drift_class'), 2)} | "
                     f"{fmt(condition['matched'][f'{CHOICE_COARSE:g}'].get('leakage_minus_none'))} |")
    return lines


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
                     + "; a learning rate is *inside the null* when its excess over the null has a 95% interval "
                     "reaching 0; the *highest safe* rate is the last one, going up, inside the null before a "
                     "rate outside it or one that lost the look (coarse no better than the pivot alone's after "
                     "a lower rate's was). Position entropy: per training seed, of its images' 3x3 cells "
                     "(1 = uniform), interval over seeds.")
    lines.append(f"- Weight per variant: {summary['choice_rule']}.")
    key = f"{CHOICE_COARSE:g}"
    for variant, record in summary["variants"].items():
        chosen, safe = record.get("chosen") or {}, record.get("highest_safe_lr") or {}
        paired = ((record.get("matched") or {}).get(key) or {}).get("leakage_minus_none")
        against = "" if paired is None else f"; training cells minus none's at matched coarse {key}: {fmt(paired)}"
        lines.append(f"- `{variant}`: weight {chosen.get('weight')}; highest safe learning rate "
                     f"{safe.get('lr')} (graded error there {fmt(safe.get('appearance_error'))}){against}.")
    lines += ["", "Per condition (the weight each variant's rule chose is marked; two-level 95% intervals, the "
              "paired difference over training seeds):", "", *condition_table(summary)]
    lines += ["", "Per learning rate (lr 0 is the pivot alone, LoRA off; two-level 95% intervals):", "",
              *lr_table(summary), "", "At matched coarse reconstruction (per training seed, interpolated along the "
              "learning rate; intervals over seeds):", "", *matched_table(summary)]
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


def condition_styles(conditions: list[dict]) -> list[dict]:
    """One colour per variant and one marker and line style per weight within it (more conditions than
    a colour cycle has would otherwise share colours)."""
    variants = list(dict.fromkeys(c["variant"] for c in conditions))
    weights = {v: sorted({c["weight"] for c in conditions if c["variant"] == v}, key=lambda w: -1 if w is None else w)
               for v in variants}
    shapes = (("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."))
    styles = []
    for c in conditions:
        marker, line = shapes[weights[c["variant"]].index(c["weight"]) % len(shapes)]
        styles.append({"color": f"C{variants.index(c['variant']) % 10}", "marker": marker, "linestyle": line})
    return styles


def h3_plot(summary: dict, path: Path) -> None:
    """Leakage against reconstruction per condition (coarse, and the graded error that does not saturate:
    the Pareto views), and the graded error and drift against the learning rate; error bars are the
    two-level 95% intervals, grey the null's band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    zero_at = pivot_lr_position(summary["conditions"])
    for condition, style in zip(summary["conditions"], condition_styles(summary["conditions"])):
        label, rows = _label(condition["variant"], condition["weight"]), condition["rows"]
        errorbar_rows(axes[0, 0], rows, "coarse", "in_training_cell", label, zero_at, style)
        errorbar_rows(axes[0, 1], rows, "appearance_error", "in_training_cell", label, zero_at, style)
        errorbar_rows(axes[1, 0], rows, None, "appearance_error", label, zero_at, style)
        drift = "drift_unrelated" if rows and rows[0].get("drift_unrelated") else "drift"
        errorbar_rows(axes[1, 1], rows, None, drift, label, zero_at, style)
    null = summary.get("null_training_cells")
    if null:
        for ax in axes[0]:
            ax.axhspan(null["lo"], null["hi"], color="grey", alpha=0.3, label="null 95%")
    axes[0, 0].set(xlabel="coarse reconstruction", ylabel="objects in a training cell (leakage)")
    axes[0, 1].set(xlabel="graded appearance error (lower = better)", ylabel="objects in a training cell (leakage)")
    axes[0, 1].invert_xaxis()
    lr_label = f"LoRA lr (lr 0, the pivot alone, drawn at {zero_at:.2g})"
    axes[1, 0].set(xscale="log", xlabel=lr_label, ylabel="graded appearance error")
    axes[1, 1].set(xscale="log", xlabel=lr_label, ylabel="drift of unrelated prompts")
    for ax in axes.flat:
        ax.legend(fontsize=7)
    fig.suptitle("H3: variants along the LoRA learning rate (means over training seeds, 95% two-level intervals)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
