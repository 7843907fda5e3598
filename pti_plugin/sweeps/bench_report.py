"""The research bench's report: leakage excess, light points, metric-to-ground-truth correlations, tables and plot.

The tables show *points*: with one training seed the runs themselves, with several the seed-mean
rows of :func:`pti_plugin.sweeps.seeds.seed_means`, whose ground-truth scores carry ``<key>_lo`` and
``<key>_hi`` and print as ``mean [lo, hi]``.
"""

from __future__ import annotations

import math
from pathlib import Path

from pti_plugin.atomic_io import atomic_write_csv, atomic_write_with
from pti_plugin.metrics.correlation import correlation
from pti_plugin.sweeps.seeds import coverage_note, format_interval
from pti_plugin.toy_world.run_scores import CORRELATIONS  # what each internal score should track

VARIANTS = {
    "none": "no regulariser",
    "half_angle": "pivot locality, half the pivot->class angle (the user's method)",
    "class_endpoint": "pivot locality, class-word endpoint only (ai-toolkit / OneTrainer)",
    "reg_images": "kohya regularisation images of the class word",
}


def add_excess_leakage(rows: list[dict], pivot: dict) -> None:
    """``<key>_excess`` = the LoRA run's leakage minus the pivot run's (LoRA off), for both leakage scores."""
    for row in rows:
        for key in ("gt_leakage", "attention_leakage"):
            if row["sweep"] == "lora" and row.get(key) is not None and pivot.get(key) is not None:
                row[f"{key}_excess"] = row[key] - pivot[key]


def light_point(rows: list[dict], leakage_key: str, threshold: float, min_editability: float = 0.0) -> dict | None:
    """The run of best gt_reconstruction among those with ``leakage_key`` <= ``threshold`` and
    gt_editability >= ``min_editability`` (ties: the lower lr); None when no run qualifies."""
    ok = [r for r in rows if r.get(leakage_key) is not None and r[leakage_key] <= threshold
          and r.get("gt_reconstruction") is not None and (r.get("gt_editability") or 0.0) >= min_editability]
    if not ok:
        return None
    best = max(ok, key=lambda r: (r["gt_reconstruction"], -r["lr"]))
    keys = ("gt_reconstruction", "gt_leakage_excess", "attention_leakage_excess", "gt_editability")
    bounds = {f"{k}_{end}": best[f"{k}_{end}"] for k in keys for end in ("lo", "hi") if f"{k}_{end}" in best}
    return {"lr": best["lr"]} | {k: best.get(k) for k in keys} | bounds


def correlations(rows: list[dict]) -> list[dict]:
    out = []
    for internal, truth, sign, over in CORRELATIONS:
        sub = [r for r in rows if over == "all" or r["sweep"] == over]
        c = correlation([r.get(internal) for r in sub], [r.get(truth) for r in sub])
        out.append({"internal": internal, "ground_truth": truth, "runs": over, "expected_sign": sign} | c)
    return out


