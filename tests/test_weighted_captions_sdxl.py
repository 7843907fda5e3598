"""kohya's weighted_captions on SDXL (kohya's strategy_sdxl): each tokenizer gives its ids and weights, each encoder's
share of the per-token states is multiplied by its own weights, the pooled output and the time ids are not weighted; a
short SDXL run with the option trains. The expectations are computed here from the plain (unweighted) encoding."""

from __future__ import annotations

import pytest
import torch

from pti_plugin.config_loading import build_config
from pti_plugin.models.loading import load_base_model
from pti_plugin.models.tiny_sdxl import TINY_SDXL_TEXT_DIMS
from pti_plugin.models.trainable import LoraSpec, TrainableModel
from pti_plugin.trainer import Trainer

from .conftest import draw_character

CAPTION = "a red (square:1.5) of tok1"
PLAIN = "a red square of tok1"


@pytest.fixture(scope="module")
def model(tiny_sdxl):
    built = TrainableModel.build(load_base_model(str(tiny_sdxl)), "tok1", 1, ["character"], LoraSpec(4, 4.0), 0)
    built.weighted_captions = True
    return built


def _square_rows(tokenizer) -> range:
    """Where ``square``'s tokens sit in the ids of ``PLAIN``: after BOS and the tokens of ``a red``."""
    start = 1 + len(tokenizer("a red").input_ids[1:-1])
    return range(start, start + len(tokenizer("square").input_ids[1:-1]))


def test_each_encoders_rows_of_the_weighted_word_are_scaled_and_the_pooled_output_is_not(model):
    plain_ids = model.tokenize([PLAIN])  # [1, 2, 77]: the second tokenizer pads with "!"
    assert torch.equal(model.tokenize_captions([CAPTION]), plain_ids)  # the brackets never reach the encoders
    with torch.no_grad():
        plain = model.encode(plain_ids)
        got = model.weigh(model.encode(model.tokenize_captions([CAPTION])), [CAPTION])
    d1, d2 = TINY_SDXL_TEXT_DIMS
    assert got.hidden_states.shape == (1, 77, d1 + d2)
    expected = plain.hidden_states.clone()
    rows1, rows2 = (_square_rows(t) for t in model.base.tokenizers)
    assert len(rows1) > 1 and rows1 == rows2  # "square" is several tokens, at the same places for both tokenizers
    expected[0, rows1.start : rows1.stop, :d1] *= 1.5  # the first encoder's share
    expected[0, rows2.start : rows2.stop, d1:] *= 1.5  # the second encoder's share
    torch.testing.assert_close(got.hidden_states, expected, rtol=1e-6, atol=1e-6)
    others = [r for r in range(77) if r not in rows1]
    assert torch.equal(got.hidden_states[0, others], plain.hidden_states[0, others])  # every other row unchanged
    assert torch.equal(got.added_cond_kwargs["text_embeds"], plain.added_cond_kwargs["text_embeds"])  # pooled: unweighted
    assert torch.equal(got.added_cond_kwargs["time_ids"], plain.added_cond_kwargs["time_ids"])


def test_each_encoder_takes_its_own_weights(model):
    """kohya weighs hidden_states1 by weights1 and hidden_states2 by weights2: different weights per encoder act on
    their own share of the width only."""
    with torch.no_grad():
        plain = model.encode(model.tokenize([PLAIN]))
    weights = torch.ones(1, 2, 77)
    weights[0, 0, 2] = 2.0  # first encoder, row 2
    weights[0, 1, 3] = 3.0  # second encoder, row 3
    got = model.family.weigh(model.text_encoders, plain, weights).hidden_states
    d1 = TINY_SDXL_TEXT_DIMS[0]
    expected = plain.hidden_states.clone()
    expected[0, 2, :d1] *= 2.0
    expected[0, 3, d1:] *= 3.0
    assert torch.equal(got, expected)


def test_a_short_sdxl_run_with_weighted_captions_trains(preset, tiny_sdxl, tmp_path):
    data = tmp_path / "data" / "1_tok1"
    data.mkdir(parents=True)
    for i, caption in enumerate(["an (anime:1.3) illustration of tok1", "a [red] ((character)) of tok1"]):
        draw_character(data / f"{i}.png", 3 * i)
        (data / f"{i}.txt").write_text(caption)
    config = build_config(preset(pretrained_model_name_or_path=str(tiny_sdxl), train_data_dir=str(tmp_path / "data"),
                                 weighted_captions=True, max_train_steps=2))
    outputs = Trainer(config).run()
    assert {"embedding", "lora"} <= set(outputs)
