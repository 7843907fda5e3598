"""Two-process CPU runs (torchrun -> accelerate MULTI_CPU, gloo): one equals a one-process run of the same
micro-batches; one skips a non-finite step on both processes, trains float8 weights and says its outputs and warnings
once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import toml
import torch
from safetensors.torch import load_file

from pti_plugin.config_loading import build_config
from pti_plugin.formats.kohya_lora import load_lora
from pti_plugin.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)) | (extra_env or {})
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _install_entry_point(site: Path, entry: str = "prior_agreement = tests.contract_plugin:PriorAgreement") -> None:
    """Declare a test plugin (default tests/contract_plugin.py) under the pti_plugin.plugins entry-point
    group, as a package would."""
    info = site / "prior_agreement_demo-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: prior-agreement-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[pti_plugin.plugins]\n{entry}\n")


def test_two_processes_with_a_third_party_plugin_match_one_process_and_only_rank0_writes(preset, tmp_path, monkeypatch):
    """Both stages (UNet and text-encoder LoRA) under 2 processes at batch 1 give what one process gives at batch 1
    with 2 accumulated micro-batches (the same global batch, cut into the same micro-batches; the one process is the
    test's), and only process 0 writes. A plugin outside the package, found through its entry point and using only
    the documented contract, trains under both; its term is 0 while the LoRA is still zero. pivot_locality trains under both: its draws
    (num_samples per micro-batch, seeded by the micro-batch's first slot) are the same micro-batch for micro-batch
    (a one-process run at batch 2 has one micro-batch, hence other draws, and differs by ~5% of the movement).

    SGD: the update is proportional to the gradient, so the comparison tests gradient averaging (Adam's first
    steps are ~lr * sign(grad) and amplify float reduction-order noise in tiny gradients)."""
    raw = preset(max_train_steps=None, save_precision="float", max_grad_norm=0.0, train_batch_size=1, optimizer_type="SGD",
                 network_train_unet_only=False,
                 plugins={"prior_agreement": {"weight": 100.0}, "pivot_locality": {"weight": 100.0}},
                 stages=[{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2, "steps": 1},
                         {"name": "lora", "kind": "lora", "learning_rate": 0.1, "steps": 2}])
    raw = {k: v for k, v in raw.items() if v is not None}
    raw.pop("output_dir")
    (tmp_path / "p.toml").write_text(toml.dumps(raw))
    _install_entry_point(tmp_path / "site")
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path / 'site'}"}
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train_pti.py"),
          "--preset", "p.toml", "--output_dir", "two"], tmp_path, env)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # the plugin's entry point, for the one process: this one
    Trainer(build_config(raw | {"output_dir": str(tmp_path / "one"), "gradient_accumulation_steps": 2})).run()
    one, two = tmp_path / "one", tmp_path / "two"
    expected = {"pti.safetensors", "tok1.safetensors", "pti.config.toml", "pti.log.jsonl"}
    assert {p.name for p in two.iterdir()} == expected  # no stray or temporary files
    logs = {name: [json.loads(line) for line in (tmp_path / name / "pti.log.jsonl").read_text().splitlines()]
            for name in ("one", "two")}
    assert len(logs["two"]) == 3  # one writer: one line per step
    assert torch.allclose(load_file(one / "tok1.safetensors")["emb_params"], load_file(two / "tok1.safetensors")["emb_params"], atol=1e-6)
    terms = [e.get("loss/prior_agreement/mse") for e in logs["two"]]
    assert terms[0] is None  # inversion stage: no rows
    # LoRA up weights start at zero: the trained model is the frozen one (up to batched-matmul rounding)
    assert terms[1] < 1e-9 and terms[2] > 1e-6
    assert [e.get("loss/prior_agreement/mse") is None for e in logs["one"]] == [True, False, False]
    for name in ("one", "two"):  # pivot_locality: lora stage only, 0 while the LoRA is zero, then > 0
        locality = [e.get("loss/pivot_locality/mse") for e in logs[name]]
        assert locality[0] is None and locality[1] < 1e-9 and locality[2] > 1e-6, locality
    a, b = load_file(tmp_path / "one" / "pti.safetensors"), load_file(tmp_path / "two" / "pti.safetensors")
    assert any(k.startswith("lora_te_") for k in a) and a.keys() == b.keys()
    # The LoRA up weights start at zero, so their values are the training's movement: the two runs agree to
    # float reduction-order noise relative to it (gradients of the extra rows are averaged over the processes).
    moved = max(float(a[k].abs().max()) for k in a if k.endswith("lora_up.weight"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"largest LoRA up weight {moved:.3g}, largest difference {diff:.3g}")
    assert moved > 1e-4 and diff < 1e-4 * moved


def test_two_processes_skip_a_non_finite_step_together_train_float8_weights_and_say_outputs_and_warnings_once(
        preset, tmp_path):
    """One two-process run serves three claims.

    nan_policy skip under 2 processes: a NaN loss term on process 1 only, at step 2; both processes skip that step
    together (neither pivot moves; the run finishes: no process waits on the other).

    fp8_base with bf16 (the text encoder DDP-wrapped in the inversion stage, the UNet and text-encoder LoRA in the
    LoRA stage): DDP leaves the float8 weights out of its start-up broadcast, which gloo (a CPU run's backend)
    cannot send.

    The output lines and the warnings come once (before: process 1 printed a bare `samples: ` line and every warning
    again)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok1 --w 32 --h 32 --s 1\n")  # warned about: kohya samples 32 px at 64
    raw = preset(max_train_steps=None, train_batch_size=1, nan_policy="skip", plugins={"rank_nan": {"at_step": 2}},
                 mixed_precision="bf16", fp8_base=True, sample_prompts=str(prompts), sample_steps=1,
                 stages=[{"name": "inversion", "kind": "inversion", "learning_rate": 5e-2, "steps": 3},
                         {"name": "lora", "kind": "lora", "learning_rate": 1e-2, "steps": 1,
                          "train_text_encoder": True}])
    raw = {k: v for k, v in raw.items() if v is not None}
    raw.pop("output_dir")
    (tmp_path / "p.toml").write_text(toml.dumps(raw))
    _install_entry_point(tmp_path / "site", "rank_nan = tests.rank_nan_plugin:RankNan")
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path / 'site'}"}
    done = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train_pti.py"),
                 "--preset", "p.toml", "--output_dir", "two"], tmp_path, env)
    log = [json.loads(line) for line in (tmp_path / "two" / "pti.log.jsonl").read_text().splitlines()]
    assert [e.get("skipped_nonfinite", 0) for e in log] == [0, 1.0, 0, 0]  # process 0's own loss was finite
    for rank in (0, 1):
        pivots = torch.load(tmp_path / "two" / f"pivots-rank{rank}.pt")
        assert len(pivots) == 4 and torch.equal(pivots[1], pivots[0]) and not torch.equal(pivots[2], pivots[1])

    lora, _ = load_lora(str(tmp_path / "two" / "pti.safetensors"))
    assert any(k.startswith("lora_te_") for k in lora) and all(torch.isfinite(v.float()).all() for v in lora.values())

    lines = done.stdout.splitlines()
    sample = tmp_path / "two" / "samples" / "pti-final-0.png"
    assert [line for line in lines if line.startswith("samples:")] == [f"samples: {sample}"]
    assert done.stderr.count("--w 32 is sampled at 64 px") == 1, done.stderr[-3000:]
