"""Analysis scripts: a run they train that a stop signal stopped leaves one instruction, the script's; research_protocol's
``--pivot_lr`` and ``--wait`` refuse what is not a number they can use; ``score_checkpoints`` itself refuses a run that
is not a toy-world one."""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import pti_plugin.cli
from pti_plugin.run_outputs import RunOutputs

from .conftest import make_preset
from .test_toy_only_s38 import _model_drawing_512, _run

REPO = Path(__file__).resolve().parents[1]


def test_a_run_the_protocol_trains_stopped_by_a_signal_names_its_state_and_only_the_scripts_command(
        tiny_model, tiny_dataset, tmp_path, monkeypatch, capsys):
    """Ctrl-C during a research_protocol run: the trainer said ``resume with: accelerate launch train_pti.py --preset
    ... --resume ...`` and then the script ``h1: <run> stopped by SIGINT; run the same command again to continue``:
    two instructions. The trainer's lines now name the state it saved, and the script's line is the only command."""
    from pti_plugin.protocol import premise
    from pti_plugin.trainer import Trainer

    after_step = Trainer._after_step

    def signalled(self, logs, order):  # Ctrl-C after step 1
        after_step(self, logs, order)
        if self.state.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "_after_step", signalled)
    preset = make_preset(tiny_model, tiny_dataset, tmp_path / "unused", output_name="premise", token_string="tok1",
                         stages=[{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2, "steps": 3}])
    run_dir = tmp_path / "runs" / "cell"
    with pytest.raises(SystemExit) as stop:
        premise.train_run(preset, run_dir, lambda line: None, "h1")
    seen = capsys.readouterr()
    assert stop.value.code == 130
    state = run_dir / "premise-state-interrupted-step00000001"
    assert state.is_dir()
    assert (f"interrupted by SIGINT after step 1\nsaved premise-interrupted-step00000001.safetensors, "
            f"tok1-interrupted-step00000001.safetensors and the state {state}\n") in seen.err
    assert "resume with" not in seen.out + seen.err and "--resume" not in seen.out + seen.err
    assert seen.out.splitlines()[-1] == "h1: cell stopped by SIGINT; run the same command again to continue"


def _hint(after_stop: bool = True) -> str:
    """The trainer's message for a saved state (its stop's, or a non-finite step's save: ``after_stop`` False)."""
    paths = {"lora": Path("run/pti-interrupted-step00000002.safetensors"),
             "embedding": Path("run/tok1-interrupted-step00000002.safetensors"),
             "state": Path("run/pti-state-interrupted-step00000002")}
    outputs = SimpleNamespace(files=SimpleNamespace(config_toml=Path("run/pti.config.toml")))
    if after_stop:
        return RunOutputs.resume_hint(outputs, paths)
    return RunOutputs.resume_hint(outputs, paths, after_stop=False)


RESUME = ("resume with: accelerate launch train_pti.py --preset run/pti.config.toml --resume "
          "run/pti-state-interrupted-step00000002")
SAVED = ("saved pti-interrupted-step00000002.safetensors, tok1-interrupted-step00000002.safetensors and the state "
         "run/pti-state-interrupted-step00000002")


def test_the_sweeps_runs_in_this_process_and_in_job_processes_leave_the_command_to_the_sweep(monkeypatch):
    """lr_sweep's and research_bench's runs (in this process, or a job process per GPU or Ray task, whose log the
    sweep's last line points to) named ``resume with: ...`` as well as the sweep's "run the same command again"."""
    from pti_plugin.sweeps import runner

    hints = []

    def trainer(argv):
        hints.append((argv, _hint()))
        return 0

    monkeypatch.setattr(pti_plugin.cli, "main", trainer)
    assert runner.train_in_process(SimpleNamespace(name="lr1e-3", finished=True), ["--preset", "p.toml"])
    command = runner.train_command(["--preset", "p.toml"])
    assert command[:2] == [sys.executable, "-c"] and command[3:] == ["--preset", "p.toml"]
    monkeypatch.setattr(sys, "argv", ["-c", "--preset", "p.toml"])
    with pytest.raises(SystemExit) as stop:  # the job process's program, run here
        exec(compile(command[2], "<job>", "exec"), {"__name__": "__main__"})
    assert stop.value.code == 0
    assert hints == [(["--preset", "p.toml"], SAVED)] * 2
    assert _hint() == f"{SAVED}\n{RESUME}"  # outside a script: the trainer's own command