def _cell(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _value(row: dict, key: str):
    """``row[key]``, as ``mean [lo, hi]`` text when the row is a seed mean with an interval on ``key``."""
    if f"{key}_lo" in row and row.get(key) is not None:
        return format_interval(row[key], row[f"{key}_lo"], row[f"{key}_hi"])
    return row.get(key)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pivot_sentence(pivot: dict, pivot_info: dict, seeds: int) -> str:
    """The report's line on the pivot: ``pivot`` its row (or seed mean), ``pivot_info`` the bench's pivot record."""
    if seeds == 1:
        which = f"lr {pivot_info['lr']:g} ({pivot_info['rule']}), digest {pivot_info['digest']}. Its own leakage"
    else:
        which = (f"lr {pivot_info['lr']:g} ({pivot_info['rule']}, on the seed means), one per training seed (the LoRA "
                 f"runs of seed k start from the inversion run of seed k), digests "
                 f"{', '.join(str(s['digest']) for s in pivot_info['seeds'])}. Its own leakage as a mean over seeds")
    return (f"Pivot of the LoRA sweeps: {which} (LoRA off, against the class word): GT {_cell(pivot.get('gt_leakage'))}, "
            f"attention {_cell(pivot.get('attention_leakage'))}; the *excess* columns below subtract these.")


def report_text(points: list[dict], corr: list[dict], light: dict, pivot: dict, pivot_info: dict, args) -> str:
    """The printed report; ``points``: the runs (one training seed) or the seed means (several)."""
    inv = [r for r in points if r["sweep"] == "inversion"]
    lora = [r for r in points if r["sweep"] == "lora"]
    base = next((r for r in points if r.get("gt_reconstruction_base") is not None), {})
    seeds = getattr(args, "training_seeds", 1)
    parts = [
        f"# Research bench on the toy world ({args.inversion_steps} inversion steps, {args.lora_steps} LoRA steps per run; "
        f"{args.seeds} seeds, DDIM {args.sample_steps}, guidance {args.guidance:g}"
        + (f"; {seeds} training seeds per point)" if seeds > 1 else ")"),
        "",
        *([coverage_note(seeds) + " Rows are points (sweep, variant, lr); the runs are in research_bench.csv.", ""]
          if seeds > 1 else []),
        "Base model (class word, LoRA off): " + ", ".join(
            f"{k} {_cell(base.get(k + '_base'))}" for k in ("gt_reconstruction", "gt_character_match", "gt_editability",
                                                           "gt_training_cell_fraction", "gt_position_entropy")),
        "",
        "## Inversion sweep (reconstruction and editability against the distance travelled)",
        "",
        markdown_table(
            ["lr", "lr×steps", "pivot L2 from init", "output angle to class (°)", "GT reconstruction", "GT character match",
             "GT editability", "GT edit position", "GT edit background", "proxy denoise MSE", "proxy edit cos"],
            [[r["lr"], r["lr"] * args.inversion_steps, r.get("pivot_l2_from_init"), r.get("output_angle_layernorm_deg"),
              *(_value(r, k) for k in ("gt_reconstruction", "gt_character_match", "gt_editability", "gt_edit_position",
                                       "gt_edit_background")),
              r.get("proxy_denoise_mse"), r.get("proxy_edit_direction_cos")] for r in inv]),
        "",
        pivot_sentence(pivot, pivot_info, seeds),
        "",
        "## LoRA sweeps (reconstruction, editability, position leakage)",
        "",
        markdown_table(
            ["variant", "lr", "‖ΔW‖", "GT reconstruction", "GT character match", "GT editability", "GT leakage",
             "GT leakage excess", "GT training-cell fraction", "GT position entropy", "attention leakage",
             "attention leakage excess", "proxy denoise MSE", "proxy edit cos"],
            [[r["variant"], r["lr"], r.get("lora_delta_norm"),
              *(_value(r, k) for k in ("gt_reconstruction", "gt_character_match", "gt_editability", "gt_leakage",
                                       "gt_leakage_excess", "gt_training_cell_fraction", "gt_position_entropy")),
              r.get("attention_leakage"), r.get("attention_leakage_excess"),
              r.get("proxy_denoise_mse"), r.get("proxy_edit_direction_cos")] for r in lora]),
        "",
        *([f"Caution: leakage from {args.seeds} seeds per prompt. On the shipped toy world, two sets of 16 seeds "
           "scoring the same run differ by 0.02–0.28 (median 0.16): differences in leakage below about 0.2 are "
           "not resolved; score with --seeds 64 or more to compare variants.", ""] if args.seeds < 64 else []),
        f"## Light point per variant (best GT reconstruction with a leakage excess ≤ {args.leakage_threshold:g} "
        f"and a GT editability ≥ {args.editability_ratio:g} × the pivot's)",
        "",
        markdown_table(
            ["variant", "chosen with", "lr", "GT reconstruction", "GT leakage excess", "attention leakage excess",
             "GT editability"],
            [[v, key, *(([p["lr"], *(_value(p, k) for k in ("gt_reconstruction", "gt_leakage_excess",
                                                             "attention_leakage_excess", "gt_editability"))])
                         if p else ["none qualifies", None, None, None, None])]
             for v, per in light.items() for key, p in per.items()]),
        "",
        "## Model-internal metrics against the ground truth (over runs)",
        "",
        markdown_table(
            ["internal metric", "ground truth", "runs", "expected sign", "Pearson", "Spearman", "n"],
            [[c["internal"], c["ground_truth"], c["runs"], "+" if c["expected_sign"] > 0 else "−", c["pearson"],
              c["spearman"], c["n"]] for c in corr]),
    ]
    return "\n".join(parts) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    first = ["sweep", "variant", "lr", "training_seed", "seed", "n_seeds", "run_dir", "pivot_l2_from_init",
             "output_angle_layernorm_deg", "lora_delta_norm",
             "gt_reconstruction", "gt_character_match", "gt_editability", "gt_edit_position", "gt_edit_background", "gt_leakage",
             "gt_leakage_excess", "gt_training_cell_fraction", "gt_position_entropy", "attention_leakage",
             "attention_leakage_excess", "proxy_denoise_mse",
             "proxy_edit_direction_cos"]
    atomic_write_csv(path, rows, first)


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inv = sorted((r for r in rows if r["sweep"] == "inversion" and r.get("gt_reconstruction") is not None),
                 key=lambda r: r.get("pivot_l2_from_init") or 0.0)
    lora = [r for r in rows if r["sweep"] == "lora" and r.get("gt_reconstruction") is not None]
    by_variant = {v: sorted((r for r in lora if r["variant"] == v), key=lambda r: r["lr"]) for v in VARIANTS}
    colours = dict(zip(VARIANTS, ("tab:blue", "tab:red", "tab:green", "tab:purple")))
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    ax = axes[0][0]
    x = [r.get("pivot_l2_from_init") for r in inv]
    for key, marker in (("gt_reconstruction", "o-"), ("gt_character_match", "^--"), ("gt_editability", "s-")):
        ax.plot(x, [r.get(key) for r in inv], marker, label=key)
    for r in inv:
        ax.annotate(f"lr {r['lr']:g}", (r.get("pivot_l2_from_init"), r.get("gt_editability")), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("pivot L2 distance from init (token-embedding space)")
    ax.set_title(f"inversion sweep, {args.inversion_steps} steps")
    panels = ((axes[0][1], ("gt_reconstruction", "gt_character_match"), "GT reconstruction (solid), character match (dashed)"),
              (axes[0][2], ("gt_editability",), "GT editability"),
              (axes[1][0], ("gt_leakage_excess",), "GT leakage excess over the pivot's"))
    for ax, keys, title in panels:
        for variant, sub in by_variant.items():
            for key, style in zip(keys, ("o-", "^--")):
                ax.plot([r["lr"] for r in sub], [r.get(key) for r in sub], style, color=colours[variant],
                        label=variant if key == keys[0] else None)
        ax.set_xscale("log")
        ax.set_xlabel("LoRA learning rate")
        ax.set_title(f"LoRA sweeps, {args.lora_steps} steps: {title}", fontsize=10)
    axes[1][0].axhline(args.leakage_threshold, color="gray", linestyle=":", label="leakage threshold")
    ax = axes[1][1]
    for variant, sub in by_variant.items():
        ax.plot([r.get("gt_leakage_excess") for r in sub], [r.get("gt_reconstruction") for r in sub], "o-",
                color=colours[variant], label=variant)
    ax.axvline(args.leakage_threshold, color="gray", linestyle=":", label="leakage threshold")
    ax.set_xlabel("GT leakage excess over the pivot's")
    ax.set_ylabel("GT reconstruction")
    ax.set_title("reconstruction bought per unit of leakage (runs in lr order)", fontsize=10)
    ax = axes[1][2]
    for variant, sub in by_variant.items():
        ax.scatter([r.get("gt_leakage") for r in sub], [r.get("attention_leakage") for r in sub], color=colours[variant],
                   label=variant)
    ax.set_xlabel("GT leakage (detected object centres)")
    ax.set_ylabel("attention leakage (cross-attention heatmaps)")
    ax.set_title("the attention metric against the ground truth", fontsize=10)
    for a in axes.flat:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


