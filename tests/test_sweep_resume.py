"""The sweep runner never loses finished work and resumes by skipping it: interrupted sweeps, changed settings,
half-saved runs, a run another process trains, and arguments that cannot name distinct runs."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import sys
from pathlib import Path

import pytest
import toml
import torch
from safetensors.torch import load_file

from pti_plugin.sweeps import lr_sweep

REPO = Path(__file__).resolve().parents[1]


def _sweep(argv: list[str]) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        lr_sweep.main(argv)
    return buffer.getvalue()


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def argv(tiny_model, tiny_dataset, tmp_path) -> list[str]:
    preset = tmp_path / "p.toml"
    preset.write_text(toml.dumps({
        "pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
        "output_dir": str(tmp_path / "unused"), "train_batch_size": 2, "seed": 3,
        "stages": [{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2}],
    }))
    return ["--preset", str(preset), "--stage", "inversion", "--lrs", "1e-2,1e-1", "--steps", "4", "--no_evaluate",
            "--gpus", "none", "--out", str(tmp_path / "out")]


def test_sigint_stops_the_sweep_and_the_same_command_resumes_the_interrupted_run(argv, tmp_path, monkeypatch):
    """SIGINT during run 1 of 2: the trainer saves an interrupted state and the sweep stops (exit 130) instead of
    training run 2; the same command resumes run 1 from that state (it used to be moved aside and retrained),
    and its embedding equals an uninterrupted sweep's, bit for bit."""
    from pti_plugin.trainer import Trainer

    original = Trainer._stop_if_signalled

    def interrupting(self):
        if Path(self.config.output_dir).name == "inversion-lr0.01" and self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, received by the trainer's own handler
        original(self)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_stop_if_signalled", interrupting)
        with pytest.raises(SystemExit) as stop:
            _sweep(argv)
    assert stop.value.code == 130
    runs = tmp_path / "out" / "runs"
    assert not (runs / "inversion-lr0.1").exists()  # the sweep stopped with run 1
    assert (runs / "inversion-lr0.01" / "pti-state-interrupted-step00000002").is_dir()

    printed = _sweep(argv)
    assert "resume inversion-lr0.01 from pti-state-interrupted-step00000002" in printed
    assert sorted(p.name for p in runs.iterdir()) == ["inversion-lr0.01", "inversion-lr0.1"]  # nothing moved aside
    _sweep([*argv[:-1], str(tmp_path / "straight")])
    for run in ("inversion-lr0.01", "inversion-lr0.1"):  # the trained embedding, tensor for tensor
        resumed, straight = (load_file(root / "runs" / run / "tok1.safetensors") for root in (tmp_path / "out",
                                                                                             tmp_path / "straight"))
        assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in resumed), run


def test_a_run_trained_with_other_settings_stops_the_sweep_and_stays_as_it_was(argv, tmp_path):
    """A re-run with other --steps used to skip the finished runs and report them as runs of the new settings."""
    _sweep(argv)
    out = tmp_path / "out"
    before = _digests(out)
    changed = [a if a != "4" else "6" for a in argv]
    with pytest.raises(SystemExit) as stop:
        _sweep(changed)
    assert stop.value.code == 2  # a bad input, as every script's usage error
    message = str(stop.value)
    assert f"--out {out}" in message and "inversion-lr0.01" in message and "stages.0.steps: 4 -> 6" in message
    assert str(out / "runs" / "inversion-lr0.01") in message  # what to move away to retrain it
    assert _digests(out) == before  # runs and their settings records untouched

    printed = _sweep(argv + ["--save_every", "3"])  # how often a run saves is not what it trains: reused
    assert printed.count("skip inversion-lr") == 2
    assert _digests(out / "runs") == {k[len("runs/"):]: v for k, v in before.items() if k.startswith("runs/")}


def test_a_final_lora_without_its_embedding_is_trained_again_and_kept_aside(argv, tmp_path):
    """The trainer writes the LoRA, then the embedding: a run stopped between them used to count as finished
    for ever (a LoRA sweep then stopped on every re-run: 'the shared pivot run failed')."""
    _sweep(argv)
    run = tmp_path / "out" / "runs" / "inversion-lr0.01"
    (run / "tok1.safetensors").unlink()
    half = _digests(run)
    other = _digests(run.with_name("inversion-lr0.1"))
    printed = _sweep(argv)
    assert "restart inversion-lr0.01" in printed and "skip inversion-lr0.1" in printed
    assert (run / "pti.safetensors").is_file() and (run / "tok1.safetensors").is_file()
    assert _digests(run.with_name("inversion-lr0.01.incomplete-1")) == half  # moved aside, not deleted
    assert _digests(run.with_name("inversion-lr0.1")) == other


