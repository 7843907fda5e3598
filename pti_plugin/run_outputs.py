"""What a run writes while it trains, from the main process: the step log (``<output_name>.log.jsonl`` and the
tracker), the saves (the LoRA + embedding pair through ``outputs.py``, the resumable state, kohya's
``save_last_n_*`` pruning), the samples, and the lines that say how to go on after a stop. The trainer decides
when (``save_schedule.py``); this module writes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .atomic_io import write_failed
from .config import Config, first_of
from .data.captions import expand_token
from .data.dataset import ImageItem, Subset
from .data.dataset_stats import tag_frequency
from .formats.kohya_dataset_metadata import kohya_dataset_metadata, session_metadata
from .hooks import TrainerState, trainer_progress
from .models.trainable import TrainableModel
from .nan_policy import optimizer_state_is_finite
from .outputs import RunFiles, run_pti_metadata, script_says_how_to_continue, trainer_command, write_lora_and_embedding
from .plan_report import schedule_training_metadata
from .plugin_calls import PluginCalls
from .plugin_state import collect_plugin_states
from .resolution import training_metadata
from .resume import SavedProgress, base_identity, batch_shape, lora_scales, save_state
from .save_schedule import SaveSchedule, epoch_metadata, prune_saves
from .tracker_keys import TrackerKeys

logger = logging.getLogger(__name__)


def saves_left_in_place(config: Config, files: RunFiles, steps_per_epoch: int) -> list[Path]:
    """The step saves of this run's names in ``output_dir`` (an earlier run's, found by a new run with ``overwrite``)
    that this run will not write again, so that they stay beside its outputs: ``-interrupted-`` saves, LoRA and
    embedding saves at a step this run does not save (its schedule: :class:`~.save_schedule.SaveSchedule`; never at
    its last step, whose save is the final one) and state folders at a step where it saves no state (the last step's
    with ``save_state`` or ``save_state_on_train_end``)."""
    schedule = SaveSchedule(config, steps_per_epoch)
    left = []
    for step, path in files.step_files():
        saved = step < schedule.total and (schedule.step_save(step) or schedule.epoch_save(step) is not None)
        if path.is_dir():
            saved = (config.save_state and saved) or (step == schedule.total and (
                config.save_state or config.save_state_on_train_end))
        if "-interrupted-" in path.name or not saved:
            left.append(path)
    return left


class RunOutputs:
    """A run's writes (see the module docstring). ``items``: the training images (the metadata's tag frequency, the
    samples' size); ``vae_offloaded``: the VAE waits on the CPU and comes to the device for the samples; ``calls``: the
    run's plugins, whose ``on_before_save`` each save calls."""

    def __init__(self, config: Config, accelerator, files: RunFiles, model: TrainableModel, calls: PluginCalls,
                 state: TrainerState, items: list[ImageItem], num_validation_images: int, vae_offloaded: bool,
                 info: Callable[[str], None], subsets: list[Subset], global_batch: int):
        self.config, self.accelerator, self.files, self.model = config, accelerator, files, model
        self.calls, self.plugins, self.state, self.items, self.info = calls, calls.plugins, state, items, info
        self.num_validation_images, self.vae_offloaded = num_validation_images, vae_offloaded
        # kohya's dataset and session keys, once (``subsets``: the scan's, which ``items`` index)
        self.kohya_keys = session_metadata(time.time()) | kohya_dataset_metadata(
            config, subsets, items, state.steps_per_epoch, global_batch)
        # A new run (not a resume) replaces an earlier run's log (there only with ``overwrite``) at its first line
        # instead of appending to it: before, the log held both runs' steps.
        self._log_mode = "a" if config.resume else "w"
        self._saved: tuple[int, dict[str, Path]] | None = None  # the last save with a state: (global step, its paths)
        self.tracker_keys = TrackerKeys(config, accelerator)  # kohya's keys beside ours, on the tracker
        if config.overwrite and not config.resume and accelerator.is_main_process:
            self._warn_saves_left(state.steps_per_epoch)

    def _warn_saves_left(self, steps_per_epoch: int) -> None:
        """``overwrite``: name the earlier run's step saves this run leaves in place (:func:`saves_left_in_place`);
        before, they stayed beside the new run's outputs unsaid. Nothing is deleted."""
        left = saves_left_in_place(self.config, self.files, steps_per_epoch)
        if left:
            logger.warning(
                "overwrite: %s holds an earlier run's step saves of this run's names (output_name %r, token %r) that "
                "this run will not write again: %s; they stay as they are beside this run's outputs (nothing is "
                "deleted): move or delete them if they are not wanted", self.files.output_dir, self.files.output_name,
                self.files.token, first_of([p.name for p in left], 12))

    def write_log(self, entry: dict[str, Any], step: int, tracker_only: dict[str, float] | None = None) -> None:
        """One logged step: a line of the JSONL log (main process) and, with ``log_with``, its numbers to the tracker,
        with ``tracker_only`` (kohya's keys: ``tracker_keys.py``)."""
        if self.accelerator.is_main_process:
            line = json.dumps(entry) + "\n"
            try:
                with open(self.files.log_jsonl, self._log_mode, encoding="utf-8") as handle:
                    handle.write(line)
                self._log_mode = "a"
            except OSError as exc:  # a full disk: the log named, as a save's file is (atomic_io)
                raise write_failed(self.files.log_jsonl, exc, len(line.encode())) from exc
        if self.config.log_with:
            numbers = {k: v for k, v in entry.items() if isinstance(v, (int, float))}
            self.accelerator.log(numbers | (tracker_only or {}), step=step)

    def save(self, optimizer, tag: str | None = None, with_state: bool = False, together: bool = True) -> dict[str, Path]:
        """Write the LoRA and embedding (final names when ``tag`` is None, else ``<name>-<tag>``),
        and the resumable state when asked (``<name>-state-<tag>``; the final one ``<name>-state-stepNNNNNNNN``;
        ``optimizer``: the stage's, accelerate's wrapper or a plain one), from the main process; the processes wait
        for each other after it unless not ``together`` (a save one process makes alone)."""
        state, config, suffix, paths = self.state, self.config, tag, {}
        with_state = with_state or (tag is None and config.save_state_on_train_end)  # kohya's: the final save's state
        if self.accelerator.is_main_process:
            training = schedule_training_metadata(state)  # None: the preset's stages' (the built-in schedule)
            training = training_metadata(config) if training is None else training
            own = run_pti_metadata(config).keys() | {k for k in training if k.startswith("pti_")}
            metadata = self.calls.save_metadata(own)  # on_before_save: a plugin's entries checked, bad ones dropped
            paths = write_lora_and_embedding(
                self.files, suffix, self.model.lora_state_dicts(), self.model.lora_alphas,
                tuple(p.vectors for p in self.model.pivots), config, state.global_step, metadata,
                tag_frequency(self.items), family=self.model.family, num_validation_images=self.num_validation_images,
                run_metadata=self.kohya_keys | epoch_metadata(config, state.steps_per_epoch, state.stage_index,
                                                              state.stage_step, final=tag is None),
                training=training,
            )
            folder = self.files.state_dir(suffix or f"step{state.global_step:08d}")
            if with_state and config.resume and folder.resolve() == Path(config.resume).resolve():
                paths["state"] = folder  # resumed at the end of training: nothing trained since this state
            elif with_state:
                paths["state"] = save_state(
                    folder, self.model.trainable_tensors(), optimizer.optimizer.state_dict()
                    if hasattr(optimizer, "optimizer") else optimizer.state_dict(),
                    state.plan.lr_scheduler.state_dict(), state.stage_index, state.stage_step, state.global_step,
                    stage_kind=state.stage.kind, optimizer_type=state.stage.optimizer_type,
                    param_groups=[(g["name"], len(g["params"])) for g in state.plan.param_groups],
                    replace=self.files.overwrite, token_string=config.token_string, base=base_identity(config),
                    lora_scales=lora_scales(config), batch=batch_shape(config, self.accelerator.num_processes),
                    plugins=collect_plugin_states(self.plugins), scaler=None if self.accelerator.scaler is None
                    else self.accelerator.scaler.state_dict(),  # fp16's gradient scaler (accelerate's scaler.pt)
                )
                self.info(f"saved state {paths['state']}")
            if not (tag or "").startswith("interrupted"):  # kohya's save_last_n_*: the run's older saves, by name
                prune_saves(self.files, config, state.global_step, state.steps_per_epoch)
        if together:
            self.accelerator.wait_for_everyone()
        if with_state:  # on every process (the others' paths are empty), so that they stop alike (save_on_stop)
            self._saved = (state.global_step, paths)
        return paths

    def save_on_stop(self, optimizer) -> dict[str, Path]:
        """The save a stop signal makes after the step just taken: the ``interrupted-stepNNNNNNNN`` LoRA, embedding and
        state, unless that step's own save wrote them with a state (the signal came during it or the samples after it):
        then its paths. Before, the same weights and state were written a second time, under ``-interrupted-`` names,
        while a scheduler's grace time ran out."""
        if self._saved is not None and self._saved[0] == self.state.global_step:
            return self._saved[1]
        return self.save(optimizer, tag=f"interrupted-step{self.state.global_step:08d}", with_state=True)

    def save_last_finite(self, optimizer, resumed: SavedProgress | None) -> str:
        """After a non-finite step: save the (finite) weights and, when its optimizer state is finite
        too, the resumable state; return what was saved and how to continue. Nothing is saved when no step
        finished since the resumed state (``resumed``): it holds these very weights (and may be this tag's own files)."""
        if resumed is not None and self.state.global_step == resumed.global_step:
            return (f"nothing saved: no step finished since the resumed state {self.config.resume}, which holds the last "
                    "finite weights; a resumed run repeats its steps exactly, so resuming it again meets the same step: "
                    "resume it with --set nan_policy=skip to skip such steps, or start again with other settings")
        tag = f"interrupted-step{self.state.global_step:08d}"
        finite_state = optimizer_state_is_finite(optimizer)
        paths = self.save(optimizer, tag=tag, with_state=finite_state)
        if finite_state or not paths:
            return self.resume_hint(paths, after_stop=False)
        return (f"saved {paths['lora'].name} and {paths['embedding'].name} (the optimizer state was non-finite, so no "
                f"resumable state); start a new run from them with network_weights = {paths['lora']} and weights = "
                f"{paths['embedding']}")

    def save_after_plugin_error(self, optimizer, resumed: SavedProgress | None, hook: str) -> str:
        """After a plugin's error in ``hook`` (a :class:`~.plugin_calls.PluginError`, or a ConfigError after the
        set-up): save the last finished step's LoRA, embedding and state, as a stop signal does (its own save's files
        when that step saved a state); return what was saved and how to go on. The weights, optimizer and counters are
        those of the last finished step whichever hook failed (no hook runs between the optimizer step and the
        counters' count); a schedule's failed ``plan_stage`` leaves the previous stage's plan, so the state is that
        stage's end. Nothing is saved when no step finished in this run (since ``resumed``), or after ``on_end`` (the
        final files are saved). Only this process saves (a plugin may fail on one process): process 0 writes files."""
        state, start = self.state, resumed.global_step if resumed is not None else 0
        if hook == "on_end":
            return "the run's final files were saved before on_end ran"
        if state.global_step == start or optimizer is None or state.plan is None:
            since = f"the resumed state {self.config.resume}, which holds these weights" if resumed else "the start"
            return f"nothing saved: no training step finished since {since}"
        if hook == "plan_stage":  # the position is the next stage's, the plan and optimizer the previous one's
            position = trainer_progress(state)
            position.stage_index -= 1
            position.stage, position.stage_step = self.config.stages[state.stage_index], state.plan.steps
        if self._saved is not None and self._saved[0] == state.global_step:
            paths = self._saved[1]
        else:
            paths = self.save(optimizer, tag=f"interrupted-step{state.global_step:08d}", with_state=True, together=False)
        if not paths:
            return (f"process {self.accelerator.process_index} saves nothing: only process 0 writes the run's files "
                    "(an error on this process alone stops process 0 too, without a save; the earlier saves are kept)")
        return self.resume_hint(paths, after_stop=False)

    def resume_hint(self, paths: dict[str, Path], after_stop: bool = True) -> str:
        """The files a save wrote and the command that resumes its state ("" when it saved no state). After a stop
        signal inside a script that says itself how to continue (:func:`~.outputs.script_continues_runs`), the files
        alone: the script's last line is the one instruction (a non-finite step's save, not ``after_stop``, keeps
        the command)."""
        if "state" not in paths:
            return ""
        saved = f"saved {paths['lora'].name}, {paths['embedding'].name} and the state {paths['state']}"
        if after_stop and script_says_how_to_continue():
            return saved
        command = trainer_command("--preset", self.files.config_toml, "--resume", paths["state"])
        return f"{saved}\nresume with: {command}"

    @torch.no_grad()
    def sample(self, tag: str) -> list[Path]:
        """Generate the sample prompts with the current model into ``samples/`` (main process only)."""
        from .sampling import generate_samples, read_prompt_file, sample_scheduler

        if not self.accelerator.is_main_process:
            return []
        config, model = self.config, self.model.base
        prompts = read_prompt_file(config.sample_prompts)
        for p in prompts:
            p.prompt = expand_token(p.prompt, config.token_string, config.num_vectors_per_token)
        pipe = model.pipeline(sample_scheduler(config.sample_sampler, model.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        size = self.items[0].bucket
        out = [self.files.sample_path(tag, i) for i in range(len(prompts))]
        if self.vae_offloaded:
            model.vae.to(self.accelerator.device)
        text_away = self.model.restore_text_encoders()
        try:
            with self.accelerator.autocast():
                generate_samples(pipe, prompts, size, config.sample_steps, out, encode=lambda texts: self.model.encode(
                    self.model.tokenize(texts).to(self.accelerator.device), pivot_grad=False))
        finally:
            if self.vae_offloaded:
                model.vae.to("cpu")
            if text_away:
                self.model.offload_text_encoders()
        return out
