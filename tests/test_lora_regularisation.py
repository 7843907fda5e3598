"""kohya's LoRA regularisation: ``network_dropout``, ``rank_dropout``/``module_dropout`` (network_args) and
``scale_weight_norms``, against kohya's ``networks/lora.py`` written out independently here.

kohya's ``LoRAModule.forward`` in training: with probability ``module_dropout`` (a CPU ``torch.rand(1)``) the base
layer's output alone; else ``lx = lora_down(x)``, ``lx = F.dropout(lx, network_dropout)`` (a Bernoulli(1 - p) mask
/ (1 - p)), ``lx *= rand(b, rank) > rank_dropout`` (broadcast over tokens or pixels) with the scale times
1 / (1 - rank_dropout); ``base + lora_up(lx) * scale``. ``apply_max_norm_regularization``: each module's
``(alpha / rank) * up @ down`` (a 3x3 down: convolved with up) clamped at the max norm by scaling up and down by
the root of the ratio. The masks are reconstructed from the seed the step context sets.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.formats.kohya_lora import KOHYA_SETTINGS
from pti_plugin.kohya_options import REFUSED_OPTIONS
from pti_plugin.lora_regularisation import MAX_NORM_LOGS, LoraDropout, apply_max_norm
from pti_plugin.models.lora import attach_lora, lora_layers, lora_parameters, set_lora_enabled
from pti_plugin.trainer import Trainer

A = "pti"  # the adapter's name


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.lin2 = nn.Linear(8, 6), nn.Linear(8, 6)
        self.conv, self.pw = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 4, 1)


def _model(targets=("lin",), rank=4, alpha=2.0) -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    attach_lora(model, list(targets), rank, alpha)
    for layer in lora_layers(model):
        nn.init.normal_(layer.lora_B[A].weight)  # a trained-looking up (peft starts it at zero)
    return model


def _parts(layer):
    return layer.base_layer, layer.lora_A[A], layer.lora_B[A], layer.scaling[A]


def test_network_dropout_is_dropout_on_the_down_output_in_training_steps_only():
    model = _model()
    x = torch.randn(3, 5, 8)
    plain = model.lin(x)  # before any hook
    drop = LoraDropout([model], 0.5)
    base, down, up, scale = _parts(model.lin)
    assert torch.equal(model.lin(x), plain)  # outside a training step (sampling, validation): the plain LoRA
    rng = torch.get_rng_state()
    with drop.step(1234):
        out = model.lin(x)
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is as it was
    torch.manual_seed(1234)
    keep = torch.empty(3, 5, 4).bernoulli_(0.5)  # F.dropout's mask, element by element
    with torch.no_grad():
        expected = base(x) + up(down(x) * keep / 0.5) * scale
    assert torch.allclose(out, expected, atol=1e-5) and not torch.allclose(out, plain, atol=1e-3)
    model.eval()  # eval mode (validation) inside a step: no dropout either
    with drop.step(1234):
        assert torch.equal(model.lin(x), plain)
    model.train()
    set_lora_enabled(model, False)  # the pivot-locality plugin's frozen pass: the LoRA off, the base layer's output
    with drop.step(1234):
        assert torch.equal(model.lin(x), base(x))


def test_rank_dropout_zeroes_whole_ranks_per_sample_and_rescales_linear_and_conv():
    model = _model(("lin", "conv"))
    drop = LoraDropout([model], None, rank_dropout=0.25)
    x, image = torch.randn(3, 5, 8), torch.randn(2, 3, 6, 6)
    with drop.step(7):
        out = model.lin(x)
    with drop.step(8):
        conv_out = model.conv(image)
    torch.manual_seed(7)
    mask = (torch.rand(3, 4) > 0.25).float()
    base, down, up, scale = _parts(model.lin)
    with torch.no_grad():
        assert torch.allclose(out, base(x) + up(down(x) * mask[:, None, :]) * scale / 0.75, atol=1e-5)
    torch.manual_seed(8)
    mask = (torch.rand(2, 4) > 0.25).float()
    base, down, up, scale = _parts(model.conv)
    with torch.no_grad():
        expected = base(image) + up(down(image) * mask[:, :, None, None]) * scale / 0.75
    assert torch.allclose(conv_out, expected, atol=1e-5)


def test_module_dropout_leaves_the_module_out_of_the_forward():
    model = _model()
    x = torch.randn(3, 5, 8)
    plain = model.lin(x)
    drop = LoraDropout([model], None, module_dropout=0.5)
    dropped = {}
    for seed in range(20):  # kohya's draw: torch.rand(1) < module_dropout on the CPU generator
        torch.manual_seed(seed)
        dropped.setdefault(bool(torch.rand(1) < 0.5), seed)
    with drop.step(dropped[True]):
        out = model.lin(x)
        out.sum().backward()
    assert torch.equal(out, model.lin.base_layer(x))
    assert all(p.grad is not None and not p.grad.any() for p in lora_parameters(model))  # zero (kohya: None)
    with drop.step(dropped[False]):
        assert torch.equal(model.lin(x), plain)


def test_gradient_checkpointing_recomputes_the_same_masks():
    model = _model()
    drop = LoraDropout([model], 0.5, rank_dropout=0.25, module_dropout=0.1)
    x = torch.randn(3, 5, 8)

    def grads(checkpointed: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with drop.step(99):
            y = torch.utils.checkpoint.checkpoint(model.lin, x, use_reentrant=False) if checkpointed else model.lin(x)
            (y**2).sum().backward()
        return [p.grad.clone() for p in lora_parameters(model)]

    plain, checkpointed = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))


def _norm(layer) -> float:
    return layer.get_delta_weight(A).norm().item()  # peft's own (alpha/rank) x up @ down, conv 3x3 included


def test_scale_weight_norms_clamps_each_update_at_the_max_norm_as_kohya():
    model = _model(("lin", "lin2", "conv", "pw"))
    layers = {name: getattr(model, name) for name in ("lin", "lin2", "conv", "pw")}
    targets = {"lin": 3.0, "conv": 2.5, "pw": 0.3, "lin2": 0.8}  # max 1.0: two above, one under half, one between
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_B[A].weight.mul_(targets[name] / _norm(layer))
    assert all(abs(_norm(layer) - targets[name]) < 1e-4 for name, layer in layers.items())
    before = {n: (l.lora_A[A].weight.clone(), l.lora_B[A].weight.clone()) for n, l in layers.items()}
    keys_scaled, mean, largest = apply_max_norm(lora_layers(model), 1.0)
    for name in ("lin", "conv"):
        layer, (down, up) = layers[name], before[name]
        assert abs(_norm(layer) - 1.0) < 1e-5
        root = (1.0 / targets[name]) ** 0.5  # both factors scaled by the root of the ratio
        assert torch.allclose(layer.lora_A[A].weight, down * root, rtol=1e-4)
        assert torch.allclose(layer.lora_B[A].weight, up * root, rtol=1e-4)
    for name in ("pw", "lin2"):
        assert torch.equal(layers[name].lora_A[A].weight, before[name][0])
        assert torch.equal(layers[name].lora_B[A].weight, before[name][1])
    assert int(keys_scaled) == 2
    assert abs(float(largest) - 1.0) < 1e-5 and abs(float(mean) - (1.0 + 1.0 + 0.3 + 0.8) / 4) < 1e-4


REGULARISED = {"network_dropout": 0.5, "network_args": ["rank_dropout=0.25", "module_dropout=0.1"],
               "scale_weight_norms": 0.05}


def test_a_run_logs_kohya_max_norm_keys_records_kohya_metadata_and_resumes_bit_identically(preset, tmp_path):
    stages = [{"kind": "lora", "steps": 2, "learning_rate": 5e-2}]
    full = preset(output_dir=str(tmp_path / "full"), stages=stages, save_every_n_steps=1, save_state=True,
                  save_precision="float", **REGULARISED)
    Trainer(build_config(full)).run()
    resumed = full | {"output_dir": str(tmp_path / "resumed"), "save_every_n_steps": 0,
                      "resume": str(tmp_path / "full" / "pti-state-step00000001")}
    Trainer(build_config(resumed)).run()
    plain = preset(output_dir=str(tmp_path / "plain"), stages=[stages[0] | {"steps": 1}], save_precision="float",
                   scale_weight_norms=0.05)
    Trainer(build_config(plain)).run()
    a, b = load_file(tmp_path / "full" / "pti.safetensors"), load_file(tmp_path / "resumed" / "pti.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the masks are drawn again exactly
    one = load_file(tmp_path / "full" / "pti-step00000001.safetensors")
    c = load_file(tmp_path / "plain" / "pti.safetensors")
    assert one.keys() == c.keys() and any(not torch.equal(one[k], c[k]) for k in c)  # the dropouts did act
    log = [json.loads(line) for line in (tmp_path / "full" / "pti.log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert len(steps) == 2 and all(set(MAX_NORM_LOGS) <= set(e) for e in steps)
    assert MAX_NORM_LOGS == ("max_norm/keys_scaled", "norm/avg_key_norm", "max_norm/max_key_norm")  # kohya's
    assert any(e["max_norm/keys_scaled"] > 0 for e in steps)
    assert all(isinstance(e["max_norm/keys_scaled"], int) and e["norm/avg_key_norm"] <= e["max_norm/max_key_norm"]
               <= 0.05 + 1e-6 for e in steps)
    modules = {k.rsplit(".", 2)[0] for k in a if k.endswith("lora_down.weight")}
    for name in modules:  # the clamp is in the saved weights: every saved update's norm is at most 0.05
        down, up, alpha = a[f"{name}.lora_down.weight"], a[f"{name}.lora_up.weight"], a[f"{name}.alpha"]
        assert (up.flatten(1) @ down.flatten(1) * (alpha / down.shape[0])).norm() <= 0.05 * (1 + 1e-5)
    with safe_open(str(tmp_path / "full" / "pti.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_network_dropout"], meta["ss_scale_weight_norms"]) == ("0.5", "0.05")  # kohya's str(args.x)
    assert meta["ss_network_args"] == '{"rank_dropout": "0.25", "module_dropout": "0.1"}'
    with safe_open(str(tmp_path / "plain" / "pti.safetensors"), framework="pt") as handle:
        assert handle.metadata()["ss_network_dropout"] == "None"  # kohya's unset default
    assert KOHYA_SETTINGS["ss_network_dropout"] == "network_dropout"
    assert KOHYA_SETTINGS["ss_scale_weight_norms"] == "scale_weight_norms"
    assert not {"network_dropout", "scale_weight_norms"} & set(REFUSED_OPTIONS)


@pytest.mark.parametrize("overrides, key", [
    ({"network_dropout": 1.0}, "network_dropout"),
    ({"network_dropout": -0.1}, "network_dropout"),
    ({"network_args": ["rank_dropout=1"]}, "network_args"),
    ({"network_args": ["module_dropout=-0.5"]}, "network_args"),
    ({"scale_weight_norms": 0.0}, "scale_weight_norms"),
    ({"scale_weight_norms": -1.0}, "scale_weight_norms"),
    ({"scale_weight_norms": float("inf")}, "scale_weight_norms"),
])
def test_out_of_range_values_are_refused_naming_the_key(preset, overrides, key):
    with pytest.raises(ConfigError, match=key) as caught:
        build_config(preset(**overrides))
    assert "not implemented" not in str(caught.value) and ("[0, 1)" in str(caught.value) or "> 0" in str(caught.value))


def test_a_run_without_a_lora_stage_refuses_them(preset):
    stages = [{"kind": "inversion", "steps": 2, "learning_rate": 5e-2}]
    for overrides, key in (({"network_dropout": 0.1}, "network_dropout"),
                           ({"scale_weight_norms": 1.0}, "scale_weight_norms"),
                           ({"network_args": ["module_dropout=0.1"]}, "module_dropout")):
        with pytest.raises(ConfigError, match=f"{key}.*no stage is a lora stage"):
            build_config(preset(stages=stages, **overrides))
    build_config(preset(stages=stages, network_dropout=None))  # unset: fine
