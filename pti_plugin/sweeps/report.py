"""A sweep's report: one row per run, the seed-mean of each point, the knees of its curves, the CSV, the plots
and the printed table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import toml

from pti_plugin.atomic_io import atomic_write_csv, atomic_write_text, atomic_write_with
from pti_plugin.sweeps.plan import RunSpec, point_name
from pti_plugin.sweeps.seeds import coverage_note, format_interval, seed_means

PIVOT_LOG_KEYS = ("pivot_l2_from_init", "pivot_angle_from_init_deg", "pivot_norm")
#: The scores whose seed-mean gets a 95% interval over training seeds.
INTERVAL_KEYS = ("reconstruction", "editability", "leakage_score")


def run_row(spec: RunSpec, args, metrics: dict | None, pivot_log: dict | None = None) -> dict:
    """One CSV row. ``pivot_log``: the shared pivot run's final log entry (a LoRA run started from
    ``weights`` logs its distance from that file, 0, instead of from the init word)."""
    row = {"run": spec.name, "stage": args.stage, "variant": spec.variant, "lr": spec.lr,
           "training_seed": spec.training_seed, "seed": spec.seed, "steps": args.steps,
           "lr_x_steps": spec.lr * args.steps, "finished": spec.finished}
    config_path = spec.run_dir / f"{spec.output_name}.config.toml"
    if config_path.is_file():
        stages = toml.load(str(config_path)).get("stages", [])
        swept = next((s for s in stages if s.get("kind") == args.stage), {})
        row["effective_lr"] = swept.get("unet_lr", swept.get("learning_rate")) if args.stage == "lora" else swept.get("learning_rate")
    row |= metrics or {}
    if pivot_log and metrics:
        row |= {k: pivot_log.get(k) for k in PIVOT_LOG_KEYS}
    row["run_dir"] = str(spec.run_dir)
    return row


def curves(stage: str) -> list[tuple[str, str, bool]]:
    """(x column, y column, log x) of each plotted curve."""
    if stage == "inversion":
        return [(x, y, False) for y in ("reconstruction", "editability") for x in ("pivot_l2_from_init", "output_angle_layernorm_deg")]
    return [(x, y, x == "lr") for y in ("reconstruction", "editability", "leakage_score") for x in ("lr", "lora_delta_norm")]


def _num(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return v


def find_knees(rows: list[dict], stage: str) -> dict:
    from pti_plugin.metrics.knee import knee_index

    knees: dict = {}
    for x, y, log_x in curves(stage):
        for variant in sorted({r["variant"] for r in rows}):
            sub = [r for r in rows if r["variant"] == variant]
            index = knee_index([_num(r.get(x)) for r in sub], [_num(r.get(y)) for r in sub], log_x=log_x)
            if index is not None:
                knees.setdefault(f"{y}_vs_{x}", {})[variant] = {"run": sub[index]["run"], "lr": sub[index]["lr"],
                                                                 "x": _num(sub[index].get(x)), "y": _num(sub[index].get(y))}
    return knees


LABELS = {
    "pivot_l2_from_init": "pivot L2 distance from init (token-embedding space)",
    "output_angle_layernorm_deg": "pivot–class angle at the token, encoder output (deg, LayerNorm geometry)",
    "lr": "learning rate",
    "lora_delta_norm": "LoRA weight change ‖ΔW‖ (all modules)",
    "leakage_score": "leakage_score: position leakage, neutral prompts (0 = base-like)",
}


def y_label(rows: list[dict], y: str) -> str:
    metric = next((r.get(f"{y}_metric") for r in rows if r.get(f"{y}_metric")), None)
    if metric is None:
        return LABELS.get(y, y)
    better = next((r.get(f"{y}_higher_is_better") for r in rows if r.get(f"{y}_higher_is_better") is not None), True)
    return f"{y}: {metric} ({'higher' if better else 'lower'} = better)"


def plot_sweep(rows: list[dict], knees: dict, stage: str, steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = curves(stage)
    ys = list(dict.fromkeys(y for _, y, _ in spec))
    xs = list(dict.fromkeys(x for x, _, _ in spec))
    fig, axes = plt.subplots(len(ys), len(xs), figsize=(6.2 * len(xs), 3.9 * len(ys)), squeeze=False)
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != "none", v))
    colours = dict(zip(variants, ("tab:blue", "tab:red", "tab:green", "tab:purple")))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            ax = axes[i][j]
            log_x = dict(((a, b), c) for a, b, c in spec)[(x, y)]
            for variant in variants:
                sub = sorted((r for r in rows if r["variant"] == variant), key=lambda r: _num(r.get(x)))
                px, py = [_num(r.get(x)) for r in sub], [_num(r.get(y)) for r in sub]
                label = "no plugin" if variant == "none" else variant
                ax.plot(px, py, "o-", color=colours[variant], label=label)
                if any(r.get("n_seeds", 1) > 1 and f"{y}_lo" in r for r in sub):  # seed means: their intervals
                    spread = [[b - _num(r.get(f"{y}_lo", b)) for r, b in zip(sub, py)],
                              [_num(r.get(f"{y}_hi", b)) - b for r, b in zip(sub, py)]]
                    ax.errorbar(px, py, yerr=spread, fmt="none", ecolor=colours[variant], capsize=3, alpha=0.7)
                for r, a, b in zip(sub, px, py):
                    if math.isfinite(a) and math.isfinite(b):
                        ax.annotate(f"lr {r['lr']:g}\nlr×steps {r['lr'] * steps:g}", (a, b), fontsize=6,
                                    xytext=(4, 4), textcoords="offset points")
                knee = knees.get(f"{y}_vs_{x}", {}).get(variant)
                if knee:
                    ax.plot([knee["x"]], [knee["y"]], marker="*", markersize=16, color=colours[variant],
                            markeredgecolor="black", linestyle="none", label=f"knee ({label})")
                    ax.axvline(knee["x"], color=colours[variant], linestyle=":", alpha=0.6)
            base = [_num(r.get(f"{y}_base")) for r in rows]
            base = [b for b in base if math.isfinite(b)]
            if base:
                ax.axhline(base[0], color="gray", linestyle="--", linewidth=1, label="base model (class word)")
            if y == "leakage_score":
                ax.axhline(0.0, color="gray", linestyle="--", linewidth=1)
            if log_x and any(math.isfinite(_num(r.get(x))) and math.isfinite(_num(r.get(y))) for r in rows):
                ax.set_xscale("log")  # (not on an empty panel: leakage not measured, matplotlib refuses)
            ax.set_xlabel(LABELS.get(x, x), fontsize=8)
            ax.set_ylabel(y_label(rows, y), fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    n_seeds = max(r.get("n_seeds", 1) for r in rows)
    fig.suptitle(f"{stage} learning-rate sweep, {steps} steps per run; ★ = knee (maximum distance to the chord)"
                 + (f"; points: means over {n_seeds} training seeds, bars: 95% intervals" if n_seeds > 1 else ""),
                 fontsize=11)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_tradeoff(rows: list[dict], stage: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5))
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != "none", v))
    for variant, colour in zip(variants, ("tab:blue", "tab:red", "tab:green", "tab:purple")):
        sub = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["lr"])
        px, py = [_num(r.get("reconstruction")) for r in sub], [_num(r.get("editability")) for r in sub]
        ax.plot(px, py, "o-", color=colour, label="no plugin" if variant == "none" else variant)
        for r, a, b in zip(sub, px, py):
            if math.isfinite(a) and math.isfinite(b):
                ax.annotate(f"lr {r['lr']:g}", (a, b), fontsize=7, xytext=(4, 4), textcoords="offset points")
    base = next((r for r in rows if math.isfinite(_num(r.get("reconstruction_base")))), None)
    if base:
        ax.plot([_num(base["reconstruction_base"])], [_num(base.get("editability_base"))], "ks", label="base model (class word)")
    if rows and rows[0].get("reconstruction_higher_is_better") is False:
        ax.invert_xaxis()  # better to the right
    ax.set_xlabel(y_label(rows, "reconstruction") + ", better →", fontsize=8)
    ax.set_ylabel(y_label(rows, "editability"), fontsize=8)
    ax.set_title(f"{stage} sweep: editability against reconstruction (runs in lr order)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def write_csv(path: Path, rows: list[dict]) -> None:
    first = ["run", "stage", "variant", "lr", "training_seed", "seed", "steps", "lr_x_steps", "effective_lr",
             "pivot_l2_from_init",
             "pivot_angle_from_init_deg", "output_angle_layernorm_deg", "output_angle_raw_deg", "lora_delta_norm",
             "reconstruction_metric", "reconstruction", "reconstruction_base", "editability_metric", "editability",
             "editability_base", "leakage_score", "diversity_ratio", "attraction_ratio", "heatmap_all_leakage_score",
             "pivot_digest", "finished"]
    atomic_write_csv(path, rows, first)


def print_table(rows: list[dict], knees: dict, stage: str) -> None:
    """The sweep's table: the scores' columns headed as the plots label them (metric, direction)."""
    x = "pivot_l2_from_init" if stage == "inversion" else "lora_delta_norm"
    cols = ["run", "lr", "lr_x_steps", x, "output_angle_layernorm_deg" if stage == "inversion" else "leakage_score",
            "reconstruction", "editability"]
    headers = [y_label(rows, c) if c in INTERVAL_KEYS else c for c in cols]
    widths = [max(18, len(h)) for h in headers]
    print("  ".join(f"{h:>{w}}" for h, w in zip(headers, widths)))
    for r in rows:
        cells = []
        for c, w in zip(cols, widths):
            v = r.get(c)
            if f"{c}_lo" in r:
                cells.append(f"{format_interval(v, r[f'{c}_lo'], r[f'{c}_hi'], '.3g'):>{w}}")
            else:
                cells.append(f"{v:>{w}.5g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{str(v):>{w}}")
        print("  ".join(cells))
    for curve, per_variant in knees.items():
        for variant, k in per_variant.items():
            print(f"knee of {curve} [{variant}]: run {k['run']} (lr {k['lr']:g}, x {k['x']:.4g}, y {k['y']:.4g})")




def point_means(rows: list[dict], stage: str) -> list[dict]:
    """The seed-mean row of each (variant, lr) point over its finished runs, named after the point."""
    means = seed_means([r for r in rows if r["finished"]], ("variant", "lr"), lambda key: key in INTERVAL_KEYS)
    for m in means:
        m["run"] = point_name(stage, m["lr"], m["variant"])
    return means


def pivot_log_of(pivot: RunSpec | None) -> dict | None:
    """The shared pivot run's final training-log entry (None without a pivot run)."""
    if pivot is None:
        return None
    from pti_plugin.metrics.evaluate import final_log_entry

    return final_log_entry(pivot.run_dir / f"{pivot.output_name}.log.jsonl")


