"""The plugin contract: hook points, the state handed to plugins, and plugin discovery.

A plugin is a class with any of the hook methods of :class:`Plugin`; each receives the
:class:`TrainerState`. Plugins read what the state carries and reach the model only through the
state's documented calls (:meth:`TrainerState.unet`, :meth:`TrainerState.encode`,
:meth:`TrainerState.frozen`, :meth:`TrainerState.tokenize`, :meth:`TrainerState.stage_trains`);
they change only their own loss terms, logs and saved metadata, and never own the loop (Lightning
callbacks, HF ``TrainerCallback`` are the models). Plugins are named in the preset
(``[plugins.NAME]``) and found through the ``pti_plugin.plugins`` entry-point group; the built-in
ones are declared in that group too (:data:`BUILTIN_ENTRY_POINTS`, read by ``setup.py``), or
given to :func:`register_plugin`.

Hook order: ``on_setup`` once; per stage ``plan_stage`` (the schedule only, see :class:`Schedule`),
then ``on_stage_start``; per micro-step ``on_step_start``, ``extra_rows``, ``extra_losses``; after
the optimizer step ``on_step_end``; ``on_stage_end``; ``on_before_save`` before every save;
``on_end`` once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from .config import Config, ConfigError, _build
from .resolution import ResolvedStage
from .models.family import Conditioning
from .models.pivot import PivotEmbedding

if TYPE_CHECKING:  # the model's module imports peft (seconds): not needed to check a preset's plugins
    from .models.trainable import TrainableModel
    from accelerate import Accelerator

ENTRY_POINT_GROUP = "pti_plugin.plugins"
#: The built-in plugins (``pti_plugin/plugins/``), registered exactly as third-party plugins are: as entry points of
#: :data:`ENTRY_POINT_GROUP`. This list is the one place they are declared; ``setup.py`` installs it (read, not
#: imported) and :func:`discover_plugins` reads it too (so a stale editable install still finds them). Named here,
#: with the discovery, so that the contract imports nothing from the plugins that import it.
BUILTIN_ENTRY_POINTS = (
    "staged_schedule = pti_plugin.plugins.staged_schedule:StagedSchedule",
    "pivot_norm = pti_plugin.plugins.pivot_norm:PivotNorm",
    "pivot_locality = pti_plugin.plugins.pivot_locality:PivotLocality",
)


@dataclass(frozen=True)
class StageTrains:
    """What a stage trains: the pivot vectors, the UNet LoRA, the text encoders' LoRA."""

    pivot: bool
    unet_lora: bool
    text_encoder_lora: bool

    @property
    def text_encoders(self) -> bool:
        """Whether gradients flow through the text encoders (their LoRA or the pivot trains)."""
        return self.pivot or self.text_encoder_lora


@dataclass
class StagePlan:
    """What a stage trains, as the schedule decides it; the trainer builds and runs it.

    ``param_groups``: optimizer parameter groups (``{"params": [...], "lr": ..., "name": ...}``);
    ``optimizer``/``lr_scheduler``: built over exactly those groups; ``lora_enabled``: whether
    the LoRA adapters take part in the forward pass of this stage.
    """

    stage: ResolvedStage
    steps: int
    param_groups: list[dict[str, Any]]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    lora_enabled: bool
    trains: StageTrains

    @property
    def trains_text_encoder(self) -> bool:
        return self.trains.text_encoders


@dataclass
class Batch:
    """One process's share of a global batch, ready for the UNet.

    ``latents`` float32 [b, 4, h, w]; ``input_ids``: token ids as the family tokenizes them
    ([b, L] for SD1.5); ``captions``: final captions; ``image_paths``/``slots``: which images and
    global-batch slots these are; ``is_reg``: per sample, whether it is a regularisation image (its
    main loss is weighted by ``prior_loss_weight``); ``sizes`` float32 [b, 6]: each sample's original
    size (h, w), crop top-left (top, left) and target size (h, w), which families with size
    conditioning (SDXL) condition on; ``noisy_latents`` [b, 4, h, w] and ``timesteps`` [b]: the main
    loss's noised inputs, set before ``on_step_start``; ``loss_masks`` float32 [b, 1, h, w] in [0, 1]: kohya's
    masked loss (``alpha_mask``, ``masked_loss``), each sample's mask fitted, cropped and flipped with its image and
    area-downsampled to the latent size (all ones for a sample without a mask), which multiplies the main loss
    per element; None when no sample of the batch has a mask. Plugin terms are not masked by it.
    """

    latents: torch.Tensor
    input_ids: torch.Tensor
    captions: list[str]
    image_paths: list[str]
    slots: list[int]
    is_reg: list[bool] = field(default_factory=list)
    sizes: torch.Tensor | None = None
    noisy_latents: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    loss_masks: torch.Tensor | None = None


