"""kohya's tracker keys on TensorBoard (``tracker_keys.py``): a lora stage's are ``train_network.py``'s, an inversion
stage's ``train_textual_inversion.py``'s, at kohya's steps, beside pti-plugin's own keys (the JSONL log unchanged)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pti_plugin.config_loading import build_config
from pti_plugin.trainer import Trainer

# 4 images x 2 repeats = 8 entries = 4 optimizer steps of batch 2 per epoch (tests/conftest.py's tiny data set).
PER_EPOCH = 4


def kohya_averages(losses: list[float], per_epoch: int) -> list[float]:
    """kohya's ``LossRecorder`` fed as ``train_network.py`` feeds it, written out from its rule: epoch 0 appends each
    loss; a later epoch puts the loss of its step ``s`` into slot ``s`` (taking the old one out of the total); the
    average is the total over the number of slots."""
    slots: list[float] = []
    total, out = 0.0, []
    for i, loss in enumerate(losses):
        epoch, step = divmod(i, per_epoch)
        if epoch == 0:
            slots.append(loss)
        else:
            total -= slots[step]
            slots[step] = loss
        total += loss
        out.append(total / len(slots))
    return out


def test_the_moving_average_is_kohyas_loss_recorder():
    from pti_plugin.tracker_keys import LossRecorder

    losses = [4.0, 2.0, 6.0, 8.0, 1.0, 3.0, 5.0]  # an epoch of 3 steps, then two more epochs' steps
    recorder, got = LossRecorder(3), []
    for loss in losses:
        recorder.add(loss)
        got.append(recorder.moving_average)
    # by hand: the mean so far through the first epoch, then of the last 3 steps
    assert got == pytest.approx([4.0, 3.0, 4.0, 16 / 3, 5.0, 4.0, 3.0])
    uneven = [0.1, 0.7, 0.3, 0.9, 0.2, 0.05, 1.3, 0.4]  # to the last bit, as kohya's total is kept
    recorder = LossRecorder(3)
    for loss, expected in zip(uneven, kohya_averages(uneven, 3)):
        recorder.add(loss)
        assert recorder.moving_average == expected
    # a resume: kohya's recorder is a new one (train_network.py makes it after loading the state), so it restarts
    resumed = LossRecorder(3)
    assert resumed.moving_average == 0
    for loss, expected in zip([7.0, 1.0, 4.0, 2.0], [7.0, 4.0, 4.0, 7 / 3]):
        resumed.add(loss)
        assert resumed.moving_average == pytest.approx(expected)


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar TensorBoard's event files under ``folder`` hold: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[int, float]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            found.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return found


def test_tensorboard_shows_kohyas_keys_per_stage_kind_and_after_a_resume(preset, tmp_path):
    pytest.importorskip("tensorboard")
    stages = [{"name": "inversion", "kind": "inversion", "steps": 5, "learning_rate": 5e-2},
              {"name": "lora", "kind": "lora", "steps": 6, "learning_rate": 1e-2},
              {"name": "more", "kind": "lora", "steps": 2, "learning_rate": 1e-2}]
    raw = preset(log_with="tensorboard", logging_dir=str(tmp_path / "tb"), stages=stages, lr_scheduler="linear",
                 save_every_n_steps=10, save_state=True)
    Trainer(build_config(raw)).run()
    log = [json.loads(line) for line in (Path(raw["output_dir"]) / "pti.log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in log] == list(range(1, 14))
    assert not any(k in e for e in log for k in ("loss/current", "loss/average", "lr", "lr/unet"))  # the JSONL's own
    tb = _scalars(tmp_path / "tb")
    approx = lambda values: pytest.approx(values, rel=1e-6)  # noqa: E731 (TensorBoard keeps float32)

    # inversion (train_textual_inversion.py): loss and lr at the global step, loss/epoch at the epoch number
    inversion = log[:5]
    assert tb["loss"] == approx({e["global_step"]: e["loss"] for e in log})  # pti-plugin's own key: the same value
    assert tb["lr"] == approx({e["global_step"]: e["lr/pivot"] for e in inversion})
    assert len({e["lr/pivot"] for e in inversion}) > 1  # a decaying schedule: the step's own rate
    losses = [e["loss"] for e in inversion]
    assert tb["loss/epoch"] == approx({1: sum(losses[:4]) / 4, 2: losses[4]})  # the last, partial epoch: its mean

    # lora (train_network.py): loss/current, loss/average, lr/unet at the global step (6..11: after the inversion's)
    lora, more = log[5:11], log[11:]
    assert {s: v for s, v in tb["loss/current"].items() if s <= 11} == approx({e["global_step"]: e["loss"] for e in lora})
    averages = kohya_averages([e["loss"] for e in lora], PER_EPOCH)  # restarts with the stage, across its epoch end
    assert {s: v for s, v in tb["loss/average"].items() if s <= 11} == approx(dict(zip(range(6, 12), averages)))
    assert {s: v for s, v in tb["lr/unet"].items() if s <= 11} == approx({e["global_step"]: e["lr/unet_lora"] for e in lora})
    assert not {"loss/current", "loss/average", "lr/unet"} & {k for k, v in tb.items() if min(v) <= 5}
    # the second lora stage: the average restarts; its epoch follows the first lora stage's two
    again = kohya_averages([e["loss"] for e in more], PER_EPOCH)
    assert {s: v for s, v in tb["loss/average"].items() if s > 11} == approx({12: again[0], 13: again[1]})
    assert tb["loss/epoch_average"] == approx({1: averages[3], 2: averages[5], 3: again[1]})

    # resumed at global step 10 (the lora stage's 5th step, in its second epoch): kohya's recorder is a new one after
    # a resume, so the average restarts at the first resumed step; the steps go on from the state's global step
    resumed = raw | {"output_dir": str(tmp_path / "again"), "logging_dir": str(tmp_path / "tb2"),
                     "resume": str(Path(raw["output_dir"]) / "pti-state-step00000010")}
    Trainer(build_config(resumed)).run()
    log = [json.loads(line) for line in (tmp_path / "again" / "pti.log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in log] == [11, 12, 13]
    tb, (first, second, third) = _scalars(tmp_path / "tb2"), [e["loss"] for e in log]
    assert tb["loss/average"] == approx({11: first, 12: second, 13: (second + third) / 2})
    assert tb["loss/epoch_average"] == approx({2: first, 3: (second + third) / 2})
    assert averages[5] != pytest.approx(first, rel=1e-6)  # the uninterrupted run's spans the epoch's earlier steps


def test_d_times_lr_under_prodigy_by_kohya_names():
    """kohya logs ``lr/d*lr/<group>`` (``lr/d*lr`` in textual inversion) for Prodigy and D-Adaptation: d x lr."""
    from pti_plugin.tracker_keys import TrackerKeys

    def state(kind, optimizer_type, names, groups):
        plan = SimpleNamespace(param_groups=[{"name": n} for n in names], optimizer=SimpleNamespace(param_groups=groups),
                               steps=10)
        stage = SimpleNamespace(kind=kind, optimizer_type=optimizer_type)
        return SimpleNamespace(stage=stage, plan=plan, stage_index=0, stage_step=1, steps_per_epoch=4)

    config = SimpleNamespace(log_with="tensorboard", stages=[SimpleNamespace(kind="lora", steps=10)])
    keys = TrackerKeys(config, accelerator=None)
    lora = state("lora", "Prodigy", ["pivot", "unet_lora", "text_encoder_lora"],
                 [{"lr": 1.0, "d": 2e-6}, {"lr": 0.5, "d": 4e-6}, {"lr": 0.25, "d": 8e-6}])
    logs = {"loss": 0.5, "lr/pivot": 1.0, "lr/unet_lora": 0.5, "lr/text_encoder_lora": 0.25}
    assert keys.after_step(lora, logs) == {
        "loss/current": 0.5, "loss/average": 0.5, "lr/unet": 0.5, "lr/textencoder": 0.25,
        "lr/d*lr/pivot": 2e-6, "lr/d*lr/unet": 2e-6, "lr/d*lr/textencoder": 2e-6}
    config.stages = [SimpleNamespace(kind="inversion", steps=10)]
    inversion = state("inversion", "prodigy", ["pivot"], [{"lr": 1.0, "d": 3e-6}])
    assert TrackerKeys(config, None).after_step(inversion, {"loss": 0.5, "lr/pivot": 1.0}) == {"lr": 1.0, "lr/d*lr": 3e-6}
    adamw = state("inversion", "AdamW", ["pivot"], [{"lr": 1.0, "d": 3e-6}])
    assert TrackerKeys(config, None).after_step(adamw, {"loss": 0.5, "lr/pivot": 1.0}) == {"lr": 1.0}
