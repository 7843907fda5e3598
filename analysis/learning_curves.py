#!/usr/bin/env python
"""LoRA learning curves on the toy world (hypothesis H2: appearance is learned before position).

Scores every saved checkpoint of each run (:func:`pti_plugin.protocol.curve_scores.score_checkpoints`,
cached in each run's folder) and summarises the runs as training seeds of one condition
(:func:`~pti_plugin.protocol.curve_scores.h2_summary`)::

    OMP_NUM_THREADS=1 python analysis/learning_curves.py RUN_DIR [RUN_DIR ...] [--seeds 64] [--steps 25]
        [--guidance 3] [--dense_until 0] [--score_every 1] [--score_every_until N:M ...] [--out DIR]

Runs must be toy-world runs (a toy-world model's, generating the toy world's 32 px scenes, which its detectors read;
a real SD1.5 or SDXL model's run, even one trained at 32 px, or a run drawn at another size is refused before any
scoring: :func:`~pti_plugin.toy_world.run_checks.toy_world_problem`) trained with ``save_every_n_steps``
(the same value for all). ``--dense_until M
--score_every N`` scores every save up to LoRA step M and past it only those at multiples of N (the
final save always), so runs saved often score densely where appearance moves and sparsely after;
``--score_every_until N:M`` (repeatable) adds the saves at multiples of N up to step M. Prints one line per run and
a last line ``t_app=<f> t_pos=<f> ratio=<f> ratio_lo=<f> ratio_hi=<f> t_app_before_first_save=<n>
ratio_at_least=<f> ratio_at_least_lo=<f> ratio_at_least_hi=<f>`` (mean half-way steps of appearance and
position, the geometric mean of T_pos / T_app with its interval, and the same with each T_app taken as
at least the first save, for the n runs whose appearance crossed half-way before it: H2 holds where
ratio_at_least_lo > 1); writes ``learning_curves.json`` and ``learning_curves.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for a clone without install

from pti_plugin.atomic_io import atomic_write_text  # noqa: E402
from pti_plugin.script_args import argument_parser, check_out_folder, device, finite_float_at_least, positive_int  # noqa: E402
from pti_plugin.toy_world.recipe_config import GUIDANCE, SAMPLE_STEPS  # noqa: E402


def positive_or_zero(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"need a whole number of steps, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"need 0 or more steps, got {text!r}")
    return value


def positive(text: str) -> int:
    value = positive_or_zero(text)
    if value == 0:
        raise argparse.ArgumentTypeError("need 1 or more steps, got 0")
    return value


def tier(text: str) -> tuple[int, int]:
    every, _, until = text.partition(":")
    try:
        return positive(every), positive(until)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"need N:M (score multiples of N up to step M), got {text!r}: {exc}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (training output_dir), one per training seed")
    parser.add_argument("--seeds", type=positive_int, default=64, help="sampling seeds 0..N-1 per prompt and checkpoint")
    parser.add_argument("--steps", type=positive_int, default=SAMPLE_STEPS, help="DDIM steps per generation")
    parser.add_argument("--guidance", type=finite_float_at_least(0), default=GUIDANCE,
                        help="classifier-free guidance scale (finite, >= 0)")
    parser.add_argument("--dense_until", type=positive_or_zero, default=0,
                        help="score every save up to this LoRA-stage step (default 0)")
    parser.add_argument("--score_every", type=positive, default=1,
                        help="past --dense_until, score the saves at multiples of this many steps (default 1: all)")
    parser.add_argument("--score_every_until", type=tier, action="append", default=[], metavar="N:M",
                        help="also score the saves at multiples of N up to step M (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("outputs/learning_curves"), help="folder of the json and plot")
    parser.add_argument("--device", type=device, default=None, help="torch device (default: CUDA when available)")
    args = parser.parse_args(argv)
    seen: dict[Path, Path] = {}
    for run in args.runs:
        if run.exists() and not run.is_dir():
            parser.error(f"run {run}: not a folder (a training output_dir)")
        key = run.expanduser().resolve()
        if key in seen:
            also = f" (also as {seen[key]})" if str(seen[key]) != str(run) else ""
            parser.error(f"run {run} given twice{also}: each run counts as one training seed")
        seen[key] = run
    check_out_folder(parser, args.out)
    from pti_plugin.protocol.curve_scores import check_run

    for run in args.runs:  # every run checked before any is scored, by score_checkpoints' own rule
        try:
            check_run(run)
        except (FileNotFoundError, ValueError) as exc:  # missing folder, no run, no intermediate saves, not toy-world
            parser.error(str(exc))
    return args


def _f(value) -> str:
    return "nan" if value is None else f"{value:.4g}"


def plot(summary: dict, path: Path) -> None:
    """Appearance and training-cell fraction against LoRA-stage step: each run thin, the mean with its band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = summary["steps"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, colour, label in (("appearance", "tab:blue", "appearance (character found)"),
                               ("position", "tab:red", "position (object in a training cell)")):
        for curve in summary[key]["per_run"]:
            ax.plot(x, [float("nan") if v is None else v for v in curve], color=colour, alpha=0.3, linewidth=0.8)
        mean = [m or {"estimate": None, "lo": None, "hi": None} for m in summary[key]["mean"]]
        column = {k: [float("nan") if m[k] is None else m[k] for m in mean] for k in ("estimate", "lo", "hi")}
        ax.plot(x, column["estimate"], "o-", color=colour, label=label)
        ax.fill_between(x, column["lo"], column["hi"], color=colour, alpha=0.2)
    ratio = summary["steps_ratio"]["ratio"] or {}
    ax.set_xlabel("LoRA-stage step")
    ax.set_ylabel("fraction of neutral generations")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{summary['n_runs']} run(s); T_pos / T_app = {_f(ratio.get('estimate'))} "
                 f"[{_f(ratio.get('lo'))}, {_f(ratio.get('hi'))}]", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from pti_plugin.protocol.curve_scores import h2_summary, score_checkpoints, scored_steps

    args = parse_args(argv)
    seeds = list(range(args.seeds))
    scored = scored_steps(args.dense_until, args.score_every, tuple(args.score_every_until))
    runs = [score_checkpoints(run_dir, seeds, args.steps, args.guidance, device=args.device,
                              log=lambda message: print(message, flush=True), scored=scored) for run_dir in args.runs]
    try:
        summary = h2_summary(runs)
    except ValueError as exc:  # runs saved at different steps
        raise SystemExit(f"error: {exc}") from exc
    times = summary["steps_ratio"]
    for k, run in enumerate(runs):
        print(f"{run['run_dir']}: points={len(run['steps'])} "
              f"coarse_final={_f(summary['appearance']['per_run'][k][-1])} "
              f"cell_final={_f(summary['position']['per_run'][k][-1])} t_app={_f(times['t_app'][k])} "
              f"t_pos={_f(times['t_pos'][k])} ratio={_f(times['ratios'][k])}")
    ratio = summary["steps_ratio"]["ratio"] or {}
    bounded = summary["steps_ratio_from_first_save"]
    at_least = bounded["ratio"] or {}
    print(f"t_app={_f(summary['t_app_mean'])} t_pos={_f(summary['t_pos_mean'])} ratio={_f(ratio.get('estimate'))} "
          f"ratio_lo={_f(ratio.get('lo'))} ratio_hi={_f(ratio.get('hi'))} "
          f"t_app_before_first_save={bounded['before_first_save']} ratio_at_least={_f(at_least.get('estimate'))} "
          f"ratio_at_least_lo={_f(at_least.get('lo'))} ratio_at_least_hi={_f(at_least.get('hi'))}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"settings": {"seeds": args.seeds, "steps": args.steps, "guidance": args.guidance,
                           "dense_until": args.dense_until, "score_every": args.score_every,
                           "score_every_until": [list(t) for t in args.score_every_until]},
              "runs": [str(r) for r in args.runs], "summary": summary}
    atomic_write_text(args.out / "learning_curves.json", json.dumps(record, indent=1) + "\n")
    plot(summary, args.out / "learning_curves.png")
    return record


if __name__ == "__main__":
    main()
