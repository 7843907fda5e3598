"""The research bench: the user's protocol on the toy world, ground truth beside the model-internal metrics.

Usage (in the background, resumable; about 1.5 hours on one CPU thread with the defaults)::

    OMP_NUM_THREADS=1 python analysis/research_bench.py [--out outputs/research_bench]
        [--preset presets/research_bench.toml] [--set KEY=VALUE] [--inversion_lrs 1e-5,2e-5,2.75e-5,3e-5,1e-4,1e-3]
        [--lora_lrs 1e-5,3e-5,1e-4,2e-4,5e-4,1e-3,2e-3,5e-3] [--inversion_steps 1000] [--lora_steps 1000]
        [--variants none,half_angle,class_endpoint,reg_images] [--pivot_lr knee|LR]
        [--seeds 16] [--sample_steps 25] [--guidance 3] [--leakage_threshold 0.1] [--training_seeds 1]
        [--engine local|ray [--address ADDR]]   (training runs as Ray tasks: see pti_plugin.sweeps.engines)

1. **Inversion sweep** (:mod:`pti_plugin.sweeps.lr_sweep` ``--stage inversion``, into ``OUT/inversion/``): the
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

**Training seeds** (``--training_seeds N``, default 1; :mod:`pti_plugin.sweeps.seeds`): every
(variant, learning rate) point of both sweeps is trained N times, run k with the preset's ``seed``
+ k, in its own folder (``-s<k>`` after the run's name for k >= 1; seed 0's run is the run of a bench
with N = 1, so raising N reuses the runs already there). The pivot is replicated with them, kept
simple: one pivot per training seed, the inversion run of seed k at the pivot learning rate, and
the LoRA runs of seed k start from it (one ``lr_sweep --only_training_seed k`` per variant and
seed); each LoRA run's leakage excess subtracts its own seed's pivot. The pivot learning rate is
chosen once, on the seed-mean curve (the knee of the mean character match against the mean L2
distance). The rows keep one entry per run (``training_seed``, ``seed``); with N > 1 the report's
tables and plot show per point the mean over training seeds, each ground-truth score with a 95%
interval over seeds (``0.53 [0.41, 0.66]``; with few seeds it undercovers, as the report says), the
light points are chosen on those means, the correlations stay over runs, and the JSON and
``OUT/research_bench_seed_means.csv`` hold the means. With N = 1 the report is per run, without
intervals.

**Toy-world presets only**: the scores read the generations with the toy world's detectors, so a preset whose model
is not a toy-world model (another family, or one drawing another size: a real SD1.5) or whose runs would generate at
another size than the toy world's 32 px (their first training image's bucket) is refused before anything trains
(:func:`~pti_plugin.toy_world.run_checks.toy_world_problem`; exit 2, naming ``--preset``, the model and the size).

Everything is deterministic under the preset's seed: training draws every sample from
(seed, stage, step, slot) and scoring uses fixed generation seeds. Finished runs are skipped and
scores reused, so an interrupted bench continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import toml

from pti_plugin.atomic_io import atomic_write_text
from pti_plugin.config import ConfigError, load_preset_dict
from pti_plugin.config_loading import apply_overrides, build_config
from pti_plugin.metrics.knee import knee_index
from pti_plugin.metrics.replication import same_lr
from pti_plugin.toy_world.run_checks import toy_world_problem
from pti_plugin.sweeps.bench_report import (VARIANTS, add_excess_leakage, correlations, light_point, plot, report_text,
                                            write_csv)
from pti_plugin.sweeps.engines import add_engine_arguments
from pti_plugin.sweeps.lr_sweep import main as sweep_main
from pti_plugin.script_args import argument_parser, check_out_folder, finite_float_at_least, positive_int
from pti_plugin.sweeps.plan import parse_lrs, point_name, preset_stages, seed_count
from pti_plugin.toy_world.recipe_config import GUIDANCE, SAMPLE_STEPS
from pti_plugin.sweeps.seeds import seed_means, seed_suffix
from pti_plugin.sweeps.stopping import stoppable
from pti_plugin.sweeps.usage import usage_exit
from pti_plugin.toy_world.run_scores import SCORES_VERSION, scores_of

#: The presets shipped with the repository (the bench's default preset lives there).
ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "pivot_locality"


def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose among {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def lrs_arg(text: str) -> str:
    parse_lrs(text)  # validates
    return text


# ---------------------------------------------------------------------- presets of the sweeps
def stage_of(raw: dict, kind: str) -> dict:
    stages, index = preset_stages(raw, kind)
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
def run_sweep(preset: Path, stage: str, lrs: str, steps: int, out: Path, engine: list[str], training_seeds: int = 1,
              only_training_seed: int | None = None) -> None:
    """Train (never evaluate) one lr_sweep, every point ``training_seeds`` times (or only its seed
    ``only_training_seed``); finished runs are skipped by lr_sweep itself. ``engine``: its
    ``--engine``/``--address`` arguments (default: in this process)."""
    only = ["--only_training_seed", str(only_training_seed)] if only_training_seed is not None else []
    sweep_main(["--preset", str(preset), "--stage", stage, "--lrs", lrs, "--steps", str(steps), "--out", str(out),
                "--training_seeds", str(training_seeds), *only, "--no_evaluate", "--gpus", "none", *engine])


def sweep_runs(out: Path, stage: str, lrs: str, training_seeds: int = 1) -> list[tuple[float, int, Path]]:
    """``(lr, training seed, run folder)`` of a sweep, in lr order then seed order (lr_sweep's naming)."""
    return [(lr, k, out / "runs" / (point_name(stage, lr, None) + seed_suffix(k)))
            for lr in parse_lrs(lrs) for k in range(training_seeds)]


def scored_rows(out: Path, stage: str, variant: str, lrs: str, output_name: str, args, base_seed: int = 0) -> list[dict]:
    """One report row per run of a sweep: its sweep, variant, lr, training seed (``seed``: ``base_seed`` + it)
    and folder, then its scores (none if unfinished)."""
    return [{"sweep": stage, "variant": variant, "lr": lr, "training_seed": k, "seed": base_seed + k, "run_dir": str(d)}
            | (scores_of(d, output_name, args) or {})
            for lr, k, d in sweep_runs(out, stage, lrs, args.training_seeds)]


def point_rows(rows: list[dict]) -> list[dict]:
    """Per (sweep, variant, lr) point, the mean over training seeds (intervals on the ground-truth scores)."""
    return seed_means(rows, ("sweep", "variant", "lr"), lambda key: key.startswith("gt_") and not key.endswith("_base"))


def seed_pivots(inversion_rows: list[dict], lr: float, training_seeds: int) -> dict[int, dict]:
    """The pivot of each training seed: its inversion row at ``lr``; SystemExit when one has no scores."""
    pivots = {r["training_seed"]: r for r in inversion_rows
              if same_lr(r["lr"], lr) and r.get("gt_reconstruction") is not None}
    missing = [k for k in range(training_seeds) if k not in pivots]
    if missing:
        raise SystemExit(f"the inversion runs of training seeds {missing} at the pivot lr {lr:g} did not finish "
                         "(see above)")
    return pivots


def choose_pivot(rows: list[dict], choice: str) -> tuple[dict, str]:
    """The inversion row whose pivot the LoRA sweeps share, and the rule that chose it."""
    done = [r for r in rows if r.get("gt_reconstruction") is not None]
    if not done:
        raise SystemExit("no finished inversion run to take the pivot from (see above)")
    if choice != "knee":
        lr = float(choice)
        match = [r for r in done if same_lr(r["lr"], lr)]
        if not match:
            raise usage_exit(f"--pivot_lr {choice}: not among the finished inversion runs ({[r['lr'] for r in done]})")
        return match[0], f"--pivot_lr {choice}"
    x = [r.get("pivot_l2_from_init") for r in done]
    for metric, sign in (("gt_character_match", 1.0), ("proxy_denoise_mse", -1.0)):
        y = [sign * r[metric] if r.get(metric) is not None else float("nan") for r in done]
        k = knee_index([v if v is not None else float("nan") for v in x], y)
        if k is not None:
            return done[k], f"knee of {metric} against pivot_l2_from_init"
    return done[len(done) // 2], "middle learning rate (no knee: fewer than 3 runs or a flat curve)"


def class_word_of(raw: dict, config) -> str:
    """The class of the regularisation images: the pivot-locality plugin's first class word, else the init word."""
    words = raw.get("plugins", {}).get(PLUGIN, {}).get("class_words") or []
    return words[0] if words else config.init_words[0]


def generate_reg_images(run_dir: Path, class_word: str, reg_dir: Path, count: int, args) -> Path:
    """``count`` images of ``T(class_word)`` by the base model, in kohya layout ``reg_dir/1_<class>/``; once,
    also when several processes ask at the same time (the others wait under ``reg_dir/.lock``)."""
    from pti_plugin.run_lock import exclusive_while_made

    folder = reg_dir / f"1_{class_word}"
    with exclusive_while_made(reg_dir / ".lock"):
        if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
            return reg_dir
        _make_reg_images(run_dir, class_word, folder, count, args)
    return reg_dir


def _make_reg_images(run_dir: Path, class_word: str, folder: Path, count: int, args) -> None:
    """Generate into a temporary folder beside ``folder``, then rename it to ``folder`` (an incomplete
    earlier ``folder`` moved aside); the caller holds the lock."""
    import tempfile

    import numpy as np
    from PIL import Image

    from pti_plugin.metrics.localisation import generate_images
    from pti_plugin.metrics.run_model import load_run

    run = load_run(run_dir, device=args.device, class_word=class_word)
    tmp = Path(tempfile.mkdtemp(prefix=".reg.", dir=folder.parent))
    seeds = [10_000 + k for k in range(count)]
    images = generate_images(run, "{T}", False, seeds, args.sample_steps, args.guidance)
    caption = run.prompt("{T}", False)
    for k, image in enumerate(np.asarray(images)):
        Image.fromarray(image).save(tmp / f"{k:03d}.png")
        (tmp / f"{k:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    if folder.exists():  # an incomplete earlier attempt (a complete one returned above)
        folder.rename(folder.parent / f".incomplete-{time.time_ns()}")
    tmp.rename(folder)
    print(f"regularisation images: {count} of {caption!r} by the base model in {folder}", flush=True)


# ---------------------------------------------------------------------- main
def parse_args(argv):
    parser = argument_parser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", type=Path, default=ROOT / "presets" / "research_bench.toml",
                        help="the toy-world training preset (.toml) both sweeps copy")
    parser.add_argument("--out", type=Path, default=Path("outputs/research_bench"),
                        help="folder of the sweeps' runs, the scores and the report")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="preset override KEY=VALUE (nested keys with dots, e.g. plugins.pivot_locality.weight=1)")
    parser.add_argument("--inversion_lrs", type=lrs_arg, default="1e-5,2e-5,2.75e-5,3e-5,1e-4,1e-3",
                        help="learning rates of the inversion sweep, comma-separated")
    parser.add_argument("--lora_lrs", type=lrs_arg, default="1e-5,3e-5,1e-4,2e-4,5e-4,1e-3,2e-3,5e-3",
                        help="learning rates of each variant's LoRA sweep, comma-separated")
    parser.add_argument("--inversion_steps", type=positive_int, default=1000, help="steps per inversion run (the method's protocol: 1000)")
    parser.add_argument("--lora_steps", type=positive_int, default=1000, help="steps per LoRA run (the method's protocol: 1000)")
    parser.add_argument("--variants", type=parse_variants, default=list(VARIANTS), help=", ".join(VARIANTS))
    parser.add_argument("--pivot_lr", default="knee", help="knee, or the inversion learning rate whose pivot LoRA runs share")
    parser.add_argument("--training_seeds", type=positive_int, default=1,
                        help="train every (variant, lr) point this many times (the preset's seed + 0..N-1); the "
                             "report shows seed means with 95%% intervals")
    parser.add_argument("--reg_images", type=positive_int, default=12, help="regularisation images of the reg_images variant")
    parser.add_argument("--seeds", type=seed_count, default=16,
                        help="generation seeds per prompt when scoring; 16 leave the leakage score uncertain by about "
                             "0.16 (two seed sets on the same run), use 64 or more to compare variants' leakage")
    parser.add_argument("--sample_steps", type=positive_int, default=SAMPLE_STEPS, help="DDIM steps of the generations")
    parser.add_argument("--guidance", type=finite_float_at_least(0), default=GUIDANCE,
                        help="classifier-free guidance scale of the generations")
    parser.add_argument("--max_images", type=positive_int, default=8, help="training images of the model-internal proxies")
    parser.add_argument("--leakage_threshold", type=finite_float_at_least(0), default=0.1,
                        help="largest leakage excess over the pivot's own of a light run")
    parser.add_argument("--editability_ratio", type=finite_float_at_least(0), default=0.8,
                        help="a light run keeps at least this fraction of the pivot's GT editability")
    parser.add_argument("--rescore", action="store_true", help="ignore cached scores")
    parser.add_argument("--device", default=None, help="torch device of the scoring (default: CUDA when available)")
    add_engine_arguments(parser, gpus_flag=False)
    args = parser.parse_args(argv)
    check_out_folder(parser, args.out)
    args.out = args.out.resolve()
    return args


def lora_sweeps(raw: dict, config, pivot_files: dict[int, Path], reg_dir: Path | None, engine: list[str],
                args) -> list[dict]:
    """Train and score every variant's LoRA sweep; the runs of training seed k start from ``pivot_files[k]``."""
    rows = []
    for variant in args.variants:
        out = args.out / f"lora_{variant}"
        for k, pivot_file in pivot_files.items():
            preset = write_preset(args.out / "presets" / f"lora_{variant}{seed_suffix(k)}.toml",
                                  variant_preset(raw, variant, pivot_file, reg_dir))
            run_sweep(preset, "lora", args.lora_lrs, args.lora_steps, out, engine, args.training_seeds,
                      k if args.training_seeds > 1 else None)
        rows += scored_rows(out, "lora", variant, args.lora_lrs, config.output_name, args, config.seed)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        raw = apply_overrides(load_preset_dict(args.preset), {}, args.sets)
        config = build_config(copy.deepcopy(raw))
    except ConfigError as exc:
        raise usage_exit(str(exc)) from exc
    if problem := toy_world_problem(config):  # a real model: hours of training, then scores the detectors cannot read
        raise usage_exit(f"--preset {args.preset}" + (f" (with --set {', '.join(args.sets)})" if args.sets else "")
                         + f": {problem}")
    stage_of(raw, "inversion"), stage_of(raw, "lora")  # both stages are needed (SystemExit naming them)
    if others := sorted(set(raw.get("plugins", {})) - {PLUGIN}):
        print(f"research_bench: the preset's plugins {', '.join(others)} are left out: the bench trains its variants "
              f"({', '.join(args.variants)}) with {PLUGIN} alone", file=sys.stderr, flush=True)
    engine = ["--engine", args.engine] + (["--address", args.address] if args.address else []) + (
        ["--gpus_per_run", str(args.gpus_per_run)] if args.gpus_per_run is not None else [])
    t0 = time.time()

    inv_out = args.out / "inversion"
    run_sweep(write_preset(args.out / "presets" / "inversion.toml", inversion_preset(raw)), "inversion",
              args.inversion_lrs, args.inversion_steps, inv_out, engine, args.training_seeds)
    rows = scored_rows(inv_out, "inversion", "none", args.inversion_lrs, config.output_name, args, config.seed)
    chosen, pivot_rule = choose_pivot(point_rows(rows), args.pivot_lr)  # on the seed-mean curve
    pivots = seed_pivots(rows, chosen["lr"], args.training_seeds)
    pivot_files = {k: Path(r["run_dir"]) / f"{config.token_string}.safetensors" for k, r in pivots.items()}
    print(f"pivot: inversion lr {chosen['lr']:g} ({pivot_rule}): {', '.join(map(str, pivot_files.values()))}", flush=True)

    reg_dir = None
    if "reg_images" in args.variants:  # images of the base model (LoRA off, class word): the same for every seed
        reg_dir = generate_reg_images(Path(pivots[0]["run_dir"]), class_word_of(raw, config), args.out / "reg",
                                      args.reg_images, args)
    rows += lora_sweeps(raw, config, pivot_files, reg_dir, engine, args)
    for k, pivot in pivots.items():  # each run's leakage excess over its own seed's pivot
        add_excess_leakage([r for r in rows if r["training_seed"] == k], pivot)
    points = rows if args.training_seeds == 1 else point_rows(rows)  # what the report's tables show
    pivot_point = pivots[0] if args.training_seeds == 1 else chosen  # the pivot's run, or its seed mean
    min_editability = args.editability_ratio * (pivot_point.get("gt_editability") or 0.0)
    light = {v: {key: light_point([r for r in points if r["sweep"] == "lora" and r["variant"] == v], key,
                                  args.leakage_threshold, min_editability)
                 for key in ("gt_leakage_excess", "attention_leakage_excess")} for v in args.variants}
    pivot_info = {"lr": chosen["lr"], "rule": pivot_rule, "file": str(pivot_files[0]),
                  "digest": pivots[0].get("pivot_digest"),
                  "seeds": [{"training_seed": k, "file": str(pivot_files[k]), "digest": pivots[k].get("pivot_digest")}
                            for k in pivots]}
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "scores_version": SCORES_VERSION, "variants": {v: VARIANTS[v] for v in args.variants}, "pivot": pivot_info,
              "rows": rows, "correlations": correlations(rows), "light_points": light}
    if args.training_seeds > 1:
        result["seed_means"] = points
    result["minutes"] = round((time.time() - t0) / 60, 1)
    write_outputs(result, points, pivot_point, args)
    return result


def cli(argv: list[str] | None = None) -> None:
    """The command: :func:`main`. A Ctrl-C or SIGTERM outside a run's training (scoring, choosing the pivot, between
    the sweeps) ends with the sweeps' last line (:func:`~pti_plugin.sweeps.stopping.stoppable`); the same command goes
    on from the cached runs and scores."""
    stoppable(lambda: main(argv))


def write_outputs(result: dict, points: list[dict], pivot_point: dict, args) -> None:
    """The bench's JSON, CSV (per run, and per point with several training seeds), report and plot; prints the report."""
    rows = result["rows"]
    text = report_text(points, result["correlations"], result["light_points"], pivot_point, result["pivot"], args)
    atomic_write_text(args.out / "research_bench.json", json.dumps(result, indent=2, default=str) + "\n")
    write_csv(args.out / "research_bench.csv", rows)
    if args.training_seeds > 1:
        write_csv(args.out / "research_bench_seed_means.csv", points)
    atomic_write_text(args.out / "research_bench.md", text)
    plot(points, args.out / "research_bench.png", args)
    print(text)
    print(f"wrote {args.out}/research_bench.json, .csv, .md, .png")


if __name__ == "__main__":
    cli()
