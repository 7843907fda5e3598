"""nan_policy's decision and wording, without a training run (the runs are in test_reliability.py)."""

import pytest

from pti_plugin.nan_policy import NanPolicy, NonFiniteLossError

WHERE = "at stage 1 ('lora'), step 4 (global step 14)"


def test_stop_raises_at_the_first_non_finite_step_naming_the_term_and_the_step():
    policy = NanPolicy("stop", max_skips=5)
    with pytest.raises(NonFiniteLossError) as error:
        policy.skip_or_stop({"mse": 0.1, "pivot_locality/loss": float("nan")}, WHERE, num_processes=1)
    assert str(error.value) == "loss term 'pivot_locality/loss' is non-finite at stage 1 ('lora'), step 4 (global step 14)"


def test_skip_allows_max_skips_in_a_row_and_a_finite_step_starts_the_count_again():
    policy = NanPolicy("skip", max_skips=2)
    bad = {"mse": float("inf")}
    assert policy.skip_or_stop(bad, WHERE, 1).startswith("skipping step: loss term 'mse' is non-finite")
    policy.skip_or_stop(bad, WHERE, 1)
    policy.step_was_finite()
    policy.skip_or_stop(bad, WHERE, 1)
    policy.skip_or_stop(bad, WHERE, 1)  # two in a row again: still allowed
    with pytest.raises(NonFiniteLossError, match=r"\(3 consecutive skipped steps\)$"):
        policy.skip_or_stop(bad, WHERE, 1)


@pytest.mark.parametrize("processes, culprit", [(1, "a gradient"), (2, "a gradient or a loss term on another process")])
def test_finite_terms_blame_a_gradient_or_another_process(processes, culprit):
    message = NanPolicy("skip", 5).skip_or_stop({"mse": 0.2}, WHERE, processes)
    assert message == f"skipping step: {culprit} is non-finite {WHERE}"
