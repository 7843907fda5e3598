"""Learning-rate sweep of one stage at a fixed step budget, then a measurement of every run.

Usage::

    python analysis/lr_sweep.py --preset P --stage inversion|lora --lrs 1e-3,5e-3,1e-2 [--steps 1000]
        [--out DIR] [--with_plugin pivot_locality] [--clip_model_path DIR] [--gpus auto|none|0,1,...]

**Runs.** For each learning rate the preset is copied with the swept stage set to that learning
rate and ``--steps`` steps (the notes' protocol: 1000), into ``OUT/runs/<stage>-lr<lr>[-<plugin>]/``
(the derived preset is kept in ``OUT/presets/``). An ``inversion`` sweep keeps only the preset's
first inversion stage. A ``lora`` sweep sets the first lora stage's ``learning_rate`` and
``unet_lr`` (a preset ``text_encoder_lr`` is left as it is), and all its runs share one pivot:
the stages before that lora stage run once, into ``OUT/pivot/``, and every LoRA run is that lora
stage alone, started from the pivot with the trainer's ``weights`` key (a preset that already
sets ``weights`` shares its own pivot and needs no pivot run). ``--shared_pivot off`` instead
runs the preset's stages up to the lora stage in every run (the same pivot again, as the trainer
draws every sample from (seed, stage, step, slot); the ``pivot_digest`` column shows it).
``--with_plugin NAME`` runs every learning rate twice, without and with ``[plugins.NAME]``
(options from the preset's table, ``--plugin_set KEY=VALUE``); the pivot run never has it.

**Resumable.** A run whose final LoRA file exists is finished and skipped (``skip <run>: finished``).
An interrupted run resumes from its latest saved state when ``--save_every N`` gave it one; else
its folder is moved aside to ``<run>.incomplete-<k>`` and the run starts again. Evaluations are
cached in each run folder (``sweep_eval.json``) and recomputed only when the evaluation settings
change (or with ``--reevaluate``).

**Devices.** With several CUDA devices (``--gpus auto`` uses all visible ones, or list them),
runs are spread one process per GPU (``CUDA_VISIBLE_DEVICES``; training through
``train_pti.py``, evaluation through this script), logs in ``OUT/logs/``. On one device (or a
CPU) runs are sequential and in-process (``pti_plugin.cli.main``).

**Measurements** (``pti_plugin.metrics.evaluate_run``): reconstruction (``clip_image_image``
with ``--clip_model_path``, else ``proxy_denoise_mse``, lower = better), editability
(``clip_text_image``, else ``proxy_edit_direction_cos``), the base model's values beside them,
the pivot's distance from its init in token-embedding space (``pivot_l2_from_init``, from the
training log) and its output-space angle to the class word (``output_angle_layernorm_deg``), the
LoRA's weight change ``lora_delta_norm``, and for lora sweeps the position-leakage score
(``--leakage``). ``lr_x_steps`` is printed beside the measured distance; it is never used in its
place (Adam moves each coordinate by up to lr per step, whatever the gradient).

**Plots and knees.** Inversion sweep: reconstruction and editability against the measured L2
distance and against the output-space angle. LoRA sweep: reconstruction, editability and
leakage against the learning rate (log axis) and against the LoRA weight-change norm. The knee of
each curve is marked: after sorting by x and rescaling both axes to [0, 1] (x in log10 for
learning rates), the point farthest from the chord joining the first and last points (maximum
distance to the chord, Kneedle's normalised form); at least 3 runs are needed. Also a trade-off
plot (editability against reconstruction, runs in learning-rate order).

Writes ``OUT/lr_sweep_<stage>.csv`` (one row per run), ``OUT/lr_sweep_<stage>.json`` (rows,
knees, settings), ``OUT/lr_sweep_<stage>.png`` and ``OUT/lr_sweep_<stage>_tradeoff.png``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import toml  # noqa: E402

from pti_plugin.atomic_io import atomic_write_csv, atomic_write_text, atomic_write_with  # noqa: E402
from pti_plugin.config import ConfigError, apply_overrides, build_config, default_stages, load_preset_dict, parse_value  # noqa: E402
from pti_plugin.hooks import instantiate_plugins  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVAL_FILE = "sweep_eval.json"
#: Bump when the evaluation changes meaning, so that cached evaluations are recomputed.
EVAL_VERSION = 1


@dataclass
class RunSpec:
    name: str
    lr: float
    variant: str  # "none" or the plugin's name
    preset_path: Path
    run_dir: Path
    output_name: str
    token: str = "tok1"

    @property
    def lora(self) -> Path:
        return self.run_dir / f"{self.output_name}.safetensors"

    @property
    def embedding(self) -> Path:
        return self.run_dir / f"{self.token}.safetensors"


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise SystemExit(f"--lrs: expected comma-separated numbers, got {text!r}") from exc
    if not lrs or any(lr <= 0 for lr in lrs):
        raise SystemExit("--lrs: give at least one positive learning rate")
    return sorted(set(lrs))


def lr_tag(lr: float) -> str:
    return f"{lr:g}"


def preset_stages(raw: dict, stage: str) -> tuple[list[dict], int]:
    """The preset's stages (the defaults when it has none) and the index of the first ``stage`` one."""
    stages = raw.get("stages") or [{k: v for k, v in dataclasses.asdict(s).items() if v is not None} for s in default_stages()]
    index = next((i for i, s in enumerate(stages) if s.get("kind", "inversion") == stage), None)
    if index is None:
        raise SystemExit(f"the preset has no {stage!r} stage to sweep (stages: {[s.get('kind', 'inversion') for s in stages]})")
    return [dict(s) for s in stages], index


