"""Resumable training state: a folder written atomically, read back before training continues.

``<state>/trainable.safetensors`` holds the pivot and LoRA weights by name, ``optimizer.pt`` and
``lr_scheduler.pt`` the optimizer and scheduler state of the current stage (loaded through the
project's allow-listed unpickler, ``safe_load.py``), ``progress.json`` the stage index and
step counters, what the optimizer state belongs to: the stage's kind, its ``optimizer_type`` and
its parameter groups (names and tensor counts), the ``token_string`` the pivot was trained for, and how its
global batch was made (processes, batch, accumulation: a resume with another is warned about; state folders
written before these were recorded lack them); ``plugins.json`` and ``plugins.safetensors`` the plugins' own states,
when a plugin keeps one (``plugin_state.py``); ``scaler.pt`` fp16's gradient scaler state (its loss scale), when the run
has a scaler (:func:`load_scaler`). Loading refuses, naming the culprit, a
broken file and a state that does not fit the run (tensor names or shapes, stage kind, optimizer type,
parameter groups, token).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic_io import atomic_torch_save, atomic_write_text, save_safetensors_atomic, umask, write_failed
from .config import ConfigError
from .outputs import latest_state_of_config, state_folders
from .plugin_state import PluginStates, read_plugin_states
from .rule_changes import RULES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SavedProgress:
    """A state folder's ``progress.json``, read and checked once (:func:`read_progress`): where the state
    is in the run, and what its optimizer state belongs to (``None`` where a state folder written before
    these were recorded lacks them)."""

    folder: Path
    stage_index: int
    stage_step: int
    global_step: int
    stage_kind: str | None = None
    optimizer_type: str | None = None
    param_groups: list[tuple[str, int]] | None = None  # (group name, number of tensors) per optimizer group
    token_string: str | None = None  # the token the saved pivot was trained for
    base: dict[str, Any] | None = None  # what the weights were trained on (:func:`base_identity`)
    lora_scales: dict[str, Any] | None = None  # the LoRA's alphas (:func:`lora_scales`)
    batch: dict[str, int] | None = None  # how the global batch was made (:func:`batch_shape`)
    rules: int | None = None  # the training rules it was saved under (:mod:`~pti_plugin.rule_changes`)
    plugins: PluginStates | None = field(default=None, compare=False, repr=False)  # read by check_resume_fits


@dataclass
class ResumedState:
    progress: SavedProgress
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]

    def load_into(self, optimizer: torch.optim.Optimizer, lr_scheduler: Any, param_groups: list[dict[str, Any]],
                  stage: str) -> None:
        """The saved optimizer and scheduler state into ``optimizer`` (built over ``param_groups``) and
        ``lr_scheduler`` of ``stage`` (its name, for messages), after :func:`check_optimizer_groups`; what that
        check cannot foresee is refused naming ``key 'resume'`` too, not a traceback."""

        check_optimizer_groups(self.progress, self.optimizer, optimizer, param_groups)
        for saved, group in zip(self.optimizer["param_groups"], optimizer.param_groups):
            changed = {k: (saved[k], group[k]) for k in sorted(set(saved) & set(group) - {"params", "lr", "name"})
                       if saved[k] != group[k]}  # lr moves with the schedule; initial_lr is the group's rate
            if changed:
                logger.warning("resuming %s keeps the saved optimizer settings of group %s (torch restores them): %s",
                               stage, group.get("name", "?"), "; ".join(f"{k} {a!r} (saved) instead of {b!r}"
                                                                     for k, (a, b) in changed.items()))
        try:
            optimizer.load_state_dict(self.optimizer)
            lr_scheduler.load_state_dict(self.lr_scheduler)
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"key 'resume': the optimizer or scheduler state in {self.progress.folder} does not fit "
                              f"this run's {stage}: {exc}") from None


def save_state(
    folder: Path, tensors: dict[str, torch.Tensor], optimizer: dict[str, Any], lr_scheduler: dict[str, Any],
    stage_index: int, stage_step: int, global_step: int, *, stage_kind: str | None = None,
    optimizer_type: str | None = None, param_groups: list[tuple[str, int]] | None = None, replace: bool = False,
    token_string: str | None = None, base: dict[str, Any] | None = None, lora_scales: dict[str, Any] | None = None,
    batch: dict[str, int] | None = None, plugins: PluginStates | None = None, scaler: dict[str, Any] | None = None,
) -> Path:
    """Write the state folder (to a temporary folder first, renamed when complete).

    ``stage_kind``, ``optimizer_type``, ``param_groups`` (``(name, number of tensors)`` per optimizer
    group) and ``token_string`` go to ``progress.json``, so that a resume with another optimizer, stage
    or token is refused before it trains; ``base`` (:func:`base_identity`) too, so that a resume on another
    base model is warned about, and ``batch`` (:func:`batch_shape`), so that one with another global batch is; ``plugins``
    (:func:`~.plugin_state.collect_plugin_states`) beside them, so that each plugin continues from its own state; ``scaler``
    (fp16's gradient scaler's ``state_dict()``, None without one) as ``scaler.pt``, as accelerate's ``save_state`` writes it. An
    existing ``folder`` is refused unless ``replace`` (``overwrite = true``): then the new state takes its place once complete."""
    if folder.exists() and not replace:
        raise FileExistsError(f"refusing to overwrite state folder {folder} (set overwrite = true to allow it)")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise write_failed(folder, exc) from exc
    old = folder.parent / f".{folder.name}.old{uuid.uuid4().hex[:8]}"  # a name the leftover clean-up knows
    try:
        save_safetensors_atomic(tmp / "trainable.safetensors", {k: v.detach() for k, v in tensors.items()})
        atomic_torch_save(tmp / "optimizer.pt", optimizer)
        atomic_torch_save(tmp / "lr_scheduler.pt", lr_scheduler)
        if plugins is not None:
            plugins.write(tmp)
        if scaler is not None:
            atomic_torch_save(tmp / SCALER_FILE, scaler)
        progress: dict[str, Any] = {"stage_index": stage_index, "stage_step": stage_step, "global_step": global_step}
        if stage_kind is not None:
            progress["stage_kind"] = stage_kind
        if optimizer_type is not None:
            progress["optimizer_type"] = optimizer_type
        if param_groups is not None:
            progress["param_groups"] = [{"name": name, "tensors": count} for name, count in param_groups]
        if token_string is not None:
            progress["token_string"] = token_string
        if base is not None:
            progress["base"] = base
        if lora_scales is not None:
            progress["lora_scales"] = lora_scales
        if batch is not None:
            progress["batch"] = batch
        progress["rules"] = RULES  # what a resume by another version compares (rule_changes)
        atomic_write_text(tmp / "progress.json", json.dumps(progress))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's folder is private (0700); give it a plain mkdir's mode
        if folder.exists():  # replace: a folder cannot be renamed over a non-empty one, so move the old one aside
            os.replace(folder, old)  # (a kill before the next rename: the next run's clean-up puts it back)
        os.replace(tmp, folder)
    except OSError as exc:  # named as the user looks for it (not the hidden temporary folder); the earlier one intact
        failed = write_failed(folder, exc)
        raise type(failed)(failed.errno, f"{str(failed).replace(str(tmp), str(folder))} (saving the state "
                                         f"{folder.name}; not saved)") from exc
    finally:
        if old.is_dir() and not folder.exists():  # the new state could not take its place: the old one goes back
            os.replace(old, folder)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


#: The files of a complete state folder (each written atomically: present means whole).
STATE_FILES = ("trainable.safetensors", "optimizer.pt", "lr_scheduler.pt", "progress.json")
#: fp16's gradient scaler state, in a state saved by a run that has a scaler (accelerate's name and content)
SCALER_FILE = "scaler.pt"


def _latest_state_hint(folder: Path) -> str:
    """When ``folder`` is a run's output folder (it holds state folders, ``*-state-*``), the hint naming the state to
    continue from, for each run (output_name) there: by :func:`~.outputs.latest_state_of_config`'s rule, the latest
    saved since the run's config was written (a hidden one is an interrupted save's temporary, which the next run
    removes). Before, the highest step of any run, even one an overwritten run left."""
    states = [(step, p) for step, p in state_folders(folder) if (p / "progress.json").is_file()]
    if not states:
        return ""
    runs: dict[str, list[tuple[int, Path]]] = {}
    for step, path in states:
        runs.setdefault(path.name.rpartition("-state-")[0], []).append((step, path))
    choices = []
    for name, run_states in sorted(runs.items()):
        latest, note = latest_state_of_config(run_states, folder / f"{name}.config.toml")
        whose = f"run {name!r}, " if len(runs) > 1 else ""
        choices.append(f"--resume {shlex.quote(str(latest))} ({whose}{note or 'the latest saved'})")
    return f"; it is a run's folder holding {len(states)} state folder(s): to continue, {' or '.join(choices)}"


def read_progress(folder: Path) -> SavedProgress:
    """Check that ``folder`` is a complete state folder and return its ``progress.json``.

    Raises ``ConfigError`` naming the folder and what is missing or broken."""

    if not folder.is_dir():
        raise ConfigError(f"key 'resume': {folder} is not a state folder")
    missing = [n for n in STATE_FILES if not (folder / n).is_file()]
    if missing:
        raise ConfigError(f"key 'resume': {folder} is not a pti-plugin state folder: missing {', '.join(missing)}"
                          + _latest_state_hint(folder))
    path = folder / "progress.json"
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"key 'resume': {path} is not valid JSON ({exc})") from None
    keys = ("stage_index", "stage_step", "global_step")
    if not isinstance(progress, dict) or not all(type(progress.get(k)) is int and progress[k] >= 0 for k in keys):
        raise ConfigError(f"key 'resume': {path} must hold the non-negative integers {', '.join(keys)}; got {progress!r}")
    for key in ("stage_kind", "optimizer_type", "token_string"):
        if key in progress and not isinstance(progress[key], str):
            raise ConfigError(f"key 'resume': {path}: {key} must be a string; got {progress[key]!r}")
    groups = progress.get("param_groups")
    if groups is not None and (not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("name"), str) and type(g.get("tensors")) is int for g in groups)):
        raise ConfigError(f"key 'resume': {path}: param_groups must be a list of {{name, tensors}}; got {groups!r}")
    base, batch, rules = progress.get("base"), progress.get("batch"), progress.get("rules")
    if rules is not None and (type(rules) is not int or rules < 0):
        raise ConfigError(f"key 'resume': {path}: rules must be a non-negative integer; got {rules!r}")
    if base is not None and not isinstance(base, dict):
        raise ConfigError(f"key 'resume': {path}: base must be a table; got {base!r}")
    if batch is not None and (not isinstance(batch, dict) or sorted(batch) != sorted(BATCH_KEYS)
                              or not all(type(v) is int and v >= 1 for v in batch.values())):
        raise ConfigError(f"key 'resume': {path}: batch must hold the positive integers {', '.join(BATCH_KEYS)}; "
                          f"got {batch!r}")
    return SavedProgress(folder, *(progress[k] for k in keys), progress.get("stage_kind"), progress.get("optimizer_type"),
                         None if groups is None else [(g["name"], g["tensors"]) for g in groups],
                         progress.get("token_string"), base, progress.get("lora_scales"), batch, rules)


def base_identity(config) -> dict[str, Any]:
    """What a run's weights are trained on, by file name (paths differ between machines): the base model, the ``vae``
    and the ``base_weights`` files with their multipliers."""
    from .base_weights import multipliers_of

    weights = config.base_weights
    return {"model": Path(config.pretrained_model_name_or_path).name, "vae": Path(config.vae).name if config.vae else None,
            "base_weights": [[Path(f).name, m] for f, m in zip(weights, multipliers_of(weights, config.base_weights_multiplier))]}


#: What makes a run's global batch, recorded with a state (:func:`batch_shape`)
BATCH_KEYS = ("processes", "train_batch_size", "gradient_accumulation_steps")


def batch_shape(config, num_processes: int) -> dict[str, int]:
    """How a run's global batch is made: its processes, ``train_batch_size`` and ``gradient_accumulation_steps``."""
    return dict(zip(BATCH_KEYS, (num_processes, config.train_batch_size, config.gradient_accumulation_steps)))


