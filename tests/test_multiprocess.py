"""A two-process CPU run (torchrun -> accelerate MULTI_CPU, gloo) equals a one-process run of the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import toml
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_processes_match_one_process_and_only_rank0_writes(preset, tmp_path):
    # SGD: the update is proportional to the gradient, so the comparison tests gradient averaging
    # (Adam's first steps are ~lr * sign(grad) and amplify float reduction-order noise in tiny gradients).
    raw = preset(max_train_steps=2, save_precision="float", max_grad_norm=0.0, train_batch_size=1, optimizer_type="SGD")
    raw.pop("output_dir")
    (tmp_path / "p.toml").write_text(toml.dumps(raw))
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train_pti.py"),
          "--preset", "p.toml", "--output_dir", "two"], tmp_path)
    _run([sys.executable, str(REPO / "train_pti.py"), "--preset", "p.toml", "--output_dir", "one",
          "--train_batch_size", "2"], tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    expected = {"pti.safetensors", "tok1.safetensors", "pti.config.toml", "pti.log.jsonl"}
    assert {p.name for p in two.iterdir()} == expected  # no stray or temporary files
    assert len((two / "pti.log.jsonl").read_text().splitlines()) == 4  # one writer: one line per step
    a, b = load_file(one / "pti.safetensors"), load_file(two / "pti.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert torch.allclose(load_file(one / "tok1.safetensors")["emb_params"], load_file(two / "tok1.safetensors")["emb_params"], atol=1e-6)
