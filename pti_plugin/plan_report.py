"""What each stage's plan is, as the run states it: the check of the schedule's plan, each stage's start-up line, and
the saved LoRA's training metadata when the schedule is not the built-in one.

The built-in ``staged_schedule`` plans each stage as the preset resolves it, so its stage line is the preset's stage
(``ResolvedStage.describe``) and its LoRA's training keys are the preset's stages' (``resolution.training_metadata``).
Another schedule may train other groups, at other rates, for other steps: its stage line states its plan, and the
LoRA's ``ss_*``/``pti_inversion_*`` training keys come from the plans it made (:func:`schedule_training_metadata`),
with every plan in ``pti_schedule``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .hooks import StagePlan, TrainerState, schedule_of, trainer_progress
from .plugin_calls import PluginError

#: What a parameter group may hold, in the order the built-in schedule plans them.
HOLDS = ("pivot", "unet_lora", "text_encoder_lora")


class PlanError(PluginError):
    """A schedule plugin's plan the trainer cannot run (a group without a name, ...), found as the trainer takes it: an
    error of its ``plan_stage`` (the trainer saves the last finished step); the message names the schedule."""

    def __init__(self, message: str, schedule: str):
        super().__init__(message, schedule, "plan_stage")


def is_builtin(schedule: Any) -> bool:
    """Whether ``schedule`` is the built-in ``staged_schedule`` (a subclass may plan otherwise: it is not)."""
    from .plugins.staged_schedule import StagedSchedule

    return type(schedule) is StagedSchedule


def start_plan(state: TrainerState, plan: StagePlan) -> None:
    """Check the schedule's ``plan`` of the current stage, make it the state's plan and record it (:func:`summary`).
    A plan the trainer cannot run is refused with a :class:`PlanError` naming the schedule and the stage."""
    name = state.schedule.name
    where = f"schedule plugin {name!r}: its plan of stage {state.stage_index} ({state.stage.name!r})"
    if not isinstance(plan, StagePlan):
        raise PlanError(f"{where} is a {type(plan).__name__}, not a pti_plugin.hooks.StagePlan", name)
    if isinstance(plan.steps, bool) or not isinstance(plan.steps, int) or plan.steps < 0:
        raise PlanError(f"{where}: steps is {plan.steps!r}, not a whole number >= 0", name)
    names = []
    for i, group in enumerate(plan.param_groups):
        group_name = group.get("name") if isinstance(group, dict) else None
        if not isinstance(group_name, str) or not group_name:
            raise PlanError(f"{where}: param_groups[{i}] has no \"name\" (a non-empty string): each parameter group "
                            "needs one, unique in the plan; it names the group's lr/<name> log and its place in a "
                            "saved state (the built-in names: pivot, unet_lora, text_encoder_lora)", name)
        names.append(group_name)
    if len(set(names)) < len(names):
        raise PlanError(f"{where}: two parameter groups share a name ({names}); each needs its own", name)
    progress = trainer_progress(state)
    progress.plan = plan
    progress.plans[state.stage_index] = summary(state, plan)


def _number(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def summary(state: TrainerState, plan: StagePlan) -> dict[str, Any]:
    """The plan of the current stage as JSON values: its steps, what trains, the optimizer's and scheduler's classes,
    and each group's name, learning rate (as planned, before the scheduler's first factor), size and what it holds
    (of :data:`HOLDS`, by its tensors)."""
    model = state.model
    kinds = {id(p): kind for kind, params in zip(HOLDS, (model.pivot_parameters(), model.lora_parameters("unet"),
                                                          model.lora_parameters("text_encoders"))) for p in params}
    groups = []
    for group in plan.param_groups:
        holds = {kinds.get(id(p), "other") for p in group["params"]}
        groups.append({"name": group["name"], "lr": _number(group.get("initial_lr", group["lr"])),
                       "params": sum(p.numel() for p in group["params"]),
                       "holds": [k for k in (*HOLDS, "other") if k in holds]})
    trains = plan.trains
    return {"stage": state.stage_index, "name": state.stage.name, "steps": plan.steps, "lora_enabled": plan.lora_enabled,
            "trains": {"pivot": trains.pivot, "unet_lora": trains.unet_lora, "text_encoder_lora": trains.text_encoder_lora},
            "optimizer": type(plan.optimizer).__name__, "lr_scheduler": type(plan.lr_scheduler).__name__,
            "learning_rate": _optimizer_lr(plan), "groups": groups}


def _optimizer_lr(plan: StagePlan) -> float | None:
    """The optimizer's own learning rate (the default of its groups: kohya's ``learning_rate``), when it has one."""
    lr = getattr(plan.optimizer, "defaults", {}).get("lr")
    try:
        return _number(lr) if lr is not None and math.isfinite(_number(lr)) else None
    except (TypeError, ValueError):
        return None


def stage_banner(state: TrainerState, plan: StagePlan) -> str:
    """The line each stage starts with: the preset's stage and its groups' sizes for the built-in schedule; for
    another, the plan it made (steps, what trains, optimizer, each group's learning rate), which is what runs."""
    stage = state.stage
    if is_builtin(state.schedule):
        return stage.describe() + " | params " + ", ".join(
            f"{g['name']} {sum(p.numel() for p in g['params'])}" for g in plan.param_groups)
    record = trainer_progress(state).plans[state.stage_index]
    trains = [k for k, v in record["trains"].items() if v]
    return (f"stage {stage.index} {stage.name!r} ({stage.kind}) as schedule {state.schedule.name!r} plans it: "
            f"steps={plan.steps} trains={trains} lora_enabled={plan.lora_enabled} optimizer={record['optimizer']!r} "
            f"lr_scheduler={record['lr_scheduler']!r} | params " + ", ".join(
                f"{g['name']} {g['params']} lr={g['lr']!r}" for g in record["groups"]))


def _group_lr(record: dict[str, Any], holds: str) -> str:
    """The learning rate of the record's first group holding ``holds`` (kohya's "None" when no group does)."""
    return next((str(g["lr"]) for g in record["groups"] if holds in g["holds"]), "None")


def schedule_training_metadata(state: TrainerState) -> dict[str, str] | None:
    """The LoRA's training keys from the plans a schedule other than the built-in made (None for the built-in:
    the preset's stages' keys stand). ``pti_schedule``: the schedule's name and each stage planned in this
    process; kohya's ``ss_*`` keys from the last plan that trained a LoRA, ``pti_inversion_*`` from the first
    that trained the pivot. The warmup keys are left out (the schedule's scheduler is its own)."""
    if is_builtin(state.schedule):
        return None
    plans = trainer_progress(state).plans
    records = [plans[i] for i in sorted(plans)]
    meta = {"pti_schedule": json.dumps({"name": state.schedule.name, "stages": records})}
    lora = [r for r in records if r["trains"]["unet_lora"] or r["trains"]["text_encoder_lora"]]
    inversion = [r for r in records if r["trains"]["pivot"]]
    for prefix, record in (("ss_", lora[-1] if lora else None), ("pti_inversion_", inversion[0] if inversion else None)):
        if record is None:
            continue
        first = next((g["lr"] for g in record["groups"]), None)
        rate = record["learning_rate"] if record["learning_rate"] is not None else first
        meta |= {f"{prefix}learning_rate": str(rate), f"{prefix}max_train_steps": str(record["steps"]),
                 f"{prefix}lr_scheduler": record["lr_scheduler"], f"{prefix}optimizer": record["optimizer"]}
        if prefix == "ss_":
            meta |= {"ss_network_train_unet_only": str(not record["trains"]["text_encoder_lora"]),
                     "ss_unet_lr": _group_lr(record, "unet_lora"), "ss_text_encoder_lr": _group_lr(record, "text_encoder_lora")}
        else:
            meta["pti_inversion_pivot_lr"] = _group_lr(record, "pivot")
    return meta


def sweep_schedule_warning(config, stage: str) -> str | None:
    """A warning for a learning-rate sweep of ``stage`` whose runs ``config`` plans with a schedule other than the
    built-in one: the sweep sets the stage's learning rates, which reach training only as that schedule reads them."""
    from .hooks import instantiate_plugins

    schedule = schedule_of(instantiate_plugins(config))
    if is_builtin(schedule):
        return None
    keys = "learning_rate" + (", unet_lr" if stage == "lora" else "")
    return (f"the preset's schedule is plugin {schedule.name!r}, not staged_schedule: the sweep sets each run's "
            f"{stage} stage {keys}, which reach training only if {schedule.name!r}'s plan_stage reads them; check "
            "each run's stage line (it states the learning rates that trained) or sweep that plugin's own option")