def _batch_text(batch: dict[str, int]) -> str:
    """A :func:`batch_shape` as the warnings name it: the global batch, then how it is made."""
    return (f"{math.prod(batch.values())} ({batch['processes']} process(es) x train_batch_size "
            f"{batch['train_batch_size']} x gradient_accumulation_steps {batch['gradient_accumulation_steps']})")


def warn_other_batch(progress: SavedProgress | None, now: dict[str, int]) -> None:
    """A state saved by a run of another global batch than this run's (``now``, :func:`batch_shape`; another number of
    processes, say) is warned about, naming both: the run continues as kohya's resume does, at the saved optimizer
    step, and its remaining steps draw this run's global batches (those a run of this global batch draws from that
    step), so it is neither run uninterrupted. The same global batch otherwise split (2 processes of batch 1, 1 of
    batch 2) draws the same batches, and a state that does not record it (written before it was) is accepted
    silently."""
    saved = progress.batch if progress is not None else None
    if saved is None or math.prod(saved.values()) == math.prod(now.values()):
        return
    logger.warning(f"resume: state {progress.folder} was saved by a run of global batch {_batch_text(saved)}; this "
                   f"run's is {_batch_text(now)}. It continues at step {progress.stage_step} of stage "
                   f"{progress.stage_index}, counted in optimizer steps as kohya's resume counts them, and its remaining "
                   "steps take this run's global "
                   "batches (a stage set in epochs is as many of this run's steps per epoch): neither run uninterrupted "
                   "gives what it gives; resume with the processes and batch it was saved with to continue it as it was")


