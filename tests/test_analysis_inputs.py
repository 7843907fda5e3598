"""What a user types into the analysis and benchmark scripts: each bad value ends in a usage error (exit 2)
naming the option or file, before any model loads, and nothing is written (an earlier output stays as it was)."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

from pti_plugin.models.model_checks import model_folder_problem
from pti_plugin.toy_world import WEIGHTS_DIR

REPO = Path(__file__).resolve().parents[1]


def _script(path: str) -> dict:
    """The globals of ``path`` (a script of this repository), run under another name than ``__main__``."""
    return runpy.run_path(str(REPO / path), run_name=Path(path).stem + "_under_test")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(call, capsys) -> str:
    """Run ``call``; it must end in a usage error (SystemExit 2); return what it printed on stderr."""
    with pytest.raises(SystemExit) as stop:
        call()
    assert stop.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def afile(tmp_path) -> Path:
    path = tmp_path / "afile"
    path.write_text("mine\n")
    return path


@pytest.fixture
def earlier_out(tmp_path) -> Path:
    """An output folder holding an earlier run's files."""
    out = tmp_path / "earlier"
    out.mkdir()
    for name in ("ellipsoid.json", "centre.safetensors", "ellipsoid.png", "learning_curves.json", "toy_quality.json"):
        (out / name).write_bytes(f"earlier {name}\n".encode())
    return out


# ----------------------------------------------------------------------------- ellipsoid_check.py

ELLIPSOID_REFUSALS = [
    (["--threshold", "nan"], "argument --threshold: must be a finite number"),
    (["--eos_factor", "inf"], "argument --eos_factor: must be a finite number"),
    (["--batch_size", "0"], "argument --batch_size: must be at least 1"),
    (["--batch_size", "-3"], "argument --batch_size: must be at least 1"),
    (["--template_words", "only", "--template", "{} and {}"], "--template '{} and {}': needs exactly one {} where the word goes"),
    (["--template_words", "only", "--template", "no field"], "--template 'no field': needs exactly one {} where the word goes"),
    (["--template", "a {0} b"], "--template 'a {0} b'"),
    (["--device", "foo"], "argument --device: not a torch device"),
]


@pytest.mark.parametrize("argv,message", ELLIPSOID_REFUSALS)
def test_ellipsoid_check_refuses_bad_numbers_and_templates_before_loading(argv, message, earlier_out, capsys):
    before = _snapshot(earlier_out)
    err = _refused(lambda: _script("analysis/ellipsoid_check.py")["cli"]([*argv, "--out", str(earlier_out)]), capsys)
    assert message in err
    assert _snapshot(earlier_out) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of cuda on a machine without it")
def test_ellipsoid_check_refuses_cuda_without_cuda(tmp_path, capsys):
    err = _refused(lambda: _script("analysis/ellipsoid_check.py")["cli"](["--device", "cuda", "--out", str(tmp_path / "o")]),
                   capsys)
    assert "argument --device: 'cuda', but CUDA is not available" in err
    assert not (tmp_path / "o").exists()


def test_ellipsoid_check_names_a_sentences_folder_or_binary_file(tmp_path, capsys):
    cli = _script("analysis/ellipsoid_check.py")["cli"]
    out = tmp_path / "o"
    err = _refused(lambda: cli(["--sentences", str(tmp_path), "--out", str(out)]), capsys)
    assert f"--sentences {tmp_path}: not a file" in err
    binary = tmp_path / "s.txt"
    binary.write_bytes(b"\xff\xfe\x00 a girl\n")
    err = _refused(lambda: cli(["--sentences", str(binary), "--out", str(out)]), capsys)
    assert f"--sentences {binary}: not UTF-8 text" in err
    assert not out.exists()


def test_ellipsoid_check_refuses_an_out_that_is_or_lies_under_a_file(afile, capsys):
    cli = _script("analysis/ellipsoid_check.py")["cli"]
    assert f"--out {afile}: exists and is not a folder" in _refused(lambda: cli(["--out", str(afile)]), capsys)
    err = _refused(lambda: cli(["--out", str(afile / "sub")]), capsys)
    assert f"--out {afile / 'sub'}: cannot be created: {afile} is a file" in err
    assert afile.read_text() == "mine\n"


