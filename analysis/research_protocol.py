#!/usr/bin/env python
"""The research protocol's training on the toy world, resumable.

    OMP_NUM_THREADS=1 python analysis/research_protocol.py h1 [--out outputs/protocol] [--seeds 42,1,2] [--no_vectors]
    OMP_NUM_THREADS=1 python analysis/research_protocol.py h2 [--out outputs/protocol] [--seeds 42,1,2] [--wait 3600] [--save_every 10]
    OMP_NUM_THREADS=1 python analysis/research_protocol.py h3 [--out outputs/protocol] [--seeds 42,1,2] [--wait 3600]
    python analysis/research_protocol.py report [--out outputs/protocol] [--results analysis/results/research_protocol]

``h1``: the inversion grid of :mod:`pti_plugin.protocol.h1_inversion` (training seeds ``--seeds``;
``--no_vectors`` leaves the 2- and 4-vector cells for later), into ``OUT/h1``.
``h2``: the LoRA runs of :mod:`pti_plugin.protocol.h2_runs` from each seed's H1 pivot at
``--pivot_lr`` (waiting up to ``--wait`` seconds for a pivot another process trains), into ``OUT/h2``;
``--save_every`` / ``--dense_until``: how often every rate's runs save, and up to which step their curves score
every save (default: :meth:`~pti_plugin.protocol.h2_runs.H2Settings.schedule`, finer for 3e-3).
``h3``: the LoRA variants of :mod:`pti_plugin.protocol.h3_variants` (none, pivot locality at half
the angle / uniform over half of it / the class endpoint, kohya reg images; each on a weight grid)
from each seed's H1 pivot at ``--pivot_lr``, into ``OUT/h3``.
``all``: h1, h2, the learning curves of each H2 rate, h3 and the report, in that order (with
``--quick``: the whole protocol reduced, for the tests).
``report``: the statistics and the report (:mod:`pti_plugin.protocol.protocol_report`) of what
is measured so far, into ``--results``: H1 from the cells' parts, H2 from ``OUT/h2/curves-lr<lr>/
learning_curves.json`` (``analysis/learning_curves.py`` on each learning rate's runs).
Two processes with disjoint ``--seeds`` share the work on two cores; seeds outside a part's default
(42, 1, 2) add training seeds (``h1 --seeds 3 --lrs 2.75e-5 --no_vectors`` trains seed 3's pivot,
then ``h3 --seeds 3`` its LoRA cells). ``--quick``: a few steps
(plumbing). ``--model``: a diffusers folder (default: the embedded toy world).
Ctrl-C or SIGTERM: a cell's training run saves its state, the script stops with one line (exit 128 + the
signal), and the same command continues the run from that state (:func:`pti_plugin.protocol.premise.train_run`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for a clone without install

from pti_plugin.script_args import (argument_parser, check_out_folder, finite_float, finite_float_at_least,  # noqa: E402
                                    number_list, positive_finite, positive_int, sd15_folder_problem)
from pti_plugin.toy_world.world import IMAGE_SIZE  # noqa: E402

BENCH_PRESET = Path(__file__).resolve().parents[1] / "presets" / "research_bench.toml"


def parse_args(argv):
    parser = argument_parser(description=__doc__.split("\n")[0])
    defaults = settings_defaults()  # the help's, from the parts' settings
    parser.add_argument("part", choices=("h1", "h2", "h3", "report", "all"),
                        help="the part to run (report: the statistics and the report, into --results)")
    parser.add_argument("--results", type=Path, default=Path("analysis/results/research_protocol"),
                        help="report: where it is written; h1, h3: the cells its cell archives hold are not trained again")
    parser.add_argument("--draws", type=positive_int, default=2000, help="report: bootstrap draws")
    parser.add_argument("--out", type=Path, default=Path("outputs/protocol"),
                        help="the protocol's working folder: each part's runs and cached cells (OUT/h1, OUT/h2, OUT/h3)")
    parser.add_argument("--model", type=Path, default=None, help="diffusers folder (default: the embedded toy world)")
    parser.add_argument("--seeds", default=None, help="training seeds to run, comma-separated; seeds outside the "
                                                       f"part's add seeds (default: {defaults['seeds']})")
    parser.add_argument("--no_vectors", action="store_true", help="h1: only the 1-vector grid")
    parser.add_argument("--pivot_lr", type=positive_number, default=2.75e-5,
                        help="h2, h3: the H1 learning rate whose pivot LoRAs start from (h1 always trains those cells)")
    parser.add_argument("--wait", type=finite_float_at_least(0), default=0.0,
                        help="h2, h3: seconds to wait for a missing pivot (0: do not wait)")
    parser.add_argument("--save_every", type=positive_int, default=None,
                        help=f"h2, all: the LoRA runs save every N steps (default: {defaults['save_every']})")
    parser.add_argument("--dense_until", type=positive_int, default=None,
                        help=f"all: the learning curves score every save up to this step (default: {defaults['dense_until']})")
    parser.add_argument("--lrs", default=None, help="learning rates of the part's grid, comma-separated (default: "
                                                     f"{defaults['lrs']})")
    parser.add_argument("--variants", default=None, help=f"h3: variants, comma-separated (default: {defaults['variants']})")
    parser.add_argument("--weights", action="append", default=[], metavar="VARIANT=W1,W2",
                        help=f"h3: one variant's weight grid (repeatable; default: {defaults['weights']})")
    parser.add_argument("--quick", action="store_true",
                        help="the whole protocol reduced to a few steps and seeds (plumbing, the tests)")
    args = parser.parse_args(argv)
    if args.model is not None and (problem := sd15_folder_problem(args.model, IMAGE_SIZE)):
        parser.error(f"--model {args.model}: {problem}")
    check_out_folder(parser, args.out)
    if args.part == "report":
        check_out_folder(parser, args.results, "--results")
    return args


def settings_defaults() -> dict[str, str]:
    """The defaults ``--help`` shows for the flags that default to each part's settings (H1Settings, H2Settings,
    H3Settings; ``--quick``'s own are smaller)."""
    from pti_plugin.protocol.h1_inversion import H1Settings
    from pti_plugin.protocol.h2_runs import H2Settings
    from pti_plugin.protocol.h3_variants import H3Settings

    h1, h2, h3 = H1Settings(), H2Settings(), H3Settings()
    listed = lambda values: ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)  # noqa: E731
    fine = " or ".join(f"{lr:g}" for lr in h2.fine_lrs)
    at_fine = lambda value: f", {value} at lr {fine}" if fine else ""  # noqa: E731
    seeds = {name: listed(h.training_seeds) for name, h in (("h1", h1), ("h2", h2), ("h3", h3))}
    return {"save_every": f"{h2.save_every_n_steps}{at_fine(h2.fine_save_every)}",
            "dense_until": f"{h2.dense_until}{at_fine(h2.fine_dense_until)}",
            "seeds": (next(iter(seeds.values())) if len(set(seeds.values())) == 1
                      else "; ".join(f"{k}: {v}" for k, v in seeds.items())),
            "lrs": f"h1 (inversion): {listed(h1.inversion_lrs)}; h2 (LoRA): {listed(h2.lora_lrs)}; "
                   f"h3 (LoRA): {listed(h3.lora_lrs)}",
            "variants": listed(h3.variants),
            "weights": "; ".join(f"{v}={listed(w)}" for v, w in h3.weights.items() if v != "none")}


