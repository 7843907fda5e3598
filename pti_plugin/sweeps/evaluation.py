"""The evaluation of a sweep's runs, cached per run folder (``sweep_eval.json``) under the evaluation settings.

A cached evaluation is reused only when the settings it was computed with equal today's (bump
:data:`EVAL_VERSION` when the evaluation changes meaning).
"""

from __future__ import annotations

import json
import sys
import time
import traceback

from pti_plugin.atomic_io import atomic_write_text
from pti_plugin.settings_cache import read_cache
from pti_plugin.sweeps.plan import RunSpec

EVAL_FILE = "sweep_eval.json"
#: Bump when the evaluation changes meaning, so that cached evaluations are recomputed. 2: ``leakage_score`` is the
#: neutral prompts' heatmap score (was neutral + edit prompts, now ``heatmap_all_leakage_score``).
EVAL_VERSION = 2


def eval_settings(args) -> dict:
    return {
        "version": EVAL_VERSION, "clip_model_path": str(args.clip_model_path or ""), "n_seeds": args.n_seeds,
        "sample_steps": args.sample_steps, "guidance": args.guidance, "leakage": args.leakage_on,
        "leakage_seeds": args.leakage_seeds, "leakage_prompts": args.leakage_prompts,
        "leakage_edit_prompts": args.leakage_edit_prompts, "max_images": args.max_images, "fp16": args.fp16,
    }


def cached_evaluation(spec: RunSpec, settings: dict) -> dict | None:
    return read_cache(spec.run_dir / EVAL_FILE, settings, "metrics")


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




def evaluate_command(argv: list[str], name: str) -> list[str]:
    """The command line of a worker process that evaluates the run ``name`` of the sweep ``argv``."""
    return [sys.executable, "-m", "pti_plugin.sweeps.lr_sweep", *argv, "--_evaluate_run", name]


def evaluate_runs(specs: list[RunSpec], args, argv: list[str], engine) -> dict[str, dict]:
    """Metrics of every finished run by name: cached ones reused, the others computed (one job per run on
    ``engine``, or here, one after the other); a failed evaluation is reported and left out."""
    settings = eval_settings(args)
    results, to_eval = {}, []
    for spec in specs:
        if not spec.finished:
            continue
        cached = None if args.reevaluate else cached_evaluation(spec, settings)
        if cached is not None:
            print(f"evaluation of {spec.name}: cached", flush=True)
            results[spec.name] = cached
        else:
            to_eval.append(spec)
    if not engine.in_process:
        engine.run([(s.name, evaluate_command(argv, s.name), args.out / "logs" / f"{s.name}.eval.log") for s in to_eval])
        for spec in to_eval:
            if (metrics := cached_evaluation(spec, settings)) is not None:
                results[spec.name] = metrics
            else:
                print(f"FAILED evaluation of {spec.name} (see {args.out / 'logs' / (spec.name + '.eval.log')})", flush=True)
        return results
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
    return results