def lora_scales(config) -> dict[str, Any]:
    """The LoRA's alphas, which set its scale with the weights: ``network_alpha`` and LoCon's ``conv_alpha`` (None
    without ``conv_dim``), recorded with a state (:func:`check_lora_scales`)."""
    from .config import network_args

    return {"network_alpha": float(config.network_alpha), "conv_alpha": network_args(config).get("conv_alpha")}


def check_lora_scales(progress: SavedProgress | None, config) -> None:
    """A state whose LoRA was trained with other alphas than this run's is refused, naming both (its weights would
    go on training as another function). A state that does not record them (written before they were) with LoCon's
    ``conv_dim`` and no ``conv_alpha`` given is warned about: ``conv_alpha`` then defaulted to ``conv_dim``, where it
    is kohya's 1.0 now."""
    from .config import network_args

    if progress is None or not any(stage.kind == "lora" for stage in config.stages[: progress.stage_index + 1]):
        return  # no LoRA stage has begun by the saved step: the alphas scale no trained weights yet
    now, saved = lora_scales(config), progress.lora_scales
    if saved is None:
        given = any(item.partition("=")[0].strip() == "conv_alpha" for item in config.network_args)
        if now["conv_alpha"] is not None and not given:
            conv_dim = int(network_args(config)["conv_dim"])
            logger.warning(f"resume: state {progress.folder} was saved before conv_alpha followed kohya's default (1.0): "
                           f"it was trained with conv_alpha = conv_dim = {conv_dim} unless network_args gave it; add "
                           f"conv_alpha={conv_dim} to network_args to continue it as it was trained")
        return
    differ = [f"{key} {saved.get(key)!r} then, {value!r} now" for key, value in now.items() if saved.get(key) != value]
    if differ:
        raise ConfigError(f"key 'resume': state {progress.folder} was trained with other LoRA alphas ({', '.join(differ)}): "
                          "its weights would go on as another function; resume with the alphas it was saved with")


