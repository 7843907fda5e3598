"""The research protocol's training runs stopped and continued, the commands the trainer prints when another program
runs it, the parts named in the log, and the premise checks' verdicts."""

from __future__ import annotations

import os
import shlex
import signal
import time
from pathlib import Path

import pytest
import toml

import pti_plugin.cli
from pti_plugin import outputs
from pti_plugin.outputs import trainer_command
from pti_plugin.protocol import premise

STATE_FILES = ("trainable.safetensors", "optimizer.pt", "lr_scheduler.pt", "progress.json")
PRESET = {"seed": 1, "learning_rate": 2.75e-5, "output_name": "premise", "token_string": "tok1",
          "stages": [{"name": "inversion", "kind": "inversion", "steps": 1000, "learning_rate": 2.75e-5}]}


def test_printed_commands_name_a_script_only_when_the_trainer_is_the_program(monkeypatch, capsys):
    """Inside an analysis script (its own arguments, not the trainer's) a printed command names train_pti.py; before,
    it named the script (``accelerate launch analysis/lr_sweep.py --preset ... --resume ...``, refused by its parser).
    The trainer's own command line (``cli.main`` without ``argv``) names the script as started."""
    monkeypatch.setattr(outputs, "_PROGRAM", {"trainer": False}, raising=False)  # restored after the test
    monkeypatch.setattr(pti_plugin.cli.atexit, "register", lambda function: None)
    monkeypatch.setattr("sys.argv", ["analysis/lr_sweep.py", "--preset", "p.toml", "--stage", "lora", "--lrs", "1e-3"])
    expected = ["accelerate", "launch", "train_pti.py", "--preset", "a b.toml", "--resume", "s"]
    assert shlex.split(trainer_command("--preset", "a b.toml", "--resume", "s")) == expected
    assert pti_plugin.cli.main(["--help"]) == 0  # the trainer run in-process with its arguments: still inside
    assert shlex.split(trainer_command("--preset", "a b.toml", "--resume", "s")) == expected
    monkeypatch.setattr("sys.argv", ["/work/my code/train_pti.py", "--help"])
    assert pti_plugin.cli.main() == 0  # train_pti.py's and pti-train's call: the program
    assert shlex.split(trainer_command("--resume", "s")) == ["accelerate", "launch", "/work/my code/train_pti.py",
                                                              "--resume", "s"]
    monkeypatch.setattr("sys.argv", ["/usr/bin/pti-train", "--help"])
    assert pti_plugin.cli.main() == 0
    assert trainer_command("--resume", "s") == "accelerate launch --no_python pti-train --resume s"
    capsys.readouterr()


def _state(run_dir: Path, tag: str, files=STATE_FILES) -> Path:
    folder = run_dir / f"premise-state-{tag}"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("{}")
    return folder


def _stopped_run(tmp_path: Path, preset: dict = PRESET) -> Path:
    """A run folder as a run stopped at step 54 leaves it: its preset file beside it, its config, log, step files
    and states (one at step 10, the interrupted one at 54, a state folder without its files at 60)."""
    run_dir = tmp_path / "runs" / "inversion-lr2.75e-05-seed1-v1-abc"
    run_dir.mkdir(parents=True)
    (run_dir.parent / f"{run_dir.name}.toml").write_text(toml.dumps(preset | {"output_dir": str(run_dir)}))
    (run_dir / "premise.config.toml").write_text(toml.dumps(preset))
    (run_dir / "premise.log.jsonl").write_text('{"step": 54}\n')
    (run_dir / "premise-interrupted-step00000054.safetensors").write_bytes(b"lora")
    _state(run_dir, "step00000010")
    _state(run_dir, "interrupted-step00000054")
    _state(run_dir, "step00000060", files=("trainable.safetensors",))  # cut short: not a state to resume
    return run_dir


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_resumable_state_is_the_latest_complete_one_of_the_same_preset(tmp_path):
    run_dir = _stopped_run(tmp_path)
    preset_file = run_dir.parent / f"{run_dir.name}.toml"
    assert premise.resumable_state(run_dir, preset_file, PRESET) == (run_dir / "premise-state-interrupted-step00000054", "")
    other = PRESET | {"learning_rate": 3e-5}  # the folder's states trained another preset
    state, why = premise.resumable_state(run_dir, preset_file, other)
    assert state is None and str(preset_file) in why and "another preset" in why
    preset_file.unlink()
    assert premise.resumable_state(run_dir, preset_file, PRESET)[0] is None
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "premise.log.jsonl").write_text("")
    assert premise.resumable_state(fresh, preset_file, PRESET) == (
        None, "no saved state to continue from (it stopped before its first save)")


