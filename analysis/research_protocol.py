#!/usr/bin/env python
"""The research protocol's training on the toy world (issue: research bench v2), resumable.

    OMP_NUM_THREADS=1 python analysis/research_protocol.py h1 [--out outputs/protocol] [--seeds 42,1,2] [--no_vectors]
    OMP_NUM_THREADS=1 python analysis/research_protocol.py h2 [--out outputs/protocol] [--seeds 42,1,2] [--wait 3600]
    OMP_NUM_THREADS=1 python analysis/research_protocol.py h3 [--out outputs/protocol] [--seeds 42,1,2] [--wait 3600]
    python analysis/research_protocol.py report [--out outputs/protocol] [--results analysis/results/research_protocol]

``h1``: the inversion grid of :mod:`pti_plugin.toy_world.h1_inversion` (training seeds ``--seeds``;
``--no_vectors`` leaves the 2- and 4-vector cells for later), into ``OUT/h1``.
``h2``: the LoRA runs of :mod:`pti_plugin.toy_world.h2_runs` from each seed's H1 pivot at
``--pivot_lr`` (waiting up to ``--wait`` seconds for a pivot another process trains), into ``OUT/h2``.
``h3``: the LoRA variants of :mod:`pti_plugin.toy_world.h3_variants` (none, pivot locality at half
the angle / uniform over half of it / the class endpoint, kohya reg images; each on a weight grid)
from each seed's H1 pivot at ``--pivot_lr``, into ``OUT/h3``.
``report``: the statistics and the report (:mod:`pti_plugin.toy_world.protocol_report`) of what
is measured so far, into ``--results``: H1 from the cells' parts, H2 from ``OUT/h2/curves-lr<lr>/
learning_curves.json`` (``analysis/learning_curves.py`` on each learning rate's runs).
Two processes with disjoint ``--seeds`` share the work on two cores. ``--quick``: a few steps
(plumbing). ``--model``: a diffusers folder (default: the embedded toy world).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for a clone without install

BENCH_PRESET = Path(__file__).resolve().parents[1] / "presets" / "research_bench.toml"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("h1", "h2", "h3", "report"))
    parser.add_argument("--results", type=Path, default=Path("analysis/results/research_protocol"))
    parser.add_argument("--draws", type=int, default=2000, help="report: bootstrap draws")
    parser.add_argument("--out", type=Path, default=Path("outputs/protocol"))
    parser.add_argument("--model", type=Path, default=None, help="diffusers folder (default: the embedded toy world)")
    parser.add_argument("--seeds", default=None, help="training seeds to run, comma-separated (default: all)")
    parser.add_argument("--no_vectors", action="store_true", help="h1: only the 1-vector grid")
    parser.add_argument("--pivot_lr", type=float, default=2.75e-5, help="h2: the H1 learning rate whose pivot LoRAs start from")
    parser.add_argument("--wait", type=float, default=0.0, help="h2: seconds to wait for a missing pivot")
    parser.add_argument("--quick", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import toml
    import torch

    from pti_plugin.embedded_default import default_model_dir
    from pti_plugin.toy_world.h1_inversion import H1Settings, pivot_file, run_h1
    from pti_plugin.toy_world.h2_runs import H2Settings, train_h2_runs

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = args.model or Path(default_model_dir())
    base = toml.load(BENCH_PRESET)
    h1 = H1Settings.quick() if args.quick else H1Settings()
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    if args.part == "report":
        page = write_protocol_report(args.out, args.results, h1, args.draws)
        print(f"wrote {page}")
        return
    if args.part == "h1":
        if args.no_vectors:
            h1 = dataclasses.replace(h1, vector_counts=())
        cells = run_h1(model, args.out / "h1", base, h1, only_seeds=seeds)
        print(f"h1: {len(cells)} cells in {args.out / 'h1'}")
        return
    if args.part == "h3":
        from pti_plugin.toy_world.h3_variants import H3Settings, run_h3

        h3 = H3Settings.quick() if args.quick else dataclasses.replace(H3Settings(), pivot_lr=args.pivot_lr)
        cells = run_h3(model, args.out / "h3", base, h3, only_seeds=seeds, h1_out=args.out / "h1",
                       wait_seconds=args.wait)
        print(f"h3: {len(cells)} cells in {args.out / 'h3'}")
        return
    h2 = H2Settings.quick() if args.quick else H2Settings()
    if seeds is not None:
        h2 = dataclasses.replace(h2, training_seeds=seeds)
    pivot_lr = h1.inversion_lrs[0] if args.quick else args.pivot_lr
    pivots = {s: pivot_file(model, args.out / "h1", base, h1, pivot_lr, s) for s in h2.training_seeds}
    runs = train_h2_runs(model, args.out / "h2", base, pivots, h1.init_word, h2, wait_seconds=args.wait)
    print(f"h2: {sum(map(len, runs.values()))} runs in {args.out / 'h2'}")


def write_protocol_report(out: Path, results: Path, h1, draws: int) -> Path:
    """The report of what ``out`` holds so far (see the module docstring)."""
    import json
    import shutil

    from pti_plugin.toy_world.h1_inversion import cell_name, load_cells
    from pti_plugin.toy_world.h1_summary import summarise_h1
    from pti_plugin.toy_world.protocol_report import h2_lines, write_h1_files, write_report

    null, cells = load_cells(out / "h1", h1)
    if not cells:
        raise SystemExit(f"error: no measured H1 cell under {out / 'h1'} (run the h1 part first)")
    summary = summarise_h1(null, cells, draws)
    sections = [{"title": "H1: reconstruction against editability along the inversion learning rate",
                 "lines": write_h1_files(results, summary), "figures": [("H1 curves", results / "h1.png")]}]
    grids = results / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    seed = h1.training_seeds[0]
    for lr in h1.inversion_lrs:
        source = out / "h1" / "parts" / f"{cell_name(lr, seed, 1)}.png"
        if source.is_file():
            shutil.copyfile(source, grids / source.name)
            sections[0]["figures"].append((f"inversion lr {lr:g}, training seed {seed}: 64 neutral images "
                                           "(4 rows) then 64 edit images (4 rows)", grids / source.name))
    records = {}
    for path in sorted((out / "h2").glob("curves-lr*/learning_curves.json"), key=lambda p: float(p.parent.name[9:])):
        records[path.parent.name[9:]] = json.loads(path.read_text())
        shutil.copyfile(path.with_suffix(".png"), results / f"h2_{path.parent.name}.png")
    if records:
        null_hi = (summary["null"] or {}).get("training_cells_a", {}).get("hi")
        sections.append({"title": "H2: appearance before position along LoRA training", "lines": h2_lines(records, null_hi),
                         "figures": [(f"LoRA lr {lr}", results / f"h2_curves-lr{lr}.png") for lr in records]})
    sections.append(h3_section(out, results, null, draws))
    return write_report(results, sections)


def h3_section(out: Path, results: Path, null: dict | None, draws: int) -> dict:
    """H3's section: its summary (``h3_summary.json``) when cells are measured, else what is missing."""
    import json

    from pti_plugin.atomic_io import atomic_write_text
    from pti_plugin.toy_world.h3_summary import summarise_h3
    from pti_plugin.toy_world.h3_variants import H3Settings, load_h3_cells

    settings = H3Settings()
    cells = load_h3_cells(out / "h3", settings)
    title = "H3: pivot locality against the other variants at matched reconstruction"
    if not cells:
        return {"title": title, "lines": [f"**Verdict: not measured.** None of the {len(settings.cells())} LoRA cells "
                                          "(variant x weight x lr x training seed) is measured yet "
                                          "(`analysis/research_protocol.py h3`)."]}
    summary = summarise_h3(null, cells, draws)
    atomic_write_text(results / "h3_summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    lines = [f"{len(cells)} of {len(settings.cells())} cells measured; the full summary is `h3_summary.json`.", "",
             "| variant | chosen weight | highest lr inside the null |", "| --- | --- | --- |"]
    for variant, record in summary["variants"].items():
        chosen, safe = record["chosen"] or {}, record["highest_safe_lr"] or {}
        lines.append(f"| {variant} | {chosen.get('weight')} | {safe.get('lr')} |")
    return {"title": title, "lines": lines}


if __name__ == "__main__":
    main()
