#!/usr/bin/env python
"""Is the character's private detail drawn to size? H3's cells re-read from their images (exploratory).

    OMP_NUM_THREADS=1 python analysis/detail_size.py --out outputs/protocol [--out OTHER ...] [--results DIR] [--draws 2000]

The detail (a white dot at the disc's centre) is the part of the look only the LoRA can learn, and on
toy world v2 it is learned over the same learning rates as position, so it is a candidate axis for
H3's matched-reconstruction comparison. But ``has_detail`` accepts any enclosed white centre, and LoRA
runs under pivot locality draw white holes several times the dot's size. For every H3 cell whose
images are in the working folder (``OUT/h3/parts/<cell>.npz``; the committed archive keeps no images)
this prints, per condition and learning rate, the share of neutral images with a detail, the share
with a *true-size* one (``has_true_size_detail``: at most ``DETAIL_MAX_WHITE_PIXELS`` near-white
pixels; the rendered dot covers 4-7), the median near-white area of the details found, and the
training-cell fraction, means over training seeds with a 95% bootstrap interval over
them (that table's intervals are over training seeds alone); then H3's secondary-axis table
(:mod:`pti_plugin.protocol.h3_detail_axis`) over the same cells, whose intervals are two-level.
A ``detail_size.json`` already in ``--results`` that holds cells this run cannot read (their images
stayed in the working folder that measured them) is not replaced unless ``--replace`` is given.
``--out`` may be given several times (an exploratory folder beside the protocol's: its ``h1`` the same
pivots); a cell in two folders is counted once. Where the cells hold a confirmatory test's condition on
its stated seeds (``CONFIRMATORY`` and ``CEILING_TEST`` in :mod:`pti_plugin.protocol.h3_detail_axis`,
stated in ``docs/method.md``), its verdict follows the table, two-level, with its small-sample check
(Student's t over the paired seeds) beside it. ``--results`` also writes ``detail_size.md``,
``.json`` and the secondary axis's plot (``h3_detail_axis.png``) there. Last line ``cells=<n>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for a clone without install

from pti_plugin.script_args import argument_parser, check_out_folder, positive_int  # noqa: E402


def parse_args(argv):
    parser = argument_parser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, action="append", default=None,
                        help="a protocol working folder (repeatable; default outputs/protocol)")
    parser.add_argument("--results", type=Path, default=None, help="also write detail_size.md and .json here")
    parser.add_argument("--draws", type=positive_int, default=2000, help="bootstrap resamples (>= 1)")
    parser.add_argument("--replace", action="store_true",
                        help="write --results even where its detail_size.json holds cells this run cannot read")
    args = parser.parse_args(argv)
    args.out = args.out or [Path("outputs/protocol")]
    check_out_folder(parser, args.results, "--results")
    args.previous_rows = None if args.results is None else previous_rows(parser, args.results / "detail_size.json")
    if missing := [str(out / "h3" / "parts") for out in args.out if not (out / "h3" / "parts").is_dir()]:
        parser.error(f"no H3 parts under {', '.join(missing)} (the --out of `research_protocol.py h3`)")
    return args


def previous_rows(parser: argparse.ArgumentParser, path: Path) -> list[dict] | None:
    """The rows of a ``detail_size.json`` already written (None: none there); ``parser.error`` naming the file
    when it is not such a table (a folder, not JSON, another shape)."""
    if not path.exists():
        return None
    why = None
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except IsADirectoryError:
        why = "a folder, not a file"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = f"cannot be read as JSON ({exc})"
    else:
        if not isinstance(rows, list) or not all(_is_row(r) for r in rows):
            why = "not a detail_size table (expected a list of rows with variant, weight, lr and a list of seeds)"
    if why:
        parser.error(f"--results {path}: {why}; move it away or give another --results")
    return rows


def _is_row(row) -> bool:
    """Whether ``row`` has the keys :func:`row_cells` reads, of the kinds it reads."""
    number = (int, float)
    return (isinstance(row, dict) and isinstance(row.get("variant"), str) and isinstance(row.get("lr"), number)
            and "weight" in row and (row["weight"] is None or isinstance(row["weight"], number))
            and isinstance(row.get("seeds"), list) and all(isinstance(seed, int) for seed in row["seeds"]))


def cell_figures(cell: dict) -> dict:
    """Shares of a cell's neutral images with a detail, with a true-size one, and in a training cell, from
    its :func:`~pti_plugin.protocol.h3_lines.image_readings`."""
    sizes = [p for p in cell["detail_pixels"] if p is not None]  # near-white pixels of each detail found
    n, in_cell = len(cell["detail_pixels"]), [v for v in cell["in_training_cell"] if v is not None]
    return {"detail": len(sizes) / n, "true_size_detail": sum(cell["true_size_detail"]) / n,
            "training_cells": sum(in_cell) / len(in_cell) if in_cell else float("nan"), "sizes": sizes}


def summarise(cells: list[dict], draws: int) -> list[dict]:
    """One row per (condition, learning rate) over the trained cells whose images were read: each figure's
    mean over training seeds with its interval."""
    import numpy as np

    from pti_plugin.metrics.replication import seed_level_interval

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cell in cells:
        if cell["lr"] > 0 and "detail_pixels" in cell:
            groups[cell["variant"], cell["weight"], cell["lr"]].append(cell_figures(cell) | {"seed": cell["seed"]})
    rows = []
    for (variant, weight, lr), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2])):
        sizes = [size for c in group for size in c["sizes"]]
        row = {"variant": variant, "weight": weight, "lr": lr, "seeds": sorted(c["seed"] for c in group),
               "median_detail_pixels": float(np.median(sizes)) if sizes else None}
        for name in ("detail", "true_size_detail", "training_cells"):
            row[name] = seed_level_interval(np.array([c[name] for c in group]), draws).to_dict()
        rows.append(row)
    return rows


def measured_cells(folders: list[Path]) -> tuple[dict | None, list[dict]]:
    """The first folder's null and every folder's H3 cells as the report reads them (each image read once;
    each seed's pivot as lr 0), the first folder's where two hold one."""
    from pti_plugin.protocol.cell_archive import h3_cell_id
    from pti_plugin.protocol.h1_inversion import H1Settings, load_cells
    from pti_plugin.protocol.h3_variants import H3Settings
    from pti_plugin.protocol.protocol_sections import measured_h3_cells

    pivot_lr, cells, null = H3Settings().pivot_lr, {}, None
    for folder in folders:
        folder_null, measured = measured_h3_cells(folder, load_cells(folder / "h1", H1Settings())[0], pivot_lr)
        null = null or folder_null
        for cell in measured:
            cells.setdefault(h3_cell_id(cell), cell)
    return null, list(cells.values())


def row_cells(rows: list[dict]) -> set[tuple]:
    """The (variant, weight, lr, seed) cells that :func:`summarise`'s ``rows`` are over."""
    return {(r["variant"], r["weight"], r["lr"], seed) for r in rows for seed in r["seeds"]}


def cells_only_in(previous: list[dict] | None, rows: list[dict]) -> list[tuple]:
    """The cells a written ``detail_size.json``'s rows ``previous`` cover and ``rows`` do not, sorted."""
    if not previous:
        return []
    return sorted(row_cells(previous) - row_cells(rows), key=lambda cell: (cell[0], cell[1] or 0.0, cell[2], cell[3]))


def table(rows: list[dict]) -> list[str]:
    def cell(interval: dict) -> str:
        return f"{interval['estimate']:.2f} [{interval['lo']:.2f}, {interval['hi']:.2f}]"

    lines = ["| condition | lr | training seeds | detail | true-size detail | median near-white pixels of a detail | training cells |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        label = r["variant"] if r["weight"] is None else f"{r['variant']} w{r['weight']:g}"
        size = "–" if r["median_detail_pixels"] is None else f"{r['median_detail_pixels']:g}"
        lines.append(f"| {label} | {r['lr']:g} | {len(r['seeds'])} | {cell(r['detail'])} | "
                     f"{cell(r['true_size_detail'])} | {size} | {cell(r['training_cells'])} |")
    return lines


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from pti_plugin.protocol.h3_detail_axis import (CEILING_RULE, CONFIRMATORY_RULE, ceiling_verdict,
                                                    confirmatory_verdict, detail_axis_lines, detail_axis_plot,
                                                    detail_axis_summary)

    null, cells = measured_cells(args.out)
    rows = summarise(cells, args.draws)
    axis = detail_axis_summary(null, cells, args.draws)
    lines = table(rows) + [""] + detail_axis_lines(axis)
    verdicts = {"Confirmatory test": (CONFIRMATORY_RULE, confirmatory_verdict(cells, args.draws)),
                "Second confirmatory test": (CEILING_RULE, ceiling_verdict(cells, args.draws))}
    for name, (rule, verdict) in verdicts.items():
        if verdict is not None:
            lines += ["", f"**{name}** ({rule}): {verdict}."]
    print("\n".join(lines))
    lost = [] if args.results is None or args.replace else cells_only_in(args.previous_rows, rows)
    if lost:
        raise SystemExit(f"error: {args.results / 'detail_size.json'} not replaced: it holds {len(lost)} cells "
                         f"this run cannot read (first: {lost[0]}), whose images stayed in the working folder that "
                         "measured them; add that folder with --out, write to another --results, or pass --replace")
    if args.results is not None:
        from pti_plugin.atomic_io import atomic_write_text

        args.results.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.results / "detail_size.json", json.dumps(rows, indent=1) + "\n")
        atomic_write_text(args.results / "detail_size.md", "\n".join(lines) + "\n")
        if axis["conditions"]:
            detail_axis_plot(axis, args.results / "h3_detail_axis.png",
                             "; ".join(f"{name}, stated before its runs: {v}" for name, (_, v) in verdicts.items() if v is not None) or None)
    print(f"cells={sum(len(r['seeds']) for r in rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