def test_ellipsoid_check_names_a_clip_skip_past_the_text_encoder(tiny_model, tmp_path, capsys):
    cli = _script("analysis/ellipsoid_check.py")["cli"]
    assert cli(["--model", str(tiny_model), "--clip_skip", "99", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--clip_skip 99: the model's text encoder has" in err and "use 1 to" in err
    assert not (tmp_path / "o").exists()


def test_ellipsoid_check_writes_nothing_when_its_result_cannot_be_written(tiny_model, tmp_path, capsys, monkeypatch):
    """A result that cannot be JSON (here a NaN in the model's identity) is refused before any file is written:
    an earlier run's folder is left byte for byte (before, its centre file and plot were replaced, its JSON not)."""
    cli = _script("analysis/ellipsoid_check.py")["cli"]
    out = tmp_path / "o"
    argv = ["--model", str(tiny_model), "--template_words", "only", "--max_sentences", "12", "--out", str(out)]
    monkeypatch.setenv("PTI_PLUGIN_CACHE", str(tmp_path / "cache"))
    assert cli(argv) == 0
    before = _snapshot(out)
    assert sorted(before) == ["centre.safetensors", "ellipsoid.json", "ellipsoid.png"]
    identity = cli.__globals__["_identity"]
    monkeypatch.setitem(cli.__globals__, "_identity", lambda *a: identity(*a) | {"width": float("nan")})
    capsys.readouterr()
    assert cli([*argv, "--seed", "1"]) == 2
    assert "not JSON compliant" in capsys.readouterr().err
    assert _snapshot(out) == before


# ----------------------------------------------------------------------------- toy_quality.py

@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "argument --steps: must be at least 1"),
    (["--steps", "-2"], "argument --steps: must be at least 1"),
    (["--guidance", "nan"], "argument --guidance: must be a finite number"),
    (["--guidance", "inf"], "argument --guidance: must be a finite number"),
])
def test_toy_quality_refuses_bad_sampling_options(argv, message, earlier_out, capsys):
    before = _snapshot(earlier_out)
    err = _refused(lambda: _script("analysis/toy_quality.py")["main"]([*argv, "--out", str(earlier_out)]), capsys)
    assert message in err
    assert _snapshot(earlier_out) == before


@pytest.mark.parametrize("premise", [[], ["--premise", "--quick"]])
def test_toy_quality_refuses_an_out_that_is_or_lies_under_a_file(premise, afile, capsys):
    main = _script("analysis/toy_quality.py")["main"]
    assert f"--out {afile}: exists and is not a folder" in _refused(lambda: main([*premise, "--out", str(afile)]), capsys)
    assert f"{afile} is a file" in _refused(lambda: main([*premise, "--out", str(afile / "sub")]), capsys)
    assert afile.read_text() == "mine\n"


def test_toy_quality_help_names_what_each_premise_option_takes(capsys, monkeypatch):
    """Only the two learning-rate options say "comma-separated learning rates" (before, all seven did)."""
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    with pytest.raises(SystemExit):
        _script("analysis/toy_quality.py")["main"](["--help"])
    lines, option = {}, None
    for line in capsys.readouterr().out.splitlines():  # an option's help may start on the line after its name
        if line.startswith("  --"):
            option = line.split()[0]
            lines[option] = line
        elif option and line.startswith("      "):
            lines[option] += " " + line.strip()
    for option in ("--init_word", "--inversion_steps", "--lora_steps", "--oracle_steps", "--seeds"):
        assert "learning rates" not in lines[option], option
    assert "a whole number >= 1" in lines["--inversion_steps"] and "vocabulary" in lines["--init_word"]
    for option in ("--inversion_lrs", "--lora_lrs"):
        assert "comma-separated learning rates" in lines[option]


# ----------------------------------------------------------------------------- learning_curves.py

