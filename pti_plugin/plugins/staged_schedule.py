"""The built-in schedule: explicit stages, each with its own trainable set, optimizer and scheduler.

``inversion`` stages train the pivot vectors only (LoRA off until a LoRA stage has run).
``lora`` stages freeze the pivot (bit-identical through the stage unless ``train_pivot = true``:
continued inversion) and train the UNet LoRA, and the text-encoder LoRA when asked. Every value
comes from the resolved stage (``pti_plugin.resolution``); nothing is derived here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..hooks import Plugin, StagePlan, StageTrains, TrainerState
from ..lr_schedulers import build_lr_scheduler
from ..optimizers import build_optimizer
from ..resolution import ResolvedStage


class StagedSchedule(Plugin):
    """The default :class:`~pti_plugin.hooks.Schedule`."""

    name = "staged_schedule"

    @dataclass
    class Options:
        pass

    def trains(self, state: TrainerState, stage: ResolvedStage) -> StageTrains:
        """What ``stage`` trains, as resolved once in the configuration."""
        return StageTrains(pivot=stage.train_pivot, unet_lora=stage.train_unet, text_encoder_lora=stage.train_text_encoder)

    def plan_stage(self, state: TrainerState, stage: ResolvedStage) -> StagePlan:
        model = state.model
        params = {
            "pivot": model.pivot_parameters,
            "unet_lora": lambda: model.lora_parameters("unet"),
            "text_encoder_lora": lambda: model.lora_parameters("text_encoders"),
        }
        groups = []
        for name, lr in stage.groups():
            group = {"name": name, "params": params[name](), "lr": lr}
            if name == "pivot":
                group["weight_decay"] = stage.pivot_weight_decay
            groups.append(group)
        if not groups or not all(g["params"] for g in groups):
            raise ValueError(f"stage {stage.name!r} trains nothing (check train_pivot / train_unet / train_text_encoder)")
        if stage.steps is None:
            raise ValueError(f"stage {stage.name!r}: epochs not converted to steps (resolution.with_epoch_steps)")
        optimizer = build_optimizer(stage.optimizer_type, groups, stage.learning_rate, list(stage.optimizer_args))
        scheduler = build_lr_scheduler(stage, optimizer)
        return StagePlan(stage, stage.steps, groups, optimizer, scheduler, lora_enabled=stage.lora_enabled,
                         trains=self.trains(state, stage))
