"""The runs of a learning-rate sweep: one derived preset per (learning rate, variant, training seed),
written before any training.

Every (learning rate, variant) point is trained once per training seed (:mod:`.seeds`: seed ``k``
sets the preset's ``seed`` to its resolved seed + k, and its run's name ends in ``-s<k>`` for k >= 1).
A ``lora`` sweep's runs of training seed ``k`` share one pivot: :func:`plan_pivot` plans the stages
before the lora stage once per seed, and every LoRA run of that seed starts from its embedding (the
trainer's ``weights`` key).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import toml

from pti_plugin.atomic_io import atomic_write_text
from pti_plugin.checked_files import release
from pti_plugin.config import default_stages, first_of, parse_value
from pti_plugin.config_loading import build_config
from pti_plugin.outputs import run_finished
from pti_plugin.plan_report import sweep_schedule_warning
from pti_plugin.script_args import int_at_least, number_list, positive_finite
from pti_plugin.sweeps.seeds import seed_suffix
from pti_plugin.sweeps.usage import usage_exit


@dataclass
class RunSpec:
    name: str
    lr: float
    variant: str  # "none" or the plugin's name
    preset_path: Path
    run_dir: Path
    output_name: str
    token: str = "tok1"
    training_seed: int = 0  # k: the run's seed is the preset's resolved seed + k
    seed: int | None = None  # the trainer's seed of the run (None: the preset's own)

    @property
    def lora(self) -> Path:
        return self.run_dir / f"{self.output_name}.safetensors"

    @property
    def embedding(self) -> Path:
        return self.run_dir / f"{self.token}.safetensors"

    @property
    def finished(self) -> bool:
        return run_finished(self.run_dir, self.output_name, self.token)


def parse_lrs(text: str) -> list[float]:
    """``--lrs``' learning rates, sorted without repeats (an argparse ``type``: a bad list is named by its option);
    two different rates whose run names would be the same (:func:`lr_tag`) are refused."""
    try:
        lrs = sorted(set(positive_finite(number_list(text))))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    for low, high in zip(lrs, lrs[1:]):
        if lr_tag(low) == lr_tag(high):
            raise argparse.ArgumentTypeError(f"{low!r} and {high!r} would share the run name lr{lr_tag(low)}; "
                                             "give rates that differ in their first 6 significant digits")
    return lrs


#: An argparse type: a count of generation seeds per prompt that the leakage score can use (>= 2).
seed_count = int_at_least(2, "layout diversity compares seeds")


#: Preset keys that set how often a run saves, not what it trains: a change of them alone keeps the run.
SAVE_KEYS = frozenset({"save_every_n_steps", "save_state"})


def _flat(value, prefix: str = "") -> dict:
    """A preset as ``{dotted key: value}`` (tables and arrays of tables opened; ``stages.0.steps``)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}{i}.").items()}
    return {prefix[:-1]: value}


def preset_differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every key (dotted) whose value differs between two presets, save keys aside."""
    a, b = _flat(old), _flat(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k) and k not in SAVE_KEYS]
    return [f"{k}: {a.get(k, 'unset')!r} -> {b.get(k, 'unset')!r}" for k in keys]


def write_run_preset(out: Path, name: str, run_dir: Path, output_name: str, token: str, preset: dict) -> Path:
    """Write run ``name``'s preset to ``OUT/presets/<name>.toml``, the record of the settings its folder is trained
    with. When the folder holds work the sweep would reuse (the finished run, or a saved state to resume), the
    record must match ``preset``: a run trained with other settings stops the sweep before anything trains,
    naming the folder, the run and what differs, instead of mixing it silently into a sweep of other settings."""
    path = (out / "presets" / f"{name}.toml").resolve()
    text = toml.dumps(preset)
    reused = run_finished(run_dir, output_name, token) or any(run_dir.glob(f"{output_name}-state-*"))
    if reused and path.is_file():
        try:
            diffs = preset_differences(toml.loads(path.read_text(encoding="utf-8")), toml.loads(text))
        except (OSError, UnicodeDecodeError, toml.TomlDecodeError) as exc:
            print(f"note: the settings record {path} of {name} is unreadable ({exc}); assuming {run_dir.name} was "
                  "trained with this sweep's settings", flush=True)
            diffs = []
        if diffs:
            shown = first_of(diffs, 5, "; ")
            raise usage_exit(
                f"--out {out}: the run {name} there was trained with other settings than this sweep's "
                f"({shown}; its record: {path}). Reusing it would mix runs of two settings in one sweep: use "
                f"another --out, or move {run_dir} away to train it again with these settings.")
    elif reused:
        print(f"note: no record of the settings {run_dir.name} was trained with ({path} is missing); assuming "
              "this sweep's", flush=True)
    atomic_write_text(path, text)
    return path


def lr_tag(lr: float) -> str:
    return f"{lr:g}"


def point_name(stage: str, lr: float, variant: str | None) -> str:
    """The name of a (learning rate, variant) point, which is its training seed 0's run name."""
    return f"{stage}-lr{lr_tag(lr)}" + (f"-{variant}" if variant and variant != "none" else "")