def positive_number(text: str) -> float:
    """An argparse type: a positive finite number (``--pivot_lr``: 0, a negative rate, ``nan`` and ``inf`` are refused,
    as :func:`float_list` refuses them in ``--lrs``)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def float_list(text: str, flag: str) -> tuple[float, ...]:
    """``text``'s comma-separated positive finite numbers (learning rates, weights), sorted without repeats (a repeat
    would list its cells twice); anything else exits naming ``flag``."""
    try:
        return tuple(sorted(set(positive_finite(number_list(text)))))
    except ValueError as exc:
        raise SystemExit(f"error: {flag}: {exc}") from None


def seed_list(text: str) -> tuple[int, ...]:
    """``text``'s comma-separated training seeds (integers >= 0); anything else exits naming ``--seeds``."""
    try:
        seeds = number_list(text, int)
    except ValueError as exc:
        raise SystemExit(f"error: --seeds: {exc}") from None
    if bad := [s for s in seeds if s < 0]:
        raise SystemExit(f"error: --seeds takes integers >= 0, got {', '.join(map(str, bad))}")
    return seeds


def h3_settings(args):
    """H3's grid from the flags (``--lrs``, ``--variants``, ``--weights VARIANT=W1,W2``)."""
    from pti_plugin.protocol.h3_variants import VARIANTS, H3Settings

    h3 = H3Settings.quick() if args.quick else dataclasses.replace(H3Settings(), pivot_lr=args.pivot_lr)
    if args.lrs:
        h3 = dataclasses.replace(h3, lora_lrs=float_list(args.lrs, "--lrs"))
    if args.seeds:
        h3 = dataclasses.replace(h3, training_seeds=seed_list(args.seeds))
    if args.variants:
        h3 = dataclasses.replace(h3, variants=tuple(v.strip() for v in args.variants.split(",")))
    weights = dict(h3.weights)
    for item in args.weights:
        variant, _, values = item.partition("=")
        if variant not in VARIANTS or variant == "none" or not values:
            raise SystemExit(f"error: --weights {item!r}: expected VARIANT=W1,W2 with VARIANT among "
                             f"{[v for v in VARIANTS if v != 'none']}")
        weights[variant] = float_list(values, f"--weights {variant}")
    unknown = [v for v in h3.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: --variants: unknown {unknown}; choose among {list(VARIANTS)}")
    return dataclasses.replace(h3, weights=weights)


def h2_settings(args):
    """H2's grid and save schedule from the flags (``--seeds``, ``--lrs``, ``--save_every``, ``--dense_until``)."""
    from pti_plugin.protocol.h2_runs import H2Settings

    h2 = H2Settings.quick() if args.quick else H2Settings()
    if args.seeds:
        h2 = dataclasses.replace(h2, training_seeds=seed_list(args.seeds))
    if args.lrs:
        h2 = dataclasses.replace(h2, lora_lrs=float_list(args.lrs, "--lrs"))
    for flag, field in (("save_every", "save_every_n_steps"), ("dense_until", "dense_until")):
        value = getattr(args, flag)
        if value is not None:  # >= 1 (parse_args)
            h2 = dataclasses.replace(h2, **{field: value}, fine_lrs=())  # a schedule asked for holds for every rate
    return h2


def run_all(args, argv: list[str]) -> None:
    """Every part in order: h1, h2, the learning curves of each H2 learning rate, h3, the report."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import learning_curves

    from pti_plugin.protocol.h2_runs import h2_runs_saved_as

    h2 = h2_settings(args)
    rest = [a for a in argv if a != "all"]
    for part in ("h1", "h2"):
        main([part, *rest])
    sampling = ["--seeds", "2", "--steps", "2"] if args.quick else []
    for lr in h2.lora_lrs:
        runs = [str(r) for r in h2_runs_saved_as(args.out / "h2", lr, h2)]
        scoring = h2.schedule(lr).learning_curves_args()
        learning_curves.main([*runs, *sampling, *scoring, "--out", str(args.out / "h2" / f"curves-lr{lr:g}")])
    for part in ("h3", "report"):
        main([part, *rest])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from pti_plugin.protocol.premise import stops_cleanly

    with stops_cleanly():  # a stop signal: one line ("run the same command again"), exit 128 + signal, no traceback
        if args.part == "all":
            run_all(args, argv)
        else:
            run_part(args)


def run_part(args) -> None:
    """One part (h1, h2, h3, report) as ``args`` say."""
    import toml
    import torch

    from pti_plugin.embedded_default import default_model_dir
    from pti_plugin.protocol.h1_inversion import H1Settings, pivot_file, run_h1
    from pti_plugin.protocol.h2_runs import train_h2_runs

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = args.model or Path(default_model_dir())
    base = toml.load(BENCH_PRESET)
    h1 = H1Settings.quick() if args.quick else H1Settings()
    pivot_lr = h1.inversion_lrs[0] if args.quick else args.pivot_lr  # the H1 cells H2 and H3 start from
    seeds = seed_list(args.seeds) if args.seeds else None
    if args.part == "report":
        from pti_plugin.protocol.protocol_sections import write_protocol_report

        page = write_protocol_report(args.out, args.results, h1, args.draws, pivot_lr)
        print(f"wrote {page}")
        return
    if args.part == "h1":
        from pti_plugin.protocol.cell_archive import H1_ARCHIVE

        if args.lrs:
            h1 = dataclasses.replace(h1, inversion_lrs=float_list(args.lrs, "--lrs"))
        if args.no_vectors:
            h1 = dataclasses.replace(h1, vector_counts=())
        if seeds is not None:
            h1 = dataclasses.replace(h1, training_seeds=seeds)
        cells = run_h1(model, args.out / "h1", base, h1, archive=args.results / H1_ARCHIVE, pivot_lr=pivot_lr)
        print(f"h1: {len(cells)} cells in {args.out / 'h1'}")
        return
    if args.part == "h3":
        from pti_plugin.protocol.cell_archive import H3_ARCHIVE
        from pti_plugin.protocol.h3_variants import run_h3

        h3 = h3_settings(args)
        try:
            cells = run_h3(model, args.out / "h3", base, h3, h1_out=args.out / "h1",
                           wait_seconds=args.wait, archive=args.results / H3_ARCHIVE)
        except FileNotFoundError as error:  # a missing pivot (wait_for)
            raise SystemExit(f"error: {error}") from None
        print(f"h3: {len(cells)} cells in {args.out / 'h3'}")
        return
    h2 = h2_settings(args)
    pivots = {s: pivot_file(model, args.out / "h1", base, h1, pivot_lr, s) for s in h2.training_seeds}
    try:
        runs = train_h2_runs(model, args.out / "h2", base, pivots, h1.init_word, h2, wait_seconds=args.wait)
    except FileNotFoundError as error:  # a missing pivot (wait_for)
        raise SystemExit(f"error: {error}") from None
    print(f"h2: {sum(map(len, runs.values()))} runs in {args.out / 'h2'}")


if __name__ == "__main__":
    main()
