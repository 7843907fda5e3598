"""The resolved stage plan: every stage's effective values, computed once from the preset.

Rules (the README's table under "Stages", of where each top-level key applies, says the same):

- A stage's own key wins. Top-level ``learning_rate``, ``optimizer_type``, ``optimizer_args``,
  ``lr_scheduler``, ``lr_warmup_steps`` and kohya's other schedule keys (``lr_scheduler_type``,
  ``lr_scheduler_args``, ``lr_decay_steps``, ``lr_scheduler_timescale``, ``lr_scheduler_min_lr_ratio``) are
  the defaults of every stage that does not set them.
- Length: a stage's own ``steps`` or ``max_train_epochs``, else the
  top-level ``max_train_epochs``, else the top-level ``max_train_steps`` (a stage setting both is refused). Epochs count passes over
  the dataset within the stage; they become steps once the dataset has been scanned (before any
  model loads, :func:`with_epoch_steps`).
- ``unet_lr`` / ``text_encoder_lr`` (kohya shorthands) set the UNet / text-encoder LoRA group of
  every lora stage that trains it and does not set its own; else that group takes the stage's
  ``learning_rate``. ``pivot_lr`` is a stage key (default: the stage's ``learning_rate``).
- ``network_train_unet_only`` is the default of every lora stage's ``train_text_encoder``, kohya's
  ``network_train_text_encoder_only`` of its ``train_unet`` (:data:`SWITCH_TARGETS`).
- The built-in stages (a preset without ``[[stages]]``) learn at ``DEFAULT_STAGE_LRS`` (inversion, lora)
  unless a top-level ``learning_rate`` is given, which then reaches both. One the command line or a kohya
  ``config_file`` gives (kohya's is the LoRA's rate) that reaches an inversion stage without a rate of its own is
  named in a warning (:func:`warn_rate_reaching_inversion`).
- ``max_train_epochs`` replaces ``max_train_steps`` where both reach a stage, with a warning naming both (kohya's
  "override steps").
- A stage's own rate or switch for a group it does not train is refused; the pivot's weight decay is the stage's
  ``optimizer_args``' ``weight_decay``, else ``pivot_weight_decay`` (:mod:`pti_plugin.stage_groups`).

A value the user gives (top-level preset key or command-line flag) that no stage uses is an error
naming the stage keys that shadow it and the ``--set`` command that would work.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from .config import DEFAULT_STAGE_LRS, Config, ConfigError, StageConfig, toml_literal
from .stage_groups import LORA_GROUPS, check_stage_keys, pivot_weight_decay, switch_commands, switch_text
from .tracking import hparam_value, logged_config

logger = logging.getLogger(__name__)

#: Top-level keys that are defaults of stage keys of the same name.
STAGE_DEFAULT_KEYS = ("learning_rate", "optimizer_type", "optimizer_args", "lr_scheduler", "lr_warmup_steps",
                      "lr_scheduler_type", "lr_scheduler_args", "lr_decay_steps", "lr_scheduler_timescale",
                      "lr_scheduler_min_lr_ratio")
#: Top-level keys that set stages' length.
LENGTH_KEYS = ("max_train_steps", "max_train_epochs")
#: kohya shorthands reaching the lora stages.
LORA_SHORTHANDS = ("unet_lr", "text_encoder_lr", "network_train_unet_only", "network_train_text_encoder_only")
#: kohya's "only" switches: the lora stage key each one is the (negated) default of.
SWITCH_TARGETS = {"network_train_unet_only": "train_text_encoder", "network_train_text_encoder_only": "train_unet"}


@dataclass(frozen=True)
class ResolvedStage:
    """One stage with every effective value; what the schedule plans, the log, the TOML and metadata read.

    ``steps`` is None only for an epoch-based stage before the dataset is scanned. A group's learning
    rate (``pivot_lr``, ``unet_lr``, ``text_encoder_lr``) is None when the stage does not train it.
    """

    index: int
    name: str
    kind: str
    steps: int | None
    max_train_epochs: int | None
    learning_rate: float
    optimizer_type: str
    optimizer_args: tuple[str, ...]
    lr_scheduler: str
    lr_warmup_steps: int  # kohya's ratio (a float) only in an epoch-based stage before the scan
    lr_scheduler_num_cycles: int
    lr_scheduler_power: float
    lr_scheduler_type: str
    lr_scheduler_args: tuple[str, ...]
    lr_decay_steps: int  # kohya's ratio (a float) only in an epoch-based stage before the scan
    lr_scheduler_timescale: int | None
    lr_scheduler_min_lr_ratio: float | None
    train_pivot: bool
    train_unet: bool
    train_text_encoder: bool
    pivot_lr: float | None
    unet_lr: float | None
    text_encoder_lr: float | None
    pivot_weight_decay: float  # the optimizer_args' weight_decay, else the top-level pivot_weight_decay
    lora_enabled: bool  # LoRA takes part in the forward pass (a lora stage ran at or before this one)

    @property
    def trains_text_encoder(self) -> bool:
        """Gradients flow through the text encoder (pivot or text-encoder LoRA trains)."""
        return self.train_pivot or self.train_text_encoder

    def groups(self) -> list[tuple[str, float]]:
        """(parameter group name, learning rate) of every group this stage trains, in optimizer order."""
        named = (("pivot", self.pivot_lr), ("unet_lora", self.unet_lr), ("text_encoder_lora", self.text_encoder_lr))
        return [(name, lr) for name, lr in named if lr is not None]

    def preset_entry(self) -> dict[str, Any]:
        """The stage as a ``[[stages]]`` table of effective values (the resolved TOML reloads to this stage)."""
        entry = {
            "name": self.name, "kind": self.kind, "steps": self.steps, "learning_rate": self.learning_rate,
            "optimizer_type": self.optimizer_type, "optimizer_args": list(self.optimizer_args),
            "lr_scheduler": self.lr_scheduler, "lr_warmup_steps": self.lr_warmup_steps, "train_pivot": self.train_pivot,
            "train_unet": self.train_unet, "train_text_encoder": self.train_text_encoder,
            "pivot_lr": self.pivot_lr, "unet_lr": self.unet_lr, "text_encoder_lr": self.text_encoder_lr,
        }
        if self.steps is None:
            entry["max_train_epochs"] = self.max_train_epochs
        entry |= {  # kohya's other schedule keys where set (left out, they reload as their defaults)
            "lr_scheduler_type": self.lr_scheduler_type or None, "lr_scheduler_args": list(self.lr_scheduler_args) or None,
            "lr_decay_steps": self.lr_decay_steps or None, "lr_scheduler_timescale": self.lr_scheduler_timescale,
            "lr_scheduler_min_lr_ratio": self.lr_scheduler_min_lr_ratio}
        return {k: v for k, v in entry.items() if v is not None}

    def describe(self) -> str:
        """The log line at stage start: ``key=value`` pairs of :meth:`preset_entry` (groups as ``<name>_lr``), and
        the pivot's weight decay where the stage trains it (not a stage key: :mod:`pti_plugin.stage_groups`)."""
        entry = self.preset_entry()
        fields = [f"{key}={entry[key]!r}" for key in entry if key not in ("name", "kind")]
        fields += [f"pivot_weight_decay={self.pivot_weight_decay!r}"] if self.train_pivot else []
        return f"stage {self.index} {self.name!r} ({self.kind}): " + " ".join(fields)