def training_seed_indices(args) -> list[int]:
    """The training seeds this invocation trains: 0..N-1, or the one ``--only_training_seed`` names."""
    count = getattr(args, "training_seeds", 1)
    only = getattr(args, "only_training_seed", None)
    if only is None:
        return list(range(count))
    if not 0 <= only < count:
        raise usage_exit(f"--only_training_seed {only}: not among the {count} training seeds (0..{count - 1})")
    return [only]


def base_seed(raw: dict) -> int:
    """The preset's resolved seed (its ``seed``, or the trainer's default)."""
    return build_config(copy.deepcopy(raw), check_paths=False).seed


def preset_stages(raw: dict, stage: str) -> tuple[list[dict], int]:
    """The preset's stages (the defaults when it has none) and the index of the first ``stage`` one."""
    stages = raw.get("stages") or [{k: v for k, v in dataclasses.asdict(s).items() if v is not None} for s in default_stages()]
    index = next((i for i, s in enumerate(stages) if s.get("kind", "inversion") == stage), None)
    if index is None:
        raise usage_exit(f"the preset has no {stage!r} stage to sweep (stages: {[s.get('kind', 'inversion') for s in stages]})")
    return [dict(s) for s in stages], index


def derive_preset(raw: dict, stage: str, lr: float, steps: int, run_dir: Path, plugin: str | None, drop_plugin: str | None,
                  plugin_options: dict, save_every: int, pivot_file: Path | None = None,
                  seed: int | None = None) -> dict:
    """The preset of one run: the swept stage at ``lr`` for ``steps`` steps, written into ``run_dir``.

    ``pivot_file`` (lora sweeps): start from that embedding (``weights``) and run the lora stage alone.
    ``seed``: the run's training seed (None: the preset's own).
    """
    out = copy.deepcopy(raw)
    if seed is not None:
        out["seed"] = seed
    stages, index = preset_stages(out, stage)
    if stage == "inversion" or pivot_file is not None:
        stages = [stages[index]]
        index = 0
    else:
        stages = stages[: index + 1]
    if pivot_file is not None:
        out["weights"] = str(pivot_file)
    swept = dict(stages[index])
    swept.pop("max_train_epochs", None)
    swept["learning_rate"] = lr
    swept["steps"] = steps
    if stage == "inversion":
        swept.pop("pivot_lr", None)
    else:
        swept["unet_lr"] = lr
    stages[index] = swept
    out["stages"] = stages
    out["output_dir"] = str(run_dir)
    out.pop("max_train_epochs", None)
    if all("steps" in s or "max_train_epochs" in s for s in stages):
        out.pop("max_train_steps", None)  # every stage sets its own length: a top-level one would be refused
    plugins = dict(out.get("plugins", {}))
    if drop_plugin:
        plugins.pop(drop_plugin, None)
    if plugin:
        plugins[plugin] = dict(plugins.get(plugin, {})) | plugin_options
    out["plugins"] = plugins
    if save_every:
        out["save_every_n_steps"] = save_every
        out["save_state"] = True
    return out


