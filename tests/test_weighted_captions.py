"""kohya's weighted_captions (SD1.5; SDXL in test_weighted_captions_sdxl.py): the A1111 weight syntax, the weighted
conditioning (rows scaled by their weights, as kohya's train_network.py weighs them), the pivot's gradient through it,
the text-encoder output cache, and the checks before training. The expectations are written out or computed here from the unweighted encoder output."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from pti_plugin.config import ConfigError
from pti_plugin.data.captions import CaptionOptions
from pti_plugin.hooks import Batch
from pti_plugin.models.loading import load_base_model
from pti_plugin.models.trainable import LoraSpec, TrainableModel
from pti_plugin.text_cache import TextConditioningCache

CAPTION = "a (red:1.5) [square] tok1"


@pytest.fixture(scope="module")
def model(tiny_model):
    built = TrainableModel.build(load_base_model(str(tiny_model)), "tok1", 1, ["character"], LoraSpec(4, 4.0), 0)
    built.weighted_captions = True
    return built


@dataclasses.dataclass(frozen=True)
class Item:  # the fields the caption code reads from an ImageItem
    caption: str
    path: str = "imgs/001.png"
    caption_options: CaptionOptions = CaptionOptions()
    caption_lines: tuple[str, ...] = ()
    is_reg: bool = False


def test_parser_gives_kohyas_pieces():
    from pti_plugin.data.weighted_captions import parse_prompt_attention

    assert parse_prompt_attention(CAPTION) == [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("square", 1 / 1.1), (" tok1", 1.0)]
    assert parse_prompt_attention("normal text") == [("normal text", 1.0)]
    assert parse_prompt_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_prompt_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_prompt_attention("\\(literal\\]") == [("(literal]", 1.0)]
    assert parse_prompt_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert parse_prompt_attention("stray) end") == [("stray) end", 1.0)]
    assert parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]
    assert parse_prompt_attention("") == [("", 1.0)]


def _expected_weights(tokenizer, length: int) -> torch.Tensor:
    pieces = [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("square", 1 / 1.1), (" tok1", 1.0)]
    weights = [1.0]  # BOS
    for text, w in pieces:
        weights += [w] * len(tokenizer(text).input_ids[1:-1])
    return torch.tensor(weights + [1.0] * (length - len(weights)))


def test_weighted_conditioning_is_the_weighted_rows_with_the_pivot_gradient(model):
    plain_ids = model.tokenize(["a red square tok1"])
    assert torch.equal(model.tokenize_captions([CAPTION]), plain_ids)  # the brackets never reach the encoder
    pivot = model.pivots[0].vectors
    pivot.requires_grad_(True)
    probe = torch.randn(plain_ids.shape[1], model.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(3))

    hidden = model.encode(plain_ids).hidden_states  # the unweighted conditioning [1, 77, d]
    w = _expected_weights(model.base.tokenizer, plain_ids.shape[1])
    expected = hidden * w[None, :, None]  # kohya's strategy_sd: the rows times their weights, no rescaling
    (expected_grad,) = torch.autograd.grad((expected * probe).sum(), pivot)

    got = model.weigh(model.encode(model.tokenize_captions([CAPTION])), [CAPTION]).hidden_states
    (got_grad,) = torch.autograd.grad((got * probe).sum(), pivot)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(got, hidden.detach(), atol=1e-4)  # the weights do change it
    pivot.requires_grad_(False)


def test_weight_one_on_the_pivot_equals_the_plain_caption(model):
    weighted = "(tok1:1.0), a red square"
    got = model.weigh(model.encode(model.tokenize_captions([weighted])), [weighted]).hidden_states
    model.weighted_captions = False
    try:
        plain = model.encode(model.tokenize_captions(["tok1, a red square"])).hidden_states
    finally:
        model.weighted_captions = True
    assert torch.equal(got, plain)


def test_cached_conditioning_equals_the_uncached_one(model, tmp_path):
    captions = [CAPTION, "tok1, ((blue)) circle", CAPTION]
    batch = Batch(torch.zeros(3, 4, 8, 8), model.tokenize_captions(captions), captions, ["a", "b", "c"], [0, 1, 2])
    uncached = TextConditioningCache(model, False, torch.device("cpu"), tmp_path)
    uncached.start_stage(False, [], "tok1", 1)
    cached = TextConditioningCache(model, True, torch.device("cpu"), tmp_path)
    cached.start_stage(False, [Item(CAPTION)], "tok1", 1)  # CAPTION encoded up front, the other one lazily
    try:
        assert CAPTION in cached.rows
        expected = uncached.conditioning(batch).hidden_states
        assert torch.equal(cached.conditioning(batch).hidden_states, expected)
        plain = model.encode(batch.input_ids).hidden_states
        assert not torch.allclose(expected, plain, atol=1e-4)  # weighted, not the plain rows
    finally:
        cached.end_stage()


def test_checks_before_training(caplog):
    from pti_plugin.data.weighted_captions import check_weighted_captions
    from pti_plugin.kohya_options import REFUSED_OPTIONS

    assert "weighted_captions" not in REFUSED_OPTIONS
    assert check_weighted_captions(False, [Item("(x:1.2.3)")]) is False  # off: nothing checked
    with pytest.raises(ConfigError, match="key 'weighted_captions'.*imgs/002.png"):
        check_weighted_captions(True, [Item(CAPTION), Item("tok1, (red:1.2.3)", "imgs/002.png")])
    with caplog.at_level(logging.WARNING):
        assert check_weighted_captions(True, [Item("tok1, (red", "imgs/003.png"), Item(CAPTION)]) is True
    assert [r for r in caplog.records if "imgs/003.png" in r.getMessage() and "never closed" in r.getMessage()]
    assert not [r for r in caplog.records if "imgs/001.png" in r.getMessage()]
