"""The calls the plugin contract documents, on the tiny model: encode's LoRA and pivot-gradient switches,
frozen(), and hooks.py importing no plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pti_plugin.models.loading import load_base_model
from pti_plugin.models.trainable import LoraSpec, TrainableModel

REPO = Path(__file__).resolve().parents[1]
PROMPT = "an anime illustration of tok1"


@pytest.fixture(scope="module")
def model(tiny_model):
    trained = TrainableModel.build(load_base_model(str(tiny_model)), "tok1", 1, ["character"],
                                   LoraSpec(4, 4.0, text_encoders=True), seed=0)
    gen = torch.Generator().manual_seed(3)
    for param in trained.lora_parameters():  # a LoRA that has moved (up weights start at zero)
        param.data = torch.randn(param.shape, generator=gen) * 0.1
    trained.set_trainable(trained.pivot_parameters() + trained.lora_parameters(), lora_enabled=True)
    return trained


@pytest.fixture(scope="module")
def base(tiny_model):
    """The same model without pivot or LoRA, loaded on its own (the independent reference)."""
    return load_base_model(str(tiny_model))


def test_encode_without_lora_is_the_base_encoder(model, base):
    ids = model.tokenize(["an anime illustration of character"])
    with torch.no_grad():
        off = model.encode(ids, lora=False).hidden_states
        on = model.encode(ids).hidden_states
        expected = base.text_encoder(ids).last_hidden_state
    assert torch.equal(off, expected)
    assert not torch.allclose(on, expected, atol=1e-4)
    with torch.no_grad():  # the switch is restored after the call
        assert torch.equal(model.encode(ids).hidden_states, on)


def test_pivot_grad_off_cuts_only_the_pivot(model):
    ids = model.tokenize([PROMPT])
    pivot = model.pivots[0].vectors
    lora = model.lora_parameters("text_encoders")
    for pivot_grad in (True, False):
        for p in [pivot, *lora]:
            p.grad = None
        model.encode(ids, pivot_grad=pivot_grad).hidden_states.square().sum().backward()
        assert (pivot.grad is not None and pivot.grad.abs().sum() > 0) == pivot_grad
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)  # the text-encoder LoRA still learns


def test_frozen_is_the_base_model_without_gradients(model, base):
    ids = model.tokenize(["an anime illustration of character"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([400])
    with torch.no_grad():
        lora_on = model.predict(x, t, model.encode(ids))
    with model.frozen():
        assert not torch.is_grad_enabled()
        frozen = model.predict(x, t, model.encode(ids))
    with torch.no_grad():
        expected = base.unet(x, t, encoder_hidden_states=base.text_encoder(ids).last_hidden_state).sample
        assert torch.equal(model.predict(x, t, model.encode(ids)), lora_on)  # switched back after the block
    assert torch.allclose(frozen, expected, atol=1e-6)
    assert not torch.allclose(lora_on, expected, atol=1e-4)


def test_hooks_import_no_plugin_module():
    code = ("import sys, pti_plugin.hooks, pti_plugin.trainer; "
            "print(sorted(m for m in sys.modules if m.startswith('pti_plugin.plugins.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
