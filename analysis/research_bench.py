"""The research bench: the user's protocol on the toy world, ground truth beside the model-internal metrics.

Usage (in the background, resumable; about 1.5 hours on one CPU thread with the defaults)::

    OMP_NUM_THREADS=1 python analysis/research_bench.py [--out outputs/research_bench]
        [--preset presets/research_bench.toml] [--set KEY=VALUE] [--inversion_lrs 1e-3,3e-3,1e-2,3e-2,1e-1]
        [--lora_lrs 1e-5,3e-5,1e-4,2e-4,5e-4,1e-3,2e-3,5e-3] [--inversion_steps 1000] [--lora_steps 1000]
        [--variants none,half_angle,class_endpoint,reg_images] [--pivot_lr knee|LR]
        [--seeds 16] [--sample_steps 25] [--guidance 3] [--leakage_threshold 0.1]

1. **Inversion sweep** (``analysis/lr_sweep.py --stage inversion``, into ``OUT/inversion/``): the
   preset's inversion stage at each learning rate for ``--inversion_steps`` steps. The
   pivot-locality regulariser acts in LoRA stages only, so this sweep has no variants.
2. **The pivot**: the inversion run at ``--pivot_lr``; ``knee`` (default) takes the knee of
   the ground-truth character match against the pivot's L2 distance from its init (maximum
   distance to the chord), else of the denoising proxy, else the middle learning rate. Every LoRA run starts
   from that embedding (``weights``), so all LoRA sweeps share one pivot.
3. **LoRA sweeps**, one per variant (``OUT/lora_<variant>/``), the preset's lora stage at each
   learning rate for ``--lora_steps`` steps:
   ``none`` (no regulariser), ``half_angle`` (``[plugins.pivot_locality]`` with ``fractions = [0.5]``,
   the user's method), ``class_endpoint`` (``fractions = [1.0]``: the class prompt only, what
   ai-toolkit and OneTrainer offer), ``reg_images`` (kohya regularisation images of the class,
   ``prior_loss_weight`` 1: ``--reg_images`` images of ``T(class word)`` generated once by the base
   model into ``OUT/reg/``). The plugin's other options come from the preset's table.
4. **Scores** of every run (:func:`pti_plugin.toy_world.run_scores.score_run`, cached in
   ``<run>/bench_scores.json`` and recomputed only when the scoring settings change): ground
   truth from the toy world's detectors (``gt_reconstruction``, ``gt_editability``, ``gt_leakage``,
   ``gt_training_cell_fraction``) and the model-internal metrics a real-model run has
   (``proxy_denoise_mse``, ``proxy_edit_direction_cos``, ``attention_leakage``, distances).
5. **Report**: the tables, the correlation (Pearson and Spearman, over runs) of each model-internal
   metric with its ground truth, and per variant the *light* point. Both leakage scores compare
   the pivot (LoRA on) with the class word on the base model, so the pivot alone already scores
   some leakage; what the LoRA adds is the *excess* over the pivot's own run (LoRA off):
   ``gt_leakage_excess`` and ``attention_leakage_excess``. The light point is the LoRA run of best
   ground-truth reconstruction whose excess stays at most ``--leakage_threshold`` and whose
   ground-truth editability keeps at least ``--editability_ratio`` of the pivot's own (a run that
   broke the model does not count as light), chosen once with the ground-truth excess and once
   with the attention excess (what a real-model user would see). Writes ``OUT/research_bench.json`` (settings, rows, correlations, light points),
   ``OUT/research_bench.csv``, ``OUT/research_bench.md`` (the printed tables) and
   ``OUT/research_bench.png``.

Everything is deterministic under the preset's seed: training draws every sample from
(seed, stage, step, slot) and scoring uses fixed generation seeds. Finished runs are skipped and
scores reused, so an interrupted bench continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import toml  # noqa: E402

import lr_sweep  # noqa: E402
from pti_plugin.atomic_io import atomic_write_csv, atomic_write_text, atomic_write_with  # noqa: E402
from pti_plugin.config import ConfigError, apply_overrides, build_config, load_preset_dict  # noqa: E402
from pti_plugin.metrics.correlation import correlation  # noqa: E402
from pti_plugin.metrics.knee import knee_index  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCORES_FILE = "bench_scores.json"
#: Bump when the scores change meaning, so that cached scores are recomputed.
SCORES_VERSION = 2
VARIANTS = {
    "none": "no regulariser",
    "half_angle": "pivot locality, half the pivot->class angle (the user's method)",
    "class_endpoint": "pivot locality, class-word endpoint only (ai-toolkit / OneTrainer)",
    "reg_images": "kohya regularisation images of the class word",
}
PLUGIN = "pivot_locality"
#: (model-internal metric, ground truth, expected sign of the correlation, runs it is computed over)
CORRELATIONS = (
    ("attention_leakage", "gt_leakage", +1, "lora"),
    ("attention_leakage", "gt_training_cell_fraction", +1, "lora"),
    ("proxy_denoise_mse", "gt_reconstruction", -1, "lora"),
    ("proxy_denoise_mse", "gt_character_match", -1, "lora"),
    ("proxy_edit_direction_cos", "gt_editability", +1, "lora"),
    ("proxy_denoise_mse", "gt_character_match", -1, "inversion"),
    ("proxy_edit_direction_cos", "gt_editability", +1, "inversion"),
    ("proxy_denoise_mse", "gt_reconstruction", -1, "all"),
    ("proxy_denoise_mse", "gt_character_match", -1, "all"),
    ("proxy_edit_direction_cos", "gt_editability", +1, "all"),
)


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"--variants: unknown {unknown or text!r}; choose among {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def lrs_arg(text: str) -> str:
    lr_sweep.parse_lrs(text)  # validates
    return text


# ---------------------------------------------------------------------- presets of the sweeps
def stage_of(raw: dict, kind: str) -> dict:
    stages, index = lr_sweep.preset_stages(raw, kind)
    return stages[index]


def inversion_preset(raw: dict) -> dict:
    """The preset of the inversion sweep: the preset without plugins (they act in LoRA stages)."""
    out = copy.deepcopy(raw)
    out["plugins"] = {}
    return out


def variant_preset(raw: dict, variant: str, pivot: Path, reg_dir: Path | None) -> dict:
    """The preset of one LoRA variant: its lora stage alone, started from ``pivot``."""
    out = copy.deepcopy(raw)
    out["stages"] = [stage_of(raw, "lora")]
    out["weights"] = str(pivot)
    plugin_options = dict(raw.get("plugins", {}).get(PLUGIN, {}))
    out["plugins"] = {}
    if variant == "half_angle":
        out["plugins"][PLUGIN] = plugin_options | {"fractions": [0.5], "fraction_sampling": "fixed"}
    elif variant == "class_endpoint":
        out["plugins"][PLUGIN] = plugin_options | {"fractions": [1.0], "fraction_sampling": "fixed"}
    elif variant == "reg_images":
        out["reg_data_dir"] = str(reg_dir)
        out.setdefault("prior_loss_weight", 1.0)
    return out


def write_preset(path: Path, raw: dict) -> Path:
    atomic_write_text(path, toml.dumps(raw))
    return path


# ---------------------------------------------------------------------- steps of the bench
def run_sweep(preset: Path, stage: str, lrs: str, steps: int, out: Path) -> None:
    """Train (never evaluate) one lr_sweep; finished runs are skipped by lr_sweep itself."""
    lr_sweep.main(["--preset", str(preset), "--stage", stage, "--lrs", lrs, "--steps", str(steps),
                   "--out", str(out), "--no_evaluate", "--gpus", "none"])


def sweep_runs(out: Path, stage: str, lrs: str) -> list[tuple[float, Path]]:
    """``(lr, run folder)`` of a sweep, in lr order (lr_sweep's naming)."""
    return [(lr, out / "runs" / f"{stage}-lr{lr_sweep.lr_tag(lr)}") for lr in lr_sweep.parse_lrs(lrs)]


def score_settings(args):
    from pti_plugin.toy_world.run_scores import ScoreSettings

    return ScoreSettings(seeds=args.seeds, steps=args.sample_steps, guidance=args.guidance, max_images=args.max_images)


def scores_of(run_dir: Path, output_name: str, args) -> dict | None:
    """The run's scores, from its cache when the settings match; None when the run has not finished."""
    from pti_plugin.toy_world.run_scores import score_run

    settings = {"version": SCORES_VERSION} | score_settings(args).as_dict()
    if not (run_dir / f"{output_name}.safetensors").is_file():
        return None
    cache = run_dir / SCORES_FILE
    if cache.is_file() and not args.rescore:
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            data = {}
        if data.get("settings") == settings:
            print(f"scores of {run_dir.name}: cached", flush=True)
            return data["scores"]
    print(f"score {run_dir}", flush=True)
    t0 = time.time()
    scores = score_run(run_dir, score_settings(args), device=args.device)
    atomic_write_text(cache, json.dumps({"settings": settings, "scores": scores, "seconds": round(time.time() - t0, 1)},
                                        indent=2) + "\n")
    return scores


def scored_rows(out: Path, stage: str, variant: str, lrs: str, output_name: str, args) -> list[dict]:
    """One report row per run of a sweep: its sweep, variant, lr and folder, then its scores (none if unfinished)."""
    return [{"sweep": stage, "variant": variant, "lr": lr, "run_dir": str(d)} | (scores_of(d, output_name, args) or {})
            for lr, d in sweep_runs(out, stage, lrs)]


def choose_pivot(rows: list[dict], choice: str) -> tuple[dict, str]:
    """The inversion row whose pivot the LoRA sweeps share, and the rule that chose it."""
    done = [r for r in rows if r.get("gt_reconstruction") is not None]
    if not done:
        raise SystemExit("no finished inversion run to take the pivot from (see above)")
    if choice != "knee":
        lr = float(choice)
        match = [r for r in done if math.isclose(r["lr"], lr, rel_tol=1e-9)]
        if not match:
            raise SystemExit(f"--pivot_lr {choice}: not among the finished inversion runs ({[r['lr'] for r in done]})")
        return match[0], f"--pivot_lr {choice}"
    x = [r.get("pivot_l2_from_init") for r in done]
    for metric, sign in (("gt_character_match", 1.0), ("proxy_denoise_mse", -1.0)):
        y = [sign * r[metric] if r.get(metric) is not None else float("nan") for r in done]
        k = knee_index([v if v is not None else float("nan") for v in x], y)
        if k is not None:
            return done[k], f"knee of {metric} against pivot_l2_from_init"
    return done[len(done) // 2], "middle learning rate (no knee: fewer than 3 runs or a flat curve)"


def generate_reg_images(run_dir: Path, class_word: str, reg_dir: Path, count: int, args) -> Path:
    """``count`` images of ``T(class_word)`` by the base model, in kohya layout ``reg_dir/1_<class>/``; once."""
    import tempfile

    import numpy as np
    from PIL import Image

    from pti_plugin.metrics.localisation import generate_images
    from pti_plugin.metrics.run_model import load_run

    folder = reg_dir / f"1_{class_word}"
    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return reg_dir
    run = load_run(run_dir, device=args.device, class_word=class_word)
    reg_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".reg.", dir=reg_dir))
    seeds = [10_000 + k for k in range(count)]
    images = generate_images(run, "{T}", False, seeds, args.sample_steps, args.guidance)
    caption = run.prompt("{T}", False)
    for k, image in enumerate(np.asarray(images)):
        Image.fromarray(image).save(tmp / f"{k:03d}.png")
        (tmp / f"{k:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    if folder.exists():  # an incomplete earlier attempt
        folder.rename(reg_dir / f".incomplete-{time.time_ns()}")
    tmp.rename(folder)
    print(f"regularisation images: {count} of {caption!r} by the base model in {folder}", flush=True)
    return reg_dir


# ---------------------------------------------------------------------- report
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
    return {"lr": best["lr"], "gt_reconstruction": best["gt_reconstruction"], "gt_leakage_excess": best.get("gt_leakage_excess"),
            "attention_leakage_excess": best.get("attention_leakage_excess"), "gt_editability": best.get("gt_editability")}


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


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report_text(rows: list[dict], corr: list[dict], light: dict, pivot: dict, pivot_rule: str, args) -> str:
    inv = [r for r in rows if r["sweep"] == "inversion"]
    lora = [r for r in rows if r["sweep"] == "lora"]
    base = next((r for r in rows if r.get("gt_reconstruction_base") is not None), {})
    parts = [
        f"# Research bench on the toy world ({args.inversion_steps} inversion steps, {args.lora_steps} LoRA steps per run; "
        f"{args.seeds} seeds, DDIM {args.sample_steps}, guidance {args.guidance:g})",
        "",
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
              r.get("gt_reconstruction"), r.get("gt_character_match"), r.get("gt_editability"), r.get("gt_edit_position"),
              r.get("gt_edit_background"), r.get("proxy_denoise_mse"), r.get("proxy_edit_direction_cos")] for r in inv]),
        "",
        f"Pivot of the LoRA sweeps: lr {pivot['lr']:g} ({pivot_rule}), digest {pivot.get('pivot_digest')}. "
        f"Its own leakage (LoRA off, against the class word): GT {_cell(pivot.get('gt_leakage'))}, attention "
        f"{_cell(pivot.get('attention_leakage'))}; the *excess* columns below subtract these.",
        "",
        "## LoRA sweeps (reconstruction, editability, position leakage)",
        "",
        markdown_table(
            ["variant", "lr", "‖ΔW‖", "GT reconstruction", "GT character match", "GT editability", "GT leakage",
             "GT leakage excess", "GT training-cell fraction", "GT position entropy", "attention leakage",
             "attention leakage excess", "proxy denoise MSE", "proxy edit cos"],
            [[r["variant"], r["lr"], r.get("lora_delta_norm"), r.get("gt_reconstruction"), r.get("gt_character_match"),
              r.get("gt_editability"), r.get("gt_leakage"), r.get("gt_leakage_excess"), r.get("gt_training_cell_fraction"),
              r.get("gt_position_entropy"), r.get("attention_leakage"), r.get("attention_leakage_excess"),
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
            [[v, key, *(([p["lr"], p["gt_reconstruction"], p["gt_leakage_excess"], p["attention_leakage_excess"],
                          p["gt_editability"]])
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
    first = ["sweep", "variant", "lr", "run_dir", "pivot_l2_from_init", "output_angle_layernorm_deg", "lora_delta_norm",
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


# ---------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", type=Path, default=ROOT / "presets" / "research_bench.toml")
    parser.add_argument("--out", type=Path, default=Path("outputs/research_bench"))
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="preset override KEY=VALUE (nested keys with dots, e.g. plugins.pivot_locality.weight=1)")
    parser.add_argument("--inversion_lrs", type=lrs_arg, default="1e-3,3e-3,1e-2,3e-2,1e-1")
    parser.add_argument("--lora_lrs", type=lrs_arg, default="1e-5,3e-5,1e-4,2e-4,5e-4,1e-3,2e-3,5e-3")
    parser.add_argument("--inversion_steps", type=int, default=1000, help="steps per inversion run (the notes: 1000)")
    parser.add_argument("--lora_steps", type=int, default=1000, help="steps per LoRA run (the notes: 1000)")
    parser.add_argument("--variants", type=parse_variants, default=list(VARIANTS), help=", ".join(VARIANTS))
    parser.add_argument("--pivot_lr", default="knee", help="knee, or the inversion learning rate whose pivot LoRA runs share")
    parser.add_argument("--reg_images", type=int, default=12, help="regularisation images of the reg_images variant")
    parser.add_argument("--seeds", type=int, default=16,
                        help="generation seeds per prompt when scoring; 16 leave the leakage score uncertain by about "
                             "0.16 (two seed sets on the same run), use 64 or more to compare variants' leakage")
    parser.add_argument("--sample_steps", type=int, default=25, help="DDIM steps of the generations")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--max_images", type=int, default=8, help="training images of the model-internal proxies")
    parser.add_argument("--leakage_threshold", type=float, default=0.1,
                        help="largest leakage excess over the pivot's own of a light run")
    parser.add_argument("--editability_ratio", type=float, default=0.8,
                        help="a light run keeps at least this fraction of the pivot's GT editability")
    parser.add_argument("--rescore", action="store_true", help="ignore cached scores")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        raw = apply_overrides(load_preset_dict(args.preset), {}, args.sets)
        config = build_config(copy.deepcopy(raw))
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from exc
    stage_of(raw, "inversion"), stage_of(raw, "lora")  # both stages are needed (SystemExit naming them)
    output_name = config.output_name
    presets = args.out / "presets"
    t0 = time.time()

    inv_out = args.out / "inversion"
    run_sweep(write_preset(presets / "inversion.toml", inversion_preset(raw)), "inversion", args.inversion_lrs,
              args.inversion_steps, inv_out)
    rows = scored_rows(inv_out, "inversion", "none", args.inversion_lrs, output_name, args)
    pivot, pivot_rule = choose_pivot(rows, args.pivot_lr)
    pivot_file = Path(pivot["run_dir"]) / f"{config.token_string}.safetensors"
    print(f"pivot: inversion lr {pivot['lr']:g} ({pivot_rule}): {pivot_file}", flush=True)

    reg_dir = None
    if "reg_images" in args.variants:
        class_word = config.init_word if isinstance(config.init_word, str) else config.init_word[0]
        reg_dir = generate_reg_images(Path(pivot["run_dir"]), class_word, args.out / "reg", args.reg_images, args)
    for variant in args.variants:
        out = args.out / f"lora_{variant}"
        preset = write_preset(presets / f"lora_{variant}.toml", variant_preset(raw, variant, pivot_file, reg_dir))
        run_sweep(preset, "lora", args.lora_lrs, args.lora_steps, out)
        rows += scored_rows(out, "lora", variant, args.lora_lrs, output_name, args)

    add_excess_leakage(rows, pivot)
    lora_rows = [r for r in rows if r["sweep"] == "lora"]
    min_editability = args.editability_ratio * (pivot.get("gt_editability") or 0.0)
    light = {v: {key: light_point([r for r in lora_rows if r["variant"] == v], key, args.leakage_threshold, min_editability)
                 for key in ("gt_leakage_excess", "attention_leakage_excess")} for v in args.variants}
    corr = correlations(rows)
    text = report_text(rows, corr, light, pivot, pivot_rule, args)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"settings": settings, "scores_version": SCORES_VERSION, "variants": {v: VARIANTS[v] for v in args.variants},
              "pivot": {"lr": pivot["lr"], "rule": pivot_rule, "file": str(pivot_file), "digest": pivot.get("pivot_digest")},
              "rows": rows, "correlations": corr, "light_points": light, "minutes": round((time.time() - t0) / 60, 1)}
    atomic_write_text(args.out / "research_bench.json", json.dumps(result, indent=2, default=str) + "\n")
    write_csv(args.out / "research_bench.csv", rows)
    atomic_write_text(args.out / "research_bench.md", text)
    plot(rows, args.out / "research_bench.png", args)
    print(text)
    print(f"wrote {args.out}/research_bench.json, .csv, .md, .png")
    return result


if __name__ == "__main__":
    main()
