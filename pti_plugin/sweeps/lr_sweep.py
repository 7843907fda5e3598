"""Learning-rate sweep of one stage at a fixed step budget, then a measurement of every run.

Usage::

    python analysis/lr_sweep.py --preset P --stage inversion|lora --lrs 1e-3,5e-3,1e-2 [--steps 1000]
        [--out DIR] [--with_plugin pivot_locality] [--clip_model_path DIR] [--gpus auto|none|0,1,...]
        [--engine local|ray [--address ADDR]] [--training_seeds N]

**Runs.** For each learning rate the preset is copied with the swept stage set to that learning
rate and ``--steps`` steps (the method's protocol: 1000), into ``OUT/runs/<stage>-lr<lr>[-<plugin>]/``
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

**Training seeds** (the unit of replication, :mod:`pti_plugin.sweeps.seeds`). ``--training_seeds N``
(default 1) trains every (learning rate, variant) point N times, run k with the preset's ``seed``
set to its resolved seed + k, into ``<run>-s<k>/`` for k >= 1 (seed 0 keeps the plain name, so raising N
later reuses every run already there). A ``lora`` sweep's shared pivot is trained once per
training seed (``OUT/pivot/``, ``OUT/pivot-s<k>/``) and the runs of seed k start from pivot k: the
pivot's training is part of what is replicated. With N > 1 the CSV and JSON keep one row per run
(``training_seed`` and ``seed`` columns), the JSON adds ``seed_means`` (per point, the mean over
seeds of every number, with a 95% interval over seeds for ``reconstruction``, ``editability`` and
``leakage_score``), the printed table shows those as ``mean [lo, hi]``, and knees and plots use the
seed-mean curves. With few seeds the interval undercovers (see the seeds module).
``--only_training_seed K`` plans and trains seed K of the N alone (the research bench starts seed
K's LoRA runs from its own pivot that way).

**Resumable.** A run whose final LoRA and embedding exist is finished and skipped (``skip <run>: finished``);
one another process is training (its run lock is held) is skipped and left alone. An interrupted run resumes
from its latest saved state (``--save_every N``'s, or the one the trainer saves on SIGINT/SIGTERM, which also
stops the sweep); else its folder is moved aside to ``<run>.incomplete-<k>`` and the run starts again.
``OUT/presets/<run>.toml`` records the settings of each run: a run in ``OUT`` trained with other settings
stops the sweep before anything trains, naming it and what differs. Evaluations are
cached in each run folder (``sweep_eval.json``) and recomputed only when the evaluation settings
change (or with ``--reevaluate``).

**Devices.** With several CUDA devices (``--gpus auto`` uses all visible ones, or list them),
runs are spread one process per GPU (``CUDA_VISIBLE_DEVICES``; training through the trainer's
``main``, evaluation through this module), logs in ``OUT/logs/``. On one device (or a CPU) runs
are sequential and in-process (``pti_plugin.cli.main``). ``--engine ray`` (the optional extra
``pip install -e ".[cluster]"``) instead runs every training run and evaluation as a Ray task, on
a local Ray or on a cluster (``--address``); see :mod:`pti_plugin.sweeps.engines`. Which runs are
finished, resumed or restarted is decided before anything is dispatched, the same for every engine.

**Measurements** (``pti_plugin.metrics.evaluate_run``): reconstruction (``clip_image_image``
with ``--clip_model_path``, else ``proxy_denoise_mse``, lower = better), editability
(``clip_text_image``, else ``proxy_edit_direction_cos``), the base model's values beside them,
the pivot's distance from its init in token-embedding space (``pivot_l2_from_init``, from the
training log) and its output-space angle to the class word (``output_angle_layernorm_deg``), the
LoRA's weight change ``lora_delta_norm``, and for lora sweeps the position-leakage score ``leakage_score``
(``--leakage``; heatmap layouts, neutral prompts; the all-prompt value is ``heatmap_all_leakage_score``).
``lr_x_steps`` is printed beside the measured distance; it is never used in its place (Adam moves each
coordinate by up to lr per step, whatever the gradient).

**Plots and knees.** Inversion sweep: reconstruction and editability against the measured L2
distance and against the output-space angle. LoRA sweep: reconstruction, editability and
leakage against the learning rate (log axis) and against the LoRA weight-change norm. The knee of
each curve is marked: after sorting by x and rescaling both axes to [0, 1] (x in log10 for
learning rates), the point farthest from the chord joining the first and last points (maximum
distance to the chord, Kneedle's normalised form); at least 3 runs are needed. Also a trade-off
plot (editability against reconstruction, runs in learning-rate order).

The same as ``python -m pti_plugin.sweeps.lr_sweep``.

Writes ``OUT/lr_sweep_<stage>.csv`` (one row per run), ``OUT/lr_sweep_<stage>.json`` (rows,
knees, settings), ``OUT/lr_sweep_<stage>.png`` and ``OUT/lr_sweep_<stage>_tradeoff.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pti_plugin.config import ConfigError, load_preset_dict
from pti_plugin.config_loading import apply_overrides
from pti_plugin.sweeps.engines import add_engine_arguments, engine_from_args
from pti_plugin.sweeps.evaluation import eval_settings, evaluate_one, evaluate_runs
from pti_plugin.script_args import (argument_parser, check_out_folder, finite_float_at_least, int_at_least,
                                    positive_int)
from pti_plugin.sweeps.plan import parse_lrs, plan_sweep, seed_count
from pti_plugin.sweeps.report import write_report
from pti_plugin.sweeps.runner import train_sweep, visible_gpus
from pti_plugin.sweeps.stopping import stoppable
from pti_plugin.sweeps.usage import usage_exit


def parse_args(argv):
    parser = argument_parser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True, type=Path, help="the training preset (.toml) each run copies")
    parser.add_argument("--stage", required=True, choices=("inversion", "lora"), help="the stage whose learning rate is swept")
    parser.add_argument("--lrs", required=True, type=parse_lrs, help="comma-separated learning rates")
    parser.add_argument("--steps", type=positive_int, default=1000, help="steps of the swept stage (the method's fixed budget)")
    parser.add_argument("--out", type=Path, default=Path("outputs/lr_sweep"),
                        help="folder of the runs, presets, logs and the lr_sweep_<stage> table and plots")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="preset override KEY=VALUE (nested keys with dots)")
    parser.add_argument("--with_plugin", default=None, help="also run every lr with [plugins.NAME] (e.g. pivot_locality)")
    parser.add_argument("--plugin_set", action="append", default=[], help="option of that plugin, KEY=VALUE")
    parser.add_argument("--save_every", type=int_at_least(0), default=0, help="save a resumable state every N steps (0 = off)")
    parser.add_argument("--shared_pivot", choices=("on", "off"), default="on",
                        help="lora sweeps: train the pivot once and start every run from it (on), or repeat it per run (off)")
    parser.add_argument("--training_seeds", type=positive_int, default=1,
                        help="train every (lr, variant) point this many times, with the preset's seed + 0..N-1")
    parser.add_argument("--only_training_seed", type=int, default=None,
                        help="train (and report) only this one of the --training_seeds seeds (0..N-1)")
    parser.add_argument("--gpus", default="auto", help="auto (all visible CUDA devices when more than one), none, or a list 0,1")
    add_engine_arguments(parser)
    parser.add_argument("--no_train", action="store_true", help="only evaluate and plot the runs already finished")
    parser.add_argument("--no_evaluate", action="store_true", help="only train")
    parser.add_argument("--reevaluate", action="store_true", help="ignore cached evaluations")
    parser.add_argument("--clip_model_path", default=None, help="a LOCAL CLIPModel folder; without it, proxies are used")
    parser.add_argument("--n_seeds", type=positive_int, default=4, help="generations per prompt for the CLIP scores")
    parser.add_argument("--sample_steps", type=positive_int, default=25, help="DDIM steps of the generations")
    parser.add_argument("--guidance", type=finite_float_at_least(0), default=7.5,
                        help="classifier-free guidance scale of the generations (finite, >= 0)")
    parser.add_argument("--leakage", choices=("auto", "on", "off"), default="auto", help="auto: on for lora sweeps")
    parser.add_argument("--leakage_seeds", type=seed_count, default=8, help="sampling seeds per prompt of the leakage measurement")
    parser.add_argument("--leakage_prompts", nargs="+", default=None, help="neutral prompts of the leakage measurement")
    parser.add_argument("--leakage_edit_prompts", nargs="*", default=None, help="position-edit prompts of the leakage measurement")
    parser.add_argument("--max_images", type=positive_int, default=8, help="training images used by the proxies")
    parser.add_argument("--device", default=None, help="torch device of the evaluation (default: CUDA when available)")
    parser.add_argument("--fp16", action="store_true", help="evaluate in float16")
    parser.add_argument("--_evaluate_run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_out_folder(parser, args.out)
    args.leakage_on = args.leakage == "on" or (args.leakage == "auto" and args.stage == "lora")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Train and measure the sweep; the report's rows (a run that failed is reported FAILED and left out)."""
    return sweep(sys.argv[1:] if argv is None else argv)[0]


