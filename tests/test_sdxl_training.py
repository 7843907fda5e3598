"""SDXL through the family adapter: conditioning as diffusers defines it, a full two-stage run on a tiny
SDXL-shaped model, v-prediction with zero terminal SNR, and pivot locality's centered geometry."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pti_plugin.config_loading import build_config
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.trainer import Trainer


@pytest.fixture
def sdxl_preset(preset, tiny_sdxl):
    def make(**overrides):
        return preset(pretrained_model_name_or_path=str(tiny_sdxl), **overrides)

    return make


def _encoders_snapshot(state) -> dict[str, dict[str, torch.Tensor]]:
    snap = {"unet": {k: v.detach().clone() for k, v in state.model.unet.state_dict().items()}}
    for i, te in enumerate(state.model.text_encoders):
        snap[f"te{i}"] = {k: v.detach().clone() for k, v in te.state_dict().items() if not k.endswith("token_embedding.vectors")}
        snap[f"pivot{i}"] = {"v": state.pivots[i].vectors.detach().clone()}
    return snap


@register_plugin
class SDXLSnapshot(Plugin):
    name = "test_sdxl_snapshot"
    records: list = []

    def on_stage_start(self, state):
        SDXLSnapshot.records.append({"stage": state.stage.name, "before": _encoders_snapshot(state)})

    def on_stage_end(self, state):
        SDXLSnapshot.records[-1]["after"] = _encoders_snapshot(state)


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_conditioning_equals_diffusers_encode_prompt(tiny_sdxl):
    """Our SDXL conditioning is the pipeline's own: penultimate states of both encoders concatenated, the
    second encoder's pooled output, and the time ids of (original, crop, target) sizes."""
    from diffusers import StableDiffusionXLPipeline

    from pti_plugin.models.loading import load_base_model

    base = load_base_model(str(tiny_sdxl))
    assert base.family.name == "sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    prompts = ["a red circle", "a blue square at the top"]
    with torch.no_grad():
        ours = base.encode(base.tokenize(prompts), sizes=torch.tensor([[48.0, 32, 0, 8, 32, 32]] * 2))
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    assert ours.hidden_states.shape[-1] == sum(te.config.hidden_size for te in base.text_encoders)
    torch.testing.assert_close(ours.hidden_states, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.added_cond_kwargs["text_embeds"], pooled, rtol=0, atol=1e-6)
    time_ids = pipe._get_add_time_ids((48, 32), (0, 8), (32, 32), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(ours.added_cond_kwargs["time_ids"], time_ids.expand(2, -1))


def test_size_conditioning_of_a_wide_image_in_a_square_bucket():
    """kohya: original size (h, w) of the file, the margins (top, left) of the image fitted inside the bucket, the
    bucket (h, w) (tests/test_sdxl_kohya_r4.py has more)."""
    from pti_plugin.data.buckets import size_conditioning

    # 48 x 32 (w x h) in a 32 x 32 bucket: fitted 32 x 21.33, top margin 10.67 // 2 = 5.
    assert size_conditioning((48, 32), (32, 32)) == (32, 48, 5, 0, 32, 32)
    # 64 x 128 in 32 x 32: fitted 16 x 32, left margin 8; flipped: 32 - (8 + 16) = 8.
    assert size_conditioning((64, 128), (32, 32), flip=True) == (128, 64, 0, 8, 32, 32)


def test_sdxl_two_stage_run_trains_each_encoders_pivot_then_only_the_lora(sdxl_preset, caplog):
    SDXLSnapshot.records = []
    config = build_config(sdxl_preset(plugins={"test_sdxl_snapshot": {}}))
    with caplog.at_level(logging.INFO):
        outputs = Trainer(config).run()
    assert "model family sdxl (model_index.json names StableDiffusionXLPipeline)" in caplog.text

    inversion, lora = SDXLSnapshot.records
    for i in (0, 1):  # stage 1: both encoders' pivots move; every other weight is bit-identical
        assert not torch.equal(inversion["before"][f"pivot{i}"]["v"], inversion["after"][f"pivot{i}"]["v"])
        assert _changed(inversion["before"][f"te{i}"], inversion["after"][f"te{i}"]) == set()
    assert _changed(inversion["before"]["unet"], inversion["after"]["unet"]) == set()
    for i in (0, 1):  # stage 2: both pivots and encoders bit-identical; only UNet LoRA tensors change
        assert torch.equal(lora["before"][f"pivot{i}"]["v"], lora["after"][f"pivot{i}"]["v"])
        assert _changed(lora["before"][f"te{i}"], lora["after"][f"te{i}"]) == set()
    changed = _changed(lora["before"]["unet"], lora["after"]["unet"])
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)

    embedding = load_file(outputs["embedding"])
    assert sorted(embedding) == ["clip_g", "clip_l"]
    assert torch.equal(embedding["clip_l"], lora["after"]["pivot0"]["v"])
    assert torch.equal(embedding["clip_g"], lora["after"]["pivot1"]["v"])
    keys = load_file(outputs["lora"])
    assert any(k.startswith("lora_unet_") for k in keys)
    assert {k for k in keys if k.startswith("bundle_emb.")} == {"bundle_emb.tok1.clip_l", "bundle_emb.tok1.clip_g"}


