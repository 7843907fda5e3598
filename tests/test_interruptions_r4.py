"""Runs stopped where the earlier tests did not stop them: a save over a file-size limit or a full disk (the state's
optimizer file, the LoRA, the log), a kill between the two renames of a state replaced under ``overwrite``, and a new
run with ``overwrite`` over an earlier run's log. Each checks what is left against what the README promises: the
earlier saves and the user's files intact, the failing file and the cause named, exit 4."""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pti_plugin import run_outputs
from pti_plugin.config_loading import build_config
from pti_plugin.resume import read_progress
from pti_plugin.trainer import Trainer

from .test_reliability import _cli

REPO = Path(__file__).resolve().parents[1]
STATE_FILES = ["lr_scheduler.pt", "optimizer.pt", "progress.json", "trainable.safetensors"]


def _listing(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def file_size_limit():
    """Set this process's file-size limit (``ulimit -f``, in bytes) for the test; the old one comes back after. Python
    ignores SIGXFSZ, so a write past the limit fails with EFBIG, as on a file system that holds no larger file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("limit, failing, earlier", [
    # the LoRA (0.36 MB) fits, the LoRA stage's optimizer state (0.87 MB) does not: the step-4 state fails
    (500_000, "pti-state-step00000004/optimizer.pt", ["pti-state-step00000002/", "pti-step00000002.safetensors",
                                                      "tok1-step00000002.safetensors", "pti-step00000004.safetensors",
                                                      "tok1-step00000004.safetensors"]),
    (300_000, "pti-step00000002.safetensors", []),  # the first LoRA does not fit
], ids=["state", "lora"])
def test_a_save_over_the_file_size_limit_names_the_file_and_keeps_the_earlier_saves(limit, failing, earlier, preset,
                                                                                    tmp_path, capsys, file_size_limit):
    """Before, the state's optimizer file failed inside torch as ``RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos`` and the LoRA as a bare ``OSError: [Errno 27] File too large``: tracebacks, exit 1, no file named.
    Now: one ``error:`` line naming the file and the cause, exit 4, every earlier save and the user's file intact."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    raw = preset(output_dir=str(out), save_every_n_steps=2, save_state=True, save_precision="float",
                 stages=[{"kind": "inversion", "steps": 3, "learning_rate": 5e-2},
                         {"kind": "lora", "steps": 3, "learning_rate": 1e-2}])
    file_size_limit(limit)
    code, seen = _cli(raw, tmp_path, capsys)
    assert code == 4, seen[-3000:]
    assert "Traceback" not in seen, seen[-3000:]
    last = next(line for line in seen.splitlines() if "error: " in line)  # (a progress bar may share its line)
    assert f"error: could not write {out / failing}" in last and "file too large" in last and "ulimit -f" in last, last
    files = _listing(out)
    assert files.pop("notes.txt") == b"the user's own file"
    for name in earlier:  # each earlier save complete and loadable
        if name.endswith("/"):
            assert sorted(p.name for p in (out / name).iterdir()) == STATE_FILES
            assert read_progress(out / name.rstrip("/")).global_step == 2
        else:
            assert load_file(out / name)
    saved = {name.split("/")[0] + ("/" if "/" in name else "") for name in files}
    assert saved == {"pti.config.toml", "pti.log.jsonl", *earlier}  # nothing partial, no temporary, no lock left


def test_a_full_disk_while_logging_names_the_log(preset, tmp_path, capsys, monkeypatch):
    """The step log is appended line by line; a full disk there was a bare ``OSError`` traceback naming no file."""
    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_outputs, "open", full, raising=False)  # the module's open: the log's only writer
    out = tmp_path / "out"
    code, seen = _cli(preset(output_dir=str(out), stages=[{"kind": "inversion", "steps": 2}]), tmp_path, capsys)
    assert code == 4, seen[-3000:]
    last = next(line for line in seen.splitlines() if "error: " in line)
    assert f"error: disk full while writing {out / 'pti.log.jsonl'}: needed " in last, last
    assert "Traceback" not in seen and not list(out.glob("*.lock"))


KILL_BETWEEN_RENAMES = """
import os, signal, sys, torch
from pathlib import Path
from pti_plugin import resume
real = os.replace
def replace(src, dst):
    real(src, dst)
    if os.path.basename(str(dst)).startswith(".pti-state-step00000001.old"):  # the old state moved aside
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
resume.save_state(Path(sys.argv[1]), {"pivot.vectors": torch.zeros(1, 32)}, {}, {}, 0, 1, 1, replace=True)
"""


