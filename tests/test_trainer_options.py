"""Trainer options beyond the default run: precision, checkpointing, text-encoder LoRA, pivot controls, saves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pti_plugin.config_loading import build_config
from pti_plugin.trainer import Trainer

from .test_trainer import SnapshotPlugin, _changed


def _run(raw) -> Path:
    config = build_config(raw)
    Trainer(config).run()
    return Path(config.output_dir)


def test_gradient_checkpointing_gives_the_same_result(preset, tmp_path):
    stages = [{"kind": "inversion", "steps": 2, "learning_rate": 5e-2, "optimizer_type": "SGD"},
              {"kind": "lora", "steps": 2, "learning_rate": 5e-1, "optimizer_type": "SGD"}]
    plain = _run(preset(output_dir=str(tmp_path / "a"), stages=stages, save_precision="float"))
    ckpt = _run(preset(output_dir=str(tmp_path / "b"), stages=stages, save_precision="float", gradient_checkpointing=True))
    a, b = load_file(plain / "pti.safetensors"), load_file(ckpt / "pti.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_runs_in_one_process_may_ask_for_different_precisions(preset, tmp_path):
    """accelerate keeps one state per process; each run starts from a fresh one, so a second run (a sweep
    run in-process, a notebook) can change mixed_precision. Without it: "AcceleratorState has already been
    initialized and cannot be changed". Nothing resets anything between the two runs here."""
    stages = [{"kind": "inversion", "steps": 1}, {"kind": "lora", "steps": 1, "learning_rate": 1e-2}]
    _run(preset(output_dir=str(tmp_path / "fp32"), stages=stages))
    out = _run(preset(output_dir=str(tmp_path / "bf16"), mixed_precision="bf16", save_precision="bf16", stages=stages))
    assert all(v.dtype == torch.bfloat16 for k, v in load_file(out / "pti.safetensors").items() if k.endswith("weight"))


def test_bf16_mixed_precision_trains_on_cpu(preset):
    out = _run(preset(mixed_precision="bf16", save_precision="bf16",
                      stages=[{"kind": "inversion", "steps": 2}, {"kind": "lora", "steps": 2, "learning_rate": 1e-2}]))
    lora = load_file(out / "pti.safetensors")
    weights = [v for k, v in lora.items() if k.endswith("weight")]
    assert weights and all(v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all() for v in weights)
    assert any(v.abs().max() > 0 for k, v in lora.items() if k.endswith("lora_up.weight"))
    assert load_file(out / "tok1.safetensors")["emb_params"].dtype == torch.float32


def test_text_encoder_lora_and_continued_inversion(preset):
    SnapshotPlugin.records = []
    out = _run(preset(plugins={"test_snapshot": {}}, stages=[
        {"kind": "lora", "steps": 2, "learning_rate": 1e-2, "train_text_encoder": True, "train_pivot": True,
         "text_encoder_lr": 5e-3, "pivot_lr": 5e-2}]))
    record = SnapshotPlugin.records[0]
    groups = {g["name"]: g["lr"] for g in record["optimizer"].param_groups}
    assert groups == {"pivot": 5e-2, "unet_lora": 1e-2, "text_encoder_lora": 5e-3}
    assert not torch.equal(record["before"]["pivot"]["v"], record["after"]["pivot"]["v"])
    te_changed = _changed(record["before"]["text_encoder"], record["after"]["text_encoder"])
    assert te_changed and all(".lora_" in k for k in te_changed)
    keys = load_file(out / "pti.safetensors").keys()
    te_modules = {k.rsplit(".", 2)[0] for k in keys if k.startswith("lora_te_")}
    assert len(te_modules) == 3 * 6  # 3 layers x (q, k, v, out, fc1, fc2) on the tiny text encoder
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te_modules


def test_multi_vector_pivot_with_norm_kept_at_init(preset):
    SnapshotPlugin.records = []
    out = _run(preset(plugins={"test_snapshot": {}}, num_vectors_per_token=2, init_word=["girl", "character"],
                      pivot_norm="init", stages=[{"kind": "inversion", "steps": 3, "learning_rate": 1e-1}]))
    record = SnapshotPlugin.records[0]
    before, after = record["before"]["pivot"]["v"], record["after"]["pivot"]["v"]
    assert after.shape == (2, 32) and not torch.equal(before, after)
    assert torch.allclose(after.norm(dim=-1), before.norm(dim=-1), atol=1e-5)
    assert load_file(out / "tok1.safetensors")["emb_params"].shape == (2, 32)
    log = [json.loads(line) for line in (out / "pti.log.jsonl").read_text().splitlines()]
    assert log[-1]["pivot_norm"] == pytest.approx(log[-1]["init_norm"], abs=1e-5)


