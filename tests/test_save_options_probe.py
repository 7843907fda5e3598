"""Saving and outputs as a kohya user drives them: where the run writes, what names it may take, what a rerun or a
resume into a folder that holds earlier files does, and a signal during the final save. Each test gives the
command-line input and checks the exit code, the message and that earlier files are untouched byte for byte."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toml
from safetensors.torch import load_file

from pti_plugin.cli import main
from pti_plugin.hooks import Plugin, register_plugin

from .test_reliability import REPO, _assert_clean, _cli, _output_state, short  # noqa: F401 (short: fixture)


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _main(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    seen = capsys.readouterr()
    return code, seen.out + seen.err


@register_plugin
class SignalAtStep(Plugin):
    """Sends this process SIGINT after optimizer step ``at_step`` (``during_save``: while the save after it runs)."""

    name = "test_signal_at_step"

    @dataclasses.dataclass
    class Options:
        at_step: int = 2
        during_save: bool = False

    def on_step_end(self, state, logs) -> None:
        if state.global_step == self.options.at_step and not self.options.during_save:
            os.kill(os.getpid(), signal.SIGINT)

    def on_before_save(self, state, files) -> None:
        if state.global_step == self.options.at_step and self.options.during_save:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def saved_run(tiny_model, tiny_dataset, tmp_path_factory) -> tuple[dict, Path]:
    """A finished 2-step run that saved the LoRA, embedding and state at step 1 and at the end (step 2)."""
    out = tmp_path_factory.mktemp("saved") / "run"
    raw = {"pretrained_model_name_or_path": str(tiny_model), "train_data_dir": str(tiny_dataset), "resolution": 32,
           "output_dir": str(out), "train_batch_size": 2, "log_every_n_steps": 1, "network_dim": 4,
           "network_alpha": 4.0, "save_every_n_steps": 1, "save_state": True,
           "stages": [{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2, "steps": 2}]}
    path = out.parent / "preset.toml"
    path.write_text(toml.dumps(raw))
    assert main(["--preset", str(path)]) == 0
    assert (out / "pti-state-step00000001").is_dir() and (out / "pti-state-step00000002").is_dir()
    return raw, out


def _copy_of(saved_run, tmp_path: Path) -> tuple[dict, Path]:
    raw, out = saved_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return raw | {"output_dir": str(copy)}, copy


# ----------------------------------------------------------------------------- names and folders

def test_an_empty_output_dir_is_refused_instead_of_writing_into_the_current_folder(short, tmp_path, capsys, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    code, seen = _cli(short(), tmp_path, capsys, ["--output_dir", ""])
    assert code == 2, seen
    assert "--output_dir (command line) is empty" in seen and "Traceback" not in seen
    assert list(here.iterdir()) == []


@pytest.mark.parametrize("key, name", [("output_name", "CON"), ("output_name", "nul"), ("output_name", "com1.v2"),
                                       ("output_name", "Aux"), ("token_string", "LPT1")])
def test_a_windows_device_name_is_refused_for_the_names_files_take(key, name, short, tmp_path, capsys):
    out = tmp_path / "out"
    before = _output_state(out)
    code, seen = _cli(short(), tmp_path, capsys, [f"--{key}", name])
    assert code == 2, seen
    assert f"--{key} (command line) = {name!r}" in seen and "Windows" in seen and "Traceback" not in seen
    _assert_clean(out, before)
    assert sorted(_output_state(out)) == ["earlier-run.safetensors"]


# ----------------------------------------------------------------------------- two runs at once

def test_a_second_run_into_the_same_output_or_onto_a_running_runs_files_is_refused_at_start(preset, tmp_path, capsys):
    """A real first process (output_name 'a', token 'tok1'), paused while it trains. A second run of the same command
    finds the lock of the first and stops at once; a run into the same folder whose token or output_name names the
    first's files is refused at start too. The first then finishes and saves its work, its log one run's alone.
    Before: such a second run finished, and the first trained every step, then lost them all at its final save."""
    out = tmp_path / "out"
    raw = preset(output_dir=str(out), output_name="a", stages=[{"kind": "inversion", "steps": 4}])
    (tmp_path / "a.toml").write_text(toml.dumps(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    first = subprocess.Popen([sys.executable, str(REPO / "train_pti.py"), "--preset", str(tmp_path / "a.toml")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    locks = [out / "a.lock", out / "tok1.lock"]
    deadline = time.time() + 300  # both of the first run's locks taken (each records its owner once held)
    while time.time() < deadline and not all(lock.is_file() and lock.read_text() for lock in locks):
        assert first.poll() is None, first.communicate()[1][-2000:]
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGSTOP)  # the first run holds its locks, paused, while the others start
    try:
        same_command = _main(["--preset", str(tmp_path / "a.toml")], capsys)
        same_token = _cli(raw | {"output_name": "b"}, tmp_path, capsys)
        name_is_token = _cli(raw | {"output_name": "tok1", "token_string": "zxq"}, tmp_path, capsys)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    code, seen = same_command
    assert code == 2, seen[-2000:]
    assert f"another run is writing to {out} with output_name 'a' (process {first.pid} on" in seen
    assert "Traceback" not in seen
    for code, seen in (same_token, name_is_token):
        assert code == 2, seen
        assert f"another run is writing to {out} with token_string 'tok1' (process {first.pid} on" in seen, seen
        assert "Traceback" not in seen
    assert "this run's output_name 'tok1' would overwrite" in name_is_token[1]
    assert first.returncode == 0, err[-2000:]
    assert load_file(out / "a.safetensors") and load_file(out / "tok1.safetensors")
    assert sorted(p.name for p in out.iterdir()) == ["a.config.toml", "a.log.jsonl", "a.safetensors", "tok1.safetensors"]
    log = (out / "a.log.jsonl").read_text().splitlines()
    assert [json.loads(line)["global_step"] for line in log] == list(range(1, 5))  # one run's log, not two


# ----------------------------------------------------------------------------- reruns and resumes

@pytest.mark.parametrize("left", ["finished", "killed_between_lora_and_embedding"])
def test_the_command_a_refused_rerun_suggests_runs(left, saved_run, tmp_path, capsys):
    """A rerun into a folder holding a run that finished, or that was killed during its final save (the LoRA written,
    not the embedding nor the final state), is refused untouched; the command it suggests then runs, in that folder
    (a copy here: its config names the original folder, which stays untouched). Before: that command was refused
    too (the folder holds the final LoRA)."""
    original = _digests(saved_run[1])
    raw, out = _copy_of(saved_run, tmp_path)
    if left != "finished":
        (out / "tok1.safetensors").unlink()
        shutil.rmtree(out / "pti-state-step00000002")
    before = _digests(out)
    code, seen = _cli(raw, tmp_path, capsys)
    assert code == 2 and "already holds pti.safetensors" in seen, seen
    assert _digests(out) == before
    command = seen.split("to continue the earlier run")[1].split(": ", 1)[1].split()
    assert command[:3] == ["accelerate", "launch", "train_pti.py"]  # the whole command (inside pytest: train_pti.py)
    command = command[3:]
    assert command[command.index("--resume") + 1] == str(out / ("pti-state-step00000002" if left == "finished"
                                                                 else "pti-state-step00000001"))
    code, seen = _main(command, capsys)
    assert code == 0, seen
    assert load_file(out / "pti.safetensors") and load_file(out / "tok1.safetensors")
    assert _digests(saved_run[1]) == original


def test_a_run_resumed_into_another_folder_records_its_config_there_and_its_resume_command_runs(saved_run, tmp_path,
                                                                                                 capsys):
    """Resuming another run's state into a new output_dir writes the resolved config there, which the printed resume
    command of that run names. Before: no config was written, and that command failed (preset not found)."""
    raw, first = saved_run
    before = _digests(first)
    elsewhere = tmp_path / "elsewhere"
    longer = raw | {"output_dir": str(elsewhere), "resume": str(first / "pti-state-step00000001"),
                    "stages": [raw["stages"][0] | {"steps": 3}], "plugins": {"test_signal_at_step": {"at_step": 2}}}
    code, seen = _cli(longer, tmp_path, capsys)
    assert code == 130, seen
    written = toml.loads((elsewhere / "pti.config.toml").read_text())
    assert written["output_dir"] == str(elsewhere)
    assert "resume" not in written  # the file is a preset; the printed command says which state it continues
    command = re.search(r"resume with: accelerate launch train_pti.py (.*)", seen).group(1).split()
    code, seen = _main(command, capsys)
    assert code == 0, seen
    assert load_file(elsewhere / "pti.safetensors") and load_file(elsewhere / "tok1.safetensors")
    assert _digests(first) == before


def test_a_resume_in_the_same_folder_with_a_longer_stage_records_it_so_its_resume_command_runs(saved_run, tmp_path,
                                                                                                  capsys):
    """A finished run continued in its own folder with its stage lengthened (2 -> 4 steps, --overwrite for its
    final files), stopped at step 3: the config must say 4 steps, else the printed resume command is refused (its
    state lies past the 2 steps the first run's config says)."""
    raw, out = _copy_of(saved_run, tmp_path)
    longer = raw | {"resume": str(out / "pti-state-step00000002"), "overwrite": True,
                    "stages": [raw["stages"][0] | {"steps": 4}], "plugins": {"test_signal_at_step": {"at_step": 3}}}
    code, seen = _cli(longer, tmp_path, capsys)
    assert code == 130, seen
    assert toml.loads((out / "pti.config.toml").read_text())["stages"][0]["steps"] == 4
    command = re.search(r"resume with: accelerate launch train_pti.py (.*)", seen).group(1).split()
    code, seen = _main(command, capsys)
    assert code == 0, seen


def test_a_state_past_the_end_of_its_stage_is_refused_naming_both_step_counts(saved_run, tmp_path, capsys):
    """The final state (step 2 of a 2-step stage) resumed with the stage shortened to 1 step. Before: the stage was
    skipped silently and the run ended as if it had the saved stage's length."""
    raw, first = saved_run
    state = first / "pti-state-step00000002"
    elsewhere = tmp_path / "elsewhere"
    code, seen = _cli(raw | {"output_dir": str(elsewhere), "resume": str(state)}, tmp_path, capsys,
                      ["--set", "stages.0.steps=1"])
    assert code == 2, seen
    assert "key 'resume'" in seen and str(state) in seen and "step 2 of stage 0" in seen and "1 step" in seen, seen
    assert "Traceback" not in seen
    assert not elsewhere.exists()  # a step-based stage's length is known before the output folder is claimed


def test_a_state_past_the_end_of_an_epoch_based_stage_is_refused_naming_the_epochs_that_fit(saved_run, tmp_path, capsys):
    """An epoch-based stage's length is known after the data scan: 8 samples at batch 8 make 1 step an epoch, so
    the state at step 2 needs 2 epochs."""
    raw, first = saved_run
    state = first / "pti-state-step00000002"
    stage = {"name": "inversion", "kind": "inversion", "learning_rate": 5e-2, "max_train_epochs": 1}
    code, seen = _cli(raw | {"output_dir": str(tmp_path / "elsewhere"), "resume": str(state), "train_batch_size": 8,
                             "stages": [stage]}, tmp_path, capsys)
    assert code == 2, seen
    assert "key 'resume'" in seen and "step 2 of stage 0" in seen and "--set stages.0.max_train_epochs=2" in seen, seen
    assert "Traceback" not in seen


def test_a_signal_during_the_final_save_keeps_the_files_and_skips_the_final_samples(preset, tmp_path, capsys):
    """Ctrl-C while the final files are written: they are complete, the run stops there and says so. Before: the
    signal was ignored, the final samples (minutes on a real model) were drawn, and nothing was said."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok1 --s 2\n")
    out = tmp_path / "out"
    raw = preset(output_dir=str(out), save_state=True, sample_prompts=str(prompts),
                 stages=[{"kind": "inversion", "steps": 2}],
                 plugins={"test_signal_at_step": {"at_step": 2, "during_save": True}})
    code, seen = _cli(raw, tmp_path, capsys)
    assert code == 0, seen
    assert "SIGINT received during the final save" in seen and "Traceback" not in seen
    assert load_file(out / "pti.safetensors") and load_file(out / "tok1.safetensors")
    assert (out / "pti-state-step00000002" / "progress.json").is_file()
    assert not list(out.glob("samples/pti-final-*"))


def test_resuming_a_run_folder_instead_of_its_state_names_the_latest_state(saved_run, tmp_path, capsys):
    """``--resume`` of the run's output folder (a kohya habit: its states sit inside) names the state to give."""
    raw, first = saved_run
    code, seen = _cli(raw | {"output_dir": str(tmp_path / "elsewhere"), "resume": str(first)}, tmp_path, capsys)
    assert code == 2, seen
    assert "key 'resume'" in seen and "not a pti-plugin state folder" in seen, seen
    assert f"--resume {first / 'pti-state-step00000002'}" in seen, seen


@pytest.mark.parametrize("value, reason", [("ckpt", "pickles"), ("pt", "pickles"), ("diffusers", "whole fine-tuned model")])
def test_a_save_format_kohya_accepts_is_refused_with_the_reason(value, reason, capsys):
    code, seen = _main(["--save_model_as", value], capsys)
    assert code == 2 and "--save_model_as" in seen and repr(value) in seen and reason in seen, seen


def test_an_output_name_equal_to_the_token_but_for_letter_case_is_refused(short, tmp_path, capsys):
    """On Windows and macOS ``TOK1.safetensors`` and ``tok1.safetensors`` are one file (and one lock file)."""
    code, seen = _cli(short(output_name="TOK1"), tmp_path, capsys)
    assert code == 2 and "output_name 'TOK1' equals token_string 'tok1'" in seen, seen


def test_without_flock_an_existing_lock_file_is_named_not_a_traceback(tmp_path, monkeypatch):
    """Windows has no flock: the lock is the file's existence, so a killed run's lock file cannot be told from a
    held one. Before: a bare FileExistsError; now the file, the name and what to do. Releasing removes the file."""
    from pti_plugin import run_lock
    from pti_plugin.config import ConfigError

    monkeypatch.setattr(run_lock, "fcntl", None)
    lock = run_lock.RunLock(tmp_path, "pti")
    lock.acquire()
    with pytest.raises(ConfigError, match=r"the lock file .*pti\.lock exists.*delete the file if no run is writing"):
        run_lock.RunLock(tmp_path, "pti").acquire()
    lock.release()
    assert not (tmp_path / "pti.lock").exists()
    run_lock.RunLock(tmp_path, "pti").acquire()  # free again