def test_a_run_killed_between_the_renames_of_a_replaced_state_leaves_the_state_for_the_next_run(preset, tmp_path, caplog):
    """``overwrite``: a state folder is replaced by moving the old one aside (``.<state>.old<hex>``), then renaming the
    new one in. A kill between the two (here in the trainer's ``save_state`` with ``overwrite``, in a process of its
    own) left no folder under the state's name, and the next run's clean-up removed the moved-aside one with the
    temporaries: that step's state was lost. Now the next run puts it back, naming it."""
    raw = preset(save_every_n_steps=1, save_state=True, stages=[{"kind": "inversion", "steps": 2, "learning_rate": 5e-2}])
    Trainer(build_config(raw)).run()
    out = Path(raw["output_dir"])
    state = out / "pti-state-step00000001"
    before = _listing(state)
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(state)], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)), timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not state.exists() and [p.name for p in out.glob(".pti-state-step00000001.old*")]  # as the kill left it
    (out / "pti.safetensors").unlink()
    (out / "tok1.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="pti_plugin.run_lock"):
        Trainer(build_config(raw | {"resume": str(out / "pti-state-step00000002"), "overwrite": True})).run()
    assert f"put back {state}" in caplog.text
    assert _listing(state) == before and read_progress(state).global_step == 1
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_new_run_with_overwrite_replaces_the_earlier_runs_log(preset, tmp_path):
    """With ``overwrite`` a new run appended its steps to the earlier run's log: the log held both runs, and a reader
    of it (the scorers' last entry, the learning curves) saw steps 1, 2, 3, 1. Now it holds the new run's steps; a
    resume still appends to the log of the run it continues."""
    def steps(out: Path) -> list[int]:
        return [json.loads(line)["global_step"] for line in (out / "pti.log.jsonl").read_text().splitlines()]

    raw = preset(save_every_n_steps=2, save_state=True, stages=[{"kind": "inversion", "steps": 3, "learning_rate": 5e-2}])
    Trainer(build_config(raw)).run()
    out = Path(raw["output_dir"])
    assert steps(out) == [1, 2, 3]
    Trainer(build_config(raw | {"resume": str(out / "pti-state-step00000002"), "overwrite": True})).run()
    assert steps(out) == [1, 2, 3, 3]  # a resume continues the run's log
    Trainer(build_config(raw | {"overwrite": True, "stages": [{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}]})).run()
    assert steps(out) == [1]


def test_a_signal_during_a_save_with_its_state_stops_without_writing_that_step_again(preset, tmp_path, monkeypatch):
    """Ctrl-C (or a scheduler's SIGTERM) while the step-2 save is written: the save is completed, then the run stops.
    Before, it then wrote the same weights and state a second time as ``*-interrupted-step00000002*`` (the time a
    scheduler's grace period allows, spent on a copy); now the resume command names the step's own state, and resuming
    it ends bit for bit as a run never stopped."""
    from pti_plugin.formats import embedding
    from pti_plugin.trainer import TrainingInterrupted

    save_embedding = embedding.save_embedding

    def signalled(path, *args, **kwargs):
        if Path(path).name == "tok1-step00000002.safetensors":  # between the step-2 LoRA and its embedding
            os.kill(os.getpid(), signal.SIGINT)
        return save_embedding(path, *args, **kwargs)

    raw = preset(save_every_n_steps=2, save_state=True, save_precision="float",
                 stages=[{"kind": "inversion", "steps": 3, "learning_rate": 5e-2}])
    out = Path(raw["output_dir"])
    with monkeypatch.context() as patch:
        patch.setattr(embedding, "save_embedding", signalled)
        with pytest.raises(TrainingInterrupted) as stop:
            Trainer(build_config(raw)).run()
    state = out / "pti-state-step00000002"
    assert f"--resume {state}" in str(stop.value) and "interrupted by SIGINT after step 2" in str(stop.value)
    assert sorted(p.name for p in out.iterdir()) == ["pti-state-step00000002", "pti-step00000002.safetensors",
                                                     "pti.config.toml", "pti.log.jsonl", "tok1-step00000002.safetensors"]
    Trainer(build_config(raw | {"resume": str(state)})).run()
    straight = Path(raw["output_dir"] + "-straight")
    Trainer(build_config(raw | {"output_dir": str(straight)})).run()
    for name in ("pti.safetensors", "tok1.safetensors"):
        a, b = load_file(out / name), load_file(straight / name)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
