"""When the run saves, samples and prunes its intermediate saves, with kohya's keys.

Saves: ``save_every_n_steps`` (global steps) and ``save_every_n_epochs`` / ``save_n_epoch_ratio`` (epochs counted
within each stage: :func:`~.outputs.epoch_save_due`), each written as ``<output_name>-stepNNNNNNNN.safetensors`` with
``<token>-stepNNNNNNNN.safetensors`` (and ``<output_name>-state-stepNNNNNNNN/`` with ``save_state``); never at the
run's last step, whose save is the final one.

Pruning (kohya's ``save_last_n_steps``, ``save_last_n_epochs`` and their ``_state`` forms, which replace them for the
state folders): after each save, the run's older saves that kohya's rules would have removed by now are deleted.
kohya's rules (``train_util.get_remove_step_no`` / ``get_remove_epoch_no``): a ``save_every_n_steps`` save at step r
goes once a step save at step g >= r + N + 1 is made, so the saves of the last N steps stay; a
``save_every_n_epochs`` save at epoch e goes at the save of epoch E = e + every x N, so the last N epoch saves
stay. Here the step count is the global step (as kohya's global step), across the stages; the epoch count is
each stage's own (its epochs, as its saves count them), so each stage keeps its last N epoch saves. The final save
at a step where kohya would also make a step save (the last step a multiple of ``save_every_n_steps``) prunes as
that save would. A save made for both a step and an epoch (one file here, two in kohya) stays while either rule
keeps it. States are pruned only while ``save_state`` saves them (kohya's ``save_and_remove_state_*``).

As in kohya, saves are known by their names only: the run's exact names ``<output_name>-stepNNNNNNNN.safetensors``
(with the ``<token>-stepNNNNNNNN.safetensors`` of the same save: the embedding goes with its LoRA, never alone) and
``<output_name>-state-stepNNNNNNNN/`` at a step where this run's schedule saves, before the save being made. Final
files, ``-interrupted-`` saves, other runs' names and anything else are never touched. A new run starts only in a
folder without files of its names (or with ``overwrite``, replacing each as it writes it), and a resume continues
its run: the saves of its names before the resumed step are the run's own, and it prunes them as the run goes on.
The state a resume started from may be pruned too, but only after a newer state has been written.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import NamedTuple

from .outputs import epoch_save_due, epoch_save_interval
from .resolution import metadata_lora_stage

logger = logging.getLogger(__name__)


def nth_epoch_ends(every: int | None, stage_step: int, stage_steps: int, steps_per_epoch: int) -> bool:
    """Whether stage step ``stage_step`` (from 1) ends an ``every``-th epoch of the stage (every epoch when None),
    the stage's last, partial epoch included: when validation (kohya's ``(epoch + 1) % validate_every_n_epochs``) and
    epoch sampling (``epoch % sample_every_n_epochs``) run."""
    if stage_step % steps_per_epoch and stage_step != stage_steps:
        return False
    return -(-stage_step // steps_per_epoch) % (every or 1) == 0


class SaveReasons(NamedTuple):
    """Why the run saves after a step: a ``save_every_n_steps``-th global step, a saving epoch's end."""

    by_steps: bool
    by_epoch: bool


def save_reasons(config, global_step: int, stage_step: int, stage_steps: int, steps_per_epoch: int) -> SaveReasons:
    """Why the run saves after global step ``global_step``, its stage's step ``stage_step`` of ``stage_steps`` (both
    from 1): (a ``save_every_n_steps``-th global step, a saving epoch's end: :func:`~.outputs.epoch_save_due`). The
    run's last step is not set apart here: its save is the final one (:func:`save_due`, :class:`SaveSchedule`)."""
    every = config.save_every_n_steps
    return SaveReasons(bool(every) and global_step % every == 0,
                       epoch_save_due(config, stage_step, stage_steps, steps_per_epoch))


