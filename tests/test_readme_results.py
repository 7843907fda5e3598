"""The README's result tables agree with the committed summaries they were copied from.

The README's "Results on the shipped toy world" restates, rounded, figures that the research protocol
writes to ``analysis/results/research_protocol/`` (``h3_summary.json``, ``internal_metrics.json``). These
tests read each figure back from the README's tables and check it against the summary, so a summary
rebuilt without its README table (or a mistyped figure) fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "analysis" / "results" / "research_protocol"
NUMBER = re.compile(r"[−-]?\d+(?:\.\d+)?")


def _table(header_start: str, path: Path = ROOT / "README.md") -> list[list[str]]:
    """The cells of the table in ``path`` whose header row starts with ``header_start`` (header and rule left out)."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip().startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _figures(cell: str) -> list[float]:
    """``0.87 [0.82, 0.91]`` -> ``[0.87, 0.82, 0.91]`` (typographic minus read as minus)."""
    return [float(n.replace("−", "-")) for n in NUMBER.findall(cell)]


def _agrees(cell: str, entry: dict, decimals: int) -> bool:
    """The cell's estimate (and interval, when it has one) equal ``entry``'s rounded to ``decimals``."""
    expected = [entry["estimate"], entry["lo"], entry["hi"]]
    written = _figures(cell)
    tolerance = 0.5 * 10 ** -decimals + 1e-9
    return 1 <= len(written) <= 3 and all(abs(w - e) <= tolerance for w, e in zip(written, expected))


def _h3_rows() -> dict[tuple[str, float | None, float], dict]:
    """``(variant, weight, lr) -> row`` of every condition in ``h3_summary.json``."""
    summary = json.loads((RESULTS / "h3_summary.json").read_text())
    return {(c["variant"], None if c["variant"] == "none" else c["weight"], row["lr"]): row
            for c in summary["conditions"] for row in c["rows"]}


def _condition(name: str) -> tuple[str, float | None]:
    """``"half_angle w100"`` -> ``("half_angle", 100.0)``; ``"none"`` and ``"pivot alone"`` -> ``("none", None)``."""
    if name in ("none", "pivot alone"):
        return "none", None
    variant, weight = name.split(" w")
    return variant, float(weight)


def test_h3_table_figures_are_the_summary_s():
    rows = _h3_rows()
    table = _table("| condition | seeds | lr | coarse |")
    assert len(table) >= 30
    columns = (("coarse", 3, 2), ("appearance_error", 4, 3), ("in_training_cell", 5, 2),
               ("training_cell_excess", 6, 2), ("drift_unrelated", 7, 2), ("class_character", 8, 2))
    for cells in table:
        variant, weight = _condition(cells[0])
        row = rows[(variant, weight, float(cells[2]))]
        assert int(cells[1]) == row["n_seeds"], cells
        for key, index, decimals in columns:
            if cells[index] == "0" and cells[2] == "0":
                continue  # the pivot alone has no LoRA to drift
            assert _agrees(cells[index], row[key], decimals), (cells[0], cells[2], key, cells[index], row[key])


#: The README's internal-metrics rows, by the version key ``internal_metrics.json`` gives them.
INTERNAL_ROWS = {
    "attention leakage (heatmaps, neutral prompts; what the real-model path reports)": "attention_leakage",
    "heatmaps, neutral + edit prompts": "heatmap_all_leakage_score",
    "heatmaps, edit prompts": "heatmap_edit_leakage_score",
    "attention centroids, neutral prompts": "centroid_neutral_leakage_score",
    "attention centroids, neutral + edit prompts": "centroid_all_leakage_score",
    "heatmaps, neutral prompts, position band only (t 780–930)": "attention_leakage_band",
    "centroids, neutral prompts, position band only": "centroid_neutral_leakage_score_band",
    "heatmaps, neutral prompts, attraction half only (1 − r_A)": "heatmap_neutral_attraction_only",
    "heatmaps, neutral prompts, lost-diversity half only (1 − r_D)": "heatmap_neutral_diversity_only",
    "centroids, neutral prompts, attraction half only": "centroid_neutral_attraction_only",
    "centroids, neutral prompts, lost-diversity half only": "centroid_neutral_diversity_only",
    "*the scorer's ground truth itself (the ceiling)*": "gt_leakage",
}


def _rho(entry: dict) -> dict:
    return {"estimate": entry["spearman"], "lo": entry["spearman_lo"], "hi": entry["spearman_hi"]}


def test_internal_metrics_table_figures_are_the_summary_s():
    summary = json.loads((RESULTS / "internal_metrics.json").read_text())
    by = {(c["internal"], c["ground_truth"]): c for c in summary["correlations"]}
    table = _table("| internal metric | against the same generations' ground truth |")
    assert [cells[0] for cells in table] == list(INTERNAL_ROWS)
    for cells in table:
        version = INTERNAL_ROWS[cells[0]]
        independent = by[(version, "h3_training_cell_fraction")]
        if version != "gt_leakage":  # the ceiling has no "same generations" column
            assert _agrees(cells[1], _rho(by[(version, "gt_leakage")]), 2), cells
        assert _agrees(cells[2], _rho(independent), 2), cells
        assert _agrees(cells[3], _rho(independent["within_lr"]), 2), cells


@pytest.mark.parametrize("cell, entry, decimals, agrees", [
    ("0.87 [0.82, 0.91]", {"estimate": 0.8712, "lo": 0.8249, "hi": 0.9061}, 2, True),
    ("−0.03 [−0.22, 0.17]", {"estimate": -0.031, "lo": -0.2204, "hi": 0.1738}, 2, True),
    ("0.87 [0.82, 0.91]", {"estimate": 0.8712, "lo": 0.8049, "hi": 0.9061}, 2, False),  # a stale lower bound
    ("0.133 [0.130, 0.137]", {"estimate": 0.1334, "lo": 0.1296, "hi": 0.1368}, 3, True),
])
def test_a_rounded_figure_is_read_back_exactly(cell, entry, decimals, agrees):
    assert _agrees(cell, entry, decimals) is agrees


def test_per_condition_table_is_the_report_s():
    """The README's H3 per-condition table is ``report.md``'s, row for row (the README writes a typographic minus)."""
    header = "| condition | training seeds | highest safe lr |"
    readme = [[cell.replace("−", "-") for cell in cells] for cells in _table(header)]
    assert len(readme) >= 10 and readme == _table(header, RESULTS / "report.md")
