"""What the saved files hold with the options that change them, against kohya's rules (``networks/lora.py``).

LoCon's ``conv_alpha``: kohya's ``create_network`` takes ``conv_alpha = 1.0`` when ``network_args`` gives ``conv_dim``
alone, and its ``LoRAModule`` reads an alpha of 0 as the rank (no scaling), so the 3x3-convolution modules of the file
it saves hold ``alpha`` 1.0, or ``conv_dim`` for 0, whatever ``network_alpha`` is.

A text-encoder-only LoRA (kohya's ``network_train_text_encoder_only``: no ``lora_unet_*`` key) loads through
``load_pti`` as the trainer's model, without diffusers' notice that the file has no UNet keys (it has none by design).

The weights' hashes: kohya's save (``train_util.precalculate_safetensors_hashes``) adds ``sshs_model_hash`` and
``sshs_legacy_hash`` to every LoRA's metadata, both of the file as ``safetensors.torch.save`` writes the tensors with the
``ss_*`` keys alone: the sha256 of the data after the header, and of the 64 KiB at offset 1 MiB (8 hex digits).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from pti_plugin.config_loading import build_config
from pti_plugin.formats.kohya_lora import save_lora
from pti_plugin.hooks import Plugin, register_plugin
from pti_plugin.load_pti import load_pti
from pti_plugin.trainer import Trainer

PROMPT = "an anime illustration of tok1"
STAGES = [{"kind": "inversion", "steps": 1, "learning_rate": 5e-2}, {"kind": "lora", "steps": 1, "learning_rate": 1e-2}]


def _alphas_by_kind(path: Path) -> dict[str, set[float]]:
    """The alphas of the file's 3x3-convolution modules ("conv") and of the others ("linear")."""
    tensors = load_file(str(path))
    found: dict[str, set[float]] = {"conv": set(), "linear": set()}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight") and not key.startswith("bundle_emb."):
            kind = "conv" if down.dim() == 4 and tuple(down.shape[2:]) == (3, 3) else "linear"
            found[kind].add(float(tensors[key.replace(".lora_down.weight", ".alpha")]))
    return found


@pytest.mark.parametrize(("network_args", "conv_alpha"), [(["conv_dim=2"], 1.0), (["conv_dim=2", "conv_alpha=0"], 2.0)],
                         ids=["conv_alpha-unset", "conv_alpha-0"])
def test_locon_alpha_is_kohyas_when_conv_alpha_is_unset_or_zero(preset, tmp_path, network_args, conv_alpha):
    raw = preset(output_dir=str(tmp_path / "out"), stages=STAGES, save_precision="float", network_args=network_args)
    Trainer(build_config(raw)).run()
    path = tmp_path / "out" / "pti.safetensors"
    assert _alphas_by_kind(path) == {"conv": {conv_alpha}, "linear": {4.0}}  # network_alpha = 4.0 in the preset
    with safe_open(str(path), framework="pt") as handle:
        args = json.loads(handle.metadata()["ss_network_args"])
    assert (args["conv_dim"], float(args["conv_alpha"])) == ("2", conv_alpha)


def test_a_lora_carries_both_of_kohyas_weight_hashes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {f"{name}.lora_down.weight": torch.randn(256, 1024, generator=generator),  # 1 MiB each: the legacy
               f"{name}.lora_up.weight": torch.randn(1024, 256, generator=generator),  # hash reads bytes past 1 MiB
               f"{name}.alpha": torch.tensor(4.0)}
    metadata = {"ss_network_dim": "256", "ss_network_alpha": "4.0", "pti_token_string": "tok1",
                "modelspec.title": "pti"}
    save_lora(tmp_path / "pti.safetensors", tensors, metadata)
    with safe_open(str(tmp_path / "pti.safetensors"), framework="pt") as handle:
        header = handle.metadata()
    as_kohya_hashes = save(tensors, {"ss_network_dim": "256", "ss_network_alpha": "4.0"})
    (length,) = struct.unpack("<Q", as_kohya_hashes[:8])
    assert header["sshs_model_hash"] == hashlib.sha256(as_kohya_hashes[8 + length:]).hexdigest()
    assert header["sshs_legacy_hash"] == hashlib.sha256(as_kohya_hashes[0x100000:0x110000]).hexdigest()[:8]
    assert header["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]  # the file is past 1 MiB
    assert header.keys() == metadata.keys() | {"sshs_model_hash", "sshs_legacy_hash"}


def _fixed_latents() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([500])


@register_plugin
class EndPrediction(Plugin):
    """The trained model's prediction for PROMPT on fixed latents at the end of the run, with its extra conditioning."""

    name = "test_saved_files_r4_prediction"
    prediction: torch.Tensor | None = None
    added: dict = {}

    @torch.no_grad()
    def on_end(self, state):
        cond = state.encode(state.tokenize([PROMPT]).to(state.device))
        EndPrediction.prediction = state.unet(*_fixed_latents(), cond)
        EndPrediction.added = dict(cond.added_cond_kwargs)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_text_encoder_only_lora_loads_as_trained_without_a_no_unet_keys_notice(preset, tiny_sdxl, tmp_path, family):
    from diffusers import DiffusionPipeline

    model = preset()["pretrained_model_name_or_path"] if family == "sd15" else str(tiny_sdxl)
    raw = preset(pretrained_model_name_or_path=model, output_dir=str(tmp_path / "out"), stages=STAGES,
                 save_precision="float", network_train_text_encoder_only=True,
                 plugins={"test_saved_files_r4_prediction": {}})
    Trainer(build_config(raw)).run()
    path = tmp_path / "out" / "pti.safetensors"
    prefixes = {key.split("_text_model")[0] for key in load_file(str(path)) if not key.startswith("bundle_emb.")}
    assert prefixes == ({"lora_te"} if family == "sd15" else {"lora_te1", "lora_te2"})  # no lora_unet_*
    pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("diffusers.loaders.peft")
    logger.addHandler(handler)
    try:
        assert load_pti(pipe, path) == "tok1"
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "No LoRA keys" in m]
    with torch.no_grad():
        if family == "sd15":
            cond, added = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0], None
        else:
            cond, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
            added = {"text_embeds": pooled, "time_ids": EndPrediction.added["time_ids"]}
        reloaded = pipe.unet(*_fixed_latents(), encoder_hidden_states=cond, added_cond_kwargs=added).sample
    assert (reloaded - EndPrediction.prediction).abs().max() < 1e-5