def cli(argv: list[str] | None = None) -> int:
    """The command: :func:`main`, exit status 1 when a run failed (after the others trained and were measured)."""
    failed = stoppable(lambda: sweep(sys.argv[1:] if argv is None else argv))[1]
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (see FAILED above; the same command "
              "retrains them and skips the finished ones)", file=sys.stderr, flush=True)
    return 1 if failed else 0


def sweep(argv: list[str]) -> tuple[list[dict], list[str]]:
    """The report's rows and the names of the runs that failed."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    try:
        raw = apply_overrides(load_preset_dict(args.preset), {}, args.sets)
        pivots, specs = plan_sweep(args, raw)
    except ConfigError as exc:
        raise usage_exit(str(exc)) from exc
    if args._evaluate_run:  # a worker process: evaluate one run and exit
        evaluate_one({s.name: s for s in specs}[args._evaluate_run], args)
        return [], []
    engine = engine_from_args(args, visible_gpus(args.gpus))
    print(f"{args.stage} sweep: {len(specs)} runs of {args.steps} steps in {args.out}; {engine.describe()}"
          + (f"; shared pivot from {', '.join(str(p.run_dir) for p in pivots.values())}" if pivots else ""), flush=True)
    failed = [] if args.no_train else train_sweep(list(pivots.values()), specs, engine, args.out / "logs")
    if args.no_evaluate:
        return [], failed
    results = evaluate_runs(specs, args, argv, engine)
    return write_report(specs, pivots, results, eval_settings(args), args), failed


if __name__ == "__main__":
    if code := cli():  # exit 0 by returning (scripts run in-process, runpy, are not stopped)
        sys.exit(code)
