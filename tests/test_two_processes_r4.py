"""Two-process CPU runs (torchrun, gloo) say what one process says, once: refusals, warnings and the outputs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import toml

REPO = Path(__file__).resolve().parents[1]


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(REPO / "train_pti.py"), "--preset", "p.toml", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _preset(preset, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok1 --w 32 --h 32 --s 1\n")  # warned about: kohya samples 32 px at 64
    raw = preset(train_batch_size=1, sample_prompts=str(prompts), sample_steps=1,
                 stages=[{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2, "steps": 1}])
    raw.pop("output_dir")
    (tmp_path / "p.toml").write_text(toml.dumps({k: v for k, v in raw.items() if v is not None}))


def test_two_processes_refuse_together_and_say_it_once(preset, tmp_path):
    """A run into a folder holding an earlier run's LoRA is refused by process 0 (it alone claims the folder): process 1
    exits with it, with no traceback of its own (before: it died at the barrier with the process group's `Connection
    closed by peer` traceback), and the refusal is printed once. A preset error is printed once, not once per process."""
    _preset(preset, tmp_path)
    bad = _torchrun(tmp_path, "--output_dir", "out", "--learning_rate", "-1")
    assert bad.returncode != 0
    assert bad.stderr.count("error: ") == 1 and "learning_rate" in bad.stderr, bad.stderr[-3000:]
    assert re.search(r"rank\s*: 0 .*\n\s*exitcode\s*: 2 ", bad.stderr.split("Root Cause")[-1]), bad.stderr[-3000:]

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "pti.safetensors").write_bytes(b"an earlier run's LoRA")
    refused = _torchrun(tmp_path, "--output_dir", "taken")
    assert refused.returncode != 0
    assert refused.stderr.count("error: output_dir") == 1, refused.stderr[-3000:]
    assert "[rank1]" not in refused.stderr and "Connection closed" not in refused.stderr, refused.stderr[-3000:]
    root_cause = refused.stderr.split("Root Cause")[-1]  # the launcher's report: process 0 refused, exit 2
    assert re.search(r"rank\s*: 0 .*\n\s*exitcode\s*: 2 ", root_cause), refused.stderr[-3000:]
    assert (tmp_path / "taken" / "pti.safetensors").read_bytes() == b"an earlier run's LoRA"


def test_a_finished_two_process_run_says_its_outputs_and_warnings_once(preset, tmp_path):
    """The output lines and the warnings come once (before: process 1 printed a bare `samples: ` line and every
    warning again)."""
    _preset(preset, tmp_path)
    done = _torchrun(tmp_path, "--output_dir", "out")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line for line in lines if line.startswith("samples:")] == [f"samples: {tmp_path / 'out' / 'samples' / 'pti-final-0.png'}"]
    assert done.stderr.count("--w 32 is sampled at 64 px") == 1, done.stderr[-3000:]
