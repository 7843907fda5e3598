"""pti_plugin/script_args.py: the argument checks shared by the analysis and benchmark scripts."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from pti_plugin.script_args import (check_out_folder, device, device_problem, finite_float, finite_float_at_least,
                                    int_at_least, out_folder_problem, positive_int)

ROOT = Path(__file__).resolve().parents[1]


def _parser(**types) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="script")
    for name, kind in types.items():
        parser.add_argument(f"--{name}", type=kind)
    return parser


@pytest.mark.parametrize("kind, text", [(positive_int, t) for t in ("0", "-3", "2.5", "x", "")]
                         + [(finite_float, t) for t in ("nan", "inf", "-inf", "NaN", "x")])
def test_a_value_outside_the_type_is_a_usage_error_naming_the_option(kind, text, capsys):
    """positive_int: whole numbers from 1; finite_float: no NaN, no inf, no words."""
    with pytest.raises(SystemExit) as stop:
        _parser(value=kind).parse_args(["--value", text])
    assert stop.value.code == 2
    assert "argument --value:" in capsys.readouterr().err


def test_positive_int_and_int_at_least_accept_their_range():
    assert _parser(steps=positive_int).parse_args(["--steps", "1"]).steps == 1
    assert _parser(n=int_at_least(3)).parse_args(["--n", "3"]).n == 3
    with pytest.raises(argparse.ArgumentTypeError, match="at least 3, got 2"):
        int_at_least(3)("2")


def test_int_at_least_names_the_reason_for_its_minimum(capsys):
    with pytest.raises(SystemExit) as stop:
        _parser(seeds=int_at_least(2, "diversity compares seeds")).parse_args(["--seeds", "1"])
    assert stop.value.code == 2
    assert "argument --seeds: must be at least 2, got 1 (diversity compares seeds)" in capsys.readouterr().err
    assert _parser(seeds=int_at_least(2, "diversity compares seeds")).parse_args(["--seeds", "2"]).seeds == 2


def test_finite_float_at_least():
    assert finite_float("-2.5") == -2.5
    assert finite_float_at_least(0)("0") == 0.0
    with pytest.raises(argparse.ArgumentTypeError, match="at least 0"):
        finite_float_at_least(0)("-0.1")
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        finite_float_at_least(0)("inf")


def test_device_refuses_an_unknown_name_and_cuda_without_cuda(capsys):
    assert device("cpu") == "cpu" and device_problem("cpu") is None
    assert "not a torch device" in device_problem("foo")
    with pytest.raises(SystemExit) as stop:
        _parser(device=device).parse_args(["--device", "foo"])
    assert stop.value.code == 2 and "argument --device:" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert "CUDA is not available" in device_problem("cuda")
        assert "CUDA is not available" in device_problem("cuda:0")
    else:
        assert device_problem("cuda") is None
        assert "CUDA device(s)" in device_problem(f"cuda:{torch.cuda.device_count()}")


def test_out_folder_problem(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert out_folder_problem(tmp_path) is None  # an existing folder
    assert out_folder_problem(tmp_path / "new" / "deeper") is None  # made later
    assert out_folder_problem(afile) == "exists and is not a folder"
    assert out_folder_problem(afile / "sub") == f"cannot be created: {afile} is a file, not a folder"
    assert "is a file" in out_folder_problem(afile / "sub" / "deeper")


def test_check_out_folder_names_the_option(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    parser = _parser()
    check_out_folder(parser, None)  # not given: nothing to check
    check_out_folder(parser, tmp_path / "new")
    with pytest.raises(SystemExit) as stop:
        check_out_folder(parser, afile / "sub", "--results")
    assert stop.value.code == 2
    assert f"--results {afile / 'sub'}: cannot be created" in capsys.readouterr().err


def test_a_flag_is_taken_only_as_typed_in_full(capsys):
    """argparse reads a prefix as the flag it begins: the bench took ``--gpus 2`` (lr_sweep's flag) as
    ``--gpus_per_run 2``, and the protocol ``--see 3`` as ``--seeds 3``. Both are now unrecognised."""
    import runpy

    from pti_plugin.sweeps.bench import parse_args as bench_args

    protocol_args = runpy.run_path(str(ROOT / "analysis" / "research_protocol.py"))["parse_args"]
    for parse, argv, flag in ((bench_args, ["--gpus", "2"], "--gpus"), (protocol_args, ["h1", "--see", "3"], "--see")):
        with pytest.raises(SystemExit) as stop:
            parse(argv)
        assert stop.value.code == 2
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_every_script_builds_its_parser_through_argument_parser():
    """The rule above is written once (``argument_parser``); a script that builds its own parser escapes it."""
    scripts = [p for folder in ("analysis", "benchmarks", "pti_plugin") for p in (ROOT / folder).rglob("*.py")]
    own = [str(p.relative_to(ROOT)) for p in scripts
           if "argparse.ArgumentParser(" in p.read_text(encoding="utf-8") and p.name != "script_args.py"]
    assert own == [], own