def test_a_stopped_run_stops_the_script_in_one_line_and_the_same_command_continues_it(tmp_path, monkeypatch, capsys):
    """Before: the trainer's exit 130 became ``RuntimeError`` with a traceback, and the rerun deleted the run's folder
    (its interrupted state with it) and trained from step 0."""
    run_dir = _stopped_run(tmp_path)
    before = _listing(tmp_path)
    calls, codes = [], [130, 0]

    def trainer(argv):
        calls.append(argv)
        if codes[0] == 0:
            (run_dir / "premise.safetensors").write_bytes(b"lora")
        return codes.pop(0)

    monkeypatch.setattr(pti_plugin.cli, "main", trainer)
    logged = []
    with pytest.raises(SystemExit) as stop:
        premise.train_run(PRESET, run_dir, logged.append, "h1")
    assert stop.value.code == 130
    state = run_dir / "premise-state-interrupted-step00000054"
    preset_file = str(run_dir.parent / f"{run_dir.name}.toml")
    assert calls == [["--preset", preset_file, "--resume", str(state)]]
    assert capsys.readouterr().out == (f"h1: {run_dir.name} stopped by SIGINT; run the same command again to "
                                       "continue\n")
    assert logged == [f"h1: continuing {run_dir.name} from {state.name}"]
    assert _listing(tmp_path) == before  # nothing deleted
    assert premise.train_run(PRESET, run_dir, logged.append, "h1") == run_dir  # the same command again
    assert calls[1] == ["--preset", preset_file, "--resume", str(state)]
    assert set(before) <= set(_listing(tmp_path))
    assert premise.train_run(PRESET, run_dir, logged.append, "h1") == run_dir and len(calls) == 2  # finished: kept
    assert set(before) <= set(_listing(tmp_path))


def test_a_run_of_another_preset_starts_over_saying_why(tmp_path, monkeypatch):
    run_dir = _stopped_run(tmp_path, PRESET | {"learning_rate": 1e-4})
    calls = []
    monkeypatch.setattr(pti_plugin.cli, "main", lambda argv: calls.append(argv) or 143)
    logged = []
    with pytest.raises(SystemExit) as stop:
        premise.train_run(PRESET, run_dir, logged.append, "h3")
    assert stop.value.code == 143  # SIGTERM's
    assert calls == [["--preset", str(run_dir.parent / f"{run_dir.name}.toml")]]
    assert logged[0].startswith(f"h3: starting {run_dir.name} over: its saved states belong to another preset")
    assert logged[1] == f"h3: training {run_dir.name}"
    assert toml.load(run_dir.parent / f"{run_dir.name}.toml")["learning_rate"] == 2.75e-5


def test_a_stop_signal_while_measuring_ends_the_script_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        with premise.stops_cleanly():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # stopped at once by the signal
            pytest.fail("not stopped")
    assert stop.value.code == 130
    assert capsys.readouterr().out == "stopped by SIGINT; run the same command again to continue\n"


def test_h1_names_its_part_in_the_log(tmp_path, monkeypatch):
    """h1 and h3 logged each cell as ``premise: training ...`` / ``premise: measuring ...``."""
    from pti_plugin.protocol import h1_inversion

    trained = []
    monkeypatch.setattr(h1_inversion, "check_init_word", lambda model, word: None)
    monkeypatch.setattr(h1_inversion, "bench_dataset", lambda out: Path(out) / "data")
    monkeypatch.setattr(h1_inversion, "model_digest", lambda model: "0" * 12)
    monkeypatch.setattr(h1_inversion, "measure_null", lambda model, settings: {"coarse": 0.0})
    monkeypatch.setattr(h1_inversion, "measure_cell", lambda run_dir, settings: {"coarse": 1.0})
    monkeypatch.setattr(h1_inversion, "train_run", lambda preset, run_dir, log, part="premise": trained.append(part))
    settings = h1_inversion.H1Settings.quick()
    logged = []
    h1_inversion.run_h1(tmp_path / "model", tmp_path / "h1", dict(PRESET), settings, log=logged.append)
    assert trained and set(trained) == {"h1"}
    assert "h1: measuring null" in logged and not [line for line in logged if line.startswith("premise")]


SUMMARY = {"oracle_coarse": 0.8, "inversion_coarse": 0.5, "inversion_training_cells": 0.34, "null_cells_lo": 0.23,
           "null_cells_hi": 0.47, "detail_after_inversion": 0.05, "detail_after_lora": 0.5}


@pytest.mark.parametrize("change, verdicts", [
    ({}, "check2=pass check3=pass check4=pass"),  # every figure at its threshold (README: >= 0.8, [0.5, 0.9], ...)
    ({"oracle_coarse": 0.0, "inversion_coarse": 0.25}, "check2=fail check3=fail check4=pass"),  # the audit's line
    ({"inversion_coarse": 0.91}, "check2=pass check3=fail check4=pass"),
    ({"inversion_training_cells": 0.48}, "check2=pass check3=fail check4=pass"),  # positions learned
    ({"detail_after_inversion": 0.06}, "check2=pass check3=pass check4=fail"),
    ({"detail_after_lora": 0.49}, "check2=pass check3=pass check4=fail"),
])
def test_premise_line_gives_each_checks_verdict(change, verdicts):
    summary = SUMMARY | change
    figures = " ".join(f"{key}={summary[key]:.3f}" for key in premise.LINE_KEYS)
    assert premise.premise_line(summary) == f"{figures} {verdicts}"
    assert " ".join(f"{k}={v}" for k, v in premise.premise_checks(summary).items()) == verdicts
