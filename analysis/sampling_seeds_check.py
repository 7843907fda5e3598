"""Does scoring runs with more sampling seeds let the model-internal metrics track leakage better?

    python analysis/sampling_seeds_check.py FEWER/internal_metrics.json MORE/internal_metrics.json --out DIR

Both files are ``analysis/internal_metrics.py`` summaries of the same runs scored with different
``--seeds`` (e.g. 16 and 64 sampling seeds a prompt). For the runs in both, every leakage version
either file has, against the same generations' ground truth (``gt_leakage``) and against H3's
independent training-cell fraction (``h3_training_cell_fraction``, which does not change with the
scorer's seeds), plus the ceiling (the scorer's own ground truth against the independent one): Spearman's
rho with fewer and with more seeds, and their difference with a 95% bootstrap interval over the runs
(the same runs resampled on both sides: :func:`pti_plugin.metrics.correlation.paired_spearman_difference`).
Writes ``sampling_seeds.md`` and ``.json`` to ``--out``; the last line printed reads
``attention_leakage_vs_independent Spearman rho: fewer=<f> (<n> seeds) more=<f> (<n> seeds) difference=<f> 95% lo=<f>
hi=<f> runs=<n>`` (rho with each file's sampling seeds a prompt; the difference, more minus fewer, with its 95%
bootstrap interval over the runs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pti_plugin.script_args import argument_parser, out_folder_problem, positive_int  # noqa: E402
from pti_plugin.protocol.internal_metrics import INDEPENDENT, LEAKAGE_TRUTHS, LEAKAGE_VERSIONS  # noqa: E402

SAME_GENERATIONS = LEAKAGE_TRUTHS[0]  # gt_leakage
#: The scorer's two ground truths against the independent one (the ceiling any metric could reach).
CEILINGS = tuple((truth, INDEPENDENT) for truth in LEAKAGE_TRUTHS[:2])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fewer", type=Path, help="internal_metrics.json scored with fewer sampling seeds")
    parser.add_argument("more", type=Path, help="internal_metrics.json of the same runs, more sampling seeds")
    parser.add_argument("--out", type=Path, required=True, help="folder of sampling_seeds.md and .json")
    parser.add_argument("--draws", type=positive_int, default=2000, help="bootstrap resamples")
    args = parser.parse_args(argv)
    missing = [str(p) for p in (args.fewer, args.more) if not p.is_file()]
    if missing:
        parser.error(f"not a file: {', '.join(missing)}")
    if problem := out_folder_problem(args.out):
        parser.error(f"--out {args.out}: {problem}")
    args.summaries = []  # the two files, read once here
    for path in (args.fewer, args.more):
        try:
            summary = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            parser.error(f"{path}: not JSON ({error})")
        if not isinstance(summary, dict) or not isinstance(summary.get("rows"), list):
            parser.error(f"{path}: not an internal_metrics.json (no 'rows' list)")
        args.summaries.append(summary)
    return args


def matched_rows(fewer: dict, more: dict) -> tuple[list[dict], list[dict]]:
    """The rows of the runs both summaries have, in the same order (``more``'s)."""
    fewer_by_run = {row["run"]: row for row in fewer["rows"]}
    shared = [row for row in more["rows"] if row["run"] in fewer_by_run]
    return [fewer_by_run[row["run"]] for row in shared], shared


def compared_pairs(fewer_rows: list[dict], more_rows: list[dict]) -> list[tuple[str, str]]:
    """The ceilings, then every leakage version both sides carry against both ground truths (a version only
    one side scored, e.g. the position-band ones left out with ``--no_band``, is skipped)."""
    def carried(rows: list[dict], version: str) -> bool:
        return any(row.get(version) is not None for row in rows)

    present = [v for v in LEAKAGE_VERSIONS if carried(fewer_rows, v) and carried(more_rows, v)]
    return [*CEILINGS, *((v, truth) for v in present for truth in (SAME_GENERATIONS, INDEPENDENT))]


def compare(fewer_rows: list[dict], more_rows: list[dict], draws: int) -> list[dict]:
    """One entry per :func:`compared_pairs` pair: rho with fewer and more seeds and the paired difference."""
    from pti_plugin.metrics.correlation import paired_spearman_difference

    def column(rows: list[dict], key: str) -> list:
        return [row.get(key) for row in rows]

    out = []
    for internal, truth in compared_pairs(fewer_rows, more_rows):
        result = paired_spearman_difference(column(fewer_rows, internal), column(fewer_rows, truth),
                                            column(more_rows, internal), column(more_rows, truth), draws=draws)
        out.append({"internal": internal, "ground_truth": truth} | result)
    return out


def _number(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.2f}".replace("-", "−")


def table_lines(entries: list[dict], seeds: tuple, runs: int) -> list[str]:
    few, many = seeds
    lines = [f"Spearman's rho over the {runs} runs both files score, with {few} and with {many} sampling seeds a "
             "prompt; difference: more minus fewer, 95% bootstrap interval over the runs (the same runs on "
             "both sides).", "",
             f"| internal metric | against | rho, {few} seeds | rho, {many} seeds | difference |",
             "| --- | --- | --- | --- | --- |"]
    for e in entries:
        lines.append(f"| {e['internal']} | {e['ground_truth']} | {_number(e['fewer'])} | {_number(e['more'])} | "
                     f"{_number(e['difference'])} [{_number(e['difference_lo'])}, {_number(e['difference_hi'])}] |")
    return lines


def main(argv=None) -> int:
    from pti_plugin.atomic_io import atomic_write_text

    args = parse_args(argv)
    fewer, more = args.summaries
    fewer_rows, more_rows = matched_rows(fewer, more)
    if len(fewer_rows) < 3:
        print(f"only {len(fewer_rows)} runs are in both {args.fewer} and {args.more}: nothing to compare")
        return 1
    entries = compare(fewer_rows, more_rows, args.draws)
    seeds = (fewer.get("seeds"), more.get("seeds"))
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"seeds": list(seeds), "runs": [row["run"] for row in more_rows], "entries": entries}
    atomic_write_text(args.out / "sampling_seeds.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(args.out / "sampling_seeds.md", "\n".join(table_lines(entries, seeds, len(more_rows))) + "\n")
    main_entry = next(e for e in entries if (e["internal"], e["ground_truth"]) == ("attention_leakage", INDEPENDENT))
    few, many = ("?" if count is None else count for count in seeds)
    print(f"attention_leakage_vs_independent Spearman rho: fewer={main_entry['fewer']:.3f} ({few} seeds) "
          f"more={main_entry['more']:.3f} ({many} seeds) difference={main_entry['difference']:.3f} "
          f"95% lo={main_entry['difference_lo']:.3f} hi={main_entry['difference_hi']:.3f} runs={main_entry['n']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
