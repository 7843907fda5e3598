#!/usr/bin/env python
"""Rank correlation of the model-internal metrics with the toy world's ground truth, over finished toy-world runs only.

    OMP_NUM_THREADS=1 python analysis/internal_metrics.py RUNS_FOLDER [RUNS_FOLDER ...] [--out DIR]
        [--seeds 16] [--sample_steps 25] [--guidance 3] [--max_images 8] [--output_name premise]
        [--shard K/N] [--score_only | --cached_only] [--band 780,930 | --no_band] [--layers] [--parts DIR] [--draws 2000]
        [--layers_only]

Scores every finished run under the folders (e.g. ``outputs/protocol/h3/runs``) with the research
bench's scorer, cached beside each run, so an interrupted call continues and ``--shard K/N`` splits
the scoring across processes (then one call without ``--shard`` gathers the cached scores;
``--cached_only`` summarises the runs scored so far and computes nothing). ``--band LOW,HIGH``: the
band versions of the attention leakage (heatmaps from the sampler steps in that timestep range; default
the toy world's position band), cached in ``<run>/attention_band.json``; ``--no_band`` skips them.
``--layers``: the versions from the cross-attention layers of one UNet resolution at a time (one more
sampling a run), cached in ``<run>/attention_layers.json``. ``--layers_only``: only those layer versions,
each run's all-layer ``attention_leakage`` taken from the same sampling (the scorer's figure again), and no
detector truth or proxies: about 25 CPU seconds a run instead of 2 minutes, for the layer comparison
against the independent truth.
``--parts``: the research protocol's H3 parts, for the independent ground truth (default: ``parts`` beside
the first runs folder, when there). An ``internal_metrics.json`` already in ``--out`` keeps its rows of runs
that are no longer under the folders (a lost working folder loses no score; ``--replace`` drops them).
Writes ``internal_metrics.json`` and ``internal_metrics.md`` into ``--out`` (see
:mod:`pti_plugin.protocol.internal_metrics`); the last line reads
``attention_leakage_spearman=<f> lo=<f> hi=<f> runs=<n>`` (against ``gt_leakage``).

Toy-world runs only: a run whose model is not a toy-world model, or whose generations are not the toy world's 32 px
scenes, is refused before anything is scored (exit 2), and so are folders without a finished run of
``--output_name`` and a ``--sample_steps`` none of whose sampler steps falls in ``--band``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for a clone without install

from pti_plugin.script_args import (argument_parser, device, finite_float_at_least, out_folder_problem,  # noqa: E402
                                    positive_int)
from pti_plugin.toy_world.recipe_config import GUIDANCE, SAMPLE_STEPS  # noqa: E402


def parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must read K/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= K < N")
    return k, n


def parse_band(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--band must read LOW,HIGH (e.g. 780,930), got {text!r}") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"--band {text}: need 0 <= LOW <= HIGH")
    return low, high


def parse_args(argv):
    parser = argument_parser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", type=Path, nargs="+", help="folders whose sub-folders are finished runs")
    parser.add_argument("--out", type=Path, default=Path("outputs/internal_metrics"))
    parser.add_argument("--seeds", type=positive_int, default=16, help="sampling seeds per prompt")
    parser.add_argument("--sample_steps", type=positive_int, default=SAMPLE_STEPS)
    parser.add_argument("--guidance", type=finite_float_at_least(0), default=GUIDANCE,
                        help="classifier-free guidance scale of the generations (a finite number >= 0)")
    parser.add_argument("--max_images", type=int, default=8, help="training images of the denoising probes")
    parser.add_argument("--output_name", default="premise", help="the runs' output name (<name>.safetensors)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1), help="score every N-th run from the K-th")
    parser.add_argument("--score_only", action="store_true", help="score (and cache), write no summary")
    parser.add_argument("--cached_only", action="store_true", help="summarise the runs already scored, score none")
    parser.add_argument("--band", type=parse_band, default=None,
                        help="LOW,HIGH timesteps of the band versions (default: the toy world's position band)")
    parser.add_argument("--parts", type=Path, default=None, help="H3 parts folder (independent ground truth)")
    parser.add_argument("--no_band", action="store_true", help="no band versions")
    parser.add_argument("--layers", action="store_true", help="also the versions from one UNet resolution's layers each")
    parser.add_argument("--layers_only", action="store_true",
                        help="score only the layer versions (the all-layer leakage from the same sampling), no detector truth")
    parser.add_argument("--draws", type=positive_int, default=2000, help="bootstrap resamples")
    parser.add_argument("--device", type=device, default="cpu")
    parser.add_argument("--rescore", action="store_true", help="ignore cached scores")
    parser.add_argument("--replace", action="store_true",
                        help="summarise only the runs under the folders (default: also keep the rows of --out's "
                             "internal_metrics.json for runs no longer there)")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.folders if not f.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    if args.score_only and args.cached_only:
        parser.error("--score_only and --cached_only together would do nothing")
    if problem := out_folder_problem(args.out):
        parser.error(f"--out {args.out}: {problem}")
    return args


def no_runs_message(folders: list[Path], output_name: str) -> str:
    """The usage error of folders without a finished run of ``--output_name``, naming the output names there are."""
    from pti_plugin.protocol.internal_metrics import output_names

    names = output_names(folders)
    there = (f"; the finished runs there are named {', '.join(names)}: pass --output_name {names[0]}" if names
             else "; no sub-folder there holds a finished run beside its <name>.config.toml")
    return (f"--output_name {output_name}: no finished run ({output_name}.safetensors) under "
            f"{', '.join(map(str, folders))}{there}")


def main(argv=None) -> int:
    from pti_plugin.atomic_io import atomic_write_text
    from pti_plugin.protocol.internal_metrics import (add_independent_truth, check_committed_seeds, compact_rows,
                                                      find_runs, layer_rows, layer_test_small_sample, layer_test_verdict,
                                                      runs_problem, score_runs, summarise, summary_lines,
                                                      with_committed_rows)
    from pti_plugin.sweeps.usage import usage_exit

    args = parse_args(argv)
    runs = find_runs(args.folders, args.output_name)
    if not runs:
        raise usage_exit(no_runs_message(args.folders, args.output_name))
    from pti_plugin.protocol.h3_variants import POSITION_BAND

    band = None if args.no_band else (args.band or tuple(POSITION_BAND))
    if not args.cached_only and (problem := runs_problem(runs, args.output_name, args.sample_steps,
                                                         None if args.layers_only else band, args.band is None)):
        raise usage_exit(problem)  # before any model loads: minutes of sampling used to end in a traceback
    committed = args.out / "internal_metrics.json"
    earlier = json.loads(committed.read_text()) if committed.is_file() and not args.replace else None
    if earlier is not None:  # refuse a mix of sampling settings before scoring anything
        check_committed_seeds(earlier, args.seeds)
    if args.layers_only:
        rows = layer_rows(runs, args, args.shard, cached_only=args.cached_only)
    else:
        rows = score_runs(runs, args.output_name, args, args.shard, cached_only=args.cached_only, band=band,
                          layers=args.layers)
    if args.score_only:
        return 0
    parts = args.parts or args.folders[0].parent / "parts"
    if parts.is_dir():
        add_independent_truth(rows, parts)
    rows, folders = compact_rows(rows), [str(f) for f in args.folders]
    if earlier is not None:  # runs scored earlier whose folders are gone stay in
        rows, folders, kept = with_committed_rows(rows, folders, earlier)
        if kept:
            print(f"kept {kept} runs scored earlier from {committed} (not under {', '.join(map(str, args.folders))}; "
                  "--replace drops them)")
    summary = summarise(rows, args.draws) | {"folders": folders, "seeds": args.seeds, "rows": rows}
    if args.layers_only:
        summary["layers_only"] = True  # the report names how these runs were scored
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "internal_metrics.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(args.out / "internal_metrics.md", "\n".join(summary_lines(summary)) + "\n")
    layer_test = layer_test_verdict(summary)
    if layer_test is not None:
        print(f"layer test: {layer_test}")
        check = layer_test_small_sample(summary)
        if check is not None:
            print(f"layer test, small-sample check: {check}")
    main_pair = next(c for c in summary["correlations"]
                     if (c["internal"], c["ground_truth"]) == ("attention_leakage", "gt_leakage"))
    print(f"attention_leakage_spearman={main_pair['spearman']:.3f} lo={main_pair['spearman_lo']:.3f} "
          f"hi={main_pair['spearman_hi']:.3f} runs={summary['runs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