def plan_pivot(args, raw: dict, training_seed: int = 0, seed0: int | None = None) -> RunSpec | None:
    """The shared pivot's run of training seed ``training_seed`` of a lora sweep (the stages before the
    lora stage, into ``OUT/pivot[-s<k>]/``), or None when not needed. ``seed0``: :func:`base_seed` of ``raw``
    when known."""
    if args.stage != "lora" or args.shared_pivot == "off" or raw.get("weights"):
        return None
    stages, index = preset_stages(raw, "lora")
    if index == 0:  # no stage before the lora stage: every run starts from init_word anyway
        return None
    preset = copy.deepcopy(raw)
    preset["stages"] = stages[:index]
    seed = (base_seed(raw) if seed0 is None else seed0) + training_seed
    preset["seed"] = seed
    name = "pivot" + seed_suffix(training_seed)
    run_dir = (args.out / name).resolve()
    preset["output_dir"] = str(run_dir)
    plugins = dict(preset.get("plugins", {}))
    plugins.pop(args.with_plugin or "", None)
    preset["plugins"] = plugins
    if args.save_every:
        preset["save_every_n_steps"] = args.save_every
        preset["save_state"] = True
    config = build_config(copy.deepcopy(preset), warn_intervals=False)  # each run warns as it starts
    path = write_run_preset(args.out, name, run_dir, config.output_name, config.token_string, preset)
    return RunSpec(name, 0.0, "pivot", path, run_dir, config.output_name, config.token_string, training_seed, seed)


def plan_runs(args, raw: dict, pivots: dict[int, RunSpec] | None = None, seed0: int | None = None) -> list[RunSpec]:
    """The sweep's runs, each point once per training seed (seeds adjacent); with ``pivots`` (a lora
    sweep's shared pivot run by training seed) a run of seed k starts from pivot k's embedding. ``seed0``:
    :func:`base_seed` of ``raw`` when known."""
    seed0 = base_seed(raw) if seed0 is None else seed0
    variants: list[str | None] = [None] + ([args.with_plugin] if args.with_plugin else [])
    plugin_options = {}
    for item in args.plugin_set:
        key, _, value = item.partition("=")
        plugin_options[key] = parse_value(value)
    specs = []
    for variant in variants:
        for lr in args.lrs:
            for k in training_seed_indices(args):
                pivot_file = pivots[k].embedding if pivots else None
                name = point_name(args.stage, lr, variant) + seed_suffix(k)
                run_dir = (args.out / "runs" / name).resolve()
                preset = derive_preset(raw, args.stage, lr, args.steps, run_dir, variant,
                                       args.with_plugin if variant is None else None, plugin_options, args.save_every,
                                       pivot_file, seed0 + k)
                # fails here, before any training, on a bad preset or plugin option (the shared pivot may not exist yet)
                config = build_config(copy.deepcopy(preset), check_paths=pivot_file is None or pivot_file.is_file(),
                                      warn_intervals=False)
                if warning := sweep_schedule_warning(config, args.stage):  # its rates may not reach training
                    logging.getLogger(__name__).warning(warning)  # once a sweep (plan_sweep: each_message_once)
                path = write_run_preset(args.out, name, run_dir, config.output_name, config.token_string, preset)
                specs.append(RunSpec(name, lr, variant or "none", path, run_dir, config.output_name, config.token_string,
                                     k, seed0 + k))
    return specs


class _FirstOfEach(logging.Filter):
    """Lets through the first record of each (logger, level, message) that reaches its handler."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@contextlib.contextmanager
def each_message_once(name: str = "pti_plugin") -> Iterator[None]:
    """Inside the block, a message of ``name``'s loggers is shown once (by each handler it reaches, ``logging``'s
    last resort included): a warning of the base preset, which the preset of every run repeats, shows once."""
    handlers, logger = [], logging.getLogger(name)
    while logger is not None:
        handlers += logger.handlers
        logger = logger.parent if logger.propagate else None
    handlers += [logging.lastResort] if logging.lastResort is not None else []
    filters = [(handler, _FirstOfEach()) for handler in dict.fromkeys(handlers)]
    for handler, first in filters:
        handler.addFilter(first)
    try:
        yield
    finally:
        for handler, first in filters:
            handler.removeFilter(first)


def plan_sweep(args, raw: dict) -> tuple[dict[int, RunSpec], list[RunSpec]]:
    """The sweep's shared pivots (by training seed; a lora sweep's, see :func:`plan_pivot`) and its runs
    (:func:`plan_runs`), the base preset's config built once, each config message logged once. Planning trains
    nothing: the starting files its checks read are not kept (``checked_files.release``; each run reads its own)."""
    with each_message_once():
        try:
            seed0 = base_seed(raw)
            pivots = {k: p for k in training_seed_indices(args) if (p := plan_pivot(args, raw, k, seed0)) is not None}
            return pivots, plan_runs(args, raw, pivots, seed0)
        finally:
            release()