@pytest.mark.parametrize("argv,message", [
    (["--seeds", "0"], "argument --seeds: must be at least 1"),
    (["--seeds", "-2"], "argument --seeds: must be at least 1"),
    (["--steps", "0"], "argument --steps: must be at least 1"),
    (["--steps", "-2"], "argument --steps: must be at least 1"),
    (["--guidance", "nan"], "argument --guidance: must be a finite number"),
    (["--device", "foo"], "argument --device: not a torch device"),
])
def test_learning_curves_refuses_bad_sampling_options(argv, message, tmp_path, earlier_out, capsys):
    before = _snapshot(earlier_out)
    err = _refused(lambda: _script("analysis/learning_curves.py")["main"]([str(tmp_path), *argv, "--out", str(earlier_out)]),
                   capsys)
    assert message in err
    assert _snapshot(earlier_out) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of cuda on a machine without it")
def test_learning_curves_refuses_cuda_without_cuda(tmp_path, capsys):
    parse_args = _script("analysis/learning_curves.py")["parse_args"]
    assert "argument --device: 'cuda', but CUDA is not available" in _refused(
        lambda: parse_args([str(tmp_path), "--device", "cuda"]), capsys)


def test_learning_curves_refuses_a_run_given_twice(tmp_path, capsys):
    parse_args = _script("analysis/learning_curves.py")["parse_args"]
    run, other = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    run.mkdir(parents=True)
    other.mkdir()
    assert f"run {run} given twice" in _refused(lambda: parse_args([str(run), str(other), str(run)]), capsys)
    spelled = tmp_path / "runs" / ".." / "runs" / "a"
    err = _refused(lambda: parse_args([str(run), f"{spelled}/"]), capsys)
    assert "given twice" in err and f"(also as {run})" in err
    assert f"no <output_name>.config.toml in {run}" in _refused(lambda: parse_args([str(run), str(other)]), capsys)


def test_learning_curves_refuses_a_file_as_run_or_out(tmp_path, afile, capsys):
    parse_args = _script("analysis/learning_curves.py")["parse_args"]
    assert f"run {afile}: not a folder" in _refused(lambda: parse_args([str(afile)]), capsys)
    assert f"--out {afile}: exists and is not a folder" in _refused(
        lambda: parse_args([str(tmp_path), "--out", str(afile)]), capsys)
    assert f"{afile} is a file" in _refused(lambda: parse_args([str(tmp_path), "--out", str(afile / "x")]), capsys)


# ----------------------------------------------------------------------------- interpolation_paths.py

def test_interpolation_paths_refuses_an_out_under_a_file(afile, capsys):
    parse_args = _script("analysis/interpolation_paths.py")["parse_args"]
    err = _refused(lambda: parse_args(["--quick", "--out", str(afile / "sub")]), capsys)
    assert f"--out {afile / 'sub'}: cannot be created: {afile} is a file" in err


def test_a_model_folder_missing_a_listed_component_is_named(tmp_path, capsys):
    """model_index.json, tokenizer and text_encoder but no unet or vae: the missing parts are named before loading."""
    half = tmp_path / "half"
    half.mkdir()
    for part in ("model_index.json", "tokenizer", "text_encoder", "scheduler"):
        source = WEIGHTS_DIR / part
        (shutil.copy if source.is_file() else shutil.copytree)(source, half / part)
    assert model_folder_problem(WEIGHTS_DIR) is None
    assert model_folder_problem(half).startswith(f"not a complete SD1.x diffusers folder: no unet/, vae/ in {half} (model family")
    parse_args = _script("analysis/interpolation_paths.py")["parse_args"]
    err = _refused(lambda: parse_args(["--model", str(half), "--out", str(tmp_path / "o")]), capsys)
    assert f"--model {half}: not a complete SD1.x diffusers folder: no unet/, vae/" in err
    only_index = tmp_path / "only_index"
    only_index.mkdir()
    shutil.copy(WEIGHTS_DIR / "model_index.json", only_index)
    err = _refused(lambda: parse_args(["--model", str(only_index)]), capsys)
    assert "tokenizer" in err and "init word" not in err
    (only_index / "model_index.json").write_text("[1, 2]")
    assert model_folder_problem(only_index) == f"{only_index / 'model_index.json'} is not a JSON object"


# ----------------------------------------------------------------------------- toy_quality.py (premise options)