def write_report(specs: list[RunSpec], pivots: dict[int, RunSpec], results: dict[str, dict], settings: dict,
                 args) -> list[dict]:
    """Rows (one per run), knees and plots of the seed-mean curves, CSV, JSON and the printed table of a sweep
    (per run with one training seed, per point with several); returns the rows. ``pivots``: the shared
    pivot run of each training seed (empty without)."""
    pivot_logs = {k: pivot_log_of(p) for k, p in pivots.items()}
    rows = [run_row(s, args, results.get(s.name), pivot_logs.get(s.training_seed)) for s in specs]
    seeds = sorted({s.training_seed for s in specs})
    digests = {(r["training_seed"], r.get("pivot_digest")) for r in rows if r.get("pivot_digest")}
    shared = len(digests) <= len(seeds)
    if args.stage == "lora" and not shared:
        print(f"warning: the LoRA runs of a training seed do not share one pivot ({len(digests)} different embeddings "
              f"over {len(seeds)} seeds)", flush=True)
    means = point_means(rows, args.stage)
    knees = find_knees(means, args.stage)
    stem = f"lr_sweep_{args.stage}"
    write_csv(args.out / f"{stem}.csv", rows)
    record = {"stage": args.stage, "steps": args.steps, "preset": str(args.preset.resolve()), "lrs": args.lrs,
              "with_plugin": args.with_plugin, "evaluation": settings, "shared_pivot": shared,
              "pivot_run": str(pivots[min(pivots)].run_dir) if pivots else None,
              "knee_method": "maximum distance to the chord after rescaling both axes to [0, 1] (x in log10 for lr)",
              "knees": knees, "rows": rows}
    if len(seeds) > 1:
        record |= {"training_seeds": seeds, "pivot_runs": [str(p.run_dir) for p in pivots.values()],
                   "interval": coverage_note(len(seeds)), "seed_means": means}
    atomic_write_text(args.out / f"{stem}.json", json.dumps(record, indent=2, default=str) + "\n")
    done = [r for r in means if r.get("reconstruction") is not None]
    if done:
        plot_sweep(done, knees, args.stage, args.steps, args.out / f"{stem}.png")
        plot_tradeoff(done, args.stage, args.out / f"{stem}_tradeoff.png")
    print_table(rows if len(seeds) == 1 else means, knees, args.stage)
    if len(seeds) > 1:
        print(coverage_note(len(seeds)))
    print(f"wrote {args.out}/{stem}.csv, .json, .png, _tradeoff.png")
    return rows
