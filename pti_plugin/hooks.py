"""The plugin contract: hook points, the state handed to plugins, and plugin discovery.

A plugin is a class with any of the hook methods of :class:`Plugin`; each receives the
:class:`TrainerState`. Plugins read what the state carries and change only their own loss
terms, logs and saved metadata. They never own the loop (Lightning callbacks, HF
``TrainerCallback`` are the models). Plugins are named in the preset (``[plugins.NAME]``) and
found among the built-ins or through the ``pti_plugin.plugins`` entry-point group.

Hook order: ``on_setup`` once; per stage ``plan_stage`` (the schedule plugin only), then
``on_stage_start``; per optimizer micro-step ``on_step_start``, ``extra_rows``, ``extra_losses``,
then ``on_step_end`` after the optimizer step; ``on_stage_end``; ``on_before_save`` before every
save; ``on_end`` once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import torch

from .config import Config, ConfigError, StageConfig, _build

ENTRY_POINT_GROUP = "pti_plugin.plugins"


@dataclass
class StagePlan:
    """What a stage trains, as the schedule plugin decides it; the trainer builds and runs it.

    ``param_groups``: optimizer parameter groups (``{"params": [...], "lr": ..., "name": ...}``);
    ``optimizer``/``lr_scheduler``: built over exactly those groups; ``lora_enabled``: whether
    the LoRA adapters take part in the forward pass of this stage.
    """

    stage: StageConfig
    steps: int
    param_groups: list[dict[str, Any]]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    lora_enabled: bool
    trains_text_encoder: bool


@dataclass
class Batch:
    """One process's share of a global batch, ready for the UNet.

    ``latents`` float32 [b, 4, h, w]; ``input_ids`` int64 [b, L]; ``captions``: final captions;
    ``image_paths``/``slots``: which images and global-batch slots these are;
    ``is_reg``: per sample, whether it is a regularisation image (its main loss is weighted by
    ``prior_loss_weight``); ``noisy_latents`` [b, 4, h, w] and ``timesteps`` [b]: the main loss's
    noised inputs, set before ``on_step_start``.
    """

    latents: torch.Tensor
    input_ids: torch.Tensor
    captions: list[str]
    image_paths: list[str]
    slots: list[int]
    is_reg: list[bool] = field(default_factory=list)
    noisy_latents: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None


@dataclass
class UNetRows:
    """Rows a plugin appends to the step's UNet call: noisy latents [r, 4, h, w], timesteps [r], conditioning [r, 77, d]."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    encoder_hidden_states: torch.Tensor


@dataclass
class MainPrediction:
    """The main loss's inputs and output for this micro-step (this process's rows only)."""

    noisy_latents: torch.Tensor  # [b, 4, h, w]
    timesteps: torch.Tensor  # [b] int64
    encoder_hidden_states: torch.Tensor  # [b, 77, d]
    prediction: torch.Tensor  # [b, 4, h, w]
    target: torch.Tensor  # [b, 4, h, w]


@dataclass
class TrainerState:
    """What plugins may read (everything but ``logs``/``metadata`` is read-only by contract)."""

    config: Config
    accelerator: Any
    model: Any  # models.loading.BaseModel (unet, vae, text_encoder, tokenizer, noise_scheduler, family)
    pivot: Any  # models.pivot.PivotEmbedding
    output_dir: Any  # pathlib.Path
    stage: StageConfig | None = None
    stage_index: int = -1
    stage_step: int = 0  # optimizer steps done in the current stage
    global_step: int = 0  # optimizer steps done in all stages
    plan: StagePlan | None = None
    steps_per_epoch: int = 1  # optimizer steps per pass over the dataset (with repeats)
    logs: dict[str, float] = field(default_factory=dict)  # plugins add scalars logged this step
    metadata: dict[str, str] = field(default_factory=dict)  # plugins add ``pti_*`` metadata saved in the LoRA

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


class Plugin:
    """Base class: every hook is a no-op. ``Options`` (a dataclass) declares the plugin's preset keys."""

    name: str = ""

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any):
        self.options = options

    def on_setup(self, state: TrainerState) -> None: ...
    def plan_stage(self, state: TrainerState, stage: StageConfig) -> StagePlan | None:
        """Schedule plugins only: return the plan of ``stage``."""
        return None
    def on_stage_start(self, state: TrainerState) -> None: ...
    def on_step_start(self, state: TrainerState, batch: Batch) -> None: ...
    def extra_rows(self, state: TrainerState, batch: Batch) -> UNetRows | None:
        """Inputs to append to this micro-step's UNet call (predictions come back in ``extra_losses``)."""
        return None
    def extra_losses(
        self, state: TrainerState, batch: Batch, main: MainPrediction, rows: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Scalar loss terms to add to the main loss; ``rows``: predictions of the rows from ``extra_rows``."""
        return {}
    def on_step_end(self, state: TrainerState, logs: dict[str, float]) -> None: ...
    def on_stage_end(self, state: TrainerState) -> None: ...
    def on_before_save(self, state: TrainerState, files: dict[str, Any]) -> None:
        """Before the LoRA and embedding are written: plugins may add ``pti_*`` entries to ``files["metadata"]``."""
    def on_end(self, state: TrainerState) -> None: ...


_REGISTERED: dict[str, type[Plugin]] = {}


def register_plugin(cls: type[Plugin]) -> type[Plugin]:
    """Make ``cls`` available under ``cls.name`` in this process (usable as a class decorator)."""
    _REGISTERED[cls.name] = cls
    return cls


def builtin_plugins() -> dict[str, type[Plugin]]:
    from .plugins.pivot_locality import PivotLocality
    from .plugins.staged_schedule import StagedSchedule

    return {StagedSchedule.name: StagedSchedule, PivotLocality.name: PivotLocality}


def discover_plugins() -> dict[str, type[Plugin]]:
    """Built-in plugins, those given to :func:`register_plugin`, and those other packages declare
    under the ``pti_plugin.plugins`` entry-point group."""
    found = builtin_plugins() | _REGISTERED
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in found:
            found[entry.name] = entry.load()
    return found


def instantiate_plugins(config: Config) -> list[Plugin]:
    """The plugins ``config.plugins`` names, with validated options; the staged schedule by default.

    Exactly one schedule plugin (one that implements ``plan_stage``) must be active.
    """
    available = discover_plugins()
    requested = dict(config.plugins)
    plugins: list[Plugin] = []
    for name, options in requested.items():
        if name not in available:
            import difflib

            close = difflib.get_close_matches(name, list(available), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"preset: unknown plugin {name!r}.{hint} Available: {', '.join(sorted(available))}")
        cls = available[name]
        plugins.append(cls(_build(cls.Options, options, f"plugins.{name}")))
    schedulers = [p for p in plugins if type(p).plan_stage is not Plugin.plan_stage]
    if not schedulers:
        from .plugins.staged_schedule import StagedSchedule

        plugins.insert(0, StagedSchedule(StagedSchedule.Options()))
    elif len(schedulers) > 1:
        raise ConfigError(f"preset: only one schedule plugin may be active, got {[p.name for p in schedulers]}")
    return plugins