@pytest.mark.parametrize("argv", [["--quick"], ["--lora_lrs", "1e-3"], ["--seeds", "2", "--init_word", "shape"]])
def test_toy_quality_refuses_premise_options_without_premise(argv, tmp_path, capsys):
    """They were silently ignored: the quality run ran in full at its defaults."""
    main = _script("analysis/toy_quality.py")["main"]
    err = _refused(lambda: main([*argv, "--out", str(tmp_path / "o")]), capsys)
    assert f"{argv[0]}" in err and "add --premise" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- position_leakage.py

@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "foo"], "argument --device:"),
    (["--steps", "0"], "argument --steps: must be at least 1"),
    (["--guidance", "nan"], "argument --guidance: must be a finite number"),
    (["--training_timestep", "-1"], "argument --training_timestep: must be at least 0"),
])
def test_position_leakage_refuses_settings_before_loading_the_run(argv, message, tmp_path, capsys):
    main = _script("analysis/position_leakage.py")["main"]
    assert message in _refused(lambda: main(["--run", str(tmp_path), *argv]), capsys)


# ----------------------------------------------------------------------------- detail_size.py

@pytest.mark.parametrize("draws", ["0", "-5"])
def test_detail_size_refuses_draws_below_one(draws, tmp_path, capsys):
    err = _refused(lambda: _script("analysis/detail_size.py")["parse_args"](["--out", str(tmp_path), "--draws", draws]),
                   capsys)
    assert "argument --draws: must be at least 1" in err


@pytest.mark.parametrize("content,message", [
    ('[{"vari', "cannot be read as JSON"),
    ('{"a": 1}', "not a detail_size table"),
    ('[{"variant": "x"}]', "not a detail_size table"),
    ('[{"variant": "x", "weight": null, "lr": 0.001, "seeds": [[1]]}]', "not a detail_size table"),
    (None, "a folder, not a file"),
])
def test_detail_size_names_a_results_table_it_cannot_read(content, message, tmp_path, capsys):
    results = tmp_path / "results"
    table = results / "detail_size.json"
    if content is None:
        table.mkdir(parents=True)
    else:
        results.mkdir()
        table.write_text(content)
    before = _snapshot(results)
    err = _refused(lambda: _script("analysis/detail_size.py")["parse_args"](
        ["--out", str(tmp_path), "--results", str(results)]), capsys)
    assert f"--results {table}: {message}" in err
    assert _snapshot(results) == before


def test_detail_size_reads_a_good_results_table_and_refuses_a_file_as_results(tmp_path, afile, capsys):
    parse_args = _script("analysis/detail_size.py")["parse_args"]
    (tmp_path / "h3" / "parts").mkdir(parents=True)  # an --out that holds H3 parts
    rows = [{"variant": "none", "weight": None, "lr": 0.001, "seeds": [1, 42]}]
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "detail_size.json").write_text(json.dumps(rows))
    assert parse_args(["--out", str(tmp_path), "--results", str(tmp_path / "results")]).previous_rows == rows
    assert f"--results {afile}: exists and is not a folder" in _refused(
        lambda: parse_args(["--out", str(tmp_path), "--results", str(afile)]), capsys)


# ----------------------------------------------------------------------------- render_report.py

@pytest.fixture
def page(tmp_path) -> Path:
    path = tmp_path / "report.html"
    path.write_text('<html><body data-images-loaded="0" data-images-total="0"><h1>report</h1></body></html>')
    return path


def _fake_browser(tmp_path: Path, body: str) -> str:
    """An executable standing in for chromium: ``body`` is Python run with the browser's arguments in ``args``."""
    script = tmp_path / "fake_browser"
    script.write_text(f"#!{sys.executable}\nimport sys\nargs = sys.argv[1:]\n"
                      "shot = next((a.split('=', 1)[1] for a in args if a.startswith('--screenshot=')), None)\n" + body)
    script.chmod(0o755)
    return str(script)