def warn_other_base(progress: SavedProgress, base: dict[str, Any]) -> None:
    """A state trained on another base model, ``vae`` or ``base_weights`` than this run's (``base``,
    :func:`base_identity`) is warned about, naming both: the run would go on training against other weights. Not
    refused: the names are file names, and a file renamed or copied to another machine under another name reads as
    another. A state that does not record its base (written before it was) is accepted silently."""
    saved = progress.base
    if saved is None or saved == base:
        return
    differ = ", ".join(f"{key} {saved.get(key)!r} then, {base.get(key)!r} now" for key in base if saved.get(key) != base.get(key))
    logger.warning(f"resume: state {progress.folder} was trained on another base than this run's ({differ}): the "
                   "resumed run trains against other weights; resume with the model, vae and base_weights it was saved with")


def check_resume_token(progress: SavedProgress, token_string: str) -> None:
    """A state whose pivot was trained for another ``token_string`` is refused (before, the resumed pivot was
    saved under the new token's name, as if trained for it); a state that does not record it is accepted."""
    saved = progress.token_string
    if saved is not None and saved != token_string:
        raise ConfigError(f"key 'resume': state {progress.folder} holds the pivot of token_string {saved!r}; this run's "
                          f"token_string is {token_string!r} (the pivot would be saved as {token_string}.safetensors, "
                          f"under another token's name); resume with --token_string {shlex.quote(saved)}")


