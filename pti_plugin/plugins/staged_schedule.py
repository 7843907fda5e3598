"""The built-in schedule: explicit stages, each with its own trainable set, optimizer and scheduler.

``inversion`` stages train the pivot vectors only (LoRA off until a LoRA stage has run).
``lora`` stages freeze the pivot (bit-identical through the stage unless ``train_pivot = true``:
continued inversion) and train the UNet LoRA, and the text-encoder LoRA when asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import StageConfig, stage_value
from ..hooks import Plugin, StagePlan, StageTrains, TrainerState
from ..optimizers import build_lr_scheduler, build_optimizer


class StagedSchedule(Plugin):
    """The default :class:`~pti_plugin.hooks.Schedule`."""

    name = "staged_schedule"

    @dataclass
    class Options:
        pass

    def trains(self, state: TrainerState, stage: StageConfig) -> StageTrains:
        config = state.config
        is_lora = stage.kind == "lora"
        return StageTrains(
            pivot=stage.train_pivot if stage.train_pivot is not None else not is_lora,
            unet_lora=is_lora and (stage.train_unet if stage.train_unet is not None else True),
            text_encoder_lora=is_lora and (
                stage.train_text_encoder if stage.train_text_encoder is not None else not config.network_train_unet_only
            ),
        )

    def plan_stage(self, state: TrainerState, stage: StageConfig) -> StagePlan:
        config, model = state.config, state.model
        lr = stage_value(config, stage, "learning_rate")
        trains = self.trains(state, stage)
        groups = []
        if trains.pivot:
            groups.append({"name": "pivot", "params": model.pivot_parameters(), "lr": stage.pivot_lr or lr,
                           "weight_decay": config.pivot_weight_decay})
        if trains.unet_lora:
            groups.append({"name": "unet_lora", "params": model.lora_parameters("unet"),
                           "lr": stage_value(config, stage, "unet_lr") or lr})
        if trains.text_encoder_lora:
            groups.append({"name": "text_encoder_lora", "params": model.lora_parameters("text_encoders"),
                           "lr": stage_value(config, stage, "text_encoder_lr") or lr})
        if not groups or not all(g["params"] for g in groups):
            raise ValueError(f"stage {stage.name!r} trains nothing (check train_pivot / train_unet / train_text_encoder)")
        epochs = stage_value(config, stage, "max_train_epochs")
        steps = epochs * state.steps_per_epoch if epochs else (stage.steps if stage.steps is not None else config.max_train_steps)
        optimizer = build_optimizer(
            stage_value(config, stage, "optimizer_type"), groups, lr, stage_value(config, stage, "optimizer_args")
        )
        scheduler = build_lr_scheduler(
            stage_value(config, stage, "lr_scheduler"), optimizer, stage_value(config, stage, "lr_warmup_steps"),
            steps, config.lr_scheduler_num_cycles, config.lr_scheduler_power,
        )
        lora_seen = any(s.kind == "lora" for s in config.stages[: state.stage_index + 1])
        return StagePlan(stage, steps, groups, optimizer, scheduler, lora_enabled=lora_seen, trains=trains)
