"""Do the model-internal metrics rank the toy world's runs as its ground truth does? (issue: research bench v2)

A real-model run has no detector: the project reads position leakage from cross-attention heatmaps
of ``tok1`` (``attention_leakage``), reconstruction from the denoising proxy and editability from
the edit-direction proxy. On the toy world every finished LoRA run is scored both ways by
:func:`~.run_scores.score_run` (the research bench's scorer and cache, ``<run>/bench_scores.json``:
ground truth and internal metrics from the same generations), and each pair of :func:`pairs` gets
Spearman's rho over runs with a 95% percentile bootstrap interval over runs
(:func:`~pti_plugin.metrics.correlation.correlation_interval`). Runs of one training seed share their pivot,
so the run-level interval is if anything too narrow.

Every version of the leakage metric the scorer computes is reported (:data:`LEAKAGE_VERSIONS`), not
only the best, against the target rho :data:`TARGET`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ..metrics.correlation import correlation_interval
from ..sweeps.bench_report import CORRELATIONS

#: Spearman's rho the attention leakage should reach against the ground truth (0.68 on toy world v1).
TARGET = 0.8
#: The leakage scores of :func:`~pti_plugin.metrics.measure_position_leakage` (family ``heatmap``: where
#: ``tok1``'s cross-attention mass lies; ``centroid``: its centre of mass), per prompt group.
LEAKAGE_VERSIONS = {
    "attention_leakage": "heatmaps, neutral prompts (what the real-model path reports)",
    "heatmap_all_leakage_score": "heatmaps, neutral and position-edit prompts",
    "heatmap_edit_leakage_score": "heatmaps, position-edit prompts",
    "centroid_neutral_leakage_score": "attention centroids, neutral prompts",
    "centroid_all_leakage_score": "attention centroids, neutral and position-edit prompts",
}
LEAKAGE_TRUTHS = ("gt_leakage", "gt_training_cell_fraction")


def pairs() -> list[tuple[str, str, int]]:
    """``(internal metric, ground truth, expected sign)``: every leakage version against each leakage truth,
    then the research bench's LoRA-run proxies (``sweeps.bench_report.CORRELATIONS``)."""
    leakage = [(version, truth, +1) for version in LEAKAGE_VERSIONS for truth in LEAKAGE_TRUTHS]
    proxies = [(internal, truth, sign) for internal, truth, sign, over in CORRELATIONS
               if over == "lora" and internal not in LEAKAGE_VERSIONS]
    return leakage + proxies


def find_runs(folders: list[Path], output_name: str) -> list[Path]:
    """The finished runs (folders holding ``<output_name>.safetensors``) directly under ``folders``, sorted."""
    return sorted(d for folder in folders for d in Path(folder).iterdir()
                  if d.is_dir() and (d / f"{output_name}.safetensors").is_file())


def score_runs(runs: list[Path], output_name: str, scoring: argparse.Namespace, shard: tuple[int, int] = (0, 1),
               log: Callable[[str], None] = print) -> list[dict]:
    """Scores of the runs of ``shard`` ``(k, n)`` (every n-th run from the k-th), each cached beside its run
    (:func:`pti_plugin.sweeps.bench.scores_of`; ``scoring``: its seeds, sample_steps, guidance, max_images,
    device, rescore)."""
    from ..sweeps.bench import scores_of

    k, n = shard
    rows = []
    for i, run in enumerate(runs):
        if i % n == k:
            log(f"[{i + 1}/{len(runs)}] {run.name}")
            rows.append({"run": run.name} | scores_of(run, output_name, scoring))
    return rows


def summarise(rows: list[dict], draws: int = 2000) -> dict:
    """Each pair's Pearson, Spearman (interval over runs) and n; for the leakage versions, whether the
    interval's estimate reaches :data:`TARGET`."""
    out = []
    for internal, truth, sign in pairs():
        c = correlation_interval([r.get(internal) for r in rows], [r.get(truth) for r in rows], draws)
        entry = {"internal": internal, "ground_truth": truth, "expected_sign": sign} | c
        if internal in LEAKAGE_VERSIONS:
            entry["version"] = LEAKAGE_VERSIONS[internal]
            entry["reaches_target"] = bool(c["spearman"] >= TARGET)
        out.append(entry)
    return {"runs": len(rows), "target": TARGET, "correlations": out}


def compact_rows(rows: list[dict]) -> list[dict]:
    """Each row with only its run and the scores :func:`pairs` reads (what the committed summary keeps)."""
    keys = ["run", *dict.fromkeys(k for internal, truth, _ in pairs() for k in (internal, truth))]
    return [{k: r.get(k) for k in keys} for r in rows]


def verdict(summary: dict) -> str:
    """The line that decides: the attention leakage against ``gt_leakage``, and whether it meets :data:`TARGET`."""
    c = next(c for c in summary["correlations"] if (c["internal"], c["ground_truth"]) == ("attention_leakage", "gt_leakage"))
    met = "meets" if c["spearman_lo"] >= summary["target"] else (
        "may meet" if c["spearman_hi"] >= summary["target"] else "does not meet")
    return (f"attention leakage against the ground-truth leakage: Spearman {_num(c['spearman'])} "
            f"[{_num(c['spearman_lo'])}, {_num(c['spearman_hi'])}] over {c['n']} runs; it {met} the target "
            f"{summary['target']:g} (its interval {'lies above' if met == 'meets' else 'reaches' if met == 'may meet' else 'lies below'} it)")


def _num(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}"  # nan != nan


def summary_lines(summary: dict) -> list[str]:
    """The report's Markdown: one row per pair, the leakage versions first."""
    head = ["internal metric", "version", "ground truth", "expected sign", "Spearman [95% over runs]", "Pearson", "runs"]
    lines = [f"Spearman's rho over {summary['runs']} LoRA runs (ground truth and internal metric from the same "
             f"generations); target for the attention leakage: rho >= {summary['target']:g}. Every leakage version "
             "the scorer computes is listed.", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c in summary["correlations"]:
        lines.append(f"| `{c['internal']}` | {c.get('version', 'proxy')} | `{c['ground_truth']}` | {c['expected_sign']:+d} | "
                     f"{_num(c['spearman'])} [{_num(c['spearman_lo'])}, {_num(c['spearman_hi'])}] | "
                     f"{_num(c['pearson'])} | {c['n']} |")
    return lines
