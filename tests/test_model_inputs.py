"""The base model a user names (``pretrained_model_name_or_path``): every wrong kind of model ends in a message
naming the key and the file or folder (exit 2), before training and without writing to ``output_dir``.

Each fake is built here from the tiny models of the fixtures: a diffusers folder with one config edited (the
architecture checks read the configs before any weight loads), or a single file with the key names of the
kind of file it stands for.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pti_plugin.models.loading import load_base_model

from .test_reliability import _cli

KEY = "pretrained_model_name_or_path"


def _copy(model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / "model"))


def _edit(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _sd2(model: Path) -> None:  # SD2.x: OpenCLIP ViT-H text encoder (width 1024) and a 1024-wide cross attention
    _edit(model / "text_encoder" / "config.json", hidden_size=1024)
    _edit(model / "unet" / "config.json", cross_attention_dim=1024)


def _fp16_variant_only(model: Path) -> None:
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))


#: case -> (how the tiny SD1.5 folder is changed, a phrase the message must hold, the culprit inside the folder)
FOLDER_CASES = {
    "sd2": (_sd2, "Stable Diffusion 2.x", ""),
    "inpainting_unet": (lambda m: _edit(m / "unet" / "config.json", in_channels=9), "inpainting UNet", ""),
    "unet_folder_missing": (lambda m: shutil.rmtree(m / "unet"), "no unet/", ""),
    "unet_weights_missing": (lambda m: (m / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "no weights file", "unet"),
    "fp16_variant_only": (_fp16_variant_only, "diffusion_pytorch_model.fp16.safetensors", "unet"),
    "tokenizer_missing": (lambda m: shutil.rmtree(m / "tokenizer"), "no tokenizer/", ""),
    "tokenizer_empty": (lambda m: [f.unlink() for f in (m / "tokenizer").iterdir()], "no vocab.json and merges.txt", "tokenizer"),
    "broken_text_encoder_config": (lambda m: (m / "text_encoder" / "config.json").write_text("{not json"),
                                   "cannot be read as JSON", "text_encoder/config.json"),
    "broken_model_index": (lambda m: (m / "model_index.json").write_text("{not json"), "cannot be read as JSON",
                           "model_index.json"),
    "scheduler_config_missing": (lambda m: (m / "scheduler" / "scheduler_config.json").unlink(),
                                 "no scheduler_config.json", "scheduler"),
}


def _assert_refused(code: int, seen: str, culprit: Path, phrase: str, out: Path) -> None:
    assert code == 2, seen
    assert f"key '{KEY}'" in seen and str(culprit) in seen and phrase in seen, seen
    assert "Traceback" not in seen
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))  # nothing written


@pytest.mark.parametrize("case", sorted(FOLDER_CASES))
def test_a_diffusers_folder_that_cannot_train_is_refused_naming_it(case, tiny_model, preset, tmp_path, capsys):
    change, phrase, inside = FOLDER_CASES[case]
    model = _copy(tiny_model, tmp_path)
    change(model)
    out = tmp_path / "out"
    code, seen = _cli(preset(pretrained_model_name_or_path=str(model)), tmp_path, capsys)
    _assert_refused(code, seen, model / inside if inside else model, phrase, out)


def test_an_sdxl_folder_read_as_sd15_is_refused_naming_the_family(tiny_sdxl, preset, tmp_path, capsys):
    code, seen = _cli(preset(pretrained_model_name_or_path=str(tiny_sdxl), model_family="sd15"), tmp_path, capsys)
    _assert_refused(code, seen, tiny_sdxl, "this is an SDXL model", tmp_path / "out")
    assert "model_family = 'auto' or 'sdxl'" in seen


def test_a_folder_that_is_not_a_model_says_what_it_is(tiny_model, preset, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, seen = _cli(preset(pretrained_model_name_or_path=str(empty)), tmp_path, capsys)
    _assert_refused(code, seen, empty, "is an empty folder", tmp_path / "out")
    code, seen = _cli(preset(pretrained_model_name_or_path=str(tiny_model / "vae")), tmp_path, capsys)
    _assert_refused(code, seen, tiny_model / "vae", "one diffusers component (AutoencoderKL", tmp_path / "out")
    damaged = Path(shutil.copytree(tiny_model / "unet", tmp_path / "unet"))  # a component whose config is damaged
    (damaged / "config.json").write_text("{not json")
    code, seen = _cli(preset(pretrained_model_name_or_path=str(damaged)), tmp_path, capsys)
    _assert_refused(code, seen, damaged, "one diffusers component (its config.json unreadable", tmp_path / "out")
    index = tiny_model / "model_index.json"  # the folder's index file given instead of the folder
    code, seen = _cli(preset(pretrained_model_name_or_path=str(index)), tmp_path, capsys)
    _assert_refused(code, seen, index, "pass the folder that holds it", tmp_path / "out")


_SD1_MARKERS = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
                "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 4)}
_SD2_KEYS = {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 1024),
             "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3),
             "cond_stage_model.model.ln_final.weight": torch.zeros(1024)}
#: case -> (file name, tensors, extra preset keys, a phrase the message must hold)
FILE_CASES = {
    "lora": ("char.safetensors", {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, {},
             "this is a LoRA"),
    "embedding": ("tok.safetensors", {"emb_params": torch.zeros(1, 768)}, {}, "textual-inversion embedding"),
    "vae_alone": ("vae.safetensors", {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
                                      "decoder.conv_out.weight": torch.zeros(3, 4, 3, 3)}, {}, "a VAE alone"),
    "sd2": ("sd2.safetensors", _SD2_KEYS, {}, "Stable Diffusion 2.x checkpoint, which is not supported"),
    "sd15_read_as_sdxl": ("sd15.safetensors", _SD1_MARKERS, {"model_family": "sdxl"},
                          "this is an SD1.x checkpoint, read as SDXL"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_a_single_file_that_is_not_a_trainable_model_says_what_it_is(case, tiny_model, preset, tmp_path, capsys):
    name, tensors, extra, phrase = FILE_CASES[case]
    path = tmp_path / name
    save_file(tensors, str(path))
    raw = preset(pretrained_model_name_or_path=str(path), tokenizer_path=str(tiny_model / "tokenizer"), **extra)
    code, seen = _cli(raw, tmp_path, capsys)
    _assert_refused(code, seen, path, phrase, tmp_path / "out")


def test_an_a1111_embedding_pt_is_named_as_an_embedding(tiny_model, preset, tmp_path, capsys):
    path = tmp_path / "style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(1, 768)}, "name": "style"}, path)
    code, seen = _cli(preset(pretrained_model_name_or_path=str(path)), tmp_path, capsys)
    _assert_refused(code, seen, path, "textual-inversion embedding", tmp_path / "out")


def test_the_architecture_rule_applies_to_any_source():
    """The rule the folder check and the post-load check share (single files' configs come from the loader)."""
    from pti_plugin.models.model_checks import architecture_problem

    sd15 = {"in_channels": 4, "cross_attention_dim": 768}
    assert architecture_problem("sd15", sd15, [768]) is None
    assert "2.x" in architecture_problem("sd15", sd15 | {"cross_attention_dim": 1024}, [1024])
    assert "inpainting" in architecture_problem("sd15", sd15 | {"in_channels": 9}, [768])
    assert "different models" in architecture_problem("sd15", sd15, [32])
    sdxl = {"in_channels": 4, "cross_attention_dim": 2048, "addition_embed_type": "text_time"}
    assert architecture_problem("sdxl", sdxl, [768, 1280]) is None
    assert "SDXL model" in architecture_problem("sd15", sdxl, [768])
    assert "not an SDXL base model" in architecture_problem("sdxl", sd15, [768, 1280])
    assert "different models" in architecture_problem("sdxl", sdxl | {"cross_attention_dim": 1280}, [768, 1280])


def test_a_v_prediction_model_is_followed_and_a_preset_overriding_an_epsilon_model_is_warned_about(tiny_model, tmp_path,
                                                                                                   caplog):
    """kohya ignores a model's scheduler config (epsilon unless --v_parameterization); pti-plugin follows the model
    and says so in the log (info, naming the file), and warns when v_parameterization overrides an epsilon model."""
    model = _copy(tiny_model, tmp_path)
    config = model / "scheduler" / "scheduler_config.json"
    _edit(config, prediction_type="v_prediction")
    with caplog.at_level(logging.INFO, logger="pti_plugin.models.loading"):
        assert load_base_model(str(model)).prediction_type == "v_prediction"
    followed = [r for r in caplog.records if "training v-prediction, as the model was trained" in r.getMessage()]
    assert [r.levelno for r in followed] == [logging.INFO] and str(config) in followed[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pti_plugin.models.loading"):
        assert load_base_model(str(tiny_model), v_parameterization=True).prediction_type == "v_prediction"
    assert "says prediction_type = 'epsilon'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pti_plugin.models.loading"):
        load_base_model(str(model), v_parameterization=True)
        load_base_model(str(tiny_model))
    assert caplog.text == ""  # preset and model agree


@pytest.mark.parametrize("case", ["sd2", "unet_folder_missing", "broken_model_index"])
def test_a_model_folder_is_checked_with_the_preset_before_any_data_is_read(case, preset, tmp_path):
    """The folder's JSON files are read when the preset is checked: the error comes from build_config, before
    the dataset scan and the model load (before: only when the model loaded, after the data was scanned)."""
    from pti_plugin.config import ConfigError
    from pti_plugin.config_loading import build_config

    change, phrase, _ = FOLDER_CASES[case]
    model = _copy(preset()["pretrained_model_name_or_path"], tmp_path)
    change(model)
    with pytest.raises(ConfigError, match=f"key '{KEY}'") as error:
        build_config(preset(pretrained_model_name_or_path=str(model)))
    assert phrase in str(error.value) and str(model) in str(error.value)
