"""Interpolation paths (hypothesis H4): the quick command line on the shipped toy weights, the path-shape
statistics on synthetic share curves with known answers, and the exactness of the interpolated
conditionings where the two prompts agree."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pti_plugin.metrics.curves import first_crossing, share_decreases
from pti_plugin.protocol.interpolation_paths import (GEOMETRIES, PathPair, PathSettings, endpoints, encoder_space,
                                                     interpolate)
from pti_plugin.toy_world import WEIGHTS_DIR

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "analysis" / "interpolation_paths.py"


def _script(argv: list[str]) -> str:
    """Run the script as ``__main__`` in this process (a fresh interpreter spends ~25 s importing torch)."""
    saved, buffer = sys.argv, io.StringIO()
    sys.argv = [str(SCRIPT)] + argv
    try:
        with contextlib.redirect_stdout(buffer):
            runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = saved
    return buffer.getvalue()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paths") / "out"
    return out, _script(["--quick", "--out", str(out)])


@pytest.fixture(scope="module")
def toy_base():
    from pti_plugin.protocol.premise import load_base

    base, _ = load_base(WEIGHTS_DIR)
    return base, encoder_space(base, PathSettings.quick())


def _encode(base, prompt: str) -> torch.Tensor:
    return base.encode(base.tokenize([prompt])).hidden_states[0]  # (77, d) float32


def test_quick_run_writes_every_file_with_ordered_intervals(quick_run):
    out, printed = quick_run
    for name in ("interpolation_paths.png", "interpolation_paths_grid.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
    record = json.loads((out / "interpolation_paths.json").read_text())
    assert [p["name"] for p in record["pairs"]] == ["colour", "shape", "position", "class_word"]
    # 7 distinct prompts, then 1 interior fraction x 3 geometries x 4 pairs: every endpoint generated once
    assert record["distinct_conditionings"] == 7 + 1 * 3 * 4 and record["images_generated"] == 19 * 4
    shares = 0
    for pair in record["pairs"]:
        for kind in GEOMETRIES:
            g = pair["geometries"][kind]
            assert g["fractions"] == [0.0, 0.5, 1.0]
            for key in ("validity", "start_share", "end_share"):
                for share in g[key]:
                    if share is None:  # the class-word pair's start prompt states no shape
                        assert pair["name"] == "class_word" and key == "start_share"
                        continue
                    assert 0.0 <= share["lo"] <= share["estimate"] <= share["hi"] <= 1.0
                    shares += 1
            for key, figure in (("valid", "validity"), ("end", "end_share")):  # each image's 0/1 reading, per fraction
                assert [sum(h) / 4 for h in g["hits"][key]] == [share["estimate"] for share in g[figure]]
    # H4's rule cannot decide with 4 sampling seeds: a sign-flip p is at least 2 / 2^4
    assert record["functional"]["label"] == "untestable" and len(record["functional"]["comparisons"]) == 4 * 2 * 3
    assert shares == 4 * 3 * 3 * 3 - 3 * 3
    with open(out / "interpolation_paths.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 3 * 3 and {r["geometry"] for r in rows} == set(GEOMETRIES)
    assert all(float(r["end_share_lo"]) <= float(r["end_share"]) <= float(r["end_share_hi"]) for r in rows)
    last = printed.strip().splitlines()[-1]
    number = r"[0-9.]+"
    assert re.fullmatch(" ".join([rf"{k}_min_validity={number}" for k in GEOMETRIES]
                                 + [rf"{k}_nonmonotone=\d+" for k in GEOMETRIES]), last)


def test_share_decreases_counts_falls_beyond_two_standard_errors():
    shares = [0.0, 0.5, 0.2, 0.9, 0.88, 1.0]
    # 0.5 -> 0.2 falls 0.3; at p = 0.35 two standard errors over 64 images are 0.119, over 4 images 0.477.
    # 0.9 -> 0.88 falls 0.02, under 2 sqrt(0.89 * 0.11 / 64) = 0.078.
    assert share_decreases(shares, n=64) == [1]
    assert share_decreases(shares, n=4) == []
    assert share_decreases([0.0, 0.25, 0.5, 0.75, 1.0], n=16) == []  # monotone
    assert share_decreases([1.0, 0.0], n=64) == [0]  # p = 0.5: the largest noise, still far below a fall of 1
    with pytest.raises(ValueError, match="n >= 1"):
        share_decreases(shares, n=0)


def test_first_crossing_on_curves_with_known_answers():
    x = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert first_crossing(x, x) == pytest.approx(0.5)  # share = fraction
    assert first_crossing([0.0, 0.5, 1.0], [0.1, 0.3, 0.7]) == pytest.approx(0.75)  # 0.5 + 0.5 * 0.2 / 0.4
    assert first_crossing(x, [0.0, 0.6, 0.3, 0.8, 0.9, 1.0]) == pytest.approx(0.2 * 5 / 6)  # the first of three
    assert first_crossing(x, [0.6] * 6) == 0.0
    assert first_crossing(x, [0.0, 0.1, 0.2, 0.3, 0.4, 0.45]) is None


def test_identical_prompts_give_the_start_conditioning_bit_for_bit(toy_base):
    base, space = toy_base
    prompt = "a red circle at the top left"
    expected = _encode(base, prompt)
    ends = endpoints(base, PathPair("same", prompt, prompt, "colour"))
    for kind in GEOMETRIES:
        for fraction in PathSettings().fraction_values():
            assert torch.equal(interpolate(kind, ends, fraction, space), expected), (kind, fraction)


def test_only_the_positions_where_the_prompts_differ_move(toy_base):
    base, space = toy_base
    start, end = _encode(base, "a red circle"), _encode(base, "a blue circle")
    ends = endpoints(base, PathPair("colour", "a red circle", "a blue circle", "colour"))
    for kind in GEOMETRIES:
        assert torch.equal(interpolate(kind, ends, 0.0, space), start)
        assert torch.equal(interpolate(kind, ends, 1.0, space), end)
        middle = interpolate(kind, ends, 0.5, space)
        # BOS and "a" precede the first differing word: the causal encoder gives both prompts the same rows
        assert torch.equal(middle[:2], start[:2])
        moved = (middle[2:] != start[2:]).any(dim=-1) & (middle[2:] != end[2:]).any(dim=-1)
        assert bool(moved.all()), kind  # every later row (the colour word, the rest, the padding) is in between


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "1"], "argument --seeds: must be at least 2, got 1 (an interval needs two sampling seeds)"),
    (["--fractions", "1"], "argument --fractions: must be at least 2, got 1 (the start and the end)"),
    (["--model", "/no/such/model"], "--model /no/such/model: base model not found: looked for /no/such/model "
                                    "(a diffusers folder with model_index.json)"),
])
def test_bad_values_are_argparse_errors_naming_the_flag(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        _script(argv + ["--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
