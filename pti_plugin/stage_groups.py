"""A stage's own keys checked against what it trains, and the pivot's weight decay (``resolution.resolve_stage``).

- A stage rate or switch for a group the stage does not train (``text_encoder_lr`` on a lora stage that trains no
  text-encoder LoRA, ``pivot_lr`` on one that leaves the pivot frozen, ``unet_lr``, ``text_encoder_lr`` or a true
  ``train_unet``/``train_text_encoder`` on an inversion stage) would be dropped: it is refused before any model
  loads, naming the key, the switch that leaves the group out and the ``--set`` that trains it.
- The pivot's weight decay in a stage is its ``optimizer_args``' ``weight_decay`` when they give one (kohya's
  textual inversion hands the optimizer's decay to the embedding), else ``pivot_weight_decay`` (default 0, so that
  AdamW's own default decay, 0.01, never reaches the pivot). A ``pivot_weight_decay`` other than 0 beside a stage that
  trains the pivot with a ``weight_decay`` in its ``optimizer_args`` is refused naming both.
"""

from __future__ import annotations

from .config import Config, ConfigError, StageConfig, toml_literal

#: A lora stage's LoRA groups: rate key -> (its stage switch, kohya's "only" switch that is its default's negation,
#: the group in words).
LORA_GROUPS = {"unet_lr": ("train_unet", "network_train_text_encoder_only", "UNet LoRA"),
               "text_encoder_lr": ("train_text_encoder", "network_train_unet_only", "text-encoder LoRA")}


def switch_text(stage: StageConfig, index: int, rate: str) -> str:
    """Why lora stage ``index`` leaves out the group of ``rate`` (``unet_lr``/``text_encoder_lr``): its own switch,
    or the kohya "only" switch its default follows (``network_train_unet_only`` is true by default here, false in
    kohya)."""
    switch, only, _ = LORA_GROUPS[rate]
    if getattr(stage, switch) is not None:
        return f"stages.{index}.{switch} = false"
    default = ", pti-plugin's default; kohya's is false" if only == "network_train_unet_only" else ""
    return f"stages.{index}.{switch} = false by {only} = true{default}"


def switch_commands(stage: StageConfig, index: int, rate: str) -> list[str]:
    """The commands that make lora stage ``index`` train the group of ``rate``: its switch by ``--set``, and where
    the stage leaves the switch to kohya's "only" switch, that one on the command line."""
    switch, only, _ = LORA_GROUPS[rate]
    return [f"--set stages.{index}.{switch}=true"] + ([f"--{only} false"] if getattr(stage, switch) is None else [])


def check_stage_keys(config: Config, stage: StageConfig, index: int, name: str, trains: dict[str, bool]) -> None:
    """Refuse a key of ``stage`` (the ``[[stages]]`` table as written) for a group it does not train; ``trains``:
    ``train_pivot``, ``train_unet``, ``train_text_encoder`` as resolved."""
    where = f"stages.{index}"
    if stage.kind != "lora":
        for key in ("unet_lr", "text_encoder_lr", "train_unet", "train_text_encoder"):
            value = getattr(stage, key)
            if value is not None and value is not False:  # a resolved config writes train_unet = false: what it does
                raise ConfigError.at(f"{where}.{key}", f" = {toml_literal(value)}: stage {name!r} is an inversion stage, "
                                     "which trains the pivot only (lora stages train the LoRA): leave it out, or set "
                                     "it on a lora stage")
        return
    if stage.pivot_lr is not None and not trains["train_pivot"]:
        why = f"{where}.train_pivot = false" if stage.train_pivot is not None else "a lora stage's train_pivot is false by default"
        raise ConfigError.at(f"{where}.pivot_lr", f" = {toml_literal(stage.pivot_lr)}: stage {name!r} does not train the pivot "
                             f"({why}): to train it at this rate (continued inversion), add --set {where}.train_pivot=true; "
                             "else leave it out")
    for rate, (switch, _, group) in LORA_GROUPS.items():
        value = getattr(stage, rate)
        if value is not None and not trains[switch]:
            raise ConfigError.at(f"{where}.{rate}", f" = {toml_literal(value)}: stage {name!r} trains no {group} "
                                 f"({switch_text(stage, index, rate)}): to train one at this rate, add "
                                 f"{' or '.join(switch_commands(stage, index, rate))}; else leave it out")


def pivot_weight_decay(config: Config, stage: StageConfig, index: int, name: str, optimizer_args: tuple[str, ...],
                       trains_pivot: bool) -> float:
    """The pivot's weight decay in stage ``index`` (its effective ``optimizer_args``): their ``weight_decay`` if they
    give one, else ``pivot_weight_decay``; both, with ``pivot_weight_decay`` not 0 in a stage that trains the pivot,
    refused naming both. The arguments are checked before (``config_checks``: the optimizer is built with them)."""
    from .optimizers import parse_key_values

    decay = parse_key_values(optimizer_args).get("weight_decay")
    if decay is None:
        return config.pivot_weight_decay
    if trains_pivot and config.pivot_weight_decay:
        where = f"stages.{index}.optimizer_args" if stage.optimizer_args is not None else "optimizer_args"
        raise ConfigError.at("pivot_weight_decay", f" = {toml_literal(config.pivot_weight_decay)} and {where}' weight_decay = "
                             f"{toml_literal(decay)} both set the pivot's decay in stage {index} {name!r}: give one of the "
                             "two (a stage's optimizer_args decay the pivot too, as in kohya's textual inversion; "
                             "pivot_weight_decay applies where they give no weight_decay)")
    return float(decay)