def _stage_dicts(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The preset's ``[[stages]]`` tables, or the built-in ones (without learning rates when the user gives one)."""
    if "stages" in raw:
        return raw["stages"]
    given_lr = "learning_rate" in raw
    return [{"name": kind, "kind": kind} | ({} if given_lr else {"learning_rate": lr}) for kind, lr in DEFAULT_STAGE_LRS.items()]


def default_stage_dicts(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The built-in stages as ``[[stages]]`` tables for the preset ``raw`` (which has none)."""
    return [dict(s) for s in _stage_dicts({k: v for k, v in raw.items() if k != "stages"})]


def _length(config: Config, stage: StageConfig, index: int) -> tuple[int | None, int | None]:
    """(steps, epochs) of ``stage``: exactly one is set."""
    if stage.max_train_epochs is not None and stage.steps is not None:
        raise ConfigError.at(f"stages.{index}.max_train_epochs", f": stages.{index} also sets steps; set one of the two")
    if stage.max_train_epochs is not None:
        return None, stage.max_train_epochs
    if stage.steps is not None:
        return stage.steps, None
    if config.max_train_epochs is not None:
        return None, config.max_train_epochs
    return config.max_train_steps, None


def resolve_stage(config: Config, stage: StageConfig, index: int, lora_seen: bool) -> ResolvedStage:
    def own_or_top(key: str) -> Any:
        value = getattr(stage, key)
        return getattr(config, key) if value is None else value

    is_lora = stage.kind == "lora"
    name = stage.name or f"{stage.kind}{index}"
    lr = own_or_top("learning_rate")
    train_pivot = stage.train_pivot if stage.train_pivot is not None else not is_lora
    train_unet = is_lora and (stage.train_unet if stage.train_unet is not None
                              else not config.network_train_text_encoder_only)
    train_te = is_lora and (stage.train_text_encoder if stage.train_text_encoder is not None
                            else not config.network_train_unet_only)
    if not (train_pivot or train_unet or train_te):
        implied = "".join(f" ({target} = false by {switch} = true)" for switch, target in SWITCH_TARGETS.items()
                          if is_lora and getattr(stage, target) is None and getattr(config, switch))
        raise ConfigError.at(f"stages.{index}.train_pivot", f": stage {name!r} trains nothing{implied}: set train_pivot, "
                             "train_unet or train_text_encoder")
    check_stage_keys(config, stage, index, name, {"train_pivot": train_pivot, "train_unet": train_unet,
                                                  "train_text_encoder": train_te})
    steps, epochs = _length(config, stage, index)
    warmup, decay = own_or_top("lr_warmup_steps"), own_or_top("lr_decay_steps")
    optimizer_args = tuple(own_or_top("optimizer_args"))
    return ResolvedStage(
        index=index, name=name, kind=stage.kind, steps=steps, max_train_epochs=epochs,
        learning_rate=lr, optimizer_type=own_or_top("optimizer_type"), optimizer_args=optimizer_args,
        lr_scheduler=own_or_top("lr_scheduler"), lr_warmup_steps=warmup if steps is None else warmup_steps(warmup, steps),
        lr_scheduler_num_cycles=config.lr_scheduler_num_cycles, lr_scheduler_power=config.lr_scheduler_power,
        lr_scheduler_type=own_or_top("lr_scheduler_type"), lr_scheduler_args=tuple(own_or_top("lr_scheduler_args")),
        lr_decay_steps=decay if steps is None else warmup_steps(decay, steps),
        lr_scheduler_timescale=own_or_top("lr_scheduler_timescale"),
        lr_scheduler_min_lr_ratio=own_or_top("lr_scheduler_min_lr_ratio"),
        train_pivot=train_pivot, train_unet=train_unet, train_text_encoder=train_te,
        pivot_lr=(stage.pivot_lr or lr) if train_pivot else None,
        unet_lr=(own_or_top("unet_lr") or lr) if train_unet else None,
        text_encoder_lr=(own_or_top("text_encoder_lr") or lr) if train_te else None,
        pivot_weight_decay=pivot_weight_decay(config, stage, index, name, optimizer_args, train_pivot),
        lora_enabled=lora_seen or is_lora,
    )


def resolve_stages(config: Config) -> tuple[ResolvedStage, ...]:
    """Every stage of ``config`` (whose ``stages`` are the preset's StageConfig tables) resolved."""
    resolved, lora_seen = [], False
    for index, stage in enumerate(config.stages):
        resolved.append(resolve_stage(config, stage, index, lora_seen))
        lora_seen = lora_seen or stage.kind == "lora"
    names = [s.name for s in resolved]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError.at(f"stages.{index}.name", f": two stages are named {name!r}")
    return tuple(resolved)


def warmup_steps(value: int | float, steps: int) -> int:
    """kohya's ``lr_warmup_steps`` (and ``lr_decay_steps``): whole steps, or a float below 1 as that fraction of the
    stage's ``steps``."""
    return int(value * steps) if isinstance(value, float) else value


def with_length(stage: ResolvedStage, steps: int) -> ResolvedStage:
    """``stage`` ``steps`` long, its warm-up and decay (kohya's ratios, :func:`warmup_steps`) in whole steps of it."""
    return dataclasses.replace(stage, steps=steps, lr_warmup_steps=warmup_steps(stage.lr_warmup_steps, steps),
                               lr_decay_steps=warmup_steps(stage.lr_decay_steps, steps))


def with_epoch_steps(config: Config, steps_per_epoch: int) -> Config:
    """``config`` with every epoch-based stage's length in steps (``steps_per_epoch`` optimizer steps per pass),
    its warm-up and decay ratios in steps (a schedule that does not fit those steps is refused, naming the stage),
    and a warning for each stage whose warm-up outlasts it (the stage never reaches its learning rate), and for
    each save or sample interval only the scan tells to be longer than the run (:func:`warn_unreached_intervals`)."""
    from .lr_schedulers import schedule_problem

    warn_unreached_intervals(config, steps_per_epoch)
    stages = []
    for s in config.stages:
        if s.steps is None:
            s = with_length(s, s.max_train_epochs * steps_per_epoch)
            if problem := schedule_problem(s):
                raise ConfigError(f"key {problem[0]!r}{problem[1]} ({s.max_train_epochs} epoch(s) of "
                                  f"{steps_per_epoch} step(s))", problem[0])
        if s.lr_warmup_steps >= s.steps:
            logger.warning("stage %d %r: lr_warmup_steps = %d is not below its %d steps, so its learning rate never "
                           "reaches %g", s.index, s.name, s.lr_warmup_steps, s.steps, s.learning_rate)
        stages.append(s)
    return dataclasses.replace(config, stages=tuple(stages))


def _unreached_intervals(config: Config, steps_per_epoch: int | None) -> dict[str, str | None]:
    """For each save or sample interval that is set: the warning when it is longer than the run, so that it never
    fires before the end ("" when it fires), or None when that cannot be told yet (a stage's length in steps or
    epochs that needs ``steps_per_epoch``, known after the data scan). ``config``: stages not yet in steps."""
    per_epoch = steps_per_epoch
    steps = [s.steps if s.steps is not None else s.max_train_epochs * per_epoch if per_epoch else None
             for s in config.stages]
    epochs = [s.max_train_epochs if s.steps is None else s.steps // per_epoch if per_epoch else None
              for s in config.stages]  # full passes within the stage: save_every_n_epochs counts them per stage
    passes = [s.max_train_epochs if s.steps is None else -(-s.steps // per_epoch) if per_epoch else None
              for s in config.stages]  # with a last partial one: sample_every_n_epochs samples at its end too
    total = None if None in steps else sum(steps)
    longest = None if None in epochs else max(epochs)
    most = None if None in passes else max(passes)
    saves, samples = ("nothing is saved before the final save", "save"), ("no sample is drawn during training", "sample")
    checks = [("save_every_n_steps", total, f"the run's {total} step(s)", saves),
              ("save_every_n_epochs", longest, f"the {longest} epoch(s) of the longest stage (epochs are counted "
               "within each stage" + (f", {per_epoch} step(s) each)" if per_epoch else ")"), saves)]
    if config.sample_prompts and config.sample_every_n_epochs:  # it replaces sample_every_n_steps (as kohya)
        checks.append(("sample_every_n_epochs", most, f"the {most} epoch(s) of the longest stage (epochs are counted "
                       "within each stage, its last one partial or not)", samples))
    elif config.sample_prompts:
        checks.append(("sample_every_n_steps", total, f"the run's {total} step(s)", samples))
    problems: dict[str, str | None] = {}
    for key, length, run, (outcome, verb) in checks:
        value = getattr(config, key)
        if value and not (key == "save_every_n_epochs" and config.save_n_epoch_ratio):  # the ratio replaces it
            problems[key] = None if length is None else "" if value <= length else (
                f"{key} = {value} is more than {run}: {outcome}; lower it to {verb} in between")
    if longest == 0 and problems.get("save_every_n_epochs"):  # no stage reaches the end of its first epoch
        problems["save_every_n_epochs"] = (
            f"save_every_n_epochs = {config.save_every_n_epochs}: every stage ends before its first epoch ends "
            f"({per_epoch} step(s) each): no epoch save, nothing is saved before the final save; save_every_n_steps "
            "saves in between")
    return problems


def warn_unreached_intervals(config: Config, steps_per_epoch: int | None = None) -> None:
    """A warning for each of ``save_every_n_steps``, ``save_every_n_epochs`` and ``sample_every_n_steps`` or
    ``sample_every_n_epochs`` (with ``sample_prompts``) that is longer than the run, once, where the run's length is first known: when the config
    is built (``steps_per_epoch`` None) for step-based stages, after the data scan (:func:`with_epoch_steps`) for
    the rest. A warning, not an error: kohya says nothing, and such a run trains and saves at its end. When the
    config is built, also the save and sample keys that do nothing here (:func:`_warn_idle_save_keys`)."""
    told = _unreached_intervals(config, None) if steps_per_epoch else {}
    for key, problem in _unreached_intervals(config, steps_per_epoch).items():
        if problem and told.get(key) is None:
            logger.warning("%s", problem)
    if not steps_per_epoch:  # once: when the config is built
        _warn_idle_save_keys(config)


def _warn_idle_save_keys(config: Config) -> None:
    """A warning naming both keys for kohya's ``save_last_n_*`` without the saves they prune (``save_last_n_steps``:
    ``save_every_n_steps``'s; ``save_last_n_epochs``: ``save_every_n_epochs``' or ``save_n_epoch_ratio``'s; the
    ``_state`` forms: also ``save_state``'s states), and for ``sample_every_n_epochs`` replacing
    ``sample_every_n_steps``. kohya says nothing of either."""
    saves = {"steps": ("save_every_n_steps", config.save_every_n_steps),
             "epochs": ("save_every_n_epochs or save_n_epoch_ratio", config.save_every_n_epochs or config.save_n_epoch_ratio)}
    for unit, (schedule, scheduled) in saves.items():
        for key in (f"save_last_n_{unit}", f"save_last_n_{unit}_state"):
            value, needs = getattr(config, key), None if scheduled else (schedule, f"{unit[:-1]} saves")
            if value and not needs and key.endswith("_state") and not config.save_state:
                needs = ("save_state", "intermediate states")
            if value and needs:
                logger.warning("%s = %d does nothing without %s: there are no %s for it to delete (kohya ignores it "
                               "too)", key, value, *needs)
    if config.sample_every_n_epochs and config.sample_every_n_steps:
        logger.warning("sample_every_n_epochs = %d replaces sample_every_n_steps = %d (as in kohya): samples are drawn "
                       "at the end of every %d-th epoch of each stage only", config.sample_every_n_epochs,
                       config.sample_every_n_steps, config.sample_every_n_epochs)


# ----------------------------------------------------------------------------- unused values

def _group_rates(config: Config, stage: StageConfig, resolved: ResolvedStage) -> list[tuple[str, str]] | None:
    """``(group rate key, where it is set)`` for every group ``stage`` trains when each has its own rate
    (``pivot_lr``, ``unet_lr``, ``text_encoder_lr``, the stage's or the top level's), so the stage's
    ``learning_rate`` reaches no group; None when one group takes ``learning_rate``."""
    found = []
    for trains, key in ((resolved.train_pivot, "pivot_lr"), (resolved.train_unet, "unet_lr"),
                        (resolved.train_text_encoder, "text_encoder_lr")):
        own, top = getattr(stage, key), getattr(config, key, None)
        if trains and own is None and top is None:
            return None
        if trains:
            found.append((key, f"stages.{resolved.index}.{key} = {own!r}" if own is not None else f"{key} = {top!r}"))
    return found or None


@dataclass(frozen=True)
class _Unused:
    """Why a stage does not use a top-level value: ``text``, as the messages name it; ``by_epochs``: the top-level
    ``max_train_epochs`` overrides it (``max_train_steps``), as in kohya, which is a warning rather than a refusal."""

    text: str
    by_epochs: bool = False


def _why_unused(config: Config, key: str, stage: StageConfig, resolved: ResolvedStage, typed: bool = False) -> _Unused | None:
    """Why ``stage`` does not use the top-level ``key`` (None when it does). ``typed`` (a value the command line
    gave): a ``learning_rate`` that every group's own rate replaces counts as unused too (a preset may well set
    ``learning_rate`` beside ``unet_lr`` and ``text_encoder_lr``, as kohya configs do)."""
    where = f"stages.{resolved.index}"
    if key in STAGE_DEFAULT_KEYS:
        if getattr(stage, key) is not None:
            return _Unused(f"{where}.{key} = {getattr(stage, key)!r}")
        rates = _group_rates(config, stage, resolved) if key == "learning_rate" and typed else None
        return None if rates is None else _Unused(f"{where}'s groups take {', '.join(text for _, text in rates)}")
    if key in LENGTH_KEYS:
        for own in ("max_train_epochs", "steps"):
            if getattr(stage, own) is not None:
                return _Unused(f"{where}.{own} = {getattr(stage, own)!r}")
        if key == "max_train_steps" and config.max_train_epochs is not None:
            return _Unused(f"{where} follows max_train_epochs = {config.max_train_epochs!r}", by_epochs=True)
        return None
    if stage.kind != "lora":
        return _Unused(f"{where} ({resolved.name!r}) is an inversion stage")
    group = {"unet_lr": ("unet_lr", resolved.train_unet, "train_unet"),
             "text_encoder_lr": ("text_encoder_lr", resolved.train_text_encoder, "train_text_encoder"),
             **{switch: (target, True, "") for switch, target in SWITCH_TARGETS.items()}}[key]
    own, trains, switch = group
    if not trains:
        return _Unused(switch_text(stage, resolved.index, own))
    return None if getattr(stage, own) is None else _Unused(f"{where}.{own} = {getattr(stage, own)!r}")


def check_given_values_are_used(config: Config, raw_stages: list[StageConfig], given: dict[str, str]) -> None:
    """Raise ConfigError for a given top-level value (``given``: key -> where it came from) that no stage uses; one a
    kohya ``config_file`` gave (``"config_file <path>"``) is a warning instead, saying what kohya would do with it
    (:func:`_what_kohya_does`; its GUI writes ``text_encoder_lr`` beside ``network_train_unet_only = true``)."""
    for key, source in given.items():
        if key.startswith("stages."):
            _check_stage_rate_is_used(config, raw_stages, key, source)
            continue
        if key not in STAGE_DEFAULT_KEYS + LENGTH_KEYS + LORA_SHORTHANDS:
            continue
        reasons = [_why_unused(config, key, stage, resolved, typed=source in ("command line", "--set"))
                   for stage, resolved in zip(raw_stages, config.stages)]
        if any(reason is None for reason in reasons):
            continue
        kohya_rate = key == "learning_rate" and source.startswith("config_file")  # kohya's is the LoRA's, never the pivot's
        value, commands = getattr(config, key), " or ".join(_hints(config, raw_stages, key, lora_only=kohya_rate))
        overridden = any(reason.by_epochs for reason in reasons)
        why = "; ".join(reason.text for reason in reasons)
        lead = f"To give a stage {value} steps instead" if overridden else "To change a stage"
        hint = (f" {lead}, use {commands}." if commands else " No lora stage can use it." if kohya_rate
                else " No stage can use it: remove it.")
        if overridden:  # kohya: max_train_epochs overrides max_train_steps
            logger.warning("max_train_epochs = %d (%s) replaces max_train_steps = %d (%s), as in kohya (\"override "
                           "steps\"): %s.%s", config.max_train_epochs, given.get("max_train_epochs", "preset"), value,
                           source, why, hint)
            continue
        message = f"{key} = {toml_literal(value)} ({source}) is used by no stage: " + why + "."
        if not source.startswith("config_file"):
            raise ConfigError(message + hint)
        logger.warning("%s %s; the run goes on without it.%s", message, _what_kohya_does(config, raw_stages, key, given),
                       hint)


def _hints(config: Config, raw_stages: list[StageConfig], key: str, lora_only: bool = False) -> list[str]:
    """The commands that make a stage use the top-level ``key``'s value, in stage order (none: no stage can). For
    ``learning_rate`` (kohya's LoRA rate) the lora stages' come first, then kohya's ``--unet_lr``/``--text_encoder_lr``
    where a lora stage would take them, then the inversion stages' (none with ``lora_only``: a kohya file's rate). A
    LoRA rate whose lora stage does not train its group names the switch that trains it (a ``--set`` of the stage's
    rate would be refused: ``stage_groups``)."""
    value = getattr(config, key)
    target = ({"max_train_steps": "steps"} | SWITCH_TARGETS).get(key, key)
    value_text = str(not value).lower() if key in SWITCH_TARGETS else toml_literal(value)
    lora_only = lora_only or target in ("unet_lr", "text_encoder_lr", *SWITCH_TARGETS.values())
    stages, lora, other = list(zip(config.stages, raw_stages)), [], []
    for s, raw in stages:
        label = f"{s.kind} stage {s.name!r}"
        if ((lora_only and s.kind != "lora") or (target == "steps" and raw.max_train_epochs is not None)
                or (target == "learning_rate" and _group_rates(config, raw, s))):
            continue
        if key in LORA_GROUPS and not getattr(s, LORA_GROUPS[key][0]):
            command = " or ".join(switch_commands(raw, s.index, key)) + f" ({label} then trains its {LORA_GROUPS[key][2]} at it)"
        else:
            command = f"--set stages.{s.index}.{target}={value_text} ({label})"
        (lora if s.kind == "lora" or key != "learning_rate" else other).append(command)
    if key != "learning_rate":
        return lora
    rates = [rate for rate, (switch, _, _) in LORA_GROUPS.items() if getattr(config, rate) is None and any(
        s.kind == "lora" and getattr(s, switch) and getattr(raw, rate) is None for s, raw in stages)]
    kohya = [" ".join(f"--{rate} {value_text}" for rate in rates) + " in place of learning_rate (kohya's LoRA "
             "rates; the inversion keeps its own)"] if rates else []
    return lora + kohya + other


def warn_rate_reaching_inversion(config: Config, raw_stages: list[StageConfig], given: dict[str, str]) -> None:
    """Once, at start-up: a warning when a top-level ``learning_rate`` that the command line (a flag or a ``--set``) or
    a kohya ``config_file`` gave (``given``: key -> where from) reaches an inversion stage that sets neither
    ``learning_rate`` nor ``pivot_lr`` (a built-in one, or a preset's): it replaces the inversion default
    (``DEFAULT_STAGE_LRS``) there, while in kohya it is the LoRA's rate. It names the ``--set`` that keeps the default; a stage rate of the user's own (that
    ``--set``, or the preset stage's) is what the user meant: that stage is left out. A preset's top-level
    ``learning_rate`` is the preset's design (the README says where it reaches): no warning."""
    source, default = given.get("learning_rate", ""), DEFAULT_STAGE_LRS["inversion"]
    if not (source in ("command line", "--set") or source.startswith("config_file")) or config.learning_rate == default:
        return
    reached = [s for s, raw in zip(config.stages, raw_stages)
               if s.kind == "inversion" and raw.learning_rate is None and raw.pivot_lr is None]
    if not reached:
        return
    several = len(reached) > 1
    stages = ("stages " if several else "stage ") + " and ".join(f"stages.{s.index} ({s.name!r})" for s in reached)
    commands = " ".join(f"--set stages.{s.index}.learning_rate={toml_literal(default)}" for s in reached)
    logger.warning("learning_rate = %s (%s) is also the rate of the inversion %s, which set%s no learning_rate "
                   "of %s own: %s pivot learns at it instead of the inversion default %s. Here a top-level "
                   "learning_rate is the default of every stage; in kohya it is the LoRA's rate (and a lower rate "
                   "slows the inversion). To keep %s for the inversion, add %s (a stage rate of your own, set that "
                   "way, also silences this warning).", toml_literal(config.learning_rate), source, stages,
                   "" if several else "s", "their" if several else "its", "their" if several else "its",
                   toml_literal(default), toml_literal(default), commands)


_GROUP_WORDS = {"pivot": "the pivot", "unet_lora": "its UNet LoRA", "text_encoder_lora": "its text-encoder LoRA"}


def _what_kohya_does(config: Config, raw_stages: list[StageConfig], key: str, given: dict[str, str]) -> str:
    """What kohya's ``train_network.py`` would do with a kohya config file's ``key`` that no stage uses, and what the
    (last) lora stage does here instead. kohya sees what the file and the command line give (not the preset's
    values; its switches default to false). It ignores only a LoRA rate whose module its "only" switch leaves out,
    and a ``learning_rate`` that each LoRA module's own rate replaces (``networks/lora.py``
    ``prepare_optimizer_params``: ``learning_rate`` is the default rate); every other key shapes its one run
    (``max_train_steps``: its length)."""
    in_kohya = lambda k: given.get(k, "preset") != "preset"
    off = lambda rate: in_kohya(LORA_GROUPS[rate][1]) and bool(getattr(config, LORA_GROUPS[rate][1]))
    value, lora = toml_literal(getattr(config, key)), metadata_lora_stage(config)
    if key in LENGTH_KEYS:
        lengths = ", ".join(f"{s.name!r} {s.steps} steps" if s.steps is not None else f"{s.name!r} {s.max_train_epochs} "
                            "epochs" for s in config.stages)
        return (f"kohya would train {value} {'steps' if key == 'max_train_steps' else 'epochs'} in all; here each "
                f"stage runs its own length ({lengths})")
    here = "here no stage trains a LoRA" if lora is None else f"here stage {lora.name!r} trains " + ", ".join(
        f"{_GROUP_WORDS[group]} at {rate:g}" for group, rate in lora.groups())
    if key == "learning_rate":
        takes = [LORA_GROUPS[rate][2] for rate in LORA_GROUPS if not off(rate) and not in_kohya(rate)]
        if not takes:
            return (f"kohya trains no LoRA module at it either (each has its own rate), it only records it as "
                    f"ss_learning_rate; {here}")
        return f"kohya would train the {' and '.join(takes)} at {value} (learning_rate is its default LoRA rate); {here}"
    if key in LORA_GROUPS:
        _, only, group = LORA_GROUPS[key]
        if off(key):
            return f"kohya ignores it too ({only} = true: it trains no {group})"
        if key == "text_encoder_lr" and not in_kohya(only):  # kohya's default trains one, ours does not
            own_switch = lora is not None and raw_stages[lora.index].train_text_encoder is not None
            return ("kohya would train a text-encoder LoRA at this rate, its network_train_unet_only defaulting to "
                    "false; pti-plugin's defaults to true" + ("" if own_switch else ": add network_train_unet_only = "
                                                               "false to the file to train one") + f"; {here}")
        return f"kohya would train a {group} at this rate; {here}"
    if key in SWITCH_TARGETS:
        group = next(group for _, only, group in LORA_GROUPS.values() if only == key)
        return f"kohya would train {'no' if getattr(config, key) else 'a'} {group}; {here}"
    used = "no stage trains a LoRA" if lora is None else f"stage {lora.name!r} uses {key} = {toml_literal(getattr(lora, key))}"
    return f"kohya would train the LoRA with it; here {used}"


def _check_stage_rate_is_used(config: Config, raw_stages: list[StageConfig], path: str, source: str) -> None:
    """``path`` = ``stages.N.learning_rate`` given by ``source`` (``--set``): refused when every group stage N trains
    has its own rate (the value would change nothing), naming them and the ``--set`` that would."""
    index = int(path.split(".")[1])
    stage, resolved = raw_stages[index], config.stages[index]
    rates = _group_rates(config, stage, resolved)
    if rates:
        value = toml_literal(stage.learning_rate)
        commands = " or ".join(f"--set stages.{index}.{key}={value}" for key, _ in rates)
        raise ConfigError(f"{path} = {value} ({source}) reaches no parameter group of stages.{index} "
                          f"({resolved.name!r}): its groups take {', '.join(text for _, text in rates)}. "
                          f"To change them, use {commands}.")


# ----------------------------------------------------------------------------- consumers

def resolved_dict(config: Config) -> dict[str, Any]:
    """The resolved preset written beside the outputs: every key with its effective value.

    The stage defaults live in the stages (the top-level keys that only reach stages are left out),
    so the file reloads as a preset (resume) that trains the same stages. ``output_dir``,
    ``logging_dir`` and the files ``log_tracker_config`` and ``metadata_thumbnail`` are absolute, so that
    a resume started from another working directory writes into the same folders and reads the same files.
    """
    from pathlib import Path

    data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for key in ("output_dir", "logging_dir", "log_tracker_config", "metadata_thumbnail"):
        if data.get(key) and not (key == "metadata_thumbnail" and data[key].startswith("data:")):  # a data URL as given
            data[key] = str(Path(data[key]).expanduser().resolve())
    # resume: the file is the run's preset; which state it continues from is the resume command's --resume
    for key in ("extends", "config_file", "resume") + STAGE_DEFAULT_KEYS + LENGTH_KEYS + LORA_SHORTHANDS:
        data.pop(key)
    data["stages"] = [s.preset_entry() for s in config.stages]
    return {k: v for k, v in data.items() if v is not None}


def metadata_lora_stage(config: Config) -> ResolvedStage | None:
    """The stage whose values kohya's single-stage ``ss_*`` keys hold (learning rates, steps, epochs): the last lora
    stage, None without one."""
    return next((s for s in reversed(config.stages) if s.kind == "lora"), None)


def training_metadata(config: Config) -> dict[str, str]:
    """kohya's ``ss_*`` training keys from the (last) lora stage and ``pti_inversion_*`` from the first inversion stage.
    ``ss_unet_lr``/``ss_text_encoder_lr`` of a LoRA the stage does not train read ``"None"`` (kohya's unset value)."""
    meta: dict[str, str] = {}
    inversion = next((s for s in config.stages if s.kind == "inversion"), None)
    for prefix, kind, stage in (("ss_", "lora", metadata_lora_stage(config)), ("pti_inversion_", "inversion", inversion)):
        if stage is None:
            continue
        optimizer = stage.optimizer_type + (f"({','.join(stage.optimizer_args)})" if stage.optimizer_args else "")
        meta |= {f"{prefix}learning_rate": str(stage.learning_rate), f"{prefix}max_train_steps": str(stage.steps),
                 f"{prefix}lr_scheduler": stage.lr_scheduler, f"{prefix}lr_warmup_steps": str(stage.lr_warmup_steps),
                 f"{prefix}optimizer": optimizer}
        if kind == "lora":
            meta["ss_network_train_unet_only"] = str(not stage.train_text_encoder)
            for key in ("unet_lr", "text_encoder_lr"):
                meta[f"ss_{key}"] = str(getattr(stage, key))
        else:
            meta["pti_inversion_pivot_lr"] = str(stage.pivot_lr)
            meta["pti_inversion_pivot_weight_decay"] = str(stage.pivot_weight_decay)
    return meta


def tracker_hparams(config: Config) -> dict[str, Any]:
    """Scalar hyperparameters of every stage for TensorBoard (``stages.<i>.<key>``), and with kohya's ``log_config``
    the top-level settings (:func:`pti_plugin.tracking.logged_config`)."""
    return {f"stages.{s.index}.{k}": hparam_value(v)
            for s in config.stages for k, v in s.preset_entry().items()} | logged_config(config, resolved_dict(config))