def test_render_report_refuses_a_screenshot_that_is_no_png_path(page, tmp_path, capsys):
    main = _script("analysis/render_report.py")["main"]
    mine = tmp_path / "mine.txt"
    mine.write_text("my notes\n")
    assert "--screenshot" in _refused(lambda: main([str(page), "--screenshot", str(mine)]), capsys)
    assert "--screenshot" in _refused(lambda: main([str(page), "--screenshot", str(page)]), capsys)
    assert "does not exist" in _refused(lambda: main([str(page), "--screenshot", str(tmp_path / "no" / "s.png")]), capsys)
    (tmp_path / "dir.png").mkdir()
    assert "is a folder" in _refused(lambda: main([str(page), "--screenshot", str(tmp_path / "dir.png")]), capsys)
    assert "no such page" in _refused(lambda: main([str(tmp_path / "missing.html")]), capsys)
    assert mine.read_text() == "my notes\n" and page.read_text().startswith("<html>")


def test_render_report_never_reads_an_earlier_file_as_the_screenshot(page, tmp_path, capsys):
    """A browser that writes no image (or not a PNG) leaves an earlier screenshot as it was and the ink at 0;
    one that writes an image replaces it. No temporary file is left beside it."""
    import numpy as np
    from PIL import Image

    main = _script("analysis/render_report.py")["main"]
    shot = tmp_path / "shots" / "shot.png"
    shot.parent.mkdir()
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(shot)  # an earlier, all-ink screenshot
    earlier = shot.read_bytes()
    for body in ("", "if shot: open(shot, 'w').write('not a png')\n"):
        assert main([str(page), "--screenshot", str(shot), "--browser", _fake_browser(tmp_path, body)]) == 1
        seen = capsys.readouterr()
        assert "screenshot_ink=0.000" in seen.out and "gave no page" in seen.err  # it printed no DOM either
        assert shot.read_bytes() == earlier
    writes = ("import numpy as np\nfrom PIL import Image\n"
              "print('<body data-images-loaded=\"0\" data-images-total=\"0\">')\n"
              "if shot: Image.fromarray(np.full((20, 20), 128, dtype=np.uint8)).save(shot)\n")
    assert main([str(page), "--screenshot", str(shot), "--browser", _fake_browser(tmp_path, writes)]) == 0
    assert "screenshot_ink=1.000" in capsys.readouterr().out
    assert shot.read_bytes() != earlier
    assert sorted(p.name for p in shot.parent.iterdir()) == ["shot.png"]


# ----------------------------------------------------------------------------- benchmarks

@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "argument --steps: must be at least 1"),
    (["--rank", "0"], "argument --rank: must be at least 1"),
    (["--rank", "-1"], "argument --rank: must be at least 1"),
    (["--device", "foo"], "argument --device: not a torch device"),
    *([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]),
])
def test_weight_guard_overhead_refuses_bad_options(argv, message, capsys):
    assert message in _refused(lambda: _script("benchmarks/weight_guard_overhead.py")["main"](argv), capsys)


@pytest.fixture
def pivot_overhead():
    """The benchmark's globals; the plugins it registers are unregistered afterwards."""
    from pti_plugin import hooks

    saved = dict(hooks._REGISTERED)
    yield _script("benchmarks/pivot_locality_overhead.py")
    hooks._REGISTERED.clear()
    hooks._REGISTERED.update(saved)


@pytest.mark.parametrize("argv,message", [
    (["--repeats", "0", "--skip-sd15"], "argument --repeats: must be at least 1"),
    (["--tiny-steps", "0", "--skip-sd15"], "argument --tiny-steps: must be at least 1"),
    (["--tiny-steps", "-3"], "argument --tiny-steps: must be at least 1"),
    (["--sd15-steps", "2"], "argument --sd15-steps: must be at least 3"),
    (["--skip-sd15", "--skip-tiny"], "--skip-sd15 and --skip-tiny together would measure nothing"),
])
def test_pivot_locality_overhead_refuses_what_its_statistics_cannot_use(argv, message, pivot_overhead, capsys):
    assert message in _refused(lambda: pivot_overhead["main"](argv), capsys)


# ----------------------------------------------------------------------------- counts: one argparse type

