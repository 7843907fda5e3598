"""Learning-rate schedules with kohya's meaning (sd-scripts ``get_scheduler_fix``).

A stage's schedule is either ``lr_scheduler``, a schedule by kohya name (diffusers' or transformers' function of
that name, given the stage's settings as kohya gives them), or ``lr_scheduler_type``, a class of
``torch.optim.lr_scheduler`` by bare name (kohya also imports a class from any module a dotted path names: refused
here, a preset does not choose code to run). ``lr_scheduler_args`` (kohya's ``"key=value"`` strings, values read
with ``ast.literal_eval``) are passed on to either. Every schedule is stepped once per optimizer step.

The stage is a :class:`pti_plugin.resolution.ResolvedStage` (read by attribute: ``lr_scheduler``,
``lr_warmup_steps``, ``lr_decay_steps``, ``steps``, ...); warm-up and decay are whole steps by then.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from .optimizers import parse_key_values

#: kohya's scheduler names this trainer runs: name -> (the library whose function of that name builds it, the
#: settings (:data:`_SETTINGS`) kohya gives that function). ``piecewise_constant`` takes ``step_rules`` from
#: ``lr_scheduler_args``.
_NAMED: dict[str, tuple[str, tuple[str, ...]]] = {
    "constant": ("diffusers", ()),
    "constant_with_warmup": ("diffusers", ("warmup",)),
    "linear": ("diffusers", ("warmup", "steps")),
    "cosine": ("diffusers", ("warmup", "steps")),
    "cosine_with_restarts": ("diffusers", ("warmup", "steps", "cycles")),
    "polynomial": ("diffusers", ("warmup", "steps", "power")),
    "piecewise_constant": ("diffusers", ()),
    "inverse_sqrt": ("transformers", ("warmup", "timescale")),
    "cosine_with_min_lr": ("transformers", ("warmup", "steps", "half_cycles", "min_lr_rate")),
    "warmup_stable_decay": ("transformers", ("warmup", "stable", "decay", "half_cycles", "min_lr_ratio")),
}
SUPPORTED_SCHEDULERS = tuple(_NAMED)

#: Each setting: (the schedule function's keyword, the preset key that sets it, its value in a resolved stage).
#: kohya halves ``lr_scheduler_num_cycles`` for the schedules whose cycles are half cosine waves.
_SETTINGS: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "warmup": ("num_warmup_steps", "lr_warmup_steps", lambda s: s.lr_warmup_steps),
    "steps": ("num_training_steps", "steps", lambda s: s.steps),
    "cycles": ("num_cycles", "lr_scheduler_num_cycles", lambda s: s.lr_scheduler_num_cycles),
    "half_cycles": ("num_cycles", "lr_scheduler_num_cycles", lambda s: s.lr_scheduler_num_cycles / 2),
    "power": ("power", "lr_scheduler_power", lambda s: s.lr_scheduler_power),
    "timescale": ("timescale", "lr_scheduler_timescale", lambda s: s.lr_scheduler_timescale),
    "min_lr_rate": ("min_lr_rate", "lr_scheduler_min_lr_ratio", lambda s: s.lr_scheduler_min_lr_ratio),
    "min_lr_ratio": ("min_lr_ratio", "lr_scheduler_min_lr_ratio", lambda s: s.lr_scheduler_min_lr_ratio or 0.0),
    "decay": ("num_decay_steps", "lr_decay_steps", lambda s: s.lr_decay_steps),
    "stable": ("num_stable_steps", "lr_warmup_steps and lr_decay_steps (the steps between them)",
               lambda s: s.steps - s.lr_warmup_steps - s.lr_decay_steps),
}
#: Settings a schedule ignores unless it names them: one given to another schedule is refused, never dropped.
_OPTIONAL_KEYS = ("lr_warmup_steps", "lr_decay_steps", "lr_scheduler_min_lr_ratio", "lr_scheduler_timescale")
#: Settings a schedule cannot run without: name -> (the preset key, its value when not given, the lr_scheduler_args
#: key that may replace it).
_NEEDS = {"cosine_with_min_lr": ("lr_scheduler_min_lr_ratio", None, "min_lr"),
          "warmup_stable_decay": ("lr_decay_steps", 0, None)}

#: kohya's scheduler names refused here, with why.
REFUSED_SCHEDULERS = {
    "adafactor": "kohya's adafactor:<lr> only reports the rate Adafactor sets itself with relative_step=True, which "
                 "pti-plugin refuses (every parameter group has its learning rate); use optimizer_type = \"Adafactor\" "
                 "with another lr_scheduler",
    "reduce_lr_on_plateau": "it follows a validation metric, which the trainer does not give its scheduler",
    "greedy": "it follows a validation metric, which the trainer does not give its scheduler",
    "cosine_warmup_with_min_lr": "kohya passes it lr_decay_steps, which it does not take, so kohya cannot run it "
                                 "either; use cosine_with_min_lr",
}
#: Classes of torch.optim.lr_scheduler refused as lr_scheduler_type, with why.
_TORCH_REFUSED = {
    "LRScheduler": "it is the base class and schedules nothing",
    "LambdaLR": "it takes a Python function (lr_lambda), which a preset cannot hold",
    "MultiplicativeLR": "it takes a Python function (lr_lambda), which a preset cannot hold",
    "SequentialLR": "it chains scheduler objects, which a preset cannot hold",
    "ChainedScheduler": "it chains scheduler objects, which a preset cannot hold",
    "ReduceLROnPlateau": "it follows a validation metric, which the trainer does not give its scheduler",
}
TORCH_SCHEDULERS = tuple(name for name in torch.optim.lr_scheduler.__all__ if name not in _TORCH_REFUSED)
_TORCH_PREFIX = "torch.optim.lr_scheduler."
#: lr_scheduler_args keys the trainer owns: it counts the steps and resumes a schedule from its saved state.
_OWN_ARGS = ("optimizer", "last_epoch")


def scheduler_name_problem(name: str) -> str | None:
    """Why ``lr_scheduler = name`` is refused (unknown, or one of kohya's names refused with a reason); None when
    it runs."""
    if name in _NAMED:
        return None
    refused = REFUSED_SCHEDULERS.get(name.split(":")[0])
    if refused:
        return f"scheduler {name!r} is not supported by pti-plugin: {refused}"
    return f"unknown scheduler {name!r}; valid: {', '.join(SUPPORTED_SCHEDULERS)}"


def torch_scheduler_class(name: str) -> type[torch.optim.lr_scheduler.LRScheduler]:
    """The class ``lr_scheduler_type = name`` names (a bare name, or one under ``torch.optim.lr_scheduler.``);
    ValueError saying why it is refused."""
    bare = name.removeprefix(_TORCH_PREFIX)
    if "." in bare:
        raise ValueError(f"{name!r} names a module path: kohya imports a scheduler class from any module, which would "
                         "run code a preset names; pti-plugin takes a class of torch.optim.lr_scheduler by its bare "
                         f"name: {', '.join(TORCH_SCHEDULERS)}")
    if bare in _TORCH_REFUSED:
        raise ValueError(f"torch.optim.lr_scheduler.{bare} is not supported: {_TORCH_REFUSED[bare]}")
    cls = getattr(torch.optim.lr_scheduler, bare, None) if bare in TORCH_SCHEDULERS else None
    needs = [p for p in list(inspect.signature(cls.step).parameters.values())[1:] if _required(p)] if cls else []
    if cls is None or not issubclass(cls, torch.optim.lr_scheduler.LRScheduler) or needs:
        raise ValueError(f"{name!r} is not a scheduler class of torch.optim.lr_scheduler the trainer can step; "
                         f"valid: {', '.join(TORCH_SCHEDULERS)}")
    return cls


def _required(parameter: inspect.Parameter) -> bool:
    return parameter.default is inspect.Parameter.empty and parameter.kind not in (
        inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _schedule(stage: Any) -> tuple[Callable[..., Any], dict[str, Any], str]:
    """(the class or function that builds ``stage``'s schedule, the keyword arguments its settings give it, the
    preset key that names it)."""
    if stage.lr_scheduler_type:
        return torch_scheduler_class(stage.lr_scheduler_type), {}, "lr_scheduler_type"
    library, settings = _NAMED[stage.lr_scheduler]
    if library == "diffusers":
        from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    else:
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
    function = {kind.value: f for kind, f in TYPE_TO_SCHEDULER_FUNCTION.items()}[stage.lr_scheduler]
    return function, {_SETTINGS[s][0]: _SETTINGS[s][2](stage) for s in settings}, "lr_scheduler"


def _set_by(stage: Any) -> dict[str, str]:
    """The schedule function's keywords ``stage``'s settings give -> the preset key that sets each."""
    settings = () if stage.lr_scheduler_type else _NAMED[stage.lr_scheduler][1]
    return {_SETTINGS[s][0]: _SETTINGS[s][1] for s in settings}


def _users(key: str) -> list[str]:
    """The named schedules that take preset key ``key``."""
    return [name for name, (_, settings) in _NAMED.items() if any(_SETTINGS[s][1] == key for s in settings)]


def build_lr_scheduler(stage: Any, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """``stage``'s schedule over ``optimizer``, stepped once per optimizer step by the trainer (checked before
    training by :func:`schedule_problem`)."""
    factory, kwargs, _ = _schedule(stage)
    return factory(optimizer, **kwargs, **parse_key_values(stage.lr_scheduler_args, strict=True))


def schedule_problem(stage: Any, length_known: bool = True) -> tuple[str, str] | None:
    """Why ``stage``'s schedule cannot run, as (the preset key at fault, the message after it), found before any
    model loads; None when it runs. ``length_known`` false: ``stage.steps`` (and its warm-up and decay) is a
    stand-in for a length the data scan tells later, so what depends on it is left to the check after the scan."""
    label = f"stage {stage.index} {stage.name!r}"
    what = (f"lr_scheduler_type {stage.lr_scheduler_type!r}" if stage.lr_scheduler_type
            else f"lr_scheduler {stage.lr_scheduler!r}")
    try:
        factory, kwargs, name_key = _schedule(stage)
    except ValueError as exc:
        return "lr_scheduler_type", f": {label}: {exc}"
    try:
        args = parse_key_values(stage.lr_scheduler_args, strict=True)
    except ValueError as exc:
        return "lr_scheduler_args", f": {label}: {exc}"
    set_by = _set_by(stage)
    for key in _OPTIONAL_KEYS:
        if getattr(stage, key) and key not in set_by.values():
            users = ", ".join(f'"{name}"' for name in _users(key))
            return key, (f" = {getattr(stage, key)!r} reaches {label}, whose {what} does not use it (it would be "
                         f"ignored): use a schedule that does (lr_scheduler {users}), or leave {key} out for that "
                         "stage")
    need, unset, instead = _NEEDS.get("" if stage.lr_scheduler_type else stage.lr_scheduler, (None, None, None))
    if need and getattr(stage, need) == unset and instead not in args:
        alternative = f" (or {instead}=... in lr_scheduler_args)" if instead else ""
        return need, f": {label}: {what} needs {need}{alternative}"
    if problem := _args_problem(factory, args, set_by, what):
        return "lr_scheduler_args", f": {label}: {problem}"
    if length_known and stage.lr_decay_steps and stage.lr_warmup_steps + stage.lr_decay_steps > stage.steps:
        return "lr_decay_steps", (f": {label}: lr_warmup_steps {stage.lr_warmup_steps} + lr_decay_steps "
                                  f"{stage.lr_decay_steps} exceed the stage's {stage.steps} steps")
    optimizer = _probe_optimizer(stage)
    steps = stage.steps if stage.lr_scheduler_type and length_known else 1  # OneCycleLR's total_steps may be too few
    try:
        scheduler = factory(optimizer, **kwargs, **args)
        optimizer.step()
        for _ in range(steps):
            scheduler.step()
    except (TypeError, ValueError, ZeroDivisionError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        over = f" (stepped once per optimizer step over the stage's {steps} steps)" if steps > 1 else ""
        return ("lr_scheduler_args" if args else name_key), f": {label}: {what}: {exc}{over}"
    return None


def _probe_optimizer(stage: Any) -> torch.optim.Optimizer:
    """The stage's own optimizer over one stand-in parameter, for the throw-away schedule of :func:`schedule_problem`
    (``CyclicLR`` and ``OneCycleLR`` need a momentum or betas that Adafactor, for one, lacks); SGD when it cannot be
    built here (its own problems are named by the optimizer check)."""
    from .optimizers import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(1))]
    try:
        return build_optimizer(stage.optimizer_type, [{"params": params}], stage.learning_rate, list(stage.optimizer_args))
    except Exception:  # noqa: BLE001 - a missing package or bad optimizer_args: refused by the optimizer check
        return torch.optim.SGD(params, lr=stage.learning_rate)


def _args_problem(factory: Callable[..., Any], args: dict[str, Any], set_by: dict[str, str], what: str) -> str | None:
    """Why ``lr_scheduler_args`` (parsed: ``args``) cannot go to ``factory`` (a keyword it lacks, one a preset key
    or the trainer sets, a required one missing), by its signature; None when they fit."""
    parameters = inspect.signature(factory).parameters
    accepted = [p for p in parameters if p not in _OWN_ARGS and p not in set_by
                and parameters[p].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    for key in args:
        if key in set_by:
            return f"{key} is set by {set_by[key]}, not lr_scheduler_args"
        if key in _OWN_ARGS:
            return f"{key} is the trainer's: it steps the schedule and resumes it from the saved state"
        if key not in accepted:
            return f"{what} takes no argument {key!r}; it takes {', '.join(accepted) or 'none'}"
    missing = [p for p in accepted if _required(parameters[p]) and p not in args]
    if missing:
        return f"{what} needs {', '.join(missing)}: give {'it' if len(missing) == 1 else 'them'} in lr_scheduler_args"
    return None
