"""The real-model path's headline leakage score: the neutral prompts' heatmap score (the validated one), the
all-prompt score kept as a secondary figure, a bootstrap interval over the sampling seeds, the sweep table's
headers and the sweep's evaluation cache version. Heatmaps are built by hand (point masses), no model."""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import pytest
import torch

from pti_plugin.metrics.leakage import LeakageMeasurement, layout_scores

GRID = 8


def _points(cells: list[list[tuple[int, int]]]) -> torch.Tensor:
    """Point-mass heatmaps ``[P, S, GRID, GRID]``: prompt p, seed s has all its mass in cell ``cells[p][s]`` (row, col)."""
    maps = torch.zeros(len(cells), len(cells[0]), GRID, GRID)
    for p, row in enumerate(cells):
        for s, (r, c) in enumerate(row):
            maps[p, s, r, c] = 1.0
    return maps


def _centre(cell: tuple[int, int]) -> np.ndarray:
    """The cell's centre (x, y) in image fractions."""
    return np.array([(cell[1] + 0.5) / GRID, (cell[0] + 0.5) / GRID])


def _by_hand(cells: dict[str, list[list[tuple[int, int]]]], train: tuple[int, int], prompts: list[int]) -> float:
    """``1 - sqrt(r_D r_A)`` of ``prompts`` written out from the cells: for point masses the layout distance is the
    Euclidean distance between the points; D = mean over prompts of the mean pairwise distance over seeds, A = mean
    over generations of the distance to the (single) training layout."""
    d, a = {}, {}
    for model, per_prompt in cells.items():
        d[model] = np.mean([np.mean([np.linalg.norm(_centre(u) - _centre(v)) for u, v in itertools.combinations(per_prompt[p], 2)])
                            for p in prompts])
        a[model] = np.mean([np.linalg.norm(_centre(u) - _centre(train)) for p in prompts for u in per_prompt[p]])
    return 1.0 - np.sqrt(d["tuned"] / d["base"] * a["tuned"] / a["base"])


TRAIN = (0, 0)
BASE = [(0, 6), (6, 0), (6, 6), (3, 7)]
#: neutral prompts 0 and 1: the fine-tuned model draws near the training layout; edit prompt 2: as the base model
CELLS = {"base": [BASE, BASE, BASE],
         "tuned": [[(0, 1), (1, 0), (1, 2), (2, 1)], [(0, 2), (2, 0), (1, 1), (0, 3)], BASE]}
GROUPS = ["neutral", "neutral", "edit"]


def _measurement(cells=CELLS, groups=GROUPS) -> tuple[LeakageMeasurement, dict]:
    heat = {m: _points(cells[m]) for m in ("base", "tuned")}
    train = {m: _points([[TRAIN]])[0] for m in ("base", "tuned")}
    summary = layout_scores(heat, train, groups, grid=GRID)
    measurement = LeakageMeasurement(prompts=list(groups), groups=list(groups), seeds=list(range(len(cells["base"][0]))),
                                     images={}, heatmaps=heat, centroids={}, training_images=[], training_heatmaps=train,
                                     training_centroids={}, summary=summary)
    return measurement, summary


def test_the_headline_score_is_the_neutral_prompts_heatmap_score():
    m, summary = _measurement()
    neutral, everything = _by_hand(CELLS, TRAIN, [0, 1]), _by_hand(CELLS, TRAIN, [0, 1, 2])
    assert abs(neutral - everything) > 0.1  # the two versions differ here
    assert m.score == pytest.approx(neutral, abs=1e-5) and m.score == summary["heatmap"]["neutral"]["leakage_score"]
    assert m.all_prompts_score == pytest.approx(everything, abs=1e-5)
    assert m.score != pytest.approx(summary["heatmap"]["all"]["leakage_score"], abs=0.1)


def _scored(cells=CELLS, groups=GROUPS):
    from pti_plugin.metrics.leakage import scored_heatmaps

    heat = {m: _points(cells[m]) for m in ("base", "tuned")}
    train = {m: _points([[TRAIN]])[0] for m in ("base", "tuned")}
    return scored_heatmaps(heat, train, groups, grid=GRID)


def test_the_headline_interval_is_ordered_holds_the_estimate_and_is_reproducible():
    m = _scored()
    interval = m.score_interval(draws=300, seed=3)
    assert interval.estimate == m.score == pytest.approx(_by_hand(CELLS, TRAIN, [0, 1]), abs=1e-5)
    assert interval.lo <= interval.estimate <= interval.hi and interval.lo < interval.hi
    assert m.score_interval(draws=300, seed=3) == interval  # the same under its seed


def test_an_interval_over_seeds_whose_layouts_are_all_halved_is_the_halving():
    """Every fine-tuned layout is its base layout moved halfway to the training layout: the diversity and the
    distance to the training layout halve for any subset of the seeds, so every resample scores 1 - 1/2."""
    base = [(0, 6), (6, 0), (6, 6), (4, 2)]
    tuned = [(0, 3), (3, 0), (3, 3), (2, 1)]
    m = _scored({"base": [base], "tuned": [tuned]}, ["neutral"])
    interval = m.score_interval(draws=200)
    assert interval.estimate == pytest.approx(0.5, abs=1e-6)
    assert interval.lo == pytest.approx(0.5, abs=1e-6) and interval.hi == pytest.approx(0.5, abs=1e-6)


def test_the_sweep_table_names_the_metrics_and_their_directions(capsys):
    from pti_plugin.sweeps.report import print_table

    row = {"run": "lora-lr0.001", "lr": 1e-3, "lr_x_steps": 1.0, "lora_delta_norm": 0.5, "leakage_score": 0.1,
           "reconstruction_metric": "proxy_denoise_mse", "reconstruction": 0.2, "reconstruction_higher_is_better": False,
           "editability_metric": "proxy_edit_direction_cos", "editability": 0.3, "editability_higher_is_better": True}
    print_table([row], {}, "lora")
    header = capsys.readouterr().out.splitlines()[0]
    assert "reconstruction: proxy_denoise_mse (lower = better)" in header
    assert "editability: proxy_edit_direction_cos (higher = better)" in header
    assert "leakage_score: position leakage, neutral prompts" in header


def test_a_sweep_evaluation_cached_before_the_headline_changed_is_recomputed(tmp_path):
    """A ``sweep_eval.json`` written under the first evaluation version holds the all-prompt ``leakage_score``:
    it is not reused."""
    from pti_plugin.sweeps.evaluation import EVAL_FILE, cached_evaluation, eval_settings
    from pti_plugin.sweeps.plan import RunSpec

    args = argparse.Namespace(clip_model_path=None, n_seeds=2, sample_steps=1, guidance=7.5, leakage_on=True,
                              leakage_seeds=2, leakage_prompts=None, leakage_edit_prompts=None, max_images=1, fp16=False)
    spec = RunSpec("lora-lr0.001", 1e-3, "none", tmp_path / "p.toml", tmp_path, "pti")
    old = eval_settings(args) | {"version": 1}
    (tmp_path / EVAL_FILE).write_text(json.dumps({"settings": old, "metrics": {"leakage_score": 0.3}}))
    assert cached_evaluation(spec, eval_settings(args)) is None
    (tmp_path / EVAL_FILE).write_text(json.dumps({"settings": eval_settings(args), "metrics": {"leakage_score": 0.3}}))
    assert cached_evaluation(spec, eval_settings(args)) == {"leakage_score": 0.3}