# (script, entry, argv before the flag, flag, value below the minimum, the refusal argparse prints)
COUNT_REFUSALS = [
    ("analysis/ellipsoid_check.py", "cli", [], "--max_sentences", "1", "argument --max_sentences: must be at least 2, got 1"),
    ("analysis/ellipsoid_check.py", "cli", [], "--index", "0",
     "argument --index: must be at least 1, got 0 (index 0 is BOS: its state is the same for every sentence)"),
    ("analysis/internal_metrics.py", "parse_args", ["."], "--seeds", "0", "argument --seeds: must be at least 1, got 0"),
    ("analysis/internal_metrics.py", "parse_args", ["."], "--sample_steps", "0", "argument --sample_steps: must be at least 1, got 0"),
    ("analysis/internal_metrics.py", "parse_args", ["."], "--draws", "-1", "argument --draws: must be at least 1, got -1"),
    ("analysis/interpolation_paths.py", "parse_args", [], "--seeds", "1",
     "argument --seeds: must be at least 2, got 1 (an interval needs two sampling seeds)"),
    ("analysis/interpolation_paths.py", "parse_args", [], "--fractions", "0",
     "argument --fractions: must be at least 2, got 0 (the start and the end)"),
    ("analysis/position_leakage.py", "main", ["--run", "."], "--n_seeds", "1",
     "argument --n_seeds: must be at least 2, got 1 (diversity compares seeds)"),
    ("analysis/position_timesteps.py", "parse_args", [], "--seeds", "0", "argument --seeds: must be at least 1, got 0"),
    ("analysis/position_timesteps.py", "parse_args", [], "--switch_every", "0", "argument --switch_every: must be at least 1, got 0"),
    ("analysis/sampling_seeds_check.py", "parse_args", ["a.json", "b.json", "--out", "o"], "--draws", "0",
     "argument --draws: must be at least 1, got 0"),
    ("analysis/toy_quality.py", "main", [], "--prompts", "0", "argument --prompts: must be at least 1, got 0"),
    ("analysis/toy_quality.py", "main", [], "--two_tone_prompts", "-2", "argument --two_tone_prompts: must be at least 1, got -2"),
    ("analysis/toy_quality.py", "main", ["--premise"], "--inversion_steps", "0",
     "argument --inversion_steps: must be at least 1, got 0"),
    ("analysis/toy_quality.py", "main", ["--premise"], "--seeds", "x", "argument --seeds: expected a whole number, got 'x'"),
]


@pytest.mark.parametrize("path, entry, before, flag, value, message", COUNT_REFUSALS,
                         ids=[f"{Path(c[0]).stem}{c[3]}={c[4]}" for c in COUNT_REFUSALS])
def test_a_count_below_its_minimum_is_refused_by_its_argparse_type(path, entry, before, flag, value, message,
                                                                   tmp_path, capsys, monkeypatch):
    """Each count's minimum is its option's argparse type: exit 2, the option, the minimum and its reason."""
    monkeypatch.chdir(tmp_path)  # relative paths above, and nothing written anywhere else
    call = _script(path)[entry]
    assert message in _refused(lambda: call([*before, flag, value, "--out", str(tmp_path / "out")]), capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path, argv, expected", [
    ("analysis/interpolation_paths.py", ["--seeds", "2", "--fractions", "2"], {"seeds": 2, "fractions": 2}),
    ("analysis/interpolation_paths.py", [], {"seeds": None, "fractions": None}),  # None: the preset's default
    ("analysis/position_timesteps.py", ["--seeds", "1", "--switch_every", "1"], {"seeds": 1, "switch_every": 1}),
    ("analysis/position_timesteps.py", [], {"seeds": 32, "switch_every": 2}),
    ("analysis/internal_metrics.py", [".", "--seeds", "1", "--sample_steps", "1", "--draws", "1"],
     {"seeds": 1, "sample_steps": 1, "draws": 1}),
    ("analysis/ellipsoid_check.py", ["--max_sentences", "2", "--index", "1"], {"max_sentences": 2, "index": 1}),
    ("analysis/ellipsoid_check.py", [], {"max_sentences": None}),
])
def test_a_count_at_its_minimum_or_left_out_parses(path, argv, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parsed = _script(path)["parse_args"]([*argv, "--out", str(tmp_path / "out")])
    args = parsed[0] if isinstance(parsed, tuple) else parsed
    assert {key: getattr(args, key) for key in expected} == expected
