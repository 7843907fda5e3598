"""kohya's caption token warm-up (``token_warmup_min``, ``token_warmup_step``): the movable tags kept grow from
token_warmup_min at a stage's step 0 to all of them at step token_warmup_step, and the pivot token is never cut."""

from __future__ import annotations

from pathlib import Path

import pytest

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.data.batch_source import DrawSettings, MicroBatchDraws, MicroBatchStream
from pti_plugin.data.captions import CaptionOptions, possible_captions
from pti_plugin.data.dataset import ImageItem
from pti_plugin.data.sample_order import SampleOrder
from pti_plugin.data.samples import draw_sample
from pti_plugin.kohya_options import REFUSED_OPTIONS

CAPTION = "tok1, red, square, left, smiling"
# kohya: floor(step * (4 - 1) / 4) + 1 movable tags (after the keep_tokens tag) before step 4, all from step 4 on.
EXPECTED = {
    0: "tok1, red",
    1: "tok1, red",
    2: "tok1, red, square",
    3: "tok1, red, square, left",
    4: "tok1, red, square, left, smiling",
    7: "tok1, red, square, left, smiling",
}


def _item(caption: str = CAPTION, **options) -> ImageItem:
    return ImageItem(Path("x.png"), caption, (32, 32), 1, False, False, False, (caption,), CaptionOptions(**options))


def _captions(item: ImageItem, stage_steps: int, stage: int = 0, steps=EXPECTED) -> dict[int, str]:
    order = SampleOrder([item.bucket], 1, 0, stage, stage_steps)
    return {k: draw_sample([item], [0], order, 0, stage, k, 0, "tok1", 1).caption for k in steps}


def test_captions_grow_from_token_warmup_min_to_every_tag():
    item = _item(keep_tokens=1, token_warmup_min=1, token_warmup_step=4)
    assert _captions(item, stage_steps=8) == EXPECTED
    assert _captions(item, stage_steps=8, stage=1) == EXPECTED  # each stage warms up from its own step 0


def test_a_fraction_is_of_the_stage_steps():
    item = _item(keep_tokens=1, token_warmup_min=1, token_warmup_step=0.5)
    assert _captions(item, stage_steps=8) == EXPECTED  # 0.5 of 8 steps: 4
    assert _captions(item, stage_steps=4, steps=[0, 1, 2, 3]) == {
        0: "tok1, red", 1: "tok1, red, square", 2: "tok1, red, square, left, smiling",
        3: "tok1, red, square, left, smiling"}  # 0.5 of 4 steps: 2; floor(1 * 3 / 2) + 1 = 2 tags at step 1


def test_the_token_tag_is_kept_when_the_warm_up_cuts_past_it():
    item = _item("red, square, tok1, left, smiling", token_warmup_min=1, token_warmup_step=4)
    assert _captions(item, stage_steps=8, steps=[0, 2, 4]) == {
        0: "red, tok1", 2: "red, square, tok1", 4: "red, square, tok1, left, smiling"}
    shuffled = _item("red, square, tok1, left, smiling", shuffle_caption=True, token_warmup_min=1, token_warmup_step=4)
    assert _captions(shuffled, stage_steps=8, steps=[0]) == {0: "red, tok1"}


def test_text_cache_captions_include_the_warm_up_captions():
    item = _item(keep_tokens=1, token_warmup_min=1, token_warmup_step=4)
    assert set(possible_captions(item, "tok1", 1)) == {
        "tok1, red", "tok1, red, square", "tok1, red, square, left", "tok1, red, square, left, smiling"}
    assert set(_captions(item, stage_steps=8, steps=range(8)).values()) <= set(possible_captions(item, "tok1", 1))
    dropped = _item(keep_tokens=1, token_warmup_min=2, token_warmup_step=4, caption_dropout_rate=0.5)
    assert set(possible_captions(dropped, "tok1", 1)) == {
        "tok1, red, square", "tok1, red, square, left", "tok1, red, square, left, smiling", "tok1"}


def test_a_resumed_stage_draws_the_same_warm_up_captions():
    item = _item(keep_tokens=1, token_warmup_min=1, token_warmup_step=4)
    orders = [SampleOrder([item.bucket], 1, 0, s, 8) for s in range(2)]
    draws = MicroBatchDraws([item], [0], orders, DrawSettings(0, "tok1", 1, 1, 1, 0, True))
    stream = MicroBatchStream(draws, workers=0, persistent=False, accumulation=1)
    stream.start_stage(1, 2, 8)  # resumed at step 2 of stage 1
    assert {k: stream.get(1, k, 0).captions[0] for k in (2, 3, 4)} == {k: EXPECTED[k] for k in (2, 3, 4)}
    stream.close()


def test_keys_are_accepted_and_checked():
    assert "token_warmup_min" not in REFUSED_OPTIONS and "token_warmup_step" not in REFUSED_OPTIONS
    base = {"train_data_dir": "/d", "resolution": 32}
    config = build_config(base | {"token_warmup_min": 2, "token_warmup_step": 0.25}, check_paths=False)
    assert (config.token_warmup_min, config.token_warmup_step) == (2, 0.25)
    for raw, expected in [({"token_warmup_min": -1}, "key 'token_warmup_min' expects an integer >= 0"),
                          ({"token_warmup_step": -2}, "key 'token_warmup_step' expects a number >= 0"),
                          ({"token_warmup_step": True}, "key 'token_warmup_step' expects int | float")]:
        with pytest.raises(ConfigError) as error:
            build_config(base | raw, check_paths=False)
        assert expected in str(error.value)