def derive_preset(raw: dict, stage: str, lr: float, steps: int, run_dir: Path, plugin: str | None, drop_plugin: str | None,
                  plugin_options: dict, save_every: int, pivot_file: Path | None = None) -> dict:
    """The preset of one run: the swept stage at ``lr`` for ``steps`` steps, written into ``run_dir``.

    ``pivot_file`` (lora sweeps): start from that embedding (``weights``) and run the lora stage alone.
    """
    out = copy.deepcopy(raw)
    stages, index = preset_stages(out, stage)
    if stage == "inversion" or pivot_file is not None:
        stages = [stages[index]]
        index = 0
    else:
        stages = stages[: index + 1]
    if pivot_file is not None:
        out["weights"] = str(pivot_file)
    swept = dict(stages[index])
    swept.pop("max_train_epochs", None)
    swept["learning_rate"] = lr
    swept["steps"] = steps
    if stage == "inversion":
        swept.pop("pivot_lr", None)
    else:
        swept["unet_lr"] = lr
    stages[index] = swept
    out["stages"] = stages
    out["output_dir"] = str(run_dir)
    out.pop("max_train_epochs", None)
    if all("steps" in s or "max_train_epochs" in s for s in stages):
        out.pop("max_train_steps", None)  # every stage sets its own length: a top-level one would be refused
    plugins = dict(out.get("plugins", {}))
    if drop_plugin:
        plugins.pop(drop_plugin, None)
    if plugin:
        plugins[plugin] = dict(plugins.get(plugin, {})) | plugin_options
    out["plugins"] = plugins
    if save_every:
        out["save_every_n_steps"] = save_every
        out["save_state"] = True
    return out


def plan_pivot(args, raw: dict) -> RunSpec | None:
    """The shared pivot's run of a lora sweep (the stages before the lora stage), or None when not needed."""
    if args.stage != "lora" or args.shared_pivot == "off" or raw.get("weights"):
        return None
    stages, index = preset_stages(raw, "lora")
    if index == 0:  # no stage before the lora stage: every run starts from init_word anyway
        return None
    preset = copy.deepcopy(raw)
    preset["stages"] = stages[:index]
    run_dir = (args.out / "pivot").resolve()
    preset["output_dir"] = str(run_dir)
    plugins = dict(preset.get("plugins", {}))
    plugins.pop(args.with_plugin or "", None)
    preset["plugins"] = plugins
    if args.save_every:
        preset["save_every_n_steps"] = args.save_every
        preset["save_state"] = True
    config = build_config(copy.deepcopy(preset))
    path = (args.out / "presets" / "pivot.toml").resolve()
    atomic_write_text(path, toml.dumps(preset))
    return RunSpec("pivot", 0.0, "pivot", path, run_dir, config.output_name, config.token_string)