@dataclass
class UNetRows:
    """Rows a plugin appends to the step's UNet call: noisy latents [r, 4, h, w], timesteps [r], conditioning (r rows)."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    conditioning: Conditioning

    @staticmethod
    def joined(noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
               rows: list[UNetRows]) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """The step's UNet inputs: the main rows, then each plugin's ``rows``; the main rows themselves when no
        plugin adds any (a concatenation of one tensor would only copy it)."""
        if not rows:
            return noisy, timesteps, cond
        return (torch.cat([noisy] + [r.noisy_latents for r in rows]), torch.cat([timesteps] + [r.timesteps for r in rows]),
                Conditioning.cat([cond] + [r.conditioning for r in rows]))


@dataclass
class MainPrediction:
    """The main loss's inputs and output for this micro-step (this process's rows only)."""

    noisy_latents: torch.Tensor  # [b, 4, h, w]
    timesteps: torch.Tensor  # [b] int64
    conditioning: Conditioning  # b rows
    prediction: torch.Tensor  # [b, 4, h, w]
    target: torch.Tensor  # [b, 4, h, w]


@dataclass
class TrainerState:
    """What plugins may read, and the calls through which they reach the model.

    Everything but ``logs``/``metadata`` is read-only by contract. ``model`` is the schedule's way
    to the trainable parameters (``model.pivot_parameters()``, ``model.lora_parameters(...)``);
    other plugins use the calls below.
    """

    config: Config
    accelerator: Accelerator
    model: TrainableModel
    output_dir: Path
    schedule: Schedule | None = None
    stage: ResolvedStage | None = None
    stage_index: int = -1
    stage_step: int = 0  # optimizer steps done in the current stage
    global_step: int = 0  # optimizer steps done in all stages
    plan: StagePlan | None = None  # the current stage's resolved plan
    steps_per_epoch: int = 1  # optimizer steps per pass over the dataset (with repeats)
    logs: dict[str, float] = field(default_factory=dict)  # plugins add scalars logged this step
    metadata: dict[str, str] = field(default_factory=dict)  # plugins add ``pti_*`` metadata saved in the LoRA

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def pivots(self) -> tuple[PivotEmbedding, ...]:
        """One pivot per text encoder (``token_ids``, ``vectors``, ``init_vectors``); read-only."""
        return self.model.pivots

    @property
    def pivot(self) -> PivotEmbedding:
        """The first text encoder's pivot (SD1.5's only one)."""
        return self.model.pivots[0]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.model.base.noise_scheduler.config.num_train_timesteps)

    @property
    def clip_skip(self) -> int:
        """The ``clip_skip`` the conditioning applies: the config's, but 1 for SDXL, which ignores it (as kohya)."""
        return int(self.model.family.clip_skip)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``latents`` [r, 4, h, w] noised with ``noise`` (same shape) at ``timesteps`` [r], by the model's
        training noise scheduler (as the main loss noises its batch)."""
        return self.model.base.noise_scheduler.add_noise(latents, noise, timesteps)

    def unet(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction [r, 4, h, w] (epsilon or v, as trained), the LoRA as the stage switched it
        (off inside :meth:`frozen`); through the stage's prepared (DDP) module when gradients are on."""
        return self.model.predict(noisy, timesteps, cond)

    def encode(self, input_ids: torch.Tensor, lora: bool = True, pivot_grad: bool = True,
               sizes: torch.Tensor | None = None) -> Conditioning:
        """The conditioning of ``input_ids`` (from :meth:`tokenize`): ``lora=False`` for the base text
        encoders, ``pivot_grad=False`` to take the pivot as a fixed input (no gradient reaches it);
        ``sizes`` [B, 6] as :attr:`Batch.sizes` (SDXL's time ids; None: the family's default)."""
        return self.model.encode(input_ids, lora=lora, pivot_grad=pivot_grad, sizes=sizes)

    def size_conditioning(self, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``added_cond_kwargs`` entries that ``sizes`` [B, 6] make for this family (``{}`` for SD1.5)."""
        return self.model.family.size_conditioning(sizes)

    def conditioning_widths(self) -> tuple[int, ...]:
        """Each text encoder's share of the conditioning's width, in order (SD1.5: (768,); SDXL: (768, 1280))."""
        return self.model.family.conditioning_widths(self.model.text_encoders)

    def pre_layernorm_states(self, input_ids: torch.Tensor, lora: bool = True, pivot_grad: bool = True) -> torch.Tensor | None:
        """Per-token states before the final LayerNorm (None where the family's conditioning has none), as :meth:`encode`."""
        return self.model.pre_layernorm_states(input_ids, lora=lora, pivot_grad=pivot_grad)

    def final_layer_norms(self) -> tuple[torch.nn.LayerNorm | None, ...]:
        """The LayerNorm ending each encoder's conditioning (None where there is none); read-only."""
        return self.model.final_layer_norms()

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids of ``captions`` (CPU), as :meth:`encode` takes them."""
        return self.model.tokenize(captions)

    def word_token_ids(self, word: str) -> list[int]:
        """The first tokenizer's ids of ``word`` without BOS/EOS (how many tokens a class word takes)."""
        return list(self.model.base.tokenizers[0](word, add_special_tokens=False).input_ids)

    def frozen(self) -> contextlib.AbstractContextManager[None]:
        """A block that sees the base model: every LoRA off, no gradients."""
        return self.model.frozen()

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return self.accelerator.autocast()

    def stage_trains(self, stage: ResolvedStage) -> StageTrains:
        """What ``stage`` trains, as the schedule plans it (usable before the stage starts)."""
        assert self.schedule is not None, "the schedule is set before on_setup"
        return self.schedule.trains(self, stage)

    def info(self, message: str) -> None:
        """Print and log ``message`` once (main process only)."""
        if self.accelerator.is_main_process:
            import logging

            logging.getLogger("pti_plugin").info(message)
            print(message, flush=True)


class Plugin:
    """Base class: every hook is a no-op. ``Options`` (a dataclass) declares the plugin's preset keys."""

    name: str = ""

    @dataclass
    class Options:
        pass

    def __init__(self, options: Any):
        self.options = options

    def on_setup(self, state: TrainerState) -> None: ...
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
    def on_step_end(self, state: TrainerState, logs: dict[str, float]) -> None:
        """After the optimizer step (``logs["skipped_nonfinite"]`` is set when the step was skipped)."""
    def on_stage_end(self, state: TrainerState) -> None: ...
    def on_before_save(self, state: TrainerState, files: dict[str, Any]) -> None:
        """Before the LoRA and embedding are written: plugins may add ``pti_*`` entries to ``files["metadata"]``."""
    def on_end(self, state: TrainerState) -> None: ...


@runtime_checkable
class Schedule(Protocol):
    """The schedule: a plugin that plans each stage. Exactly one is active (``staged_schedule`` by default)."""

    def trains(self, state: TrainerState, stage: ResolvedStage) -> StageTrains:
        """What ``stage`` trains (cheap, no optimizer built)."""
    def plan_stage(self, state: TrainerState, stage: ResolvedStage) -> StagePlan:
        """The full plan of ``stage``: parameter groups, optimizer, scheduler, steps."""


_REGISTERED: dict[str, type[Plugin]] = {}


def register_plugin(cls: type[Plugin]) -> type[Plugin]:
    """Make ``cls`` available under ``cls.name`` in this process (usable as a class decorator)."""
    _REGISTERED[cls.name] = cls
    return cls


def builtin_entry_points() -> list[EntryPoint]:
    """The built-in plugins as entry points of :data:`ENTRY_POINT_GROUP` (the list ``setup.py`` installs)."""
    return [EntryPoint(name.strip(), value.strip(), ENTRY_POINT_GROUP)
            for name, value in (line.split("=", 1) for line in BUILTIN_ENTRY_POINTS)]


def discover_plugins() -> dict[str, type[Plugin]]:
    """Plugins given to :func:`register_plugin` and those declared under the ``pti_plugin.plugins``
    entry-point group (the built-ins among them), loaded by name."""
    found: dict[str, type[Plugin]] = dict(_REGISTERED)
    for entry in [*builtin_entry_points(), *entry_points(group=ENTRY_POINT_GROUP)]:
        if entry.name not in found:
            found[entry.name] = entry.load()
    return found


#: Plugins every run has unless the preset names them (the default schedule is added only when no
#: schedule is named).
DEFAULT_PLUGINS = ("pivot_norm",)


def instantiate_plugins(config: Config) -> list[Plugin]:
    """The plugins ``config.plugins`` names, with validated options; the staged schedule when none of
    them is a schedule, and :data:`DEFAULT_PLUGINS`. Exactly one :class:`Schedule` must be active."""
    available = discover_plugins()
    requested = dict(config.plugins)
    plugins: list[Plugin] = []
    for name, options in requested.items():
        if name not in available:
            import difflib

            close = difflib.get_close_matches(name, list(available), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"preset: unknown plugin {name!r}.{hint} Available: {', '.join(sorted(available))}",
                              f"plugins.{name}")
        cls = available[name]
        plugins.append(cls(_build(cls.Options, options, f"plugins.{name}.")))
    schedulers = [p for p in plugins if isinstance(p, Schedule)]
    defaults = [available[n] for n in DEFAULT_PLUGINS if n not in requested]
    if not schedulers:
        defaults.insert(0, available["staged_schedule"])
    elif len(schedulers) > 1:
        raise ConfigError(f"preset: only one schedule plugin may be active, got {[p.name for p in schedulers]}")
    return [cls(cls.Options()) for cls in defaults] + plugins


def schedule_of(plugins: list[Plugin]) -> Schedule:
    """The active schedule among ``plugins``."""
    return next(p for p in plugins if isinstance(p, Schedule))
