"""H4's verdict is built from the data: the sign-flip test and the rule on synthetic path readings with known
answers, and the report's H4 section, which gives no verdict when an input is missing or was measured on
another model than the protocol's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pti_plugin.protocol.h4_verdict import functional_verdict, sign_flip_p
from pti_plugin.protocol.protocol_sections import h4_section

PROTOCOL_DIGEST = "9006635b5261"
GEOMS = ("layernorm", "centered", "linear")


def _record(seeds: int = 16, end_hits: dict | None = None, digest: str = PROTOCOL_DIGEST) -> dict:
    """An interpolation-path record over fractions 0, 0.5, 1: every image valid; the end attribute absent at 0,
    present at 1 and, at 0.5, ``end_hits[geometry]`` (a 0/1 list over the seeds; default: every seed's image
    has it in every geometry)."""
    pairs = []
    for name in ("colour", "shape"):
        geometries = {}
        for kind in GEOMS:
            middle = (end_hits or {}).get(kind, [1] * seeds)
            geometries[kind] = {"fractions": [0.0, 0.5, 1.0],
                                "hits": {"valid": [[1] * seeds] * 3, "end": [[0] * seeds, list(middle), [1] * seeds]}}
        pairs.append({"name": name, "geometries": geometries})
    summary = {kind: {"min_validity": 1.0, "nonmonotone": 0, "crossing_fraction": {"colour": 0.5, "shape": 0.5}}
               for kind in GEOMS}
    return {"model_digest": digest, "settings": {"seeds": seeds, "bootstrap": 200}, "summary": summary, "pairs": pairs}


def _ellipsoid(digest: str | None = PROTOCOL_DIGEST) -> dict:
    return {"model": {"argument": "@embedded", "model_digest": digest}, "index": 5, "cv_about_centre": 0.194,
            "eos_cv_about_centre": 0.200, "threshold": 0.1, "eos_factor": 1.5, "limit": 0.300, "verdict": "supported",
            "width": 64, "shell_context": {"index": {"gaussian_cv": 0.276}}}


def _results(tmp_path: Path, paths: dict | None, ellipsoid: dict | None, archive: bool = True) -> Path:
    """A results tree as the report reads it: ``research_protocol/`` (with an H1 cell archive naming the
    protocol's model) beside ``interpolation_paths/`` and ``ellipsoid_toy/``."""
    results = tmp_path / "res" / "research_protocol"
    results.mkdir(parents=True)
    if archive:
        (results / "h1_cell_records.json").write_text(json.dumps(
            {"measured_with": {"model_digest": PROTOCOL_DIGEST, "seeds": 64}, "null": None, "cells": []}))
    if paths is not None:
        (tmp_path / "res" / "interpolation_paths").mkdir()
        (tmp_path / "res" / "interpolation_paths" / "interpolation_paths.json").write_text(json.dumps(paths))
    if ellipsoid is not None:
        (tmp_path / "res" / "ellipsoid_toy" / "toy").mkdir(parents=True)
        (tmp_path / "res" / "ellipsoid_toy" / "toy" / "ellipsoid.json").write_text(json.dumps(ellipsoid))
    return results


def _head(section: dict) -> str:
    return section["lines"][0]


def test_sign_flip_p_on_differences_with_known_answers():
    # 5 equal positive differences: only "all +" and "all -" reach |mean| 1 among 2^5 sign assignments
    assert sign_flip_p([1.0] * 5) == pytest.approx(2 / 32)
    # 16 seeds, one differing: every assignment has |mean| >= 1/16
    assert sign_flip_p([0.0] * 15 + [1.0]) == 1.0
    assert sign_flip_p([0.0] * 8) == 1.0 and sign_flip_p([1.0, -1.0]) == 1.0
    # (+1, +1, +1, -1): |mean| >= 0.5 for every assignment but the C(4, 2) = 6 whose signs cancel: 10 of 16
    assert sign_flip_p([1.0, 1.0, 1.0, -1.0]) == pytest.approx(10 / 16)


def test_the_rule_reads_a_clear_difference_no_difference_and_too_few_seeds():
    same = functional_verdict(_record())
    assert same["label"] == "no functional difference" and not same["significant"]
    assert len(same["comparisons"]) == 2 * 2 * 3 and same["alpha"] == pytest.approx(0.05 / 12)
    # linear draws the end attribute half-way in every seed, the slerps in none: p = 2 / 2^16 on both pairs
    split = functional_verdict(_record(end_hits={"layernorm": [0] * 16, "centered": [0] * 16, "linear": [1] * 16}))
    assert split["label"] == "differ"
    found = {(r["pair"], r["measure"], r["a"], r["b"]) for r in split["significant"]}
    assert found == {(pair, "end share", a, "linear") for pair in ("colour", "shape") for a in ("layernorm", "centered")}
    row = next(r for r in split["significant"] if r["a"] == "layernorm")
    assert row["estimate"] == pytest.approx(-1.0) and row["p"] == pytest.approx(2 / 2 ** 16)
    # a difference in 4 of 16 seeds only: p = 1/8 (the 4 differing seeds' 16 assignments), not significant
    few = functional_verdict(_record(end_hits={"linear": [0] * 4 + [1] * 12}))
    assert few["label"] == "no functional difference"
    # 6 seeds: the smallest p a sign-flip test can give, 2/64, is above 0.05/12, whatever the data
    assert functional_verdict(_record(seeds=6, end_hits={"linear": [0] * 6}))["label"] == "untestable"


def test_h4_section_gives_no_verdict_when_an_input_is_missing(tmp_path):
    head = _head(h4_section(_results(tmp_path / "a", None, _ellipsoid())))
    assert head.startswith("**No verdict:") and "`interpolation_paths.json` is missing" in head and "Verdict on" not in head
    head = _head(h4_section(_results(tmp_path / "b", _record(), None)))
    assert head.startswith("**No verdict:") and f"no ellipsoid result of the protocol's model (digest {PROTOCOL_DIGEST})" in head


def test_h4_section_flags_a_result_measured_on_another_model(tmp_path):
    section = h4_section(_results(tmp_path, _record(digest="ca7e434a1812"), _ellipsoid()))
    head = _head(section)
    assert head.startswith("**No verdict:")
    assert f"was measured on another model (digest ca7e434a1812; the protocol's is {PROTOCOL_DIGEST})" in head
    assert any("model ca7e434a1812, **not the protocol's model: not part of the verdict**" in line for line in section["lines"])
    # an ellipsoid result that records no model digest is not the protocol's model's either
    head = _head(h4_section(_results(tmp_path / "b", _record(), _ellipsoid(digest=None))))
    assert head.startswith("**No verdict:") and "no ellipsoid result of the protocol's model" in head
    # without a cell archive the protocol's model is unknown: nothing can be checked against it
    head = _head(h4_section(_results(tmp_path / "c", _record(), _ellipsoid(), archive=False)))
    assert head.startswith("**No verdict:") and "the protocol's model is not recorded" in head


def test_h4_section_verdict_follows_the_rule(tmp_path):
    section = h4_section(_results(tmp_path / "a", _record(), _ellipsoid()))
    head = _head(section)
    assert head.startswith(f"**Verdict on the toy model ({PROTOCOL_DIGEST}): no functional difference between the "
                           "geometries (none of the 12 paired comparisons has p < 0.0042)")
    assert "the ellipsoid rule reads supported at index 5 on its 64-wide text encoder" in head
    ellipsoid = next(line for line in section["lines"] if line.startswith("- Ellipsoid statistics"))
    assert "reads **supported** for this 64-wide encoder" in ellipsoid and "no evidence either way" not in ellipsoid
    split = _record(end_hits={"layernorm": [0] * 16, "centered": [0] * 16, "linear": [1] * 16})
    head = _head(h4_section(_results(tmp_path / "b", split, _ellipsoid())))
    assert head.startswith(f"**Verdict on the toy model ({PROTOCOL_DIGEST}): the geometries differ (layernorm − "
                           "linear on colour, end share -1.000 [-1.000, -1.000]")
    # a record written before the per-image readings gives no verdict
    old = _record()
    for pair in old["pairs"]:
        for geometry in pair["geometries"].values():
            del geometry["hits"]
    head = _head(h4_section(_results(tmp_path / "c", old, _ellipsoid())))
    assert head.startswith("**No verdict:") and "has no per-image readings" in head


def test_ellipsoid_check_records_the_model_digest_the_protocol_compares(tiny_model, tmp_path, monkeypatch):
    """The report matches an ellipsoid result to the protocol's model by this digest (before, the JSON named the
    model by its path and text-encoder hash only, which no protocol record holds)."""
    import runpy

    from pti_plugin.protocol.premise import model_digest

    cli = runpy.run_path(str(Path(__file__).resolve().parents[1] / "analysis" / "ellipsoid_check.py"),
                         run_name="ellipsoid_check_under_test")["cli"]
    monkeypatch.setenv("PTI_PLUGIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "o"
    assert cli(["--model", str(tiny_model), "--template_words", "only", "--max_sentences", "12", "--out", str(out)]) == 0
    assert json.loads((out / "ellipsoid.json").read_text())["model"]["model_digest"] == model_digest(tiny_model)