def plan_runs(args, raw: dict, pivot: RunSpec | None = None) -> list[RunSpec]:
    """The sweep's runs; with ``pivot`` (a lora sweep's shared pivot run) they start from its embedding."""
    pivot_file = pivot.embedding if pivot is not None else None
    variants: list[str | None] = [None] + ([args.with_plugin] if args.with_plugin else [])
    plugin_options = {}
    for item in args.plugin_set:
        key, _, value = item.partition("=")
        plugin_options[key] = parse_value(value)
    specs = []
    for variant in variants:
        for lr in args.lrs:
            name = f"{args.stage}-lr{lr_tag(lr)}" + (f"-{variant}" if variant else "")
            run_dir = (args.out / "runs" / name).resolve()
            preset = derive_preset(raw, args.stage, lr, args.steps, run_dir, variant,
                                   args.with_plugin if variant is None else None, plugin_options, args.save_every, pivot_file)
            # fails here, before any training, on a bad preset (the shared pivot may not exist yet)
            config = build_config(copy.deepcopy(preset), check_paths=pivot_file is None or pivot_file.is_file())
            instantiate_plugins(config)  # unknown plugins and bad plugin options, too
            path = (args.out / "presets" / f"{name}.toml").resolve()
            atomic_write_text(path, toml.dumps(preset))
            specs.append(RunSpec(name, lr, variant or "none", path, run_dir, config.output_name, config.token_string))
    return specs


def latest_state(spec: RunSpec) -> Path | None:
    states = sorted(spec.run_dir.glob(f"{spec.output_name}-state-step*"))
    return states[-1] if states else None


def prepare_run(spec: RunSpec) -> list[str] | None:
    """The trainer's argv for an unfinished run (None when finished); moves an unresumable partial run aside."""
    if spec.lora.is_file():
        print(f"skip {spec.name}: finished ({spec.lora.name} exists)", flush=True)
        return None
    argv = ["--preset", str(spec.preset_path)]
    if spec.run_dir.is_dir() and any(spec.run_dir.iterdir()):
        state = latest_state(spec)
        if state is not None:
            print(f"resume {spec.name} from {state.name}", flush=True)
            return argv + ["--resume", str(state)]
        k = 1
        while spec.run_dir.with_name(f"{spec.run_dir.name}.incomplete-{k}").exists():
            k += 1
        aside = spec.run_dir.with_name(f"{spec.run_dir.name}.incomplete-{k}")
        spec.run_dir.rename(aside)
        print(f"restart {spec.name}: an interrupted run without a saved state was moved to {aside.name}", flush=True)
    print(f"train {spec.name}", flush=True)
    return argv


def reset_accelerate() -> None:
    """Forget accelerate's per-process singletons between in-process runs."""
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    except Exception:  # older accelerate: nothing to reset
        pass


def train_in_process(spec: RunSpec, argv: list[str]) -> bool:
    from pti_plugin.cli import main as train_main

    try:
        code = train_main(argv)
    except Exception:
        traceback.print_exc()
        code = 1
    finally:
        reset_accelerate()
    if code != 0 or not spec.lora.is_file():
        print(f"FAILED {spec.name} (exit code {code})", flush=True)
        return False
    return True


def visible_gpus(choice: str) -> list[str]:
    if choice == "none":
        return []
    if choice != "auto":
        return [g.strip() for g in choice.split(",") if g.strip()]
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:
        count = 0
    return [str(i) for i in range(count)] if count > 1 else []


