"""The SDXL single-file loader's checks (the conversion itself is diffusers' own, given the shipped configs)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pti_plugin.config import ConfigError
from pti_plugin.models.loading import load_base_model

_MARKERS = {  # one tensor of each component, in the original (sgm) layout
    "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2),
    "first_stage_model.decoder.conv_in.weight": torch.zeros(2),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 4),
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2),
    "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 4),
}


def test_a_single_file_without_openclip_is_refused_naming_the_component(tmp_path):
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in _MARKERS.items() if not k.startswith("conditioner.embedders.1")}
              | {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}, str(path))
    # detected as SDXL by its first encoder's layout, then refused for the missing second encoder
    with pytest.raises(ConfigError, match=r"partial.safetensors: not a complete SDXL checkpoint: no weights for OpenCLIP ViT-bigG"):
        load_base_model(str(path), tokenizer_path="/nonexistent")


def test_a_refiner_is_refused(tmp_path):
    path = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(2),
               "model.diffusion_model.x": torch.zeros(1)}, str(path))
    with pytest.raises(ConfigError, match="refiner.safetensors: this is an SDXL refiner checkpoint"):
        load_base_model(str(path), model_family="sdxl")


def test_weights_that_do_not_fit_the_sdxl_configs_are_refused_naming_the_file(tmp_path, tiny_model):
    path = tmp_path / "wrong.safetensors"
    save_file(dict(_MARKERS), str(path))
    with pytest.raises(ConfigError, match=r"wrong.safetensors: .*UNet.*configs/sdxl"):
        load_base_model(str(path), tokenizer_path=str(tiny_model))
