"""End-to-end runs of the trainer on the tiny model: outputs, trainable sets, resume, optimizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.trainer import Trainer


def _snapshot(state) -> dict[str, dict[str, torch.Tensor]]:
    unet = {k: v.detach().clone() for k, v in state.model.unet.state_dict().items()}
    te = {k: v.detach().clone() for k, v in state.model.text_encoder.state_dict().items() if not k.endswith("token_embedding.vectors")}
    return {"unet": unet, "text_encoder": te, "pivot": {"v": state.pivot.vectors.detach().clone()}}


@register_plugin
class SnapshotPlugin(Plugin):
    """Records the model before and after every stage, and the optimizer of each stage."""

    name = "test_snapshot"
    records: list = []

    def on_stage_start(self, state):
        SnapshotPlugin.records.append({"stage": state.stage.name, "before": _snapshot(state), "optimizer": state.plan.optimizer})

    def on_stage_end(self, state):
        SnapshotPlugin.records[-1]["after"] = _snapshot(state)


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_two_stage_run_trains_only_what_each_stage_owns(preset, tmp_path):
    SnapshotPlugin.records = []
    config = build_config(preset(plugins={"test_snapshot": {}}))
    outputs = Trainer(config).run()

    inversion, lora = SnapshotPlugin.records
    # Stage 1: only the pivot vectors move; the embedding table and every UNet tensor (LoRA included) are bit-identical.
    assert not torch.equal(inversion["before"]["pivot"]["v"], inversion["after"]["pivot"]["v"])
    assert _changed(inversion["before"]["text_encoder"], inversion["after"]["text_encoder"]) == set()
    assert _changed(inversion["before"]["unet"], inversion["after"]["unet"]) == set()
    # Stage 2: the pivot is bit-identical; only LoRA tensors of the UNet change, every base weight is bit-identical.
    assert torch.equal(lora["before"]["pivot"]["v"], lora["after"]["pivot"]["v"])
    changed = _changed(lora["before"]["unet"], lora["after"]["unet"])
    assert changed and all(".lora_B." in k or ".lora_A." in k for k in changed)
    assert _changed(lora["before"]["text_encoder"], lora["after"]["text_encoder"]) == set()

    lora_file = load_file(outputs["lora"])
    unet_keys = {k for k in lora_file if k.startswith("lora_unet_")}
    assert len({k.rsplit(".", 2)[0] for k in unet_keys}) == 192  # kohya's SD1.5 target set
    embedding = load_file(outputs["embedding"])
    assert list(embedding) == ["emb_params"] and embedding["emb_params"].shape == (1, 32)
    assert torch.equal(embedding["emb_params"], lora["after"]["pivot"]["v"])
    out = Path(config.output_dir)
    log = [json.loads(line) for line in (out / "pti.log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in log] == [1, 2, 3, 4, 5, 6]
    assert log[2]["pivot_l2_from_init"] > 0 and log[2]["pivot_l2_from_init"] == pytest.approx(log[5]["pivot_l2_from_init"])
    resolved = (out / "pti.config.toml").read_text()
    assert f'output_dir = "{out}"' in resolved and "steps = 3" in resolved


def test_new_run_never_overwrites_previous_outputs(preset):
    raw = preset(stages=[{"kind": "inversion", "steps": 1}])
    Trainer(build_config(raw)).run()
    lora = Path(raw["output_dir"]) / "pti.safetensors"
    before = lora.read_bytes()
    with pytest.raises(ConfigError, match="already holds pti.safetensors"):
        Trainer(build_config(raw)).run()
    with pytest.raises(ConfigError, match="already holds tok1.safetensors"):  # same token: the embedding would clash
        Trainer(build_config(raw | {"output_name": "second"})).run()
    assert lora.read_bytes() == before
    Trainer(build_config(raw | {"output_name": "second", "token_string": "tok2"})).run()  # other names: fine


def test_resume_matches_uninterrupted_run(preset, tmp_path):
    full = preset(output_dir=str(tmp_path / "full"), save_every_n_steps=4, save_state=True,
                  stages=[{"kind": "inversion", "steps": 3, "learning_rate": 5e-2},
                          {"kind": "lora", "steps": 3, "learning_rate": 1e-2, "optimizer_type": "AdamW",
                           "lr_scheduler": "cosine"}])
    Trainer(build_config(full)).run()
    state = tmp_path / "full" / "pti-state-step00000004"
    assert (state / "progress.json").is_file()
    resumed = full | {"output_dir": str(tmp_path / "resumed"), "resume": str(state), "save_every_n_steps": 0}
    Trainer(build_config(resumed)).run()
    a = load_file(tmp_path / "full" / "pti.safetensors")
    b = load_file(tmp_path / "resumed" / "pti.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(load_file(tmp_path / "full" / "tok1.safetensors")["emb_params"],
                       load_file(tmp_path / "resumed" / "tok1.safetensors")["emb_params"])


def test_adamw8bit_runs_with_8bit_state_on_cpu(preset):
    SnapshotPlugin.records = []
    raw = preset(plugins={"test_snapshot": {}}, stages=[
        {"kind": "lora", "steps": 2, "learning_rate": 1e-2, "optimizer_type": "AdamW8bit", "optimizer_args": ["min_8bit_size=16"]}])
    Trainer(build_config(raw)).run()
    record = SnapshotPlugin.records[0]
    optimizer = record["optimizer"]
    assert type(optimizer).__name__ == "AdamW8bit"
    states = [s for s in optimizer.state.values() if "state1" in s]
    assert states and all(s["state1"].dtype == torch.uint8 for s in states)
    changed = _changed(record["before"]["unet"], record["after"]["unet"])
    assert changed and all(".lora_" in k for k in changed)
    assert all(torch.isfinite(record["after"]["unet"][k]).all() for k in changed)


def test_gradient_accumulation_matches_larger_batch(preset, tmp_path):
    """Two accumulated batches of 1 equal one batch of 2 (same samples, same draws)."""
    stages = [{"kind": "inversion", "steps": 2, "learning_rate": 5e-2, "optimizer_type": "SGD"}]
    big = preset(output_dir=str(tmp_path / "big"), train_batch_size=2, stages=stages, max_grad_norm=0.0)
    small = big | {"output_dir": str(tmp_path / "small"), "train_batch_size": 1, "gradient_accumulation_steps": 2}
    Trainer(build_config(big)).run()
    Trainer(build_config(small)).run()
    a = load_file(tmp_path / "big" / "tok1.safetensors")["emb_params"]
    b = load_file(tmp_path / "small" / "tok1.safetensors")["emb_params"]
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