def check_resume_fits(folder: Path, stages, base: dict[str, Any] | None = None) -> SavedProgress:
    """Before anything loads: refuse a state whose stage is not in ``stages`` (the run's resolved stages)
    or was saved by a stage of another kind or optimizer type, or, when that stage's length is set in steps, past its
    end (:func:`check_resume_within_stage`; an epoch-based stage's is checked once the data is scanned); warn when it
    was trained on another ``base`` (:func:`warn_other_base`); return its :class:`SavedProgress`, with the plugins'
    states it holds (:func:`~.plugin_state.read_plugin_states`)."""
    from .optimizers import optimizer_key

    progress = dataclasses.replace(read_progress(folder), plugins=read_plugin_states(folder))
    index = progress.stage_index
    if index >= len(stages):
        raise ConfigError(f"key 'resume': {folder} is at stage {index}, but this run has {len(stages)} stage(s)")
    stage = stages[index]
    kind = progress.stage_kind
    if kind is not None and kind != stage.kind:
        raise ConfigError(f"key 'resume': state {folder} was saved by a {kind!r} stage {index}; this run's stage {index} "
                          f"({stage.name!r}) is {stage.kind!r}; resume with the stages the state was saved with")
    saved = progress.optimizer_type
    if saved is not None and optimizer_key(saved) != optimizer_key(stage.optimizer_type):
        raise ConfigError(f"key 'resume': state {folder} holds the optimizer state of {saved} (stage {index}, "
                          f"{stage.name!r}); this run's stage {index} uses optimizer_type {stage.optimizer_type}; resume "
                          f"with optimizer_type {saved} (e.g. --set stages.{index}.optimizer_type={saved})")
    if stage.max_train_epochs is None:  # set in steps: its length is known before the data scan
        check_resume_within_stage(progress, stages)
    if base is not None:
        warn_other_base(progress, base)
    return progress


