"""kohya's tracker keys, logged with ``log_with`` beside pti-plugin's own (the JSONL log keeps its keys as they are;
these go to the tracker only), so that a run reads in TensorBoard as kohya's scripts' runs do.

A lora stage logs ``train_network.py``'s keys: at the steps the log writes, at the global optimizer step,
``loss/current`` (the step's loss: pti-plugin's ``loss``, every term the step trained on), ``loss/average`` (kohya's
moving average: :class:`LossRecorder`), ``lr/unet`` and ``lr/textencoder`` (the groups ``unet_lora`` and
``text_encoder_lora``; a pivot trained in the stage, a group kohya's network trainer lacks, keeps ``lr/pivot``), under
Prodigy (or D-Adaptation) ``lr/d*lr/<that name>``; at each epoch's end ``loss/epoch_average`` (the moving average then),
at the epoch number, as kohya logs it (kohya before v0.10: ``loss/epoch``). ``max_norm/*`` and ``norm/*`` come with
the step's own logs (``lora_regularisation.MAX_NORM_LOGS``).

An inversion stage logs ``train_textual_inversion.py``'s: ``loss`` (pti-plugin's own key: the same value), ``lr`` (the
pivot's), ``lr/d*lr`` under Prodigy, and at each epoch's end ``loss/epoch``, the mean loss of the epoch's steps (kohya
divides the sum by the epoch's full length, so its last, partial epoch reads lower; here the mean of the steps taken).

Epochs count within a stage, from 1, after the epochs of the run's earlier stages of the same kind (so a key's epochs
never repeat); the average and the epoch's mean restart with each stage (a kohya run of that stage starts them) and
after a resume (kohya's recorder is new then: the average is the mean of the steps since the resume until an epoch's
worth). A step skipped as non-finite (``nan_policy = "skip"``) logs its NaN ``loss/current`` and is left out of both.

Under gradient accumulation a step's loss is the mean of its micro-batches', one value per optimizer step; kohya logs
(and averages) each micro-batch's loss, at the global step as it stands then (README's "Differences").
"""

from __future__ import annotations

import collections
import math
from typing import Any

from .optimizers import optimizer_key
from .save_schedule import nth_epoch_ends

#: pti-plugin's parameter groups under kohya's ``train_network.py`` names (``networks/lora.py``'s lr descriptions).
KOHYA_GROUP_NAMES = {"unet_lora": "unet", "text_encoder_lora": "textencoder"}


class LossRecorder:
    """kohya's ``train_util.LossRecorder`` as ``train_network.py`` feeds it, one loss a step with the step's index in
    its epoch as slot: through the first epoch the mean of every loss so far, then of the last ``window`` (an epoch of
    steps), each loss replacing the one an epoch before it. The running total changes as kohya's does (minus the
    replaced loss, plus the new one), so the averages are kohya's to the last bit."""

    def __init__(self, window: int):
        self.losses: collections.deque[float] = collections.deque(maxlen=window)
        self.total = 0.0

    def add(self, loss: float) -> None:
        if len(self.losses) == self.losses.maxlen:
            self.total -= self.losses[0]
        self.losses.append(loss)
        self.total += loss

    @property
    def moving_average(self) -> float:
        return self.total / len(self.losses) if self.losses else 0.0


def tracks_d(optimizer_type: str) -> bool:
    """Whether kohya logs ``d*lr`` for ``optimizer_type``: D-Adaptation's and Prodigy."""
    key = optimizer_key(optimizer_type)
    return key.startswith("dadapt") or key == "prodigy"


class TrackerKeys:
    """The kohya keys of a run (see the module docstring); inert without ``log_with``."""

    def __init__(self, config, accelerator):
        self.config, self.accelerator, self.enabled = config, accelerator, bool(config.log_with)
        self._stage: int | None = None

    def _start_stage(self, state) -> None:
        self._stage, per_epoch = state.stage_index, state.steps_per_epoch
        self.recorder = LossRecorder(per_epoch)
        self.epoch_total, self.epoch_steps = 0.0, 0
        earlier = [s for s in self.config.stages[: state.stage_index] if s.kind == state.stage.kind]
        self.epochs_before = sum(-(-s.steps // per_epoch) for s in earlier)

    def after_step(self, state, logs: dict[str, float]) -> dict[str, float]:
        """After every optimizer step (``logs``: its logs): record its loss, log an ending epoch's value to the tracker,
        and return the step's kohya keys, for the tracker with the step's entry when the log writes it."""
        if not self.enabled:
            return {}
        if self._stage != state.stage_index:
            self._start_stage(state)
        loss = logs["loss"]
        if math.isfinite(loss):
            self.recorder.add(loss)
            self.epoch_total, self.epoch_steps = self.epoch_total + loss, self.epoch_steps + 1
        inversion = state.stage.kind == "inversion"
        keys = self._lr_keys(state, logs, inversion)
        if not inversion:
            keys = {"loss/current": loss, "loss/average": self.recorder.moving_average} | keys
        if nth_epoch_ends(None, state.stage_step, state.plan.steps, state.steps_per_epoch):
            epoch = self.epochs_before - (-state.stage_step // state.steps_per_epoch)
            if inversion:
                value = {"loss/epoch": self.epoch_total / self.epoch_steps if self.epoch_steps else math.nan}
            else:
                value = {"loss/epoch_average": self.recorder.moving_average}
            self.accelerator.log(value, step=epoch)
            self.epoch_total, self.epoch_steps = 0.0, 0
        return keys

    def _lr_keys(self, state, logs: dict[str, float], inversion: bool) -> dict[str, Any]:
        """``lr/<kohya name>`` (``lr`` in an inversion stage) and, under Prodigy, ``lr/d*lr/<kohya name>``."""
        keys, d_lr = {}, tracks_d(state.stage.optimizer_type)
        for group, live in zip(state.plan.param_groups, state.plan.optimizer.param_groups):
            lr = logs.get(f"lr/{group['name']}")
            if lr is None:  # a skipped step logs no learning rate
                continue
            name = "" if inversion else "/" + KOHYA_GROUP_NAMES.get(group["name"], group["name"])
            if name != "/pivot":  # lr/pivot: pti-plugin's own key, already logged
                keys[f"lr{name}"] = lr
            if d_lr and "d" in live:
                keys[f"lr/d*lr{name}"] = live["d"] * live["lr"]
        return keys
