"""kohya's tracker keys with ``log_every_n_steps`` above 1 and with gradient accumulation (``tracker_keys.py``).

kohya's ``train_network.py`` has no logging interval: it logs ``loss/current`` and ``loss/average`` after every
micro-batch. ``log_every_n_steps`` is pti-plugin's own: the kohya step keys come with the log's entries (every N-th
global step and a stage's last), one value per optimizer step, while kohya's moving average still takes every step's
loss, the unlogged ones included (README, "Differences").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pti_plugin.config_loading import build_config
from pti_plugin.trainer import Trainer


def test_every_nth_step_logs_kohyas_keys_with_an_average_of_every_step(preset, tmp_path, monkeypatch):
    """A lora stage of 3 steps (batch 1, 2 micro-batches a step: 4 images x 2 repeats = 4 steps an epoch, so the
    average is the mean so far) logging every 2nd step: the tracker gets the kohya step keys at global steps 2 and 3
    (the stage's last) and not at 1, once a step; ``loss/current`` is the step's loss and ``loss/average`` the mean of
    the losses of steps 1-2, then 1-3 (step 1's, which no log shows, counted)."""
    from accelerate import Accelerator

    losses: list[float] = []  # every optimizer step's loss, as the step returned it
    optimizer_step = Trainer._optimizer_step

    def recording(self, plan):
        logs = optimizer_step(self, plan)
        losses.append(logs["loss"])
        return logs

    tracked: list[tuple[int, dict]] = []  # what the tracker is given: (step, values)
    log = Accelerator.log
    monkeypatch.setattr(Trainer, "_optimizer_step", recording)
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **k: (tracked.append((step, dict(values))),
                                                                                  log(self, values, step=step, **k))[1])
    raw = preset(log_with="tensorboard", logging_dir=str(tmp_path / "tb"), log_every_n_steps=2, train_batch_size=1,
                 gradient_accumulation_steps=2, stages=[{"name": "lora", "kind": "lora", "steps": 3,
                                                         "learning_rate": 1e-2}])
    Trainer(build_config(raw)).run()
    entries = [json.loads(line) for line in (Path(raw["output_dir"]) / "pti.log.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in entries] == [2, 3] and len(losses) == 3
    steps = [(step, values) for step, values in tracked if "loss/current" in values]
    assert [step for step, _ in steps] == [2, 3]
    l1, l2, l3 = losses
    assert [values["loss/current"] for _, values in steps] == pytest.approx([l2, l3], rel=1e-12)
    assert [values["loss/average"] for _, values in steps] == pytest.approx([(l1 + l2) / 2, (l1 + l2 + l3) / 3], rel=1e-12)
    assert [values["lr/unet"] for _, values in steps] == [e["lr/unet_lora"] for e in entries]
