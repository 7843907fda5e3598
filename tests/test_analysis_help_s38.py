"""The analysis scripts' ``--help`` (every default shown, no internal issue cited), the position band's record
(a ``--quick`` run cannot replace a band measured otherwise; the report states the band's seeds and steps) and
H1's stored segment fits (the same file from inputs that differ in the last digits)."""

from __future__ import annotations

import argparse
import json
import runpy
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Scripts other work owns: only the formatter's defaults and the absence of issue citations are checked.
OWNED_ELSEWHERE = ("position_leakage", "internal_metrics")
SCRIPTS = sorted(p.stem for p in (REPO / "analysis").glob("*.py"))


def _script(stem: str) -> dict:
    return runpy.run_path(str(REPO / "analysis" / f"{stem}.py"), run_name=f"{stem}_under_test")


def _help(stem: str, monkeypatch, capsys) -> tuple[argparse.ArgumentParser, dict[str, str], str]:
    """The parser ``--help`` printed, each argument's help text as printed (by its first name) and the whole text."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line per argument
    printed = []
    original = argparse.ArgumentParser.print_help
    monkeypatch.setattr(argparse.ArgumentParser, "print_help",
                        lambda self, file=None: (printed.append(self), original(self, file))[1])
    script = _script(stem)
    entry = next(script[name] for name in ("parse_args", "main", "cli") if name in script)
    with pytest.raises(SystemExit) as stop:
        entry(["--help"])
    assert stop.value.code == 0 and len(printed) == 1
    text = capsys.readouterr().out
    lines: dict[str, str] = {}
    name = None
    for line in text.splitlines():  # an argument's help may start on the line after its name
        if line.startswith("  ") and not line.startswith("   ") and line.split():
            name = line.split()[0].rstrip(",")
            lines[name] = line
        elif name and line.startswith("   "):
            lines[name] += " " + line.strip()
        else:
            name = None
    return printed[0], lines, text


def _shows(default) -> bool:
    return default not in (None, False, argparse.SUPPRESS) and not (isinstance(default, (str, list, tuple)) and not default)


@pytest.mark.parametrize("stem", SCRIPTS)
def test_help_shows_every_default_and_cites_no_issue(stem, monkeypatch, capsys):
    """Only ellipsoid_check showed its defaults; position_timesteps and research_protocol cited internal issues
    in their descriptions, and several arguments had no help at all (lr_sweep's --preset, research_protocol's
    --quick, ellipsoid_check's --batch_size and --device, render_report's page)."""
    parser, lines, text = _help(stem, monkeypatch, capsys)
    assert "issue:" not in text.lower()
    assert "(default: " in text
    if stem in OWNED_ELSEWHERE:
        return
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        choices = "{" + ",".join(action.choices) + "}" if action.choices else None
        name = action.option_strings[0] if action.option_strings else action.metavar or choices or action.dest
        assert action.help, f"{name} has no help"
        line = lines[name]
        if _shows(action.default) and "default" not in action.help.lower():
            assert f"(default: {action.default})" in line, line


def _band(folder: Path, seeds: int, steps: int, digest: str) -> Path:
    """A band record as position_timesteps.py writes it (written by hand: no model runs)."""
    points = list(range(0, steps, 2)) + [steps]
    pairs = [("a red circle at the top left", "a red circle at the bottom right"),
             ("a blue square at the bottom right", "a blue square at the top left"),
             ("a green triangle at the top right", "a green triangle at the bottom left")]
    record = {"model": "/somewhere/weights",
              "settings": {"seeds": seeds, "sample_steps": steps, "guidance": 3.0, "switch_every": 2,
                           "switch_points": points, "model_digest": digest},
              "t_high": 961.6, "t_low": 662.4, "regulariser_coverage": 0.2992,
              "rows": [{"prompt_a": a, "prompt_b": b, "switch_step": k} for a, b in pairs for k in points]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "position_timesteps.json").write_text(json.dumps(record, indent=1) + "\n")
    (folder / "position_timesteps.png").write_bytes(b"the committed plot")
    return folder / "position_timesteps.json"


@pytest.fixture(scope="module")
def toy_digest() -> str:
    from pti_plugin.embedded_default import default_model_dir
    from pti_plugin.protocol.premise import model_digest

    return model_digest(Path(default_model_dir()))


def test_a_quick_band_does_not_replace_one_measured_otherwise(tmp_path, capsys, toy_digest):
    """``--quick --out analysis/results/research_protocol`` replaced the committed 32-seed band with a 4-seed one
    without a word; now a record measured with other settings (seeds and steps, or another model, or written
    before the record kept the model) is refused before the model loads, naming what differs and ``--replace``."""
    parse_args = _script("position_timesteps")["parse_args"]
    committed = _band(tmp_path / "results", 32, 25, toy_digest)
    before = committed.read_bytes()
    with pytest.raises(SystemExit) as stop:
        parse_args(["--quick", "--out", str(committed.parent)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and str(committed) in err and "--replace" in err
    assert "seeds 32 -> 4" in err and "sample_steps 25 -> 4" in err
    assert committed.read_bytes() == before and (committed.parent / "position_timesteps.png").read_bytes() == b"the committed plot"
    assert parse_args(["--out", str(committed.parent)]).replace is False  # measured alike: replaced as before
    assert parse_args(["--quick", "--replace", "--out", str(committed.parent)]).replace is True
    assert parse_args(["--quick", "--out", str(tmp_path / "empty")]).quick  # nothing there yet

    other = _band(tmp_path / "other", 32, 25, "0123456789ab")
    with pytest.raises(SystemExit):
        parse_args(["--out", str(other.parent)])
    assert f"model_digest 0123456789ab -> {toy_digest}" in capsys.readouterr().err

    older = _band(tmp_path / "older", 32, 25, toy_digest)
    record = json.loads(older.read_text())
    del record["settings"]["model_digest"]
    older.write_text(json.dumps(record))
    with pytest.raises(SystemExit):
        parse_args(["--out", str(older.parent)])
    assert f"model_digest (none) -> {toy_digest}" in capsys.readouterr().err


def test_report_band_line_states_seeds_and_steps(tmp_path):
    """The report said "between timesteps 962 and 662 ... 30%" for a 4-seed quick band as for the committed
    32-seed one; the line now says how the band was measured."""
    from pti_plugin.protocol.protocol_sections import timestep_lines

    _band(tmp_path, 4, 4, "0123456789ab")
    line = timestep_lines(tmp_path)[1]
    assert "4 sampling seeds x 3 prompt pairs, 4 sampler steps, a switch point every 2" in line
    assert "between timesteps 962 and 662" in line and "30% of them" in line


def _fits_file(path: Path, scale: float) -> Path:
    """H1's knees and segment fits of a fixed grid (5 rates, 2 training seeds) whose per-image scores are
    multiplied by ``scale``, written as the report writes the summary."""
    from pti_plugin.protocol.h1_summary import knee_and_fits

    angles = [0.5, 1.0, 2.0, 4.0, 8.0]
    coarse = [[0.05, 0.1], [0.3, 0.35], [0.7, 0.6], [0.8, 0.85], [0.83, 0.87]]
    edit = [[0.9, 0.8], [0.85, 0.8], [0.6, 0.65], [0.4, 0.3], [0.2, 0.25]]
    rows = [{"output_angle_layernorm_deg": a, "pivot_l2_from_init": a / 10} for a in angles]
    groups = {lr: [{"seed": s, "coarse": [coarse[j][s] * scale, (coarse[j][s] + 0.01) * scale],
                    "joint_edit": [edit[j][s] * scale, (edit[j][s] - 0.01) * scale]} for s in range(2)]
              for j, lr in enumerate([1e-5, 3e-5, 1e-4, 3e-4, 1e-3])}
    path.write_text(json.dumps(knee_and_fits(rows, groups, draws=20), indent=1, default=str) + "\n")
    return path


def test_h1_segment_fits_are_stored_alike_from_inputs_that_differ_in_the_last_digits(tmp_path):
    """A rebuilt report on a fresh clone rewrote the committed h1_summary.json in the fits' last digits
    (slope_before 0.1157422267954258 -> ...581); the fits are now stored to 10 significant digits."""
    from pti_plugin.metrics.curves import segment_fits

    first = _fits_file(tmp_path / "a.json", 1.0)
    second = _fits_file(tmp_path / "b.json", 1.0 + 4e-15)
    assert first.read_bytes() == second.read_bytes()
    stored = json.loads(first.read_text())["output_angle_layernorm_deg"]["segments_coarse"]["two_segments"]
    exact = segment_fits([0.5, 1.0, 2.0, 4.0, 8.0], [0.08, 0.33, 0.655, 0.83, 0.855])["two_segments"]
    for key, value in exact.items():  # far above the report's 3 significant digits
        assert stored[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_research_protocol_help_shows_the_parts_default_values(monkeypatch, capsys):
    """``--save_every`` and ``--dense_until`` said "(default: H2Settings')", and ``--seeds``, ``--lrs``, ``--weights``
    "the part's" or "the module's": the values are now shown (H2 saves every 10 steps and reads every save up to
    step 100; at 3e-3 every 2 steps, up to 20)."""
    _, lines, text = _help("research_protocol", monkeypatch, capsys)
    assert "H2Settings" not in text and "the module's" not in text and "default: the part's" not in text
    assert "(default: 10, 2 at lr 0.003)" in lines["--save_every"]
    assert "(default: 100, 20 at lr 0.003)" in lines["--dense_until"]
    assert "(default: 42,1,2)" in lines["--seeds"]
    assert "h2 (LoRA): 0.001,0.003,0.01;" in lines["--lrs"] and "h1 (inversion): 3e-06,1e-05," in lines["--lrs"]
    assert "half_angle=10,100;" in lines["--weights"] and "reg_images=1,3)" in lines["--weights"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_lr_sweep_refuses_a_guidance_that_is_not_a_finite_number_at_least_0(value, tmp_path, capsys):
    """``--guidance nan`` (or inf) was taken and every generation of the sweep's measurement came out NaN."""
    from pti_plugin.sweeps.lr_sweep import parse_args

    argv = ["--preset", str(tmp_path / "p.toml"), "--stage", "lora", "--lrs", "1e-3", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as stop:
        parse_args([*argv, f"--guidance={value}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "argument --guidance" in err and repr(value) in err
    assert parse_args([*argv, "--guidance", "0"]).guidance == 0.0


@pytest.mark.parametrize("script", ["research_bench", "internal_metrics"])
def test_the_bench_and_internal_metrics_refuse_a_guidance_that_is_not_finite(script, tmp_path, capsys):
    """``--guidance nan`` reached the generations of the bench and the internal metrics as it did lr_sweep's."""
    if script == "research_bench":
        from pti_plugin.sweeps.bench import parse_args
    else:
        import importlib.util
        spec = importlib.util.spec_from_file_location("internal_metrics_cli", Path(__file__).parents[1] / "analysis" / "internal_metrics.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        parse_args = module.parse_args
    argv = [str(tmp_path)] if script == "internal_metrics" else []
    with pytest.raises(SystemExit) as stop:
        parse_args([*argv, "--guidance", "nan"])
    assert stop.value.code == 2 and "argument --guidance" in capsys.readouterr().err