def check_optimizer_groups(progress: SavedProgress, saved_optimizer: dict[str, Any],
                           optimizer: torch.optim.Optimizer, param_groups: list[dict[str, Any]]) -> None:
    """Before the saved optimizer state is loaded into ``optimizer`` (built over ``param_groups``, the
    stage's named groups): refuse, naming the groups, a state whose parameter groups differ (names and
    tensor counts when ``progress`` records them; the saved groups' sizes; and, for a state that does not
    record its ``optimizer_type``, option names this optimizer does not know)."""

    folder = progress.folder
    ours = [(g["name"], len(g["params"])) for g in param_groups]
    show = lambda groups: ", ".join(f"{n} ({c} tensors)" for n, c in groups)  # noqa: E731
    recorded = progress.param_groups
    if recorded is not None and recorded != ours:
        raise ConfigError(f"key 'resume': state {folder} holds the optimizer state of the parameter groups "
                          f"{show(recorded)}; this run's stage trains {show(ours)}; resume with the stage settings "
                          "(kind, train_pivot, train_unet, train_text_encoder, LoRA) the state was saved with")
    groups = saved_optimizer.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise ConfigError(f"key 'resume': {folder / 'optimizer.pt'} holds no optimizer state dict (param_groups)")
    sizes = [len(g["params"]) for g in groups]
    if sizes != [c for _, c in ours]:
        raise ConfigError(f"key 'resume': state {folder} holds the optimizer state of {len(sizes)} parameter group(s) "
                          f"of {sizes} tensors; this run's stage trains {show(ours)}; resume with the stage settings "
                          "the state was saved with")
    if progress.optimizer_type is not None:  # compared by name already (check_resume_fits)
        return
    # A state from before optimizer_type was recorded: options this optimizer does not know mean another optimizer
    # (options it lacks may be ones a newer torch added; torch fills those in).
    for saved_group, group in zip(groups, optimizer.param_groups):
        unknown = sorted(set(saved_group) - set(group) - {"initial_lr", "name"})
        if unknown:
            raise ConfigError(f"key 'resume': state {folder} holds the state of another optimizer than this run's "
                              f"{type(optimizer).__name__} (its options {unknown} are not {type(optimizer).__name__}'s); "
                              "resume with the optimizer_type the state was saved with")


def check_resume_within_stage(progress: SavedProgress | None, stages) -> None:
    """A resumed state (``progress``, or None) lies within its stage of the resolved ``stages``: one saved past the
    end of the stage as this run sets it (a stage shortened since) is refused. Before, the rest of that stage was
    skipped silently and the run went on as the saved one had. Called once per resume, once the stage's length is
    known: a stage set in steps by :func:`check_resume_fits`, before anything loads; an epoch-based one (its ``steps``
    is None until the data is scanned) by :func:`check_resume_within_epochs`, after the scan, before the model loads."""
    if progress is None:
        return
    stage = stages[progress.stage_index]
    if stage.steps is not None and progress.stage_step > stage.steps:
        epochs = stage.max_train_epochs  # its steps = epochs x steps per epoch, once the data is scanned
        how = (f"--set stages.{stage.index}.max_train_epochs={-(-progress.stage_step * epochs // stage.steps)} or more"
               if epochs is not None else f"--set stages.{stage.index}.steps={progress.stage_step} or more")
        raise ConfigError(
            f"key 'resume': state {progress.folder} is at step {progress.stage_step} of stage {stage.index} "
            f"({stage.name!r}), but this run's stage {stage.index} has {stage.steps} step(s); resume with the stage as "
            f"long as when it was saved or longer ({how})"
        )


def check_resume_within_epochs(progress: SavedProgress | None, stages) -> None:
    """After the data scan (``stages`` in steps): :func:`check_resume_within_stage` for a state of an epoch-based
    stage, whose length is known only now (one set in steps was checked by :func:`check_resume_fits`)."""
    if progress is not None and stages[progress.stage_index].max_train_epochs is not None:
        check_resume_within_stage(progress, stages)


def _untrained_unet_lora(saved: dict[str, torch.Tensor], tensors: dict[str, torch.nn.Parameter]) -> set[str]:
    """The names of a state's UNet LoRA tensors when this run has no UNet LoRA (no stage trains the UNet) and they
    never trained (every ``lora_B`` weight still zero, as peft starts it): a state saved before such runs stopped
    attaching one. Empty otherwise (a trained one is a real difference, refused by the caller)."""
    extra = set(saved) - set(tensors)
    if not extra or any(not n.startswith("unet.") for n in extra) or any(n.startswith("unet.") for n in tensors):
        return set()
    ups = [saved[n] for n in extra if ".lora_B." in n]
    return extra if ups and not any(bool(t.any()) for t in ups) else set()


