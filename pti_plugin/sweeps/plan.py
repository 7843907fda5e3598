"""The runs of a learning-rate sweep: one derived preset per (learning rate, variant), written before any training.

A ``lora`` sweep's runs share one pivot: :func:`plan_pivot` plans the stages before the lora stage
once, and every LoRA run starts from its embedding (the trainer's ``weights`` key).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import toml

from pti_plugin.atomic_io import atomic_write_text
from pti_plugin.config import build_config, default_stages, parse_value
from pti_plugin.hooks import instantiate_plugins


@dataclass
class RunSpec:
    name: str
    lr: float
    variant: str  # "none" or the plugin's name
    preset_path: Path
    run_dir: Path
    output_name: str
    token: str = "tok1"

    @property
    def lora(self) -> Path:
        return self.run_dir / f"{self.output_name}.safetensors"

    @property
    def embedding(self) -> Path:
        return self.run_dir / f"{self.token}.safetensors"


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise SystemExit(f"--lrs: expected comma-separated numbers, got {text!r}") from exc
    if not lrs or any(lr <= 0 for lr in lrs):
        raise SystemExit("--lrs: give at least one positive learning rate")
    return sorted(set(lrs))


def lr_tag(lr: float) -> str:
    return f"{lr:g}"


def preset_stages(raw: dict, stage: str) -> tuple[list[dict], int]:
    """The preset's stages (the defaults when it has none) and the index of the first ``stage`` one."""
    stages = raw.get("stages") or [{k: v for k, v in dataclasses.asdict(s).items() if v is not None} for s in default_stages()]
    index = next((i for i, s in enumerate(stages) if s.get("kind", "inversion") == stage), None)
    if index is None:
        raise SystemExit(f"the preset has no {stage!r} stage to sweep (stages: {[s.get('kind', 'inversion') for s in stages]})")
    return [dict(s) for s in stages], index


def derive_preset(raw: dict, stage: str, lr: float, steps: int, run_dir: Path, plugin: str | None, drop_plugin: str | None,
                  plugin_options: dict, save_every: int, pivot_file: Path | None = None) -> dict:
    """The preset of one run: the swept stage at ``lr`` for ``steps`` steps, written into ``run_dir``.

    ``pivot_file`` (lora sweeps): start from that embedding (``weights``) and run the lora stage alone.
    """
    out = copy.deepcopy(raw)
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


def plan_pivot(args, raw: dict) -> RunSpec | None:
    """The shared pivot's run of a lora sweep (the stages before the lora stage), or None when not needed."""
    if args.stage != "lora" or args.shared_pivot == "off" or raw.get("weights"):
        return None
    stages, index = preset_stages(raw, "lora")
    if index == 0:  # no stage before the lora stage: every run starts from init_word anyway
        return None
    preset = copy.deepcopy(raw)
    preset["stages"] = stages[:index]
    run_dir = (args.out / "pivot").resolve()
    preset["output_dir"] = str(run_dir)
    plugins = dict(preset.get("plugins", {}))
    plugins.pop(args.with_plugin or "", None)
    preset["plugins"] = plugins
    if args.save_every:
        preset["save_every_n_steps"] = args.save_every
        preset["save_state"] = True
    config = build_config(copy.deepcopy(preset))
    path = (args.out / "presets" / "pivot.toml").resolve()
    atomic_write_text(path, toml.dumps(preset))
    return RunSpec("pivot", 0.0, "pivot", path, run_dir, config.output_name, config.token_string)


def plan_runs(args, raw: dict, pivot: RunSpec | None = None) -> list[RunSpec]:
    """The sweep's runs; with ``pivot`` (a lora sweep's shared pivot run) they start from its embedding."""
    pivot_file = pivot.embedding if pivot is not None else None
    variants: list[str | None] = [None] + ([args.with_plugin] if args.with_plugin else [])
    plugin_options = {}
    for item in args.plugin_set:
        key, _, value = item.partition("=")
        plugin_options[key] = parse_value(value)
    specs = []
    for variant in variants:
        for lr in args.lrs:
            name = f"{args.stage}-lr{lr_tag(lr)}" + (f"-{variant}" if variant else "")
            run_dir = (args.out / "runs" / name).resolve()
            preset = derive_preset(raw, args.stage, lr, args.steps, run_dir, variant,
                                   args.with_plugin if variant is None else None, plugin_options, args.save_every, pivot_file)
            # fails here, before any training, on a bad preset (the shared pivot may not exist yet)
            config = build_config(copy.deepcopy(preset), check_paths=pivot_file is None or pivot_file.is_file())
            instantiate_plugins(config)  # unknown plugins and bad plugin options, too
            path = (args.out / "presets" / f"{name}.toml").resolve()
            atomic_write_text(path, toml.dumps(preset))
            specs.append(RunSpec(name, lr, variant or "none", path, run_dir, config.output_name, config.token_string))
    return specs


