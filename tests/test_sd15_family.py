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
    tokenizer, te = long_model.tokenizer, long_model.text_encoder
    caption = " ".join(["red", "green", "blue"] * 40)  # 120 tokens: two windows
    ids = long_model.family.tokenize(tokenizer, [caption])
    assert ids.shape == (1, 152)
    states = long_model.family.encode(te, ids)
    assert states.shape == (1, 152, 32)
    bos, eos = ids[:, :1], ids[:, -1:]
    first = te(torch.cat([bos, ids[:, 1:76], eos], 1)).last_hidden_state
    second = te(torch.cat([bos, ids[:, 76:151], eos], 1)).last_hidden_state
    assert torch.equal(states[:, :76], first[:, :76]) and torch.equal(states[:, 76:], second[:, 1:])
    # Up to the 75th token, a 150-token run sees what a 75-token run sees.
    short_states = short_model.family.encode(short_model.text_encoder, short_model.family.tokenize(short_model.tokenizer, [caption]))
    assert torch.equal(states[:, :76], short_states[:, :76])


@torch.no_grad()
def test_clip_skip_applies_the_final_layernorm_to_an_earlier_layer(tiny_model):
    model = load_base_model(str(tiny_model), clip_skip=2)
    ids = model.family.tokenize(model.tokenizer, ["an anime illustration of character"])
    hidden = model.text_encoder(ids, output_hidden_states=True).hidden_states
    expected = final_layer_norm(model.text_encoder)(hidden[-2])
    assert torch.equal(model.family.encode(model.text_encoder, ids), expected)
    assert not torch.allclose(expected, model.text_encoder(ids).last_hidden_state)
