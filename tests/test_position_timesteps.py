"""The position-decision experiment: the prompt switch and the band read off its curve."""

from pathlib import Path

import numpy as np
import pytest

from pti_plugin.protocol.position_timesteps import (SwitchSettings, band_coverage, crossing_timestep, decision_band,
                                                    sample_switched, share_curve)


@pytest.fixture(scope="module")
def toy_pipe():
    from pti_plugin.embedded_default import default_model_dir
    from pti_plugin.protocol.premise import load_base

    return load_base(Path(default_model_dir()))


def test_switch_at_the_ends_gives_each_prompts_own_images_bit_for_bit(toy_pipe):
    from pti_plugin.protocol.premise import PremiseSettings, encode_text, sample

    base, pipe = toy_pipe
    settings = SwitchSettings(seeds=3, sample_steps=4)
    plain = PremiseSettings(sample_steps=4, guidance=settings.guidance)
    cond_a = encode_text(base, ["a red circle at the top left"] * 3)
    cond_b = encode_text(base, ["a red circle at the bottom right"] * 3)
    uncond = encode_text(base, [""])
    only_a, only_b = sample(pipe, cond_a, uncond, plain), sample(pipe, cond_b, uncond, plain)
    np.testing.assert_array_equal(sample_switched(pipe, cond_a, cond_b, uncond, 0, settings), only_b)
    np.testing.assert_array_equal(sample_switched(pipe, cond_a, cond_b, uncond, 4, settings), only_a)
    middle = sample_switched(pipe, cond_a, cond_b, uncond, 2, settings)
    assert not np.array_equal(middle, only_a) and not np.array_equal(middle, only_b)  # the swap took effect


def test_band_is_found_on_a_curve_with_known_crossings():
    # DDIM-like timesteps 900, 800, ..., 0 at 10 steps; the share of A's cell jumps 0 -> 1 between
    # switch boundaries 950, 850, 750, ...: 0.1 is crossed 1/5 of the way from 850 to 750 (830), 0.9 4/5
    # of the way from 650 to 550 (570).
    timesteps = list(range(900, -1, -100))[:10]
    rows = []
    for k, share in zip(range(0, 11), [0, 0, 0.5, 0.5, 1, 1, 1, 1, 1, 1, 1]):
        rows.append({"switch_step": k, "in_a": int(share * 10), "in_b": 10 - int(share * 10)})
    switch_t, share = share_curve(rows, timesteps)
    assert switch_t[0] == 950 and switch_t[1] == 850 and switch_t[-1] == 0
    t_high, t_low = decision_band(switch_t, share)
    assert t_high == pytest.approx(830) and t_low == pytest.approx(570)
    assert band_coverage(t_high, t_low) == pytest.approx(0.26)
    assert np.isnan(crossing_timestep(switch_t, np.zeros_like(share), 0.5))  # never crosses