def test_epoch_saves_and_tensorboard(preset):
    # 4 images x 2 repeats = 8 entries = 4 steps of batch 2 per epoch.
    out = _run(preset(max_train_epochs=2, save_every_n_epochs=1, log_with="tensorboard",
                      stages=[{"kind": "inversion"}, {"kind": "lora", "learning_rate": 1e-2}]))
    log = [json.loads(line) for line in (out / "pti.log.jsonl").read_text().splitlines()]
    assert log[-1]["global_step"] == 16
    saved = sorted(p.name for p in out.glob("pti-step*.safetensors"))
    assert saved == [f"pti-step{n:08d}.safetensors" for n in (4, 8, 12)]  # the final save replaces step 16
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_starting_from_an_embedding_and_a_lora_file(preset, tmp_path, monkeypatch):
    """The second run starts from the first's files; from the start-up check to the LoRA's load, each tensor of its
    network_weights file is read once (twice before: the check read the file, then the trainer again)."""
    import safetensors

    from .test_base_weights import _CountingHandle

    first = _run(preset(output_dir=str(tmp_path / "first"), save_precision="float",
                        stages=[{"kind": "inversion", "steps": 2, "learning_rate": 5e-2},
                                {"kind": "lora", "steps": 2, "learning_rate": 1e-2}]))
    SnapshotPlugin.records = []
    reads: dict = {}
    opener = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, *a, **k: _CountingHandle(opener(path, *a, **k),
                                                                                        Path(path).resolve(), reads))
    # An inversion-only run from both files: the pivot starts at the file's vectors, the LoRA passes through untouched.
    second = _run(preset(output_dir=str(tmp_path / "second"), save_precision="float", plugins={"test_snapshot": {}},
                         weights=str(first / "tok1.safetensors"), network_weights=str(first / "pti.safetensors"),
                         stages=[{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}]))
    monkeypatch.undo()
    lora_file = (first / "pti.safetensors").resolve()
    assert {name: n for (file, name), n in reads.items() if file == lora_file} == dict.fromkeys(load_file(lora_file), 1)
    loaded = load_file(first / "tok1.safetensors")["emb_params"]
    assert torch.equal(SnapshotPlugin.records[0]["before"]["pivot"]["v"], loaded)
    a, b = load_file(first / "pti.safetensors"), load_file(second / "pti.safetensors")
    lora_keys = [k for k in a if k.startswith("lora_")]
    assert lora_keys and all(torch.equal(a[k], b[k]) for k in lora_keys)  # save -> load -> save: identical
    log = [json.loads(line) for line in (second / "pti.log.jsonl").read_text().splitlines()]
    assert log[0]["init_norm"] == pytest.approx(float(loaded.norm(dim=-1).mean()), rel=1e-6)


def test_network_weights_of_another_rank_are_refused(preset, tmp_path):
    first = _run(preset(output_dir=str(tmp_path / "first"), stages=[{"kind": "lora", "steps": 1}]))
    from pti_plugin.config import ConfigError

    with pytest.raises(ConfigError, match=r"does not fit this run's LoRA .*file ranks \[4\].*set network_dim"):
        _run(preset(output_dir=str(tmp_path / "second"), network_weights=str(first / "pti.safetensors"), network_dim=8,
                    stages=[{"kind": "lora", "steps": 1}]))


def test_locon_conv_layers_take_conv_dim_and_alpha(preset):
    out = _run(preset(save_precision="float", network_args=["conv_dim=2", "conv_alpha=1"],
                      stages=[{"kind": "lora", "steps": 2, "learning_rate": 1e-2}]))
    from safetensors import safe_open

    tensors = load_file(out / "pti.safetensors")
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape == (2, 32, 3, 3) and float(tensors[f"{conv}.alpha"]) == 1.0
    linear = "lora_unet_down_blocks_0_resnets_0_time_emb_proj"
    assert tensors[f"{linear}.lora_down.weight"].shape == (4, 128) and float(tensors[f"{linear}.alpha"]) == 4.0
    modules = {k.rsplit(".", 2)[0] for k in tensors if k.startswith("lora_unet_")}
    assert len(modules) == 192 + 50 + 34  # attention set + 3x3 convs + time embeddings of the tiny UNet
    with safe_open(out / "pti.safetensors", "pt") as handle:
        assert json.loads(handle.metadata()["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}


def test_cache_text_encoder_outputs_encodes_each_caption_once_and_trains_the_same(preset, tmp_path, monkeypatch):
    """The LoRA stage (text side frozen) with the cache gives the same LoRA as without, while the text encoder
    runs once per distinct caption instead of once per batch."""
    from pti_plugin.models.trainable import TrainableModel

    calls = {"rows": 0}
    encode = TrainableModel.encode

    def counting(self, input_ids, *args, **kwargs):
        if torch.is_grad_enabled() is False and self._lora_on:  # the LoRA stage's conditioning (no gradient)
            calls["rows"] += input_ids.shape[0]
        return encode(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(TrainableModel, "encode", counting)
    stages = [{"kind": "inversion", "steps": 2, "learning_rate": 5e-2, "optimizer_type": "SGD"},
              {"kind": "lora", "steps": 4, "learning_rate": 5e-1, "optimizer_type": "SGD"}]
    plain = _run(preset(output_dir=str(tmp_path / "a"), stages=stages, save_precision="float"))
    uncached_rows, calls["rows"] = calls["rows"], 0
    cached = _run(preset(output_dir=str(tmp_path / "b"), stages=stages, save_precision="float", cache_text_encoder_outputs=True))
    a, b = load_file(plain / "pti.safetensors"), load_file(cached / "pti.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    # 4 steps x batch 2 encoded without the cache; with it, the dataset's 2 distinct captions once each
    # ("an anime illustration of tok1" from the caption files and the template, which are the same text).
    assert uncached_rows == 8 and 1 <= calls["rows"] <= 2


def test_with_cached_latents_training_never_runs_the_vae_after_caching(preset, monkeypatch):
    """What lets the trainer move the VAE off the accelerator once latents are cached: after the cache is
    filled (one encode per image and flip), no training step encodes anything."""
    from diffusers import AutoencoderKL

    encodes = []
    original = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: encodes.append(x.shape[0]) or original(self, x, *a, **k))
    trainer = Trainer(build_config(preset(cache_latents=True, stages=[{"kind": "inversion", "steps": 2},
                                                                     {"kind": "lora", "steps": 3, "learning_rate": 1e-2}])))
    trainer.run()
    # the tiny dataset: 4 images, no flip_aug -> the cache holds 4 latents; training itself encoded nothing
    assert sum(encodes) == 4
    assert trainer.placement.vae_offloaded is False  # on a CPU device there is nothing to move
