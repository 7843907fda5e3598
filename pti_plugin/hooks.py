"""The plugin contract: hook points, the state handed to plugins, and plugin discovery.

A plugin is a subclass of :class:`Plugin` overriding any of its hook methods; each receives the
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
``on_end`` once. A plugin's own state across a resume: ``state_dict`` at every save with a state,
``load_state_dict`` on a resume, before ``on_setup`` (``plugin_state.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
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

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class StagePlan:
    """What a stage trains, as the schedule decides it; the trainer runs exactly this (read-only once made).

    ``stage``: the stage planned; ``steps``: the optimizer steps it runs (the preset's ``stage.steps`` unless the
    schedule decides otherwise); ``param_groups``: the optimizer's parameter groups, each a dict with ``"params"``
    (the tensors it trains), ``"lr"`` (its learning rate) and ``"name"`` (a unique string: it names the group's
    ``lr/<name>`` log and its place in a saved state; the built-in names are ``pivot``, ``unet_lora``,
    ``text_encoder_lora``), plus any other key the optimizer takes (``weight_decay``, ...);
    ``optimizer``/``lr_scheduler``: built over exactly those groups (the trainer steps the scheduler once per
    optimizer step); ``lora_enabled``: whether the LoRA adapters take part in the forward pass of this stage;
    ``trains``: what the groups train (as :meth:`Schedule.trains` says). The start-up line of each stage and the
    saved LoRA's training metadata state the plan (``pti_plugin.plan_report``).
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
class Progress:
    """Where the run is: the trainer's to set (:func:`trainer_progress`); plugins read it through the read-only
    properties of :class:`TrainerState` of the same names."""

    stage: ResolvedStage | None = None
    stage_index: int = -1
    stage_step: int = 0  # optimizer steps done in the current stage
    global_step: int = 0  # optimizer steps done in all stages
    plan: StagePlan | None = None  # the current stage's plan, as the schedule made it
    steps_per_epoch: int = 1  # optimizer steps per pass over the dataset (with repeats)
    plans: dict[int, dict[str, Any]] = field(default_factory=dict)  # each stage planned in this process (plan_report)


def _read_only(name: str, doc: str) -> property:
    def refuse(state: TrainerState, value: Any) -> None:
        raise AttributeError(f"TrainerState.{name} is read-only: plugins read it; the trainer sets it "
                             "(through pti_plugin.hooks.trainer_progress)")
    return property(lambda state: getattr(state._progress, name), refuse, doc=doc)


@dataclass
class TrainerState:
    """What plugins may read, and the calls through which they reach the model.

    Everything but ``logs``/``metadata`` is read-only: ``stage``, ``stage_index``, ``stage_step``, ``global_step``,
    ``plan`` and ``steps_per_epoch`` refuse an assignment, ``config`` is frozen (its ``plugins`` tables too), and
    the pivot vectors must not be written in place (their optimizer owns them). ``model`` is the schedule's way
    to the trainable parameters (``model.pivot_parameters()``, ``model.lora_parameters(...)``);
    other plugins use the calls below.
    """

    config: Config
    accelerator: Accelerator
    model: TrainableModel
    output_dir: Path
    schedule: Schedule | None = None
    logs: dict[str, float] = field(default_factory=dict)  # plugins add scalars logged this step
    metadata: dict[str, str] = field(default_factory=dict)  # plugins add ``pti_*`` metadata saved in the LoRA
    _progress: Progress = field(default_factory=Progress, init=False, repr=False)

    stage = _read_only("stage", "The current stage (:class:`~pti_plugin.resolution.ResolvedStage`).")
    stage_index = _read_only("stage_index", "The current stage's index (-1 before the first).")
    stage_step = _read_only("stage_step", "Optimizer steps done in the current stage.")
    global_step = _read_only("global_step", "Optimizer steps done in all stages.")
    plan = _read_only("plan", "The current stage's :class:`StagePlan`, as the schedule made it.")
    steps_per_epoch = _read_only("steps_per_epoch", "Optimizer steps per pass over the dataset (with repeats).")

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
    """Base class of every plugin (README "Plugins" has a complete skeleton): every hook is a no-op.

    ``name``: the preset table's name, ``[plugins.NAME]``; :func:`register_plugin` registers the class under it (an
    entry point's own name wins); :func:`instantiate_plugins` sets it on each instance to the table's name.
    ``Options``: a dataclass whose fields are the table's keys, type-checked from their annotations.
    ``__init__(options)`` receives the ``Options`` instance and only checks it (it also runs when the preset is
    checked, before any model loads); a ``ValueError``/``TypeError`` raised there stops the run as a ConfigError
    naming ``plugins.NAME``. Work that needs the model goes in ``on_setup``.
    """

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
    def state_dict(self) -> dict[str, Any] | None:
        """What a resume needs of this plugin (tensors and JSON values by name), saved with every state (main
        process); None: it keeps none (``plugin_state.py``). A save after an error within a step takes it as it is
        then and the resumed run repeats that step: change it in ``on_step_end``, not in the micro-batch hooks."""
        return None
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On a resume, before ``on_setup``: what :meth:`state_dict` returned when the state was saved (tensors on
        the CPU); not called when the state holds none for this plugin."""


@runtime_checkable
class Schedule(Protocol):
    """The schedule: a plugin that plans each stage. Exactly one is active (``staged_schedule`` by default)."""

    def trains(self, state: TrainerState, stage: ResolvedStage) -> StageTrains:
        """What ``stage`` trains (cheap, no optimizer built)."""
    def plan_stage(self, state: TrainerState, stage: ResolvedStage) -> StagePlan:
        """The full plan of ``stage``: parameter groups, optimizer, scheduler, steps."""


def trainer_progress(state: TrainerState) -> Progress:
    """The trainer's way to set what :class:`TrainerState` shows plugins read-only."""
    return state._progress


