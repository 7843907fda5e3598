"""``scale_weight_norms``: the clamp acts after every optimizer step, and its three logged values (kohya's
``max_norm/keys_scaled``, ``norm/avg_key_norm``, ``max_norm/max_key_norm``) are read back from the device only for the
steps the log writes; on those steps they are what a run logging every step writes.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pti_plugin.config import Config
from pti_plugin.config_loading import build_config
from pti_plugin.lora_regularisation import MAX_NORM_LOGS, LoraRegularisation
from pti_plugin.models.lora import attach_lora, lora_layers
from pti_plugin.trainer import Trainer

A = "pti"  # the adapter's name


class _Model:
    """What LoraRegularisation reads of a trainable model: its components (here all carry a LoRA)."""

    def __init__(self, unet: nn.Module):
        self.unet = unet

    def lora_components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    components = lora_components  # every component here carries a LoRA


def _norm(layer) -> float:
    return layer.get_delta_weight(A).norm().item()  # peft's (alpha / rank) x up @ down


def test_the_clamp_reads_nothing_back_until_its_values_are_logged(monkeypatch):
    torch.manual_seed(0)
    unet = nn.Sequential(nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(8, 6))
    attach_lora(unet, ["0", "1", "2"], 4, 2.0)
    layers = lora_layers(unet)
    targets = (3.0, 0.3, 0.8)  # max norm 1.0: one above (scaled to 1), two under (left as they are)
    with torch.no_grad():
        for layer, target in zip(layers, targets):
            nn.init.normal_(layer.lora_B[A].weight)
            layer.lora_B[A].weight.mul_(target / _norm(layer))
    regularisation = LoraRegularisation(Config(scale_weight_norms=1.0), _Model(unet))

    def refused(*args, **kwargs):
        raise AssertionError("a value was read back from the device")

    with monkeypatch.context() as patch:
        for name in ("tolist", "item", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, refused)
        regularisation.after_step()
    assert [round(_norm(layer), 4) for layer in layers] == [1.0, 0.3, 0.8]  # the clamp acted
    logs = regularisation.logs()
    assert list(logs) == list(MAX_NORM_LOGS) and logs["max_norm/keys_scaled"] == 1
    assert isinstance(logs["max_norm/keys_scaled"], int)
    assert logs["norm/avg_key_norm"] == pytest.approx((1.0 + 0.3 + 0.8) / 3, rel=1e-5)
    assert logs["max_norm/max_key_norm"] == pytest.approx(1.0, rel=1e-5)
    for layer in layers:
        layer.lora_A[A].weight.requires_grad_(False)  # a stage that trains no LoRA: no clamp, nothing logged
    regularisation.after_step()
    assert regularisation.logs() == {}


def test_logged_steps_hold_the_values_a_run_logging_every_step_writes(preset, tmp_path):
    """log_every_n_steps = 3 over 4 steps, validating every 2: steps 2 (validation), 3 (cadence) and 4 (the stage's
    last) are written, with the values the every-step log holds for them."""
    entries = {}
    for every in (1, 3):
        raw = preset(output_dir=str(tmp_path / f"every{every}"), stages=[{"kind": "lora", "steps": 4,
                     "learning_rate": 5e-2}], scale_weight_norms=0.05, log_every_n_steps=every, validation_split=0.25,
                     validate_every_n_steps=2)
        Trainer(build_config(raw)).run()
        log = (tmp_path / f"every{every}" / "pti.log.jsonl").read_text().splitlines()
        entries[every] = {e["global_step"]: e for e in map(json.loads, log) if "loss" in e}
    assert sorted(entries[1]) == [1, 2, 3, 4] and sorted(entries[3]) == [2, 3, 4]
    assert any(entries[1][step]["max_norm/keys_scaled"] > 0 for step in (2, 3, 4))
    for step in (2, 3, 4):
        assert {k: entries[3][step][k] for k in MAX_NORM_LOGS} == {k: entries[1][step][k] for k in MAX_NORM_LOGS}
