"""Two-process CPU runs (torchrun, gloo) say a refusal once, as one process does."""

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


def test_two_processes_refuse_together_and_say_it_once(preset, tmp_path):
    """A run into a folder holding an earlier run's LoRA is refused by process 0 (it alone claims the folder): process 1
    exits with it, with no traceback of its own (before: it died at the barrier with the process group's `Connection
    closed by peer` traceback), and the refusal is printed once. A preset error is printed once, not once per process."""
    raw = preset(train_batch_size=1,
                 stages=[{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2, "steps": 1}])
    raw.pop("output_dir")
    (tmp_path / "p.toml").write_text(toml.dumps({k: v for k, v in raw.items() if v is not None}))
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


# A finished two-process run's outputs and warnings said once: test_multiprocess's
# test_two_processes_skip_a_non_finite_step_together_train_float8_weights_and_say_outputs_and_warnings_once (one run).