def save_due(config, state, steps_per_epoch: int) -> bool:
    """Whether an intermediate save ``<name>-stepNNNNNNNN`` follows the step just taken (``state``: the trainer's,
    its ``stage_step`` of the stage's ``plan.steps``, from 1): for either of :func:`save_reasons`, except at the run's
    last step (the final save)."""
    step, stage_steps = state.stage_step, state.plan.steps
    due = any(save_reasons(config, state.global_step, step, stage_steps, steps_per_epoch))
    return due and not (state.stage_index == len(config.stages) - 1 and step == stage_steps)


def sample_due(config, state, steps_per_epoch: int) -> bool:
    """Whether samples follow the step just taken: with ``sample_every_n_epochs``, at the end of each stage's every
    N-th epoch (the stage's last, partial epoch included; kohya's ``epoch % sample_every_n_epochs``), and
    ``sample_every_n_steps`` is then not used (as kohya); else every ``sample_every_n_steps`` global steps."""
    if not config.sample_prompts:
        return False
    if config.sample_every_n_epochs:
        return nth_epoch_ends(config.sample_every_n_epochs, state.stage_step, state.plan.steps, steps_per_epoch)
    return bool(config.sample_every_n_steps) and state.global_step % config.sample_every_n_steps == 0


class SaveSchedule:
    """The run's intermediate saves, by global step: why each is made and when kohya's rules let it go."""

    def __init__(self, config, steps_per_epoch: int):
        self.config, self.per_epoch = config, steps_per_epoch
        self.starts, start = [], 0  # the global step before each stage's first
        for stage in config.stages:
            self.starts.append(start)
            start += stage.steps
        self.total = start

    def _stage_of(self, step: int) -> int:
        """The stage that takes global step ``step`` (from 1)."""
        return max(i for i, start in enumerate(self.starts) if start < step) if step > 0 else 0

    def _reasons(self, step: int) -> tuple[int, int, SaveReasons]:
        """The stage that takes global step ``step``, the step within it and :func:`save_reasons` there."""
        index = self._stage_of(step)
        stage_step = step - self.starts[index]
        return index, stage_step, save_reasons(self.config, step, stage_step, self.config.stages[index].steps,
                                               self.per_epoch)

    def step_save(self, step: int) -> bool:
        """Whether global step ``step`` is a ``save_every_n_steps`` save (at the run's last step: the final save,
        which stands for the step save kohya makes there beside its final file)."""
        return 0 < step <= self.total and self._reasons(step)[2].by_steps

    def epoch_save(self, step: int) -> tuple[int, int] | None:
        """``(stage, epoch within the stage)`` when global step ``step`` ends an epoch the run saves at, else None
        (the run's last step is the final save, not an epoch save, as kohya saves no epoch file at its last epoch)."""
        if not 0 < step < self.total:
            return None
        index, stage_step, reasons = self._reasons(step)
        return (index, stage_step // self.per_epoch) if reasons.by_epoch else None

    def _latest_epoch_save(self, index: int, step: int) -> int:
        """The latest epoch of stage ``index`` saved at or before global step ``step`` (0: none yet)."""
        stage_steps = self.config.stages[index].steps
        every = epoch_save_interval(self.config, stage_steps, self.per_epoch)
        epoch = min(step - self.starts[index], stage_steps) // self.per_epoch
        epoch -= epoch % every
        while epoch > 0 and self.epoch_save(self.starts[index] + epoch * self.per_epoch) is None:
            epoch -= every
        return max(epoch, 0)

    def gone(self, save: int, step: int, last_n_steps: int | None, last_n_epochs: int | None) -> bool:
        """Whether the save at global step ``save`` is one kohya's rules have removed once the run saved at ``step``:
        ``last_n_steps`` (None: keep) for a step save, ``last_n_epochs`` for an epoch save; both when it is both."""
        by_steps, by_epoch = self.step_save(save), self.epoch_save(save)
        if save >= step or not (by_steps or by_epoch):
            return False
        if by_steps:
            every = self.config.save_every_n_steps
            latest = step - step % every  # the latest step save up to ``step`` (the final save counts as one)
            if not last_n_steps or save > latest - last_n_steps - 1:
                return False
        if by_epoch:
            index, epoch = by_epoch
            every = epoch_save_interval(self.config, self.config.stages[index].steps, self.per_epoch)
            if not last_n_epochs or epoch > self._latest_epoch_save(index, step) - every * last_n_epochs:
                return False
        return True


def prune_saves(files, config, step: int, steps_per_epoch: int) -> list[Path]:
    """After the save at global step ``step`` (an intermediate or the final one), delete this run's earlier saves
    that kohya's ``save_last_n_*`` rules have removed by now (see the module docstring); return what was deleted.
    ``files``: the run's :class:`~.outputs.RunFiles`."""
    model_n = (config.save_last_n_steps, config.save_last_n_epochs)
    state_n = (config.save_last_n_steps_state or config.save_last_n_steps,
               config.save_last_n_epochs_state or config.save_last_n_epochs)
    if not any(model_n) and not (config.save_state and any(state_n)):
        return []
    schedule, removed = SaveSchedule(config, steps_per_epoch), []
    for save, path in files.step_files():
        tag = f"step{save:08d}"
        is_state = path == files.state_dir(tag)
        if not (is_state and config.save_state or path == files.lora(tag)):
            continue  # the embedding goes with its LoRA; -interrupted- saves and states without save_state stay
        if not schedule.gone(save, step, *(state_n if is_state else model_n)):
            continue
        if not is_state and (path.is_symlink() or not path.is_file()):
            continue  # a link or a folder by the LoRA's name is not a save of the run: its embedding stays with it
        for old in ([path] if is_state else [files.embedding(tag), path]):  # the embedding first: a LoRA left by a
            if old.is_symlink() or not (old.is_dir() if is_state else old.is_file()):  # stop between the two is
                continue  # still found by its name and removed later; a link or another kind of entry is not ours
            try:
                (shutil.rmtree if is_state else Path.unlink)(old)
            except OSError as exc:  # the run goes on: a save left behind costs disk space, not the training
                logger.warning("could not remove the old save %s (save_last_n_*): %s", old, exc)
                continue
            message = f"removed the old save {old} (save_last_n_*, at the save of step {step})"
            logger.info(message)
            print(message, flush=True)  # as the trainer says what it saves (it calls this from the main process)
            removed.append(old)
    return removed


def epoch_metadata(config, steps_per_epoch: int, stage_index: int, stage_step: int, final: bool) -> dict[str, str]:
    """kohya's ``ss_num_epochs`` and ``ss_epoch`` for a save after ``stage_step`` steps of stage ``stage_index``
    (``final``: the run's last save), counted in the LoRA stage whose settings the metadata holds (the last lora stage,
    :func:`~pti_plugin.resolution.metadata_lora_stage`); {} without one. Its epochs: ``ceil(steps / steps_per_epoch)``.
    As kohya's saves: the final save (or any after that stage) writes its epochs; a save at a saving epoch's end the
    epochs done; any other save (a step's, an interrupted one) the 0-based epoch in progress (kohya's step saves
    pass the loop's epoch index); a save before the stage, 0."""
    stage = metadata_lora_stage(config)
    if stage is None:
        return {}
    epochs = math.ceil(stage.steps / steps_per_epoch)
    if final or stage_index > stage.index:
        epoch = epochs
    elif stage_index < stage.index:
        epoch = 0
    elif epoch_save_due(config, stage_step, stage.steps, steps_per_epoch):
        epoch = stage_step // steps_per_epoch
    else:
        epoch = max(stage_step - 1, 0) // steps_per_epoch
    return {"ss_num_epochs": str(epochs), "ss_epoch": str(epoch)}