def run_on_gpus(jobs: list[tuple[str, list[str], Path]], gpus: list[str]) -> dict[str, int]:
    """Run ``(name, argv, log file)`` jobs as subprocesses, one per GPU at a time; returns exit codes."""
    pending, running, codes = list(jobs), {}, {}
    while pending or running:
        for gpu in gpus:
            if gpu not in running and pending:
                name, argv, log = pending.pop(0)
                log.parent.mkdir(parents=True, exist_ok=True)
                handle = open(log, "a", encoding="utf-8")
                env = os.environ | {"CUDA_VISIBLE_DEVICES": gpu}
                print(f"  GPU {gpu}: {name} (log {log})", flush=True)
                running[gpu] = (name, subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env), handle)
        time.sleep(1.0)
        for gpu, (name, proc, handle) in list(running.items()):
            if proc.poll() is not None:
                handle.close()
                codes[name] = proc.returncode
                print(f"  GPU {gpu}: {name} finished with exit code {proc.returncode}", flush=True)
                del running[gpu]
    return codes


# ---------------------------------------------------------------------- evaluation
def eval_settings(args) -> dict:
    return {
        "version": EVAL_VERSION, "clip_model_path": str(args.clip_model_path or ""), "n_seeds": args.n_seeds,
        "sample_steps": args.sample_steps, "guidance": args.guidance, "leakage": args.leakage_on,
        "leakage_seeds": args.leakage_seeds, "leakage_prompts": args.leakage_prompts,
        "leakage_edit_prompts": args.leakage_edit_prompts, "max_images": args.max_images, "fp16": args.fp16,
    }


def cached_evaluation(spec: RunSpec, settings: dict) -> dict | None:
    path = spec.run_dir / EVAL_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return data["metrics"] if data.get("settings") == settings else None


def evaluate_one(spec: RunSpec, args, scorer=None) -> dict:
    import torch

    from pti_plugin.metrics.evaluate import evaluate_run

    settings = eval_settings(args)
    t0 = time.time()
    metrics = evaluate_run(
        spec.run_dir, spec.output_name, None, list(range(args.n_seeds)), args.sample_steps, args.guidance,
        leakage=args.leakage_on, leakage_seeds=list(range(args.leakage_seeds)), inversion_stage=None,
        device=args.device, dtype=torch.float16 if args.fp16 else torch.float32, scorer=scorer,
        max_images=args.max_images, leakage_prompts=args.leakage_prompts, leakage_edit_prompts=args.leakage_edit_prompts,
    )
    record = {"settings": settings, "metrics": metrics, "seconds": round(time.time() - t0, 1)}
    atomic_write_text(spec.run_dir / EVAL_FILE, json.dumps(record, indent=2) + "\n")
    return metrics


# ---------------------------------------------------------------------- results
PIVOT_LOG_KEYS = ("pivot_l2_from_init", "pivot_angle_from_init_deg", "pivot_norm")