def load_scaler(folder: Path, scaler: Any) -> None:
    """fp16's gradient ``scaler`` (the accelerator's; None in a run without one: no ``mixed_precision = "fp16"``, or a
    device without one) continues from the state's ``scaler.pt``, its loss scale and growth tracker, as accelerate's
    ``load_state`` restores it (before, every resume restarted the loss scale). A state without one (saved by an older
    version or a run without a scaler) leaves the run's as it starts, said in an info line; a state with one resumed by
    a run without a scaler is warned about, naming ``mixed_precision``."""
    from .safe_load import safe_torch_load

    path = folder / SCALER_FILE
    if scaler is None:
        if path.is_file():
            logger.warning("resume: state %s holds fp16's gradient scaler state (%s), saved by a run with mixed_precision "
                           "= \"fp16\"; this run has no gradient scaler (mixed_precision is not \"fp16\", or its device "
                           "has none), so it is left out: resume with mixed_precision = \"fp16\" on a GPU to continue the "
                           "run as it was", folder, SCALER_FILE)
        return
    if not path.is_file():
        logger.info("resume: state %s holds no gradient scaler state (%s: saved by an older version or by a run without "
                    "mixed_precision = \"fp16\"); fp16's loss scale starts afresh at %s", folder, SCALER_FILE,
                    scaler.get_scale())
        return
    try:
        saved = safe_torch_load(path)
        if not isinstance(saved, dict):
            raise ValueError(f"{path} holds no gradient scaler state dict")
        scaler.load_state_dict(saved)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise ConfigError(f"key 'resume': {path}: not a gradient scaler state that fits this run's ({exc})") from None
    logger.info("resume: fp16's gradient scaler continues at loss scale %s (state %s)", scaler.get_scale(), folder)


def load_state(progress: SavedProgress, tensors: dict[str, torch.nn.Parameter], scaler: Any = None) -> ResumedState:
    """Copy the saved trainable weights of ``progress.folder`` (read and checked by :func:`check_resume_fits`)
    into ``tensors`` (by name), the saved loss scale into fp16's gradient ``scaler`` (:func:`load_scaler`), and
    return the rest of the state.

    Every file goes through the safe loaders (``optimizer.pt``/``lr_scheduler.pt`` through the
    allow-listed unpickler); a state whose tensor names or shapes differ from this run's (another
    ``num_vectors_per_token``, ``network_dim``, LoRA targets) is refused naming the first difference.
    """
    from .safe_load import load_safetensors, safe_torch_load

    folder = progress.folder
    try:
        saved = load_safetensors(folder / "trainable.safetensors")
        optimizer, scheduler = (safe_torch_load(folder / name) for name in ("optimizer.pt", "lr_scheduler.pt"))
    except ValueError as exc:
        raise ConfigError(f"key 'resume': {exc}") from None
    if untrained := _untrained_unet_lora(saved, tensors):
        logger.info("resume: %s holds the %d tensors of a UNet LoRA that never trained (saved before runs that train no "
                    "UNet stopped attaching one); left out", folder, len(untrained))
        saved = {name: tensor for name, tensor in saved.items() if name not in untrained}
    if set(saved) != set(tensors):
        diff = sorted(set(saved) ^ set(tensors))
        raise ConfigError(f"key 'resume': state {folder} does not match this run's trainable tensors "
                          f"(first difference: {diff[0]}, {'only in the state' if diff[0] in saved else 'only in this run'}); "
                          "resume with the settings the state was saved with")
    for name, param in tensors.items():
        if tuple(saved[name].shape) != tuple(param.shape):
            raise ConfigError(f"key 'resume': state {folder} holds {name} with shape {list(saved[name].shape)}, "
                              f"this run's is {list(param.shape)} (num_vectors_per_token, network_dim or "
                              "network_args differ from the saved run's)")
    if not isinstance(optimizer, dict) or not isinstance(scheduler, dict):
        raise ConfigError(f"key 'resume': {folder}: optimizer.pt and lr_scheduler.pt must hold state dicts")
    load_scaler(folder, scaler)
    with torch.no_grad():
        for name, param in tensors.items():
            param.copy_(saved[name].to(param.device, param.dtype))
    return ResumedState(progress, optimizer, scheduler)