def test_v_prediction_target_and_zero_terminal_snr(tiny_sdxl):
    from pti_plugin.diffusion_loss import training_target
    from pti_plugin.models.loading import load_base_model

    base = load_base_model(str(tiny_sdxl), v_parameterization=True, model_family="sdxl", zero_terminal_snr=True)
    assert base.prediction_type == "v_prediction"
    scheduler = base.noise_scheduler
    assert float(scheduler.alphas_cumprod[-1]) == pytest.approx(0.0, abs=1e-12)  # the last step is pure noise
    assert float(scheduler.alphas_cumprod[0]) > 0.99
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 999])
    target = training_target(scheduler, latents, noise, t, base.prediction_type)
    a = scheduler.alphas_cumprod[t].sqrt()[:, None, None, None]
    s = (1 - scheduler.alphas_cumprod[t]).sqrt()[:, None, None, None]
    torch.testing.assert_close(target, a * noise - s * latents)  # v = sqrt(abar) eps - sqrt(1 - abar) x0
    torch.testing.assert_close(target[1], -latents[1])  # at zero SNR the velocity is -x0


def test_pivot_locality_on_sdxl_uses_the_centered_geometry(sdxl_preset, capsys):
    from pti_plugin.plugins.pivot_locality import PivotLocality

    config = build_config(sdxl_preset(plugins={"pivot_locality": {"probe_every_n_steps": 0}}))
    trainer = Trainer(config)
    outputs = trainer.run()
    printed = capsys.readouterr().out
    assert "using the centered geometry" in printed and "geometry centered" in printed
    plugin = next(p for p in trainer.plugins if isinstance(p, PivotLocality))
    log = [line for line in Path(outputs["lora"]).with_suffix("").with_suffix(".log.jsonl").read_text().splitlines()]
    import json

    entries = [json.loads(line) for line in log]
    locality = [e["loss/pivot_locality/mse"] for e in entries if "loss/pivot_locality/mse" in e]
    # the LoRA starts at zero (lora_B = 0): fine-tuned == frozen, up to float differences of a larger UNet batch
    assert locality[0] < 1e-9
    assert locality[-1] > 1e-6  # after the LoRA moved
    assert {"pivot_locality/angle_centered_te1_deg", "pivot_locality/angle_centered_te2_deg"} <= set(entries[-1])
    assert plugin.pooled_centre is not None and plugin.geometry == "centered"


def test_pooled_output_is_taken_at_the_end_of_text_even_with_sdxls_eos_token_id_2(tiny_sdxl):
    """SDXL's published configs carry eos_token_id = 2, with which transformers pools at the highest id: the
    pivot token once added. Our pooled embedding stays at the end-of-text token, as A1111 and kohya have it."""
    from pti_plugin.models.loading import load_base_model
    from pti_plugin.models.pivot import add_pivot_token

    base = load_base_model(str(tiny_sdxl))
    te2 = base.text_encoders[1]
    for tokenizer, te in zip(base.tokenizers, base.text_encoders):
        add_pivot_token(tokenizer, te, "tok1", 1, ["character"])
        te.config.eos_token_id = 2  # as in SDXL's published text_encoder_2 config (read when the model is built)
        getattr(te, "text_model", te).eos_token_id = 2
    ids = base.tokenize(["a tok1 at the top"])  # [1, 2, 77]
    eos = int((ids[0, 0] == base.tokenizers[0].eos_token_id).nonzero()[0])
    with torch.no_grad():
        ours = base.encode(ids).added_cond_kwargs["text_embeds"]
        states = te2(ids[:, 1]).last_hidden_state  # after the final LayerNorm
        expected = te2.text_projection(states[:, eos])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(te2(ids[:, 1]).text_embeds, expected)  # transformers' own pooling picked the pivot


def test_load_pti_makes_diffusers_pool_at_the_end_of_text(tiny_sdxl, tmp_path):
    """With SDXL's eos_token_id = 2 configs, diffusers would pool at the loaded token; load_pti fixes the id so the
    pipeline's pooled embedding is taken at EOS, as in training."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from pti_plugin.load_pti import load_pti

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    for te in (pipe.text_encoder, pipe.text_encoder_2):
        te.config.eos_token_id = 2
        getattr(te, "text_model", te).eos_token_id = 2
    path = tmp_path / "bundle.safetensors"
    generator = torch.Generator().manual_seed(0)
    save_file({"bundle_emb.tok1.clip_l": torch.randn(1, 32, generator=generator),
               "bundle_emb.tok1.clip_g": torch.randn(1, 48, generator=generator)}, str(path))
    assert load_pti(pipe, path) == "tok1"
    with torch.no_grad():
        _, _, pooled, _ = pipe.encode_prompt("a tok1 at the top", device="cpu", do_classifier_free_guidance=False)
        ids = pipe.tokenizer_2("a tok1 at the top", padding="max_length", max_length=77, return_tensors="pt").input_ids
        eos = int((ids[0] == pipe.tokenizer_2.eos_token_id).nonzero()[0])
        expected = pipe.text_encoder_2.text_projection(pipe.text_encoder_2(ids).last_hidden_state[:, eos])
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-6)