_REGISTERED: dict[str, type[Plugin]] = {}
_WARNED: set[str] = set()  # clash warnings already given in this process (instantiate_plugins runs twice a run)
_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a bare TOML key: [plugins.NAME] and --set plugins.NAME.key need no quotes


def _target(provider: type | EntryPoint) -> str:
    """``module:qualname`` of a class, an entry point's value: what a name stands for (one target, one plugin)."""
    if isinstance(provider, type):
        return f"{provider.__module__}:{provider.__qualname__}"
    return str(getattr(provider, "value", provider))


def _named(entry: EntryPoint) -> str:
    """An entry point as a message names it: ``NAME = module:Class (distribution D V)``."""
    dist = getattr(entry, "dist", None)
    where = f"distribution {dist.name} {dist.version}" if dist is not None else "no distribution"
    return f"{entry.name} = {_target(entry)} ({where})"


def _same_source(taken: type | EntryPoint, cls: type) -> bool:
    """Whether ``taken`` is a class of ``cls``'s qualified name defined in the same file: the same plugin, imported
    under another module name (a script imported as a module and also run as ``__main__``)."""
    import inspect

    if not isinstance(taken, type) or taken.__qualname__ != cls.__qualname__:
        return False
    try:
        return Path(inspect.getfile(taken)).resolve() == Path(inspect.getfile(cls)).resolve()
    except (TypeError, OSError):  # a class of no file (defined in an interactive session)
        return False


def register_plugin(cls: type[Plugin]) -> type[Plugin]:
    """Make ``cls`` available under ``cls.name`` in this process (usable as a class decorator). A name means one
    plugin: registering a built-in's name or a name another class holds is refused (ValueError); registering the same
    class again (same module and qualified name, e.g. a re-run notebook cell, or the same file's class imported under
    another module name) replaces it."""
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise TypeError(f"register_plugin({cls!r}): a plugin is a subclass of pti_plugin.hooks.Plugin")
    name = cls.name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"register_plugin({cls.__qualname__}): name = {name!r}; a plugin's name is its preset table's "
                         "([plugins.NAME]): letters, digits, '_' or '-', not empty")
    taken = {e.name: e for e in builtin_entry_points()}.get(name) or _REGISTERED.get(name)
    if taken is not None and _target(taken) != _target(cls) and not _same_source(taken, cls):
        what = "the built-in plugin" if isinstance(taken, EntryPoint) else "registered to"
        raise ValueError(f"register_plugin({cls.__qualname__}): {name!r} is {what} {_target(taken)}; choose another name")
    _REGISTERED[name] = cls
    return cls


def builtin_entry_points() -> list[EntryPoint]:
    """The built-in plugins as entry points of :data:`ENTRY_POINT_GROUP` (the list ``setup.py`` installs)."""
    return [EntryPoint(name.strip(), value.strip(), ENTRY_POINT_GROUP)
            for name, value in (line.split("=", 1) for line in BUILTIN_ENTRY_POINTS)]


def discover_plugins() -> dict[str, list[type[Plugin] | EntryPoint]]:
    """Every plugin name this process knows and what provides it, nothing imported: per name, the class given to
    :func:`register_plugin` or the built-in entry point first, then each ``pti_plugin.plugins`` entry point of that
    name with another target (one naming the same target, e.g. this package's own declaration of the built-ins,
    counts once). :func:`instantiate_plugins` loads only the names a run uses."""
    found: dict[str, list[type[Plugin] | EntryPoint]] = {name: [cls] for name, cls in _REGISTERED.items()}
    for entry in [*builtin_entry_points(), *entry_points(group=ENTRY_POINT_GROUP)]:
        providers = found.setdefault(entry.name, [])
        if all(_target(p) != _target(entry) for p in providers):
            providers.append(entry)
    return found


