"""kohya's save_last_n_steps / save_last_n_epochs (and their _state forms), save_state_on_train_end and
sample_every_n_epochs.

The expected files are written out by hand from kohya sd-scripts' rules (``library/train_util.py``):
``get_remove_step_no``: at a step save of global step g, the step save at ``g - N - 1`` rounded down to a multiple of
``save_every_n_steps`` is deleted (the saves of the last N steps stay); ``get_remove_epoch_no``: at the save of epoch
E, the one of epoch ``E - save_every_n_epochs x N`` is deleted; ``save_and_remove_state_*``: the same for states with
``save_last_n_*_state`` (else ``save_last_n_*``); ``save_state_on_train_end``: a state at the end only;
``sample_images_common``: ``sample_every_n_epochs`` replaces ``sample_every_n_steps``, samples at epoch ends with
``epoch % N == 0``. Here the final save stands for kohya's step save at the last step, the step count is global and
the epoch count is each stage's own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from pti_plugin.config import ConfigError
from pti_plugin.config_loading import build_config
from pti_plugin.outputs import RunFiles
from pti_plugin.save_schedule import SaveSchedule, prune_saves
from pti_plugin.trainer import Trainer

from .conftest import draw_character

#: The files of a finished run of output_name "pti", token "tok1", beside its step saves and states.
RUN_FILES = {"pti.safetensors", "tok1.safetensors", "pti.config.toml", "pti.log.jsonl"}
#: Another run's files, and names that only look like this run's: pruning never touches them.
STRANGERS = ("other-step00000001.safetensors", "other-state-step00000002/", "tok2-step00000003.safetensors",
             "xpti-step00000001.safetensors", "pti-step1.safetensors", "pti-step00000002.safetensors.bak",
             "notes-state-step00000001/")


def _names(out: Path) -> set[str]:
    return {p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.name not in ("samples", "logs")}


def _saves(*steps: int) -> set[str]:
    return {f"{name}-step{n:08d}.safetensors" for n in steps for name in ("pti", "tok1")}


def _states(*steps: int) -> set[str]:
    return {f"pti-state-step{n:08d}/" for n in steps}


def _plant_strangers(out: Path) -> None:
    out.mkdir(parents=True)
    for name in STRANGERS:
        if name.endswith("/"):
            (out / name).mkdir()
            (out / name / "progress.json").write_text("{}")
        else:
            (out / name).write_bytes(b"not ours")


def test_save_last_n_steps_keeps_the_saves_of_the_last_n_steps_and_nothing_else_is_touched(preset, tmp_path):
    # 3 inversion + 3 lora steps, a save and a state every step: steps 1..5 and the final save at 6. kohya deletes at
    # step g the step save g - 3: 1 at 4, 2 at 5, 3 at 6 (kohya's step-6 save beside its final file; here the final
    # save). The states with save_last_n_steps_state = 1: kohya deletes at step g the state g - 2, so after the final
    # save (step 6, with its state) the states 5 and 6 stay. Another run's saves and states are never touched.
    out = tmp_path / "out"
    _plant_strangers(out)
    raw = preset(output_dir=str(out), save_every_n_steps=1, save_last_n_steps=2, save_last_n_steps_state=1,
                 save_state=True, stages=[{"kind": "inversion", "steps": 3, "learning_rate": 5e-2},
                                          {"kind": "lora", "steps": 3, "learning_rate": 1e-2}])
    Trainer(build_config(raw)).run()
    assert _names(out) == RUN_FILES | _saves(4, 5) | _states(5, 6) | set(STRANGERS)
    for name in STRANGERS:
        assert (out / name / "progress.json").is_file() if name.endswith("/") else (out / name).read_bytes() == b"not ours"


def test_the_state_forms_prune_the_states_and_save_state_on_train_end_writes_the_last_state(preset, tmp_path):
    # save_last_n_steps_state = 1 beside save_last_n_steps: the test above. save_last_n_steps_state alone (a save and
    # a state every step of 6): the states are pruned as above (5 and 6 stay), the model files kept (kohya's
    # get_remove_step_no reads save_last_n_steps only)
    out = tmp_path / "states_only"
    Trainer(build_config(preset(output_dir=str(out), save_every_n_steps=1, save_last_n_steps_state=1, save_state=True,
                                stages=[{"kind": "inversion", "steps": 3, "learning_rate": 5e-2},
                                        {"kind": "lora", "steps": 3, "learning_rate": 1e-2}]))).run()
    assert _names(out) == RUN_FILES | _saves(1, 2, 3, 4, 5) | _states(5, 6)
    # save_state_on_train_end without save_state: no state with the step saves, one with the final save
    out = tmp_path / "end_state"
    Trainer(build_config(preset(output_dir=str(out), save_every_n_steps=1, save_state_on_train_end=True,
                                stages=[{"kind": "inversion", "steps": 2, "learning_rate": 5e-2}]))).run()
    assert _names(out) == RUN_FILES | _saves(1) | _states(2)
    assert (out / "pti-state-step00000002" / "progress.json").is_file()


def _one_image_data(folder: Path, repeats: int) -> str:
    """A data folder of one image seen ``repeats`` times an epoch: with batch 1, ``repeats`` steps an epoch."""
    (folder / f"{repeats}_tok1").mkdir(parents=True)
    draw_character(folder / f"{repeats}_tok1" / "a.png", 0)
    return str(folder)


def test_save_last_n_epochs_keeps_each_stages_last_epoch_saves(preset, tmp_path):
    # 1 image x 1 repeat at batch 1: one step an epoch. Inversion 3 epochs (steps 1-3), lora 4 (steps 4-7), a save
    # every epoch: stage 0 saves its epochs 1, 2, 3 (steps 1-3; its end is not the run's), stage 1 its epochs 1-3
    # (steps 4-6; its epoch 4 is the final save). kohya deletes at epoch E the save of epoch E - 1 x 2 within the
    # stage: epoch 1 of each (steps 1 and 4). States with N = 1: epoch E - 1: each stage's last epoch state stays.
    out = tmp_path / "epochs"
    raw = preset(output_dir=str(out), train_data_dir=_one_image_data(tmp_path / "data", 1), train_batch_size=1,
                 save_every_n_epochs=1, save_last_n_epochs=2,
                 save_last_n_epochs_state=1, save_state=True,
                 stages=[{"kind": "inversion", "max_train_epochs": 3, "learning_rate": 5e-2},
                         {"kind": "lora", "max_train_epochs": 4, "learning_rate": 1e-2}])
    Trainer(build_config(raw)).run()
    assert _names(out) == RUN_FILES | _saves(2, 3, 5, 6) | _states(3, 6, 7)


def test_a_resume_continues_pruning_the_runs_earlier_saves(preset, tmp_path):
    # First process: 3 steps, a save and a state every step (step 3: the final save), stopped before its final
    # files (removed here, as after a kill during the final save). The resume lengthens the stage to 6 steps: its
    # saves at 4 and 5 and the final one at 6 delete, by kohya's rule, the step saves 1, 2 and 3 the first process
    # wrote (3 had only its state: its LoRA was the final file), the state it resumed from (3) once state 6 exists.
    out = tmp_path / "run"
    raw = preset(output_dir=str(out), save_every_n_steps=1, save_last_n_steps=2, save_state=True,
                 stages=[{"kind": "inversion", "steps": 3, "learning_rate": 5e-2}])
    Trainer(build_config(raw)).run()
    assert _names(out) == RUN_FILES | _saves(1, 2) | _states(1, 2, 3)
    for name in ("pti.safetensors", "tok1.safetensors"):
        (out / name).unlink()
    longer = raw | {"resume": str(out / "pti-state-step00000003"),
                    "stages": [{"kind": "inversion", "steps": 6, "learning_rate": 5e-2}]}
    Trainer(build_config(longer)).run()
    assert _names(out) == RUN_FILES | _saves(4, 5) | _states(4, 5, 6)


def test_an_interrupted_save_is_never_pruned(preset, tmp_path):
    out = tmp_path / "run"
    raw = preset(output_dir=str(out), save_every_n_steps=1, save_last_n_steps=1, save_state=True,
                 stages=[{"kind": "inversion", "steps": 2, "learning_rate": 5e-2}])
    Trainer(build_config(raw)).run()
    for name in ("pti.safetensors", "tok1.safetensors"):
        (out / name).unlink()
    (out / "pti-state-step00000002").rename(out / "pti-state-interrupted-step00000002")
    longer = raw | {"resume": str(out / "pti-state-interrupted-step00000002"),
                    "stages": [{"kind": "inversion", "steps": 5, "learning_rate": 5e-2}]}
    Trainer(build_config(longer)).run()
    # N = 1: after the final save at 5 only the step save 4 stays (kohya: 5 - 1 - 1 = 3 deleted at 5)
    assert _names(out) == RUN_FILES | _saves(4) | _states(4, 5) | {"pti-state-interrupted-step00000002/"}


def test_sample_every_n_epochs_samples_at_each_stages_epoch_ends_and_replaces_sample_every_n_steps(
        preset, tmp_path, monkeypatch, caplog):
    # 1 image x 2 repeats at batch 1: 2 steps an epoch. Inversion 3 steps (epoch 1 ends at step 2, its partial epoch 2 at step 3), lora 4
    # (epochs 1 and 2 end at global steps 5 and 7). Every 2nd epoch: steps 3 and 7; then the final samples.
    tags = []
    monkeypatch.setattr(Trainer, "sample", lambda self, tag: tags.append(tag) or [])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tok1 --s 1\n")
    raw = preset(output_dir=str(tmp_path / "out"), train_data_dir=_one_image_data(tmp_path / "data", 2),
                 train_batch_size=1, sample_prompts=str(prompts),
                 sample_every_n_epochs=2, sample_every_n_steps=1,
                 stages=[{"kind": "inversion", "steps": 3, "learning_rate": 5e-2},
                         {"kind": "lora", "steps": 4, "learning_rate": 1e-2}])
    with caplog.at_level(logging.WARNING):
        config = build_config(raw)
    assert "sample_every_n_epochs = 2 replaces sample_every_n_steps = 1 (as in kohya)" in caplog.text
    Trainer(config).run()
    assert tags == ["step00000003", "step00000007", "final"]


def test_a_save_for_both_a_step_and_an_epoch_stays_while_either_rule_keeps_it():
    # One stage of 12 steps, 3 steps an epoch; saves every 2 steps (2, 4, ..., 10; 12 is the final save) and every
    # epoch (3, 6, 9; 12 final). save_last_n_steps = 2 alone: after the final save (a step save) the step saves
    # 2..8 are gone (12 - 3 = 9 and below) except 6, an epoch save that nothing prunes; 3 and 9 are epoch saves only.
    config = SimpleNamespace(save_every_n_steps=2, save_every_n_epochs=1, save_n_epoch_ratio=None,
                             stages=[SimpleNamespace(steps=12)])
    schedule = SaveSchedule(config, 3)
    assert [s for s in range(1, 12) if schedule.gone(s, 12, 2, None)] == [2, 4, 8]
    # with save_last_n_epochs = 1 too: epoch saves before the latest (9) go, so 3 and 6 too
    assert [s for s in range(1, 12) if schedule.gone(s, 12, 2, 1)] == [2, 3, 4, 6, 8]
    # at step 10 (a step save): 10 - 3 = 7 and below; the latest epoch save is 9
    assert [s for s in range(1, 12) if schedule.gone(s, 10, 2, 1)] == [2, 3, 4, 6]


def test_pruning_removes_only_its_exact_names_of_the_right_kind(tmp_path):
    # save_last_n_steps = 1, a save every step: the save at step 5 removes the step saves 3 and below. Of those,
    # only a LoRA file with its embedding and a state folder are the run's saves; an embedding whose LoRA is gone,
    # a file named as a state, a folder named as a LoRA, a link and the -interrupted- saves stay.
    config = SimpleNamespace(save_every_n_steps=1, save_every_n_epochs=0, save_n_epoch_ratio=None, save_state=True,
                             save_last_n_steps=1, save_last_n_epochs=None, save_last_n_steps_state=None,
                             save_last_n_epochs_state=None, stages=[SimpleNamespace(steps=10)])
    kept = {"tok1-step00000002.safetensors", "pti-state-step00000002", "pti-step00000003.safetensors/",
            "pti-step00000004.safetensors", "tok1-step00000004.safetensors", "pti-state-step00000004/",
            "pti-interrupted-step00000001.safetensors", "pti-state-interrupted-step00000001/", "pti-state-step00000003/"}
    for name in kept | {"pti-step00000001.safetensors", "tok1-step00000001.safetensors", "pti-state-step00000001/"}:
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(b"x")
    (tmp_path / "pti-state-step00000003").rmdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "pti-state-step00000003").symlink_to(tmp_path / "elsewhere")
    removed = prune_saves(RunFiles(tmp_path, "pti", "tok1"), config, 5, 1)
    assert sorted(p.name for p in removed) == ["pti-state-step00000001", "pti-step00000001.safetensors",
                                               "tok1-step00000001.safetensors"]
    assert _names(tmp_path) == kept | {"elsewhere/"}


@pytest.mark.parametrize("key", ["save_last_n_steps", "save_last_n_steps_state", "save_last_n_epochs",
                                 "save_last_n_epochs_state", "sample_every_n_epochs"])
@pytest.mark.parametrize("value", [0, -1])
def test_the_counts_must_be_positive(preset, key, value):
    with pytest.raises(ConfigError, match=f"key '{key}' must be > 0, got {value}"):
        build_config(preset(**{key: value}))


@pytest.mark.parametrize("given, warning", [
    ({"save_last_n_steps": 3}, "save_last_n_steps = 3 does nothing without save_every_n_steps"),
    ({"save_last_n_epochs": 2, "save_every_n_steps": 1},
     "save_last_n_epochs = 2 does nothing without save_every_n_epochs or save_n_epoch_ratio"),
    ({"save_last_n_steps_state": 2, "save_every_n_steps": 1}, "save_last_n_steps_state = 2 does nothing without save_state"),
    ({"save_last_n_epochs_state": 1, "save_every_n_steps": 1},
     "save_last_n_epochs_state = 1 does nothing without save_every_n_epochs or save_n_epoch_ratio"),
])
def test_a_count_without_saves_to_prune_is_warned_about_naming_both_keys(preset, given, warning, caplog):
    with caplog.at_level(logging.WARNING):
        build_config(preset(**given))
    assert warning in caplog.text


def test_a_count_with_its_saves_is_not_warned_about(preset, caplog):
    with caplog.at_level(logging.WARNING):
        build_config(preset(save_last_n_steps=3, save_every_n_steps=1, save_last_n_epochs_state=1, save_n_epoch_ratio=2,
                            save_state=True))
    assert "does nothing" not in caplog.text