def run_row(spec: RunSpec, args, metrics: dict | None, pivot_log: dict | None = None) -> dict:
    """One CSV row. ``pivot_log``: the shared pivot run's final log entry (a LoRA run started from
    ``weights`` logs its distance from that file, 0, instead of from the init word)."""
    row = {"run": spec.name, "stage": args.stage, "variant": spec.variant, "lr": spec.lr, "steps": args.steps,
           "lr_x_steps": spec.lr * args.steps, "finished": spec.lora.is_file()}
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
    "leakage_score": "position-leakage score (0 = base-like)",
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
            if log_x:
                ax.set_xscale("log")
            ax.set_xlabel(LABELS.get(x, x), fontsize=8)
            ax.set_ylabel(y_label(rows, y), fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(f"{stage} learning-rate sweep, {steps} steps per run; ★ = knee (maximum distance to the chord)", fontsize=11)
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
    first = ["run", "stage", "variant", "lr", "steps", "lr_x_steps", "effective_lr", "pivot_l2_from_init",
             "pivot_angle_from_init_deg", "output_angle_layernorm_deg", "output_angle_raw_deg", "lora_delta_norm",
             "reconstruction_metric", "reconstruction", "reconstruction_base", "editability_metric", "editability",
             "editability_base", "leakage_score", "diversity_ratio", "attraction_ratio", "pivot_digest", "finished"]
    atomic_write_csv(path, rows, first)


def print_table(rows: list[dict], knees: dict, stage: str) -> None:
    x = "pivot_l2_from_init" if stage == "inversion" else "lora_delta_norm"
    cols = ["run", "lr", "lr_x_steps", x, "output_angle_layernorm_deg" if stage == "inversion" else "leakage_score",
            "reconstruction", "editability"]
    print("  ".join(f"{c:>18}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:>18.5g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f"{str(v):>18}")
        print("  ".join(cells))
    for curve, per_variant in knees.items():
        for variant, k in per_variant.items():
            print(f"knee of {curve} [{variant}]: run {k['run']} (lr {k['lr']:g}, x {k['x']:.4g}, y {k['y']:.4g})")


# ---------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True, type=Path)
    parser.add_argument("--stage", required=True, choices=("inversion", "lora"))
    parser.add_argument("--lrs", required=True, type=parse_lrs, help="comma-separated learning rates")
    parser.add_argument("--steps", type=int, default=1000, help="steps of the swept stage (the notes' fixed budget)")
    parser.add_argument("--out", type=Path, default=Path("outputs/lr_sweep"))
    parser.add_argument("--set", dest="sets", action="append", default=[], help="preset override KEY=VALUE (nested keys with dots)")
    parser.add_argument("--with_plugin", default=None, help="also run every lr with [plugins.NAME] (e.g. pivot_locality)")
    parser.add_argument("--plugin_set", action="append", default=[], help="option of that plugin, KEY=VALUE")
    parser.add_argument("--save_every", type=int, default=0, help="save a resumable state every N steps (0 = off)")
    parser.add_argument("--shared_pivot", choices=("on", "off"), default="on",
                        help="lora sweeps: train the pivot once and start every run from it (on), or repeat it per run (off)")
    parser.add_argument("--gpus", default="auto", help="auto (all visible CUDA devices when more than one), none, or a list 0,1")
    parser.add_argument("--no_train", action="store_true", help="only evaluate and plot the runs already finished")
    parser.add_argument("--no_evaluate", action="store_true", help="only train")
    parser.add_argument("--reevaluate", action="store_true", help="ignore cached evaluations")
    parser.add_argument("--clip_model_path", default=None, help="a LOCAL CLIPModel folder; without it, proxies are used")
    parser.add_argument("--n_seeds", type=int, default=4, help="generations per prompt for the CLIP scores")
    parser.add_argument("--sample_steps", type=int, default=25, help="DDIM steps of the generations")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--leakage", choices=("auto", "on", "off"), default="auto", help="auto: on for lora sweeps")
    parser.add_argument("--leakage_seeds", type=int, default=8)
    parser.add_argument("--leakage_prompts", nargs="+", default=None, help="neutral prompts of the leakage measurement")
    parser.add_argument("--leakage_edit_prompts", nargs="*", default=None, help="position-edit prompts of the leakage measurement")
    parser.add_argument("--max_images", type=int, default=8, help="training images used by the proxies")
    parser.add_argument("--device", default=None)
    parser.add_argument("--fp16", action="store_true")
    parser.add_argument("--_evaluate_run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.leakage_on = args.leakage == "on" or (args.leakage == "auto" and args.stage == "lora")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    try:
        raw = apply_overrides(load_preset_dict(args.preset), {}, args.sets)
        pivot = plan_pivot(args, raw)
        specs = plan_runs(args, raw, pivot)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from exc
    by_name = {s.name: s for s in specs}
    if args._evaluate_run:  # a worker process: evaluate one run and exit
        evaluate_one(by_name[args._evaluate_run], args)
        return []
    gpus = visible_gpus(args.gpus)
    print(f"{args.stage} sweep: {len(specs)} runs of {args.steps} steps in {args.out}; "
          + (f"GPUs {','.join(gpus)} (one process each)" if gpus else "sequential, in-process")
          + (f"; shared pivot from {pivot.run_dir}" if pivot else ""), flush=True)

    if not args.no_train:
        if pivot is not None and (a := prepare_run(pivot)) is not None:
            if gpus:
                run_on_gpus([(pivot.name, [sys.executable, str(ROOT / "train_pti.py")] + a,
                              args.out / "logs" / "pivot.train.log")], gpus[:1])
            else:
                train_in_process(pivot, a)
        if pivot is not None and not pivot.embedding.is_file():
            raise SystemExit(f"the shared pivot run failed: {pivot.embedding} is missing (see above)")
        todo = [(s, a) for s in specs if (a := prepare_run(s)) is not None]
        if gpus:
            jobs = [(s.name, [sys.executable, str(ROOT / "train_pti.py")] + a, args.out / "logs" / f"{s.name}.train.log") for s, a in todo]
            run_on_gpus(jobs, gpus)
        else:
            for spec, a in todo:
                train_in_process(spec, a)

    rows = []
    if not args.no_evaluate:
        settings = eval_settings(args)
        results = {}
        to_eval = []
        for spec in specs:
            if not spec.lora.is_file():
                continue
            cached = None if args.reevaluate else cached_evaluation(spec, settings)
            if cached is not None:
                print(f"evaluation of {spec.name}: cached", flush=True)
                results[spec.name] = cached
            else:
                to_eval.append(spec)
        if gpus and to_eval:
            jobs = [(s.name, [sys.executable, str(Path(__file__).resolve())] + argv + ["--_evaluate_run", s.name],
                     args.out / "logs" / f"{s.name}.eval.log") for s in to_eval]
            run_on_gpus(jobs, gpus)
            for spec in to_eval:
                results[spec.name] = cached_evaluation(spec, settings)
        else:
            scorer = None
            if args.clip_model_path and to_eval:
                from pti_plugin.metrics.clip_scores import ClipScorer

                scorer = ClipScorer(args.clip_model_path, device=args.device)
            for spec in to_eval:
                print(f"evaluate {spec.name}", flush=True)
                try:
                    results[spec.name] = evaluate_one(spec, args, scorer)
                except Exception:
                    traceback.print_exc()
                    print(f"FAILED evaluation of {spec.name}", flush=True)
        pivot_log = None
        if pivot is not None:
            from pti_plugin.metrics.evaluate import final_log_entry

            pivot_log = final_log_entry(pivot.run_dir / f"{pivot.output_name}.log.jsonl")
        rows = [run_row(s, args, results.get(s.name), pivot_log) for s in specs]
        digests = {r.get("pivot_digest") for r in rows if r.get("pivot_digest")}
        if args.stage == "lora" and len(digests) > 1:
            print(f"warning: the LoRA runs do not share one pivot ({len(digests)} different embeddings)", flush=True)
        knees = find_knees([r for r in rows if r["finished"]], args.stage)
        stem = f"lr_sweep_{args.stage}"
        write_csv(args.out / f"{stem}.csv", rows)
        atomic_write_text(args.out / f"{stem}.json", json.dumps(
            {"stage": args.stage, "steps": args.steps, "preset": str(args.preset.resolve()), "lrs": args.lrs,
             "with_plugin": args.with_plugin, "evaluation": settings, "shared_pivot": len(digests) <= 1,
             "pivot_run": str(pivot.run_dir) if pivot else None,
             "knee_method": "maximum distance to the chord after rescaling both axes to [0, 1] (x in log10 for lr)",
             "knees": knees, "rows": rows}, indent=2, default=str) + "\n")
        done = [r for r in rows if r["finished"] and r.get("reconstruction") is not None]
        if done:
            plot_sweep(done, knees, args.stage, args.steps, args.out / f"{stem}.png")
            plot_tradeoff(done, args.stage, args.out / f"{stem}_tradeoff.png")
        print_table(rows, knees, args.stage)
        print(f"wrote {args.out}/{stem}.csv, .json, .png, _tradeoff.png")
    return rows


if __name__ == "__main__":
    main()
