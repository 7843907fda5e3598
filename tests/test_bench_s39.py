"""research_bench's own flags and the preset's plugins it leaves out."""

from __future__ import annotations

from pathlib import Path

import pytest

import pti_plugin.sweeps.bench as bench

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag", ["--leakage_threshold", "--editability_ratio"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_the_light_point_s_thresholds_must_be_finite_numbers_at_least_0(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(["--out", str(tmp_path / "o"), f"{flag}={value}"])
    assert stop.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


class _Trained(Exception):
    """The first sweep was about to train."""


def test_the_presets_other_plugins_are_named_as_left_out(tmp_path, monkeypatch, capsys):
    """The bench trains its own variants with pivot_locality alone; another plugin of the preset was dropped silently."""
    def first_sweep(*args, **kwargs):
        raise _Trained

    monkeypatch.setattr(bench, "run_sweep", first_sweep)
    argv = ["--preset", str(REPO / "presets" / "research_bench.toml"), "--out", str(tmp_path / "o")]
    with pytest.raises(_Trained):
        bench.main(argv)
    assert "left out" not in capsys.readouterr().err
    with pytest.raises(_Trained):
        bench.main([*argv, "--set", "plugins.staged_schedule={}"])
    assert "the preset's plugins staged_schedule are left out" in capsys.readouterr().err
