"""The SD1.5 family's conditioning: clip_skip and kohya's max_token_length window concatenation."""

from __future__ import annotations

import pytest
import torch

from pti_plugin.models.loading import load_base_model
from pti_plugin.models.sd15 import final_layer_norm


@pytest.fixture(scope="module")
def models(tiny_model):
    return load_base_model(str(tiny_model)), load_base_model(str(tiny_model), max_token_length=150)


@torch.no_grad()
def test_long_captions_are_encoded_in_framed_windows(models):
    short_model, long_model = models
    te = long_model.text_encoder
    caption = " ".join(["red", "green", "blue"] * 40)  # 120 tokens: two windows
    ids = long_model.tokenize([caption])
    assert ids.shape == (1, 152)
    states = long_model.encode(ids).hidden_states
    assert states.shape == (1, 152, 32)
    bos, eos = ids[:, :1], ids[:, -1:]
    first = te(torch.cat([bos, ids[:, 1:76], eos], 1)).last_hidden_state
    second = te(torch.cat([bos, ids[:, 76:151], eos], 1)).last_hidden_state
    assert torch.equal(states[:, :76], first[:, :76]) and torch.equal(states[:, 76:], second[:, 1:])
    # Up to the 75th token, a 150-token run sees what a 75-token run sees.
    short_states = short_model.encode(short_model.tokenize([caption])).hidden_states
    assert torch.equal(states[:, :76], short_states[:, :76])


@torch.no_grad()
def test_clip_skip_applies_the_final_layernorm_to_an_earlier_layer(tiny_model):
    model = load_base_model(str(tiny_model), clip_skip=2)
    ids = model.tokenize(["an anime illustration of character"])
    hidden = model.text_encoder(ids, output_hidden_states=True).hidden_states
    expected = final_layer_norm(model.text_encoder)(hidden[-2])
    assert torch.equal(model.encode(ids).hidden_states, expected)
    assert not torch.allclose(expected, model.text_encoder(ids).last_hidden_state)


def _safetensors_with_keys(path, keys):
    from safetensors.torch import save_file

    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


def test_family_is_detected_from_the_weights_and_can_be_overridden(tiny_model, tmp_path, caplog):
    import json
    import logging
    import shutil

    from pti_plugin.config import ConfigError
    from pti_plugin.models.family import detect_family

    assert detect_family(tiny_model)[0] == "sd15"
    sd15_file = _safetensors_with_keys(tmp_path / "a.safetensors", ["cond_stage_model.transformer.text_model.x", "model.diffusion_model.y"])
    sdxl_file = _safetensors_with_keys(tmp_path / "b.safetensors", ["conditioner.embedders.1.model.ln_final.weight"])
    assert detect_family(sd15_file)[0] == "sd15" and detect_family(sdxl_file)[0] == "sdxl"

    # A diffusers folder whose model_index names the SDXL pipeline is read as SDXL, and refused naming what it lacks ...
    xl = tmp_path / "xl"
    shutil.copytree(tiny_model, xl)
    index = json.loads((xl / "model_index.json").read_text())
    (xl / "model_index.json").write_text(json.dumps(index | {"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ConfigError, match="not a complete SDXL diffusers folder: no text_encoder_2/, tokenizer_2/.*model_index.json names StableDiffusionXLPipeline"):
        load_base_model(str(xl))
    # ... unless the preset's model_family says otherwise; the choice is logged.
    with caplog.at_level(logging.INFO, logger="pti_plugin.models.loading"):
        model = load_base_model(str(xl), model_family="sd15")
    assert model.family.name == "sd15" and "model family sd15 (set by model_family)" in caplog.text