def test_a_non_finite_steps_save_inside_a_script_keeps_its_command():
    """Only a stop's message leaves the command to the script: a run stopped on a non-finite step fails the script,
    whose line gives no command to continue it."""
    from pti_plugin.outputs import script_continues_runs

    with script_continues_runs():
        assert _hint() == SAVED
        assert _hint(after_stop=False) == f"{SAVED}\n{RESUME}"
    assert _hint() == f"{SAVED}\n{RESUME}"


@pytest.mark.parametrize("flag, value, said", [
    ("--pivot_lr", "nan", "must be a finite number, got 'nan'"),
    ("--pivot_lr", "inf", "must be a finite number, got 'inf'"),
    ("--pivot_lr", "0", "must be a positive number, got '0'"),
    ("--pivot_lr", "-2.75e-5", "must be a positive number, got '-2.75e-5'"),
    ("--wait", "nan", "must be a finite number, got 'nan'"),
    ("--wait", "inf", "must be a finite number, got 'inf'"),
    ("--wait", "-1", "must be at least 0, got '-1'"),
])
def test_research_protocol_refuses_a_pivot_lr_or_wait_it_cannot_use(flag, value, said, tmp_path, capsys):
    """``--wait nan`` waited for ever (``waited >= nan`` is never true) and ``--pivot_lr 0`` or ``nan`` looked for a
    pivot no H1 cell can have; both were taken as given."""
    parse_args = runpy.run_path(str(REPO / "analysis" / "research_protocol.py"), run_name="protocol_s39")["parse_args"]
    with pytest.raises(SystemExit) as stop:
        parse_args(["h2", f"{flag}={value}", "--out", str(tmp_path / "o")])
    assert stop.value.code == 2 and f"error: argument {flag}: {said}" in capsys.readouterr().err
    args = parse_args(["h2", "--pivot_lr", "3e-5", "--wait", "0", "--out", str(tmp_path / "o")])
    assert (args.pivot_lr, args.wait) == (3e-5, 0.0)


def test_score_checkpoints_itself_refuses_a_real_models_run_before_any_model_loads(tiny_model, tiny_dataset, tmp_path,
                                                                                   monkeypatch):
    """Called directly (not through learning_curves.py), score_checkpoints checked only the drawing size: a 512 px
    model's run trained at 32 px went on to load the model and score every image 0."""
    from pti_plugin.protocol.curve_scores import CACHE_FILE, score_checkpoints

    class Loaded(Exception):
        pass

    def load_run(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr("pti_plugin.metrics.run_model.load_run", load_run)
    stages = [{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}, {"kind": "lora", "steps": 2, "learning_rate": 1e-2}]
    model = _model_drawing_512(tiny_model, tmp_path / "model512")
    runs = {}
    for name, base in (("toy", tiny_model), ("r512", model)):
        run = runs[name] = _run(tmp_path / name, base, tiny_dataset, output_name="pti", stages=stages)
        (run / "pti.safetensors").unlink()  # its intermediate saves only
        for step in (2, 3):
            (run / f"pti-step{step:08d}.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as refused:
        score_checkpoints(runs["r512"], [0], steps=1, device="cpu")
    assert str(refused.value).startswith(f"{runs['r512']}: pretrained_model_name_or_path {model}: a model whose images "
                                         "are 512 px, not a toy-world model")
    assert not (runs["r512"] / CACHE_FILE).exists()
    with pytest.raises(Loaded):  # the tiny model's 32 px run passes the check and goes on to load its model
        score_checkpoints(runs["toy"], [0], steps=1, device="cpu")
