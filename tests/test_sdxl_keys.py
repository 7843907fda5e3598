"""SDXL's LoRA key table against SDXL's real architecture (built on the meta device from the shipped
configs, no weights) and against diffusers' own kohya-SDXL converter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pti_plugin.models.sdxl_keys import SDXL_EMBEDDING_LAYOUT, sdxl_key_table

CONFIGS = Path(__file__).resolve().parent.parent / "pti_plugin" / "models" / "configs" / "sdxl"
TEXT_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _config(sub: str) -> dict:
    return json.loads((CONFIGS / sub / "config.json").read_text())


@pytest.fixture(scope="module")
def sdxl():
    """SDXL 1.0's UNet and both text encoders on the meta device, by component."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(_config("unet")),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**_config("text_encoder"))),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**_config("text_encoder_2"))),
        }


def _adapted_by_kohya(model: torch.nn.Module, classes: tuple[str, ...]) -> set[str]:
    """kohya ``networks.lora``'s rule applied to the model's structure: every Linear and Conv2d inside a
    module of one of ``classes``."""
    found = set()
    for name, module in model.named_modules():
        if type(module).__name__ in classes:
            found |= {f"{name}.{child}" for child, leaf in module.named_modules()
                      if isinstance(leaf, (torch.nn.Linear, torch.nn.Conv2d))}
    return found


def _table_paths(model: torch.nn.Module, component: str, conv: bool) -> set[str]:
    table = sdxl_key_table()
    names = {n for n, _ in model.named_modules()}
    return {table.installed_path(k, names) for k in table.keys if k.component == component and k.conv == conv}


def test_unet_rows_are_exactly_kohyas_modules(sdxl):
    unet = sdxl["unet"]
    attention = _table_paths(unet, "unet", conv=False)
    conv = _table_paths(unet, "unet", conv=True)
    assert attention == _adapted_by_kohya(unet, ("Transformer2DModel",))
    assert conv == _adapted_by_kohya(unet, ("ResnetBlock2D", "Downsample2D", "Upsample2D"))
    # The count from the config alone: per Transformer2DModel, proj_in + proj_out + 10 linears per block.
    cfg = _config("unet")
    depth, per_block = cfg["transformer_layers_per_block"], cfg["layers_per_block"]
    down = sum(per_block * (2 + 10 * d) for d, kind in zip(depth, cfg["down_block_types"]) if kind.startswith("CrossAttn"))
    up = sum((per_block + 1) * (2 + 10 * d) for d, kind in zip(depth[::-1], cfg["up_block_types"]) if kind.startswith("CrossAttn"))
    assert len(attention) == down + (2 + 10 * depth[-1]) + up == 722
    # LoCon: 17 ResNet blocks x (conv1, time_emb_proj, conv2), 11 of them with a shortcut, 2 down- and 2 upsamplers.
    assert len(conv) == 17 * 3 + 11 + 4


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2"])
def test_text_encoder_rows_are_exactly_kohyas_modules(sdxl, component):
    model = sdxl[component]
    expected = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TEXT_LEAVES)}
    assert _table_paths(model, component, conv=False) == expected
    assert len(expected) == 6 * _config(component)["num_hidden_layers"]


def test_kohya_names_follow_kohyas_sdxl_convention():
    """Hand-written names from kohya's SDXL LoRA files (sgm UNet names, te1/te2 prefixes)."""
    table = sdxl_key_table()
    expected = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2": "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
        "lora_unet_middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k": "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "lora_unet_output_blocks_5_1_proj_out": "up_blocks.1.attentions.2.proj_out",
        "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "lora_unet_output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "lora_unet_output_blocks_8_0_skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
        "lora_unet_middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "text_model.encoder.layers.0.self_attn.q_proj",
        "lora_te2_text_model_encoder_layers_31_mlp_fc1": "text_model.encoder.layers.31.mlp.fc1",
    }
    assert {name: table.by_name(name).path for name in expected} == expected
    assert table.by_name("lora_te_text_model_encoder_layers_0_mlp_fc1") is None  # SD1.5's single-encoder prefix
    assert SDXL_EMBEDDING_LAYOUT.standalone_keys == SDXL_EMBEDDING_LAYOUT.bundle_keys == ("clip_l", "clip_g")


def _kohya_state_dict(sdxl) -> dict[str, torch.Tensor]:
    """Rank-1 lora_down/lora_up/alpha for every row (shapes from the meta modules); row i's lora_down holds i."""
    table, tensors = sdxl_key_table(), {}
    for i, key in enumerate(table.keys):
        model = sdxl[key.component]
        module = model.get_submodule(table.installed_path(key, {n for n, _ in model.named_modules()}))
        if isinstance(module, torch.nn.Conv2d):
            down, up = (1, module.in_channels, *module.kernel_size), (module.out_channels, 1, 1, 1)
        else:
            down, up = (1, module.in_features), (module.out_features, 1)
        tensors[f"{key.kohya_name}.lora_down.weight"] = torch.full(down, float(i))
        tensors[f"{key.kohya_name}.lora_up.weight"] = torch.zeros(up)
        tensors[f"{key.kohya_name}.alpha"] = torch.tensor(1.0)
    return tensors


def test_diffusers_converts_every_kohya_name_to_the_rows_module(sdxl):
    """diffusers' SDXL loader (sgm block remapping + kohya conversion) takes every name of the table,
    leaves nothing unconverted, and lands each on the very module the table's row names."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    tensors = _kohya_state_dict(sdxl)
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(tensors), unet_config=sdxl["unet"].config)
    assert len(alphas) == len(sdxl_key_table().keys)
    by_component = {}
    for key, value in converted.items():
        component, _, rest = key.partition(".")
        by_component.setdefault(component, {})[rest] = value
    peft = {"unet": convert_unet_state_dict_to_peft(by_component.pop("unet"))}
    for component in ("text_encoder", "text_encoder_2"):
        peft[component] = convert_state_dict_to_peft(convert_state_dict_to_diffusers(by_component.pop(component)))
    assert not by_component
    table = sdxl_key_table()
    for component, state in peft.items():
        names = {n for n, _ in sdxl[component].named_modules()}
        # where each row's lora_down landed (its value is the row's index), by module path
        landed = {k.removesuffix(".lora_A.weight"): int(v.flatten()[0]) for k, v in state.items() if k.endswith(".lora_A.weight")}
        landed = {(p if p in names else p.removeprefix("text_model.")): i for p, i in landed.items()}
        expected = {table.installed_path(k, names): i for i, k in enumerate(table.keys) if k.component == component}
        assert landed == expected, component
