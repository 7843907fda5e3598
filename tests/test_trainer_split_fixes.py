"""Two trainer fixes: the start-up precision line names the float8 weights of kohya's ``fp8_base`` /
``fp8_base_unet``; a run whose lora stages never train the UNet attaches no UNet LoRA, so its file holds no
``lora_unet_*`` module (kohya's ``network_train_text_encoder_only``), and it loads, resumes and refuses a
``network_weights`` file with UNet modules as such."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.trainer import Trainer

from .conftest import make_preset

INVERSION = {"kind": "inversion", "steps": 1, "learning_rate": 5e-2}


def _precision_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("precision: "))


@pytest.mark.parametrize("keys, float8", [
    ({"fp8_base_unet": True}, "UNet linear/conv float8_e4m3fn (fp8_base_unet)"),
    ({"fp8_base": True}, "UNet and text encoder linear/conv float8_e4m3fn (fp8_base)"),
    ({"fp8_base": True, "fp8_base_unet": True}, "UNet linear/conv float8_e4m3fn (fp8_base_unet)"),  # kohya: _unet wins
])
def test_the_precision_line_names_the_float8_weights(preset, capsys, keys, float8):
    """It said "frozen weights bfloat16" while the UNet's (and with fp8_base alone the text encoders') linear and
    convolution weights were float8_e4m3fn."""
    Trainer(build_config(preset(mixed_precision="bf16", stages=[INVERSION]) | keys)).run()
    assert _precision_line(capsys.readouterr().out).startswith(
        f"precision: bf16 (frozen weights bfloat16, {float8}, trainable float32); gradient checkpointing off")


def _kohya_modules(tensors: dict, prefix: str) -> set[str]:
    return {k.split(".", 1)[0] for k in tensors if k.startswith(prefix)}


@pytest.mark.parametrize("text_only", [
    {"network_train_text_encoder_only": True, "stages": [INVERSION, {"kind": "lora", "steps": 2, "learning_rate": 1e-2}]},
    {"stages": [INVERSION, {"kind": "lora", "steps": 2, "learning_rate": 1e-2, "train_unet": False,
                            "train_text_encoder": True}]},
], ids=["network_train_text_encoder_only", "train_unet_false"])
def test_a_run_that_trains_only_the_text_encoder_lora_saves_no_unet_module(preset, tiny_model, tmp_path, text_only,
                                                                           request):
    """Its file held every lora_unet_* module with all-zero up weights (a UNet LoRA attached, never trained); kohya's
    holds none. Now: only the text encoder's modules (each of the family's), its state no UNet tensor, and the file
    loads through load_pti (into the text encoder alone) and as network_weights."""
    from diffusers import StableDiffusionPipeline

    from pti_plugin.formats.kohya_lora import unexpected_keys
    from pti_plugin.load_pti import load_pti
    from pti_plugin.models.family import make_family

    raw = preset(output_dir=str(tmp_path / "te"), save_state=True, save_precision="float", **text_only)
    if raw == preset(output_dir=str(tmp_path / "te"), **TEXT_ONLY_FIRST):  # the module's run: trained once for both
        out = request.getfixturevalue("text_only_runs")[1].parent
    else:
        Trainer(build_config(raw)).run()
        out = tmp_path / "te"
    tensors = load_file(out / "pti.safetensors")
    table = make_family("sd15").key_table
    assert not [k for k in tensors if k.startswith("lora_unet_")]
    layers = json.loads((Path(tiny_model) / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    assert _kohya_modules(tensors, "lora_te_") == {  # kohya's text-encoder targets: attention projections, MLP
        f"lora_te_text_model_encoder_layers_{i}_{m}" for i in range(layers)
        for m in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}
    assert all(tensors[k].abs().max() > 0 for k in tensors if k.endswith(".lora_up.weight"))
    assert not unexpected_keys(tensors, table=table)
    state = load_file(out / "pti-state-step00000003" / "trainable.safetensors")
    assert state and not [k for k in state if k.startswith("unet.")] and any(k.startswith("text_encoder.") for k in state)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, local_files_only=True)
    assert load_pti(pipe, out / "pti.safetensors") == "tok1"
    assert list(pipe.get_list_adapters()) == ["text_encoder"]

    again = preset(output_dir=str(tmp_path / "again"), network_weights=str(out / "pti.safetensors"),
                   save_precision="float", **text_only)
    again["stages"] = [dict(again["stages"][1], learning_rate=1e-30)]  # the file's LoRA passes through, rounded away
    Trainer(build_config(again)).run()
    passed = load_file(tmp_path / "again" / "pti.safetensors")
    lora = [k for k in tensors if k.startswith("lora_")]
    assert sorted(k for k in passed if k.startswith("lora_")) == sorted(lora)
    assert all(torch.equal(passed[k], tensors[k]) for k in lora)


LORA = {"kind": "lora", "steps": 2, "learning_rate": 1e-2}
TEXT_ONLY_FIRST = {"save_state": True, "save_precision": "float", "network_train_text_encoder_only": True,
                   "stages": [INVERSION, LORA]}
LONGER = [INVERSION, LORA | {"steps": 3}]


@pytest.fixture(scope="module")
def text_only_runs(tiny_model, tiny_dataset, tmp_path_factory):
    """A text-encoder-only run (1 inversion + 2 lora steps, its state saved at the end) and that state resumed with a
    3-step lora stage; returns (the first run's preset, its state, the resumed run's folder)."""
    root = tmp_path_factory.mktemp("text_only")
    first = make_preset(tiny_model, tiny_dataset, root / "first", **TEXT_ONLY_FIRST)
    Trainer(build_config(first)).run()
    state = root / "first" / "pti-state-step00000003"
    Trainer(build_config(first | {"output_dir": str(root / "resumed"), "resume": str(state), "stages": LONGER})).run()
    return first, state, root / "resumed"


@pytest.fixture(scope="module")
def inversion_only(tiny_model, tiny_dataset, tmp_path_factory) -> Path:
    """The output folder of a one-step inversion-only run with its state (it keeps its UNet LoRA, untrained)."""
    out = tmp_path_factory.mktemp("inversion_only") / "inversion"
    Trainer(build_config(make_preset(tiny_model, tiny_dataset, out, save_state=True, stages=[INVERSION]))).run()
    return out


def test_a_text_encoder_only_run_resumes_like_a_straight_run(text_only_runs, tiny_model, tmp_path):
    """The state of a run without a UNet LoRA resumes (its tensors are this run's) and ends bit for bit as the run
    that went straight through."""
    first, state, resumed = text_only_runs
    layers = json.loads((Path(tiny_model) / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    assert json.loads((state / "progress.json").read_text())["param_groups"] == [  # 6 modules a layer, down and up
        {"name": "text_encoder_lora", "tensors": layers * 6 * 2}]
    Trainer(build_config(first | {"output_dir": str(tmp_path / "straight"), "save_state": False, "stages": LONGER})).run()
    a, b = (load_file(folder / "pti.safetensors") for folder in (resumed, tmp_path / "straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [k for k in a if k.startswith("lora_unet_")]


def test_network_weights_with_unet_modules_are_refused_where_no_stage_trains_the_unet(inversion_only, preset, tmp_path):
    """An inversion-only run keeps its UNet LoRA (a network_weights LoRA passes through it; untrained here, so its
    ups are zero) and its file holds the UNet modules as before. A run whose lora stages train only the text encoder
    has no UNet LoRA to start from that file: refused naming network_weights (it loaded them before, and saved them)."""
    inverted = inversion_only / "pti.safetensors"
    tensors = load_file(inverted)
    assert _kohya_modules(tensors, "lora_unet_") and not _kohya_modules(tensors, "lora_te")
    assert all(not tensors[k].any() for k in tensors if k.endswith(".lora_up.weight"))

    raw = preset(output_dir=str(tmp_path / "te"), network_weights=str(inverted), network_train_text_encoder_only=True,
                 stages=[{"kind": "lora", "steps": 1, "learning_rate": 1e-2}])
    with pytest.raises(ConfigError, match=r"key 'network_weights': .*pti\.safetensors holds UNet LoRA weights, but no "
                                          r"lora stage trains the UNet LoRA .*set train_unet = true"):
        Trainer(build_config(raw)).run()
    assert not Path(tmp_path / "te" / "pti.safetensors").exists()


def test_a_state_saved_with_an_untrained_unet_lora_still_resumes_a_text_encoder_only_run(text_only_runs, inversion_only,
                                                                                         tmp_path):
    """Before such runs stopped attaching a UNet LoRA, their states held one that never trained (its lora_B zero):
    a resume leaves it out and ends as a resume from the state without it; a trained one is still refused."""
    first, state, resumed = text_only_runs
    unet = {k: v for k, v in load_file(inversion_only / "pti-state-step00000001" / "trainable.safetensors").items()
            if k.startswith("unet.")}  # the inversion-only run's untrained UNet LoRA
    assert unet and any(".lora_B." in k for k in unet) and not any(v.any() for k, v in unet.items() if ".lora_B." in k)
    old = tmp_path / "old-state-step00000003"
    shutil.copytree(state, old)
    save_file(load_file(state / "trainable.safetensors") | unet, str(old / "trainable.safetensors"))
    Trainer(build_config(first | {"output_dir": str(tmp_path / "old"), "resume": str(old), "stages": LONGER})).run()
    a, b = (load_file(folder / "pti.safetensors") for folder in (resumed, tmp_path / "old"))  # resumed: from `state`
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained = next(k for k in unet if ".lora_B." in k)
    save_file(load_file(state / "trainable.safetensors") | unet | {trained: unet[trained] + 1}, str(old / "trainable.safetensors"))
    with pytest.raises(ConfigError, match=r"key 'resume': state .* does not match this run's trainable tensors"):
        Trainer(build_config(first | {"output_dir": str(tmp_path / "refused"), "resume": str(old), "stages": LONGER})).run()