def test_a_run_another_process_is_training_is_left_alone(argv, tmp_path):
    """A second sweep into the same --out used to move the folder of the run the first was training aside."""
    from pti_plugin.run_lock import RunLock

    run = tmp_path / "out" / "runs" / "inversion-lr0.01"
    run.mkdir(parents=True)
    (run / "pti.config.toml").write_text("# written by the other process\n")
    with RunLock(run, "pti"):  # held as the other process's trainer holds it
        printed = _sweep(argv)
        assert "skip inversion-lr0.01: another process is training it" in printed
        assert sorted(p.name for p in run.iterdir()) == ["pti.config.toml", "pti.lock"]
    assert not list(run.parent.glob("*.incomplete-*"))
    assert (run.with_name("inversion-lr0.1") / "tok1.safetensors").is_file()  # the rest trained


def test_a_run_killed_before_it_wrote_anything_is_trained_in_place(argv, tmp_path):
    """A run killed during its set-up leaves only its lock files (its output_name's and its token's); nobody holds
    them, so the run is trained where it is, not moved aside as an unresumable partial run."""
    run = tmp_path / "out" / "runs" / "inversion-lr0.01"
    run.mkdir(parents=True)
    for name in ("pti.lock", "tok1.lock"):
        (run / name).write_text('{"pid": 999999999, "host": "gone"}')
    printed = _sweep(argv)
    assert "restart inversion-lr0.01" not in printed, printed
    assert not list(run.parent.glob("*.incomplete-*"))
    assert (run / "pti.safetensors").is_file() and (run / "tok1.safetensors").is_file()
    assert not (run / "pti.lock").exists() and not (run / "tok1.lock").exists()


def test_learning_rates_that_would_share_a_run_name_are_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        lr_sweep.parse_args(["--preset", "p.toml", "--stage", "lora", "--lrs", "1e-2,1.0000001e-2"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "argument --lrs:" in err and "share the run name lr0.01" in err
    assert lr_sweep.parse_args(["--preset", "p.toml", "--stage", "lora", "--lrs", "1e-1,1e-2,0.1"]).lrs == [1e-2, 1e-1]


@pytest.mark.parametrize("script", ["lr_sweep", "research_bench", "research_protocol"])
@pytest.mark.parametrize("under", [False, True])
def test_an_out_that_is_a_file_is_refused_naming_out_and_the_path(script, under, tmp_path, capsys):
    """It used to end in a NotADirectoryError traceback (the bench, the protocol) after loading the model."""
    sys.path.insert(0, str(REPO / "analysis"))
    import research_protocol

    from pti_plugin.sweeps import bench

    afile = tmp_path / "afile"
    afile.write_text("x")
    out = afile / "sub" if under else afile
    parse = {"lr_sweep": lambda: lr_sweep.parse_args(["--preset", "p.toml", "--stage", "lora", "--lrs", "1e-3",
                                                      "--out", str(out)]),
             "research_bench": lambda: bench.parse_args(["--out", str(out)]),
             "research_protocol": lambda: research_protocol.parse_args(["h1", "--out", str(out)])}[script]
    with pytest.raises(SystemExit) as stop:
        parse()
    assert stop.value.code == 2 and f"--out {out}: " in capsys.readouterr().err


def test_a_sweep_with_a_failed_run_trains_the_others_then_exits_1_naming_it(argv, tmp_path, monkeypatch, capsys):
    """Before, the command printed FAILED and exited 0, so a script running sweeps could not tell."""
    from pti_plugin.trainer import Trainer

    original = Trainer.run

    def failing(self):
        if Path(self.config.output_dir).name == "inversion-lr0.01":
            raise RuntimeError("a run that breaks")
        return original(self)

    monkeypatch.setattr(Trainer, "run", failing)
    assert lr_sweep.cli(argv) == 1
    err = capsys.readouterr().err
    assert "error: 1 run(s) failed: inversion-lr0.01" in err
    assert (tmp_path / "out" / "runs" / "inversion-lr0.1" / "tok1.safetensors").is_file()
    monkeypatch.setattr(Trainer, "run", original)
    assert lr_sweep.cli(argv) == 0  # the same command retrains the failed run and skips the finished one
    assert (tmp_path / "out" / "runs" / "inversion-lr0.01" / "tok1.safetensors").is_file()


def test_the_scorers_count_a_run_finished_only_with_its_embedding(tmp_path):
    """The sweep's rule (LoRA and embedding) now holds for the scorers too (run_scores.scores_of, internal metrics'
    find_runs), the token read from the run's resolved config; they counted a LoRA without its embedding."""
    from pti_plugin.toy_world.run_scores import scores_of
    from pti_plugin.protocol.internal_metrics import find_runs

    for name, files in {"whole": ["pti.safetensors", "tok9.safetensors"], "half": ["pti.safetensors"],
                        "no_config": ["pti.safetensors"]}.items():
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        for file in files:
            (run / file).write_bytes(b"")
        if name != "no_config":  # an older run without its resolved config: the LoRA alone decides
            (run / "pti.config.toml").write_text('token_string = "tok9"\n')
    assert [r.name for r in find_runs([tmp_path / "runs"], "pti")] == ["no_config", "whole"]
    assert scores_of(tmp_path / "runs" / "half", "pti", args=None) is None  # before any scoring or cache read
