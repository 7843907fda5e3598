"""The toy world's premise checks: their measurements on rendered images with known answers, the
learning-rate pick, and ``analysis/toy_quality.py`` (both lines) end to end on the shipped weights."""

from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from pti_plugin.protocol import premise
from pti_plugin.toy_world import WEIGHTS_DIR
from pti_plugin.toy_world.world import CELL_CENTRES, CHARACTER_CELLS, NEUTRAL_TEMPLATES, Scene, render_character, render_scene

SCRIPT = Path(__file__).resolve().parents[1] / "analysis" / "toy_quality.py"
NUMBER = r"(\d+\.\d{3}|nan)"


def test_measure_reads_known_generations():
    at_cells = [render_character(CELL_CENTRES[c], CELL_CENTRES[r], bg) for (r, c) in CHARACTER_CELLS for bg in ("white", "gray")]
    figures = premise.measure(np.stack(at_cells), bootstrap=100)
    assert figures["coarse"] == figures["detail"] == figures["training_cells"] == 1.0
    assert figures["appearance_error"] < 0.01 and figures["training_cells_lo"] == figures["training_cells_hi"] == 1.0
    elsewhere = [render_scene(Scene("square", "red", "black", r, c, CELL_CENTRES[c], CELL_CENTRES[r], 11.0))
                 for r in range(3) for c in range(3) if (r, c) not in CHARACTER_CELLS]
    figures = premise.measure(np.stack(elsewhere))
    assert figures["coarse"] == figures["detail"] == figures["training_cells"] == 0.0 and figures["objects"] == 6
    assert figures["appearance_error"] > 0.2


def test_bootstrap_interval_brackets_the_mean_with_the_binomial_width():
    hits = [True] * 50 + [False] * 150  # mean 0.25, binomial standard error 0.0306
    lo, hi = premise.bootstrap_interval(hits, 4000)
    assert lo < 0.25 < hi and abs((hi - lo) / 2 - 1.96 * 0.0306) < 0.01
    assert premise.bootstrap_interval([True] * 9, 100) == (1.0, 1.0)


def test_pick_inversion_prefers_the_band_inside_the_null_interval():
    rows = [{"lr": 1e-3, "coarse": 0.3, "training_cells": 0.33}, {"lr": 1e-2, "coarse": 0.7, "training_cells": 0.9},
            {"lr": 3e-3, "coarse": 0.6, "training_cells": 0.35}, {"lr": 3e-2, "coarse": 0.95, "training_cells": 0.34}]
    assert premise.pick_inversion(rows, 0.25, 0.42) == rows[2] | {"passes": True}
    assert premise.pick_inversion(rows, 0.0, 0.1) == rows[3] | {"passes": False}  # none qualifies: best coarse


def test_neutral_prompts_cycle_the_templates():
    prompts = premise.neutral_prompts("tok1", 8)
    assert prompts[:4] == [t.format("tok1") for t in NEUTRAL_TEMPLATES] == prompts[4:]


def _script(argv: list[str]) -> tuple[dict, str]:
    """Run analysis/toy_quality.py's main in this process; return (result, printed)."""
    saved, buffer = sys.argv, io.StringIO()
    sys.argv = [str(SCRIPT)] + argv
    try:
        with contextlib.redirect_stdout(buffer):
            result = runpy.run_path(str(SCRIPT), run_name="toy_quality_under_test")["main"](argv)
    finally:
        sys.argv = saved
    return result, buffer.getvalue()


shipped = pytest.mark.skipif(not (WEIGHTS_DIR / "model_index.json").is_file(), reason="shipped toy weights absent")


@shipped
def test_quality_line_carries_two_tone(tmp_path):
    _, printed = _script(["--prompts", "4", "--two_tone_prompts", "2", "--steps", "2", "--out", str(tmp_path)])
    keys = ("colour", "shape", "background", "position", "position_entropy", "two_tone")
    line = printed.strip().splitlines()[-1]
    figures, _, what = line.partition(" (")
    assert re.fullmatch(" ".join(f"{k}={NUMBER}" for k in keys), figures), line
    assert "the 4 prompts' images" in what and "over 2 two-tone prompts" in what and "log 9" in what, line
    assert json.loads((tmp_path / "toy_quality.json").read_text())["two_tone_prompts"] == 2


@shipped
def test_quick_premise_check_prints_its_line_and_resumes_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv("PTI_PLUGIN_CACHE", str(tmp_path / "cache"))
    argv = ["--premise", "--quick", "--out", str(tmp_path)]
    summary, printed = _script(argv)
    line = printed.strip().splitlines()[-1]
    verdicts = " ".join(f"check{n}=(pass|fail)" for n in (2, 3, 4))
    assert re.fullmatch(" ".join(f"{k}={NUMBER}" for k in premise.LINE_KEYS) + f" {verdicts}", line), line
    assert 0.0 <= summary["null_cells_lo"] <= summary["null_cells_hi"] <= 1.0
    result = json.loads((tmp_path / "premise" / "premise.json").read_text())
    assert line.endswith(" ".join(f"{name}={verdict}" for name, verdict in result["checks"].items()))  # one verdict
    null = result["null"]
    assert null["training_cells_lo"] <= null["training_cells"] <= null["training_cells_hi"]
    assert [r["lr"] for r in result["inversions"]] == list(premise.PremiseSettings.quick().inversion_lrs)
    assert len(result["loras"]) == len(premise.PremiseSettings.quick().lora_lrs)
    assert set(result["oracle"]) >= {"coarse", "detail", "appearance_error", "loss_init", "loss_optimised", "vae_round_trip"}
    kept = np.load(tmp_path / "premise" / "parts" / "null.npz")["images"]  # the generations, for re-scoring
    assert kept.shape == (premise.PremiseSettings.quick().seeds, 32, 32, 3) and kept.dtype == np.uint8
    assert premise.measure(kept, null["settings"]["bootstrap"])["training_cells"] == null["training_cells"]

    def fail(*args, **kwargs):
        raise AssertionError("a cached premise part was recomputed")

    monkeypatch.setattr("pti_plugin.cli.main", fail)
    for name in ("measure", "measure_null", "measure_oracle", "measure_run"):
        monkeypatch.setattr(premise, name, fail)
    summary_again, printed_again = _script(argv)
    assert printed_again.strip().splitlines()[-1] == line and summary_again == summary


@shipped
@pytest.mark.parametrize("option, culprit", [("--inversion_lrs=1e-3,x", "--inversion_lrs"), ("--seeds=0", "--seeds"),
                                             ("--init_word=zebra", "zebra"), ("--lora_lrs=,", "--lora_lrs"),
                                             ("--lora_lrs=1e-3,nan", "--lora_lrs: expected positive finite numbers, got nan")])
def test_bad_premise_options_are_refused_before_any_work(tmp_path, capsys, option, culprit):
    with pytest.raises(SystemExit) as exit_info:
        _script(["--premise", "--out", str(tmp_path), option])
    assert exit_info.value.code == 2 and culprit in capsys.readouterr().err
    assert not (tmp_path / "premise").exists()
