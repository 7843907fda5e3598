"""Several processes: a refusal every process finds in a later stage's set-up (its plan: what it trains, its optimizer)
is printed once, by process 0 (before: process 1 heard the mark process 0 left as the previous stage's steps began,
"" for "passed", and printed its own too); one process 1 alone finds there is still printed at once. Both processes
are played in this one, in turn, as tests/test_training_refusal_s38.py does; the stage's set-up is the trainer's own
(``Trainer._run_stage``) up to its plan, which a stand-in schedule refuses."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from pti_plugin import cli, main_process_checks
from pti_plugin.config import ConfigError
from pti_plugin.main_process_checks import tell_refusal_printed
from pti_plugin.hooks import Progress
from pti_plugin.plugin_calls import PluginCalls
from pti_plugin.trainer import Trainer

from tests.test_training_refusal_s38 import _as_process, _launched

REFUSAL = "error: stage 'lora': optimizer_args: unknown argument 'betas2'"


class _RefusingSchedule:
    """A schedule whose plan of every stage is refused (each process finds the same): records the points passed."""

    def __init__(self):
        self.points_at_plan: list[int] = []

    def trains(self, state, stage):
        raise AssertionError("not asked before the plan")

    def plan_stage(self, state, stage):
        self.points_at_plan.append(main_process_checks._points_passed)
        raise ConfigError(REFUSAL.removeprefix("error: "))


def _stage_2_set_up_refused(schedule: _RefusingSchedule) -> None:
    """The trainer's set-up of the run's 2nd stage (index 1), refused at its plan."""
    trainer = SimpleNamespace(config=SimpleNamespace(stages=[SimpleNamespace(name="ti"), SimpleNamespace(name="lora")]),
                              state=SimpleNamespace(_progress=Progress()), accelerator=None, plugins=[schedule])
    trainer.calls = PluginCalls(trainer.plugins, trainer.state)  # the trainer's hook calls (plugin_calls.py)
    with pytest.raises(ConfigError):
        Trainer._run_stage(trainer, 1, 0, None)


def test_a_refusal_both_processes_find_in_the_second_stage_s_set_up_is_printed_once(monkeypatch, capsys):
    store = _launched(monkeypatch)  # the launcher's store, held until the test's end
    monkeypatch.setattr(cli, "QUIET_WAIT_S", 20)
    monkeypatch.setattr(cli, "SAID_GRACE_S", 0)  # its wait for the launcher to stop it, once process 0 has printed
    schedule = _RefusingSchedule()
    _as_process(monkeypatch, 0, 4)  # process 0: the 1st stage's steps began after 4 points of the set-up
    main_process_checks.training_steps_begin()
    _stage_2_set_up_refused(schedule)
    _as_process(monkeypatch, 1, 4)  # process 1: the same points, the same refusal
    _stage_2_set_up_refused(schedule)
    assert schedule.points_at_plan == [5, 5]  # a point between the steps and the plan, passed by both alike

    # process 1 is refused before process 0 has printed (it prints 0.3 s later): it waits for that word
    printed_by_0 = threading.Timer(0.3, tell_refusal_printed, [REFUSAL])
    printed_by_0.start()
    started = time.monotonic()
    assert cli._fail(REFUSAL, 2, alike=True) == 2
    printed_by_0.join()
    assert capsys.readouterr().err == ""  # before: "" heard at once, the refusal printed by both processes
    assert time.monotonic() - started < 5

    # another run: process 1 alone is refused at the 2nd stage's plan; process 0 goes on to the stage's next point
    # (DDP's wrapping, accelerator_options.prepare_for_stage), saying it passed, and waits there for process 1
    _as_process(monkeypatch, 0, 6)
    main_process_checks.training_steps_begin()
    main_process_checks.stage_set_up_begins()
    main_process_checks.passed_without_refusal()
    _as_process(monkeypatch, 1, 6)
    _stage_2_set_up_refused(schedule)
    started = time.monotonic()
    assert cli._fail(REFUSAL, 2, alike=True) == 2
    assert capsys.readouterr().err == REFUSAL + "\n"  # printed at once, not after QUIET_WAIT_S
    assert time.monotonic() - started < 5
    del store