def _load(name: str, providers: list[type[Plugin] | EntryPoint]) -> type[Plugin]:
    """The class ``name`` stands for, checked (:func:`_check_class`). A registered class or a built-in wins over a
    third-party entry point of its name, which is ignored with a warning; two third-party entry points of one name
    are refused, as is one that fails to load (ConfigError naming it and its distribution)."""
    first, others = providers[0], providers[1:]
    builtin = isinstance(first, type) or _target(first) in {_target(e) for e in builtin_entry_points()}
    if others and not builtin:
        raise ConfigError.at(f"plugins.{name}", ": two installed plugins have this name, "
                             f"{' and '.join(_named(e) for e in providers)}; uninstall one")
    for entry in others:
        owner = "the built-in plugin" if isinstance(first, EntryPoint) else "the plugin given to register_plugin"
        message = f"plugins.{name}: entry point {_named(entry)} is ignored: {name!r} is {owner} {_target(first)}"
        if message not in _WARNED:
            _WARNED.add(message)
            logger.warning("%s", message)
    if isinstance(first, type):
        return _check_class(name, first, f"the class {_target(first)} given to register_plugin")
    try:
        loaded = first.load()
    except Exception as exc:  # any import-time failure of a plugin's package: name the entry point, not the import
        raise ConfigError.at(f"plugins.{name}", f": entry point {_named(first)} failed to load: "
                             f"{type(exc).__name__}: {exc}") from exc
    return _check_class(name, loaded, f"entry point {_named(first)}")


def _check_class(name: str, cls: Any, where: str) -> type[Plugin]:
    """``cls`` when it has a plugin's shape: a :class:`Plugin` subclass whose ``Options`` is a dataclass, and both
    of :class:`Schedule`'s methods or neither; else ConfigError naming ``plugins.NAME``, ``where`` and what is missing."""
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        problem = f"{cls!r} is not a subclass of pti_plugin.hooks.Plugin (README 'Plugins' has the skeleton)"
    elif not (isinstance(cls.Options, type) and dataclasses.is_dataclass(cls.Options)):
        problem = f"{cls.__name__}.Options is not a dataclass (write @dataclass above class Options)"
    elif hasattr(cls, "trains") != hasattr(cls, "plan_stage"):
        has, lacks = ("trains", "plan_stage") if hasattr(cls, "trains") else ("plan_stage", "trains")
        problem = f"{cls.__name__} has {has} but no {lacks}: a schedule has both"
    else:
        return cls
    raise ConfigError.at(f"plugins.{name}", f": {where}: {problem}")


def _create(name: str, cls: type[Plugin], raw: dict[str, Any]) -> Plugin:
    """``cls`` built with the options ``raw`` (checked by ``cls.Options``), named ``name`` (its preset table's).
    A ValueError or TypeError from ``Options`` or ``__init__`` becomes a ConfigError naming ``plugins.NAME``
    (a ConfigError that already names it passes unchanged)."""
    try:
        options = _build(cls.Options, raw, f"plugins.{name}.")  # unknown keys and wrong types name plugins.NAME.key
        plugin = cls(options)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError) and f"plugins.{name}" in str(exc):
            raise
        raise ConfigError.at(f"plugins.{name}", f" ({cls.__name__}) refused its options: {exc}") from exc
    plugin.name = name  # terms, logs and messages use the table's name, whatever the class declares
    return plugin


#: Plugins every run has unless the preset names them (the default schedule is added only when no
#: schedule is named).
DEFAULT_PLUGINS = ("pivot_norm",)


def instantiate_plugins(config: Config) -> list[Plugin]:
    """The plugins ``config.plugins`` names, with validated options; the staged schedule when none of
    them is a schedule, and :data:`DEFAULT_PLUGINS`. Exactly one :class:`Schedule` must be active. Only the
    plugins the run uses are loaded; each is named by its preset table's name (``plugin.name``)."""
    available = discover_plugins()
    requested = dict(config.plugins)
    for name in requested:
        if name not in available:
            import difflib

            close = difflib.get_close_matches(name, list(available), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"preset: unknown plugin {name!r}.{hint} Available: {', '.join(sorted(available))}",
                              f"plugins.{name}")
    plugins = [_create(name, _load(name, available[name]), options) for name, options in requested.items()]
    schedulers = [p for p in plugins if isinstance(p, Schedule)]
    defaults = [n for n in DEFAULT_PLUGINS if n not in requested]
    if not schedulers:
        defaults.insert(0, "staged_schedule")
    elif len(schedulers) > 1:
        raise ConfigError(f"preset: only one schedule plugin may be active, got {[p.name for p in schedulers]}")
    return [_create(n, _load(n, available[n]), {}) for n in defaults] + plugins


def schedule_of(plugins: list[Plugin]) -> Schedule:
    """The active schedule among ``plugins``."""
    return next(p for p in plugins if isinstance(p, Schedule))
