"""The checks of a parsed preset, before any model loads: ranges, choices, stage kinds, data keys,
paths that must exist, and whether the pivot is learned at all. Each problem raises
:class:`~pti_plugin.config.ConfigError` naming its key.

:func:`pti_plugin.config_loading.build_config` calls :func:`validate_config` on the parsed config and
:func:`check_the_pivot_is_learned` on the resolved one; the checks of numbers, names, path kinds
and starting files follow in :mod:`pti_plugin.input_checks`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from .config import DATA_PATH_KEYS, EMBEDDED, PATH_KEYS, Config, ConfigError, network_args
from .data.dataset_keys import DATASET_KEYS, SUBSET_KEYS, TOP_LEVEL_KEYS
from .input_checks import check_inputs, with_leading_dot, with_tokenizer_cache_dir
from .text_files import path_not_found

logger = logging.getLogger(__name__)

_STAGE_KINDS = ("inversion", "lora")


def check_the_pivot_is_learned(config: Config) -> None:
    """A run where no stage trains the pivot, with no ``weights`` file nor ``resume``, keeps ``tok1``
    equal to its init word: a warning, and an error with ``pivot_locality`` toward the init word
    itself (the default class word: the pivot->class angle is then 0, so the regulariser would tie
    the model to itself on the training prompt)."""
    if any(stage.train_pivot for stage in config.stages) or config.weights or config.resume:
        return
    words = " ".join(config.init_words)
    locality = config.plugins.get("pivot_locality")
    if locality is not None and set(locality.get("class_words") or config.init_words) <= set(config.init_words):
        raise ConfigError(
            f"preset: plugins.pivot_locality needs a learned pivot, but no stage trains it and no 'weights' file "
            f"is given: {config.token_string} equals its init word {words!r}, so the pivot->class angle is 0. "
            "Add an inversion stage, set 'weights' to a trained embedding, or drop the plugin"
        )
    logger.warning("no stage trains the pivot and no 'weights' file is given: %s stays its init word %r",
                   config.token_string, words)



def _warn_replaced_epoch_interval(config: Config) -> None:
    """kohya's ``save_n_epoch_ratio`` replaces ``save_every_n_epochs`` when both are set: a warning naming both."""
    if config.save_n_epoch_ratio and config.save_every_n_epochs:
        logger.warning("save_n_epoch_ratio = %d replaces save_every_n_epochs = %d (as in kohya): each stage saves every "
                       "floor(its epochs / %d) epochs (at least 1)", config.save_n_epoch_ratio, config.save_every_n_epochs,
                       config.save_n_epoch_ratio)


#: Keys that are unset (None) or > 0: top-level ones, and a stage's (``stages.<i>.<key>``).
_POSITIVE_WHEN_SET = ("unet_lr", "text_encoder_lr", "max_train_epochs", "save_n_epoch_ratio", "validate_every_n_steps",
                      "validate_every_n_epochs", "max_validation_steps", "lr_scheduler_timescale",
                      "save_last_n_steps", "save_last_n_steps_state", "save_last_n_epochs", "save_last_n_epochs_state",
                      "sample_every_n_epochs")
_STAGE_POSITIVE_WHEN_SET = ("steps", "max_train_epochs", "learning_rate", "unet_lr", "text_encoder_lr", "pivot_lr",
                            "lr_scheduler_timescale")


def validate_config(config: Config, check_paths: bool, data_only: bool = False) -> None:
    """Every check of a parsed (not yet resolved) config; the first problem raises ConfigError naming its key.
    ``data_only``: only the paths a tool that loads no model reads (``DATA_PATH_KEYS``); no device question."""
    from .choices import CHOICES, choice_problem
    from .hooks import instantiate_plugins

    for key in CHOICES:
        problem = choice_problem(key, getattr(config, key), data_only)
        if problem:
            raise problem
    if not config.stages:
        raise ConfigError("preset: 'stages' is empty; at least one stage is needed")
    for i, stage in enumerate(config.stages):
        if stage.kind not in _STAGE_KINDS:
            raise ConfigError.at(f"stages.{i}.kind", f" must be one of {list(_STAGE_KINDS)}, got {stage.kind!r}")
    positive = ["max_train_steps", "learning_rate", "train_batch_size", "gradient_accumulation_steps", "network_dim",
                "log_every_n_steps", "max_nan_skips", "sample_steps", "clip_skip", "lr_scheduler_num_cycles",
                "lr_scheduler_power", "huber_c", "huber_scale", "vae_batch_size"]
    for key in positive:
        if getattr(config, key) <= 0:
            raise ConfigError.at(key, f" must be > 0, got {getattr(config, key)!r}")
    for key in ("network_alpha", "max_grad_norm", "noise_offset", "min_snr_gamma", "save_every_n_steps",
                "save_every_n_epochs", "sample_every_n_steps", "pivot_weight_decay", "multires_noise_iterations",
                "max_data_loader_n_workers", "min_timestep", "ip_noise_gamma", "v_pred_like_loss"):
        if getattr(config, key) < 0:
            raise ConfigError.at(key, f" must be >= 0, got {getattr(config, key)!r}")
    for key in _POSITIVE_WHEN_SET:
        if getattr(config, key) is not None and getattr(config, key) <= 0:
            raise ConfigError.at(key, f" must be > 0, got {getattr(config, key)!r}")
    _warn_replaced_epoch_interval(config)
    for i, stage in enumerate(config.stages):
        for key in _STAGE_POSITIVE_WHEN_SET:
            value = getattr(stage, key)
            if value is not None and value <= 0:
                raise ConfigError.at(f"stages.{i}.{key}", f" must be > 0, got {value!r}")
    _check_schedule_values(config)
    if not 0 <= config.multires_noise_discount <= 1:  # > 1 drowns the noise in its coarse levels (1e30: NaN noise)
        raise ConfigError.at("multires_noise_discount", f" must be between 0 and 1, got {config.multires_noise_discount!r}")
    _check_noise_keys(config)
    if isinstance(config.resolution, list) and len(config.resolution) != 2:
        raise ConfigError.at("resolution", " must be one size or two (width, height; W,H on the command line), "
                                           f"got {config.resolution!r}")
    sizes = config.resolution if isinstance(config.resolution, list) else [config.resolution]
    multiple = 64 if config.enable_bucket else 8
    if any(size <= 0 or size % multiple for size in sizes):
        raise ConfigError.at("resolution", f" must be a positive multiple of {multiple}"
                          f"{' (enable_bucket)' if config.enable_bucket else ''}, got {config.resolution!r}")
    _check_optimisation(config)
    network_args(config)
    if not 1 <= config.num_vectors_per_token <= config.max_token_length:  # vectors past it would never train
        raise ConfigError.at("num_vectors_per_token", f" must be between 1 and max_token_length = "
                                                      f"{config.max_token_length} (the caption's tokens), got "
                                                      f"{config.num_vectors_per_token}")
    if len(config.init_words) not in (1, config.num_vectors_per_token):
        raise ConfigError.at("init_word", " lists one word, or one word per vector (num_vectors_per_token)")
    if not config.output_dir.strip():  # before: the run wrote into the current folder without a word
        raise ConfigError.at("output_dir", " is empty: give the folder for the run's files ('.' for the current one)")
    if Path(config.output_name).name != config.output_name or not config.output_name:
        raise ConfigError.at("output_name", f" must be a plain file name, got {config.output_name!r}")
    if config.output_name.casefold() == config.token_string.casefold():  # one file where case is not told apart
        raise ConfigError(
            f"preset: output_name {config.output_name!r} equals token_string {config.token_string!r} (letter case aside, "
            "as on Windows and macOS): the LoRA and the standalone embedding would be the same file; choose another output_name"
        )
    _check_data_keys(config)
    if not config.train_data_dir and not config.dataset_config:
        raise ConfigError("preset: set 'train_data_dir' (a kohya image folder) or 'dataset_config'")
    if config.train_data_dir and config.dataset_config:
        raise ConfigError("preset: set only one of 'train_data_dir' and 'dataset_config' (a command-line one "
                          "replaces the preset's other one)")
    if check_paths:
        for key in DATA_PATH_KEYS if data_only else PATH_KEYS:
            value = getattr(config, key)
            if value and value != EMBEDDED and not Path(value).expanduser().exists():
                raise ConfigError.at(key, f": {path_not_found(value)}")
    for name in config.plugins:
        if not isinstance(config.plugins[name], dict):
            raise ConfigError.at(f"plugins.{name}", " must be a table of options")
    instantiate_plugins(config)  # unknown plugins and bad plugin options, before any model loads
    check_inputs(config, check_paths, data_only)  # numbers, names, path kinds, starting files: see there



def _check_data_keys(config: Config) -> None:
    """The top-level kohya dataset keys, by the dataset_config's own checks (``data/dataset_keys.py``;
    a dataset_config's values are checked when it is read), and the keys of the other sources."""
    for key in TOP_LEVEL_KEYS:
        value = getattr(config, key)
        try:
            (DATASET_KEYS | SUBSET_KEYS)[key](value)
        except ValueError as exc:
            raise ConfigError.at(key, f" {exc}, got {value!r}") from None
    if config.prior_loss_weight < 0:
        raise ConfigError.at("prior_loss_weight", f" must be >= 0, got {config.prior_loss_weight!r}")
    if config.dataset_repeats < 1:
        raise ConfigError.at("dataset_repeats", f" must be >= 1, got {config.dataset_repeats!r}")
    for key in ("reg_data_dir", "in_json"):
        if getattr(config, key) and config.dataset_config:
            raise ConfigError.at(key, " is not used with 'dataset_config' (kohya ignores it there); "
                              + ("add [[datasets.subsets]] with is_reg = true instead" if key == "reg_data_dir"
                                 else "use a metadata_file subset instead"))
        if getattr(config, key) and not config.train_data_dir:
            raise ConfigError.at(key, " needs 'train_data_dir'")
    if config.reg_data_dir and config.in_json:
        raise ConfigError("preset: 'reg_data_dir' applies to kohya folders, not to in_json (fine-tuning) data")
    _check_kohya_caption_keys(config)


def _check_kohya_caption_keys(config: Config) -> None:
    """kohya's textual inversion's ``use_object_template`` / ``use_style_template`` (one of them, with an inversion
    stage to apply to)."""
    if config.use_object_template and config.use_style_template:
        raise ConfigError.at("use_style_template", " and use_object_template are both true: kohya then uses the object "
                                                   "templates and ignores this one; set only one of them")
    key = "use_object_template" if config.use_object_template else "use_style_template" if config.use_style_template else ""
    if key and not any(stage.kind == "inversion" for stage in config.stages):
        raise ConfigError.at(key, " replaces the training captions in inversion stages (kohya's textual inversion), "
                                  "and no stage is one: add an inversion stage or drop it")


def _check_noise_keys(config: Config) -> None:
    """kohya's noise options that refine another one need it (kohya ignores them silently without it), and the
    timestep bounds; the bounds against the model's schedule are checked as it loads (``diffusion_loss``). Huber
    settings that the loss_type (or the "snr" schedule, for huber_scale) does not use are warned about."""
    needs = {"noise_offset_random_strength": "noise_offset", "adaptive_noise_scale": "noise_offset",
             "ip_noise_gamma_random_strength": "ip_noise_gamma"}
    for key, base in needs.items():
        if getattr(config, key) and not getattr(config, base):
            raise ConfigError.at(key, f" = {getattr(config, key)!r} needs {base} > 0: it changes {base}'s strength, "
                                      f"and {base} is 0 (off)")
    if config.max_timestep is not None and config.max_timestep < config.min_timestep:
        raise ConfigError.at("max_timestep", f" = {config.max_timestep} is below min_timestep = {config.min_timestep}: "
                                             "timesteps are drawn in [min_timestep, max_timestep) (kohya), or are "
                                             "max_timestep itself when the two are equal")
    unused = ["huber_schedule", "huber_c", "huber_scale"] if config.loss_type not in ("huber", "smooth_l1") else (
        ["huber_scale"] if config.huber_schedule == "snr" else [])
    defaults = Config()
    if given := [f"{key} = {getattr(config, key)!r}" for key in unused if getattr(config, key) != getattr(defaults, key)]:
        logger.warning("%s: not used with loss_type = %r and huber_schedule = %r (kohya ignores it too)",
                       ", ".join(given), config.loss_type, config.huber_schedule)


def _check_optimisation(config: Config) -> None:
    """Each stage's optimizer and scheduler names, then its optimizer built with its ``optimizer_args`` (a bad
    argument used to stop the run when its stage began, after the stages before it had trained); kohya's LoRA
    regularisation keys (``lora_regularisation.py``), ``full_bf16`` and kohya's accelerator options (``accelerator_options.py``)."""
    from .accelerator_options import check_accelerator_options
    from .choices import optimizer_problem
    from .lora_regularisation import check_lora_regularisation
    from .optimizers import optimizer_args_problem

    for where, stage in [("", config)] + [(f"stages.{i}.", s) for i, s in enumerate(config.stages)]:
        problem = optimizer_problem(where, stage.optimizer_type, stage.lr_scheduler)
        if problem:
            raise problem
    for where, stage in [(f"stages.{i}.", s) for i, s in enumerate(config.stages)] or [("", config)]:
        args, args_where = (config.optimizer_args, "") if stage.optimizer_args is None else (stage.optimizer_args, where)
        problem = optimizer_args_problem(stage.optimizer_type or config.optimizer_type, args)
        if problem:
            raise ConfigError.at(f"{args_where}optimizer_args", f": {problem}")
    check_lora_regularisation(config)
    _check_full_bf16(config)
    _check_fp8_base(config)
    check_accelerator_options(config)


def _check_fp8_base(config: Config) -> None:
    """kohya's rule: ``fp8_base`` / ``fp8_base_unet`` need ``mixed_precision`` fp16 or bf16, whose autocast upcasts
    the float8 weights in each layer (a float8 weight cannot enter an operation as it is)."""
    key = "fp8_base" if config.fp8_base else "fp8_base_unet" if config.fp8_base_unet else None
    if key and config.mixed_precision not in ("fp16", "bf16"):
        raise ConfigError.at(key, f' = true needs mixed_precision = "fp16" or "bf16" (kohya\'s rule: autocast upcasts the '
                                  f"float8 weights in each layer), got {config.mixed_precision!r}")


def _check_full_bf16(config: Config) -> None:
    """kohya's rule: ``full_bf16`` needs ``mixed_precision = "bf16"``, the dtype it casts the trainable tensors to."""
    if config.full_bf16 and config.mixed_precision != "bf16":
        raise ConfigError.at("full_bf16", f" = true needs mixed_precision = \"bf16\" (kohya's rule: the pivot and the "
                                          f"LoRA train in the mixed-precision dtype), got {config.mixed_precision!r}")


# ----------------------------------------------------------------------------- warm-up and schedulers

def _check_schedule_values(config: Config) -> None:
    """kohya's schedule numbers (top level and each stage's): ``lr_warmup_steps`` and ``lr_decay_steps`` whole steps
    >= 0, or kohya's ratio, a float in [0, 1); ``lr_scheduler_min_lr_ratio`` in [0, 1] (``lr_scheduler_timescale`` > 0:
    ``_POSITIVE_WHEN_SET``)."""
    for where, table in [("", config)] + [(f"stages.{i}.", s) for i, s in enumerate(config.stages)]:
        for key in ("lr_warmup_steps", "lr_decay_steps"):
            value = getattr(table, key)
            if value is not None and value < 0:
                raise ConfigError.at(where + key, f" must be >= 0, got {value!r}")
            if isinstance(value, float) and value >= 1:
                raise ConfigError.at(where + key, f" as a float is a fraction of the stage's steps (kohya) and must be "
                                                  f"below 1, got {value!r}; give whole steps as an integer")
        ratio = table.lr_scheduler_min_lr_ratio
        if ratio is not None and not 0 <= ratio <= 1:
            raise ConfigError.at(where + "lr_scheduler_min_lr_ratio", " is a fraction of the learning rate and must be "
                                                                      f"between 0 and 1, got {ratio!r}")


def check_stage_schedules(parsed: Config, config: Config) -> None:
    """Each resolved stage's schedule, before any model loads (:func:`pti_plugin.lr_schedulers.schedule_problem`):
    a setting its schedule ignores (a warm-up on ``constant``: kohya refuses it too), one it needs and lacks,
    ``lr_scheduler_args`` it cannot take, warm-up and decay longer than the stage, a schedule that cannot be built
    (``polynomial`` at a learning rate at or below its end rate 1e-7: before, a traceback when the stage began); an
    ``lr_scheduler`` beside ``lr_scheduler_type``, which replaces it. An epoch-based stage is checked on a stand-in
    length here, and on its own once the data scan tells it (``resolution.with_epoch_steps``). ``parsed``: the
    config as written (its stages name where each value was given)."""
    from .lr_schedulers import schedule_problem
    from .resolution import with_length

    default_scheduler = next(f.default for f in dataclasses.fields(Config) if f.name == "lr_scheduler")
    for given, stage in zip(parsed.stages, config.stages):
        def where(key: str) -> str:
            return f"stages.{stage.index}.{key}" if getattr(given, key) is not None else key

        # A stage's own lr_scheduler_type replaces the top-level lr_scheduler the other stages use; given together at
        # one level (or a stage's lr_scheduler under a top-level lr_scheduler_type), one of them would be ignored.
        overrides = given.lr_scheduler_type is not None and given.lr_scheduler is None
        if stage.lr_scheduler_type and stage.lr_scheduler != default_scheduler and not overrides:
            raise ConfigError.at(where("lr_scheduler"), f" = {stage.lr_scheduler!r} reaches stage {stage.index} "
                                 f"{stage.name!r}, whose lr_scheduler_type {stage.lr_scheduler_type!r} replaces it "
                                 "(kohya ignores lr_scheduler then): leave one of the two out (a stage goes back to a "
                                 'named schedule with its own lr_scheduler_type = "")')
        probe = stage
        if stage.steps is None:  # a length at which any warm-up or decay ratio is whole steps
            steps = 10**6 + sum(v for v in (stage.lr_warmup_steps, stage.lr_decay_steps) if isinstance(v, int))
            probe = with_length(stage, steps)
        if problem := schedule_problem(probe, length_known=stage.steps is not None):
            raise ConfigError.at(where(problem[0]), problem[1])


def with_kohya_tracker(config: Config) -> Config:
    """kohya's meaning of ``logging_dir`` without ``log_with``: log to TensorBoard there (before, nothing was
    logged and nothing said so). Without the tensorboard package, a warning says the folder stays unused."""
    if not config.logging_dir or config.log_with:
        return config
    from .choices import installed

    if not installed("tensorboard", "tensorboardX"):
        logger.warning("logging_dir = %r: kohya logs to TensorBoard there, but the tensorboard package is not "
                       "installed, so nothing is logged (pip install tensorboard)", config.logging_dir)
        return config
    logger.info("logging_dir = %r without log_with: logging to TensorBoard there, as kohya does", config.logging_dir)
    return dataclasses.replace(config, log_with="tensorboard")


#: kohya's deprecated optimizer switches and the optimizer_type each stands for (``train_util.get_optimizer``).
OPTIMIZER_SWITCHES = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}


def _with_caption_extention(config: Config) -> Config:
    """kohya's misspelt ``caption_extention``, checked as a file extension naming it, replaces ``caption_extension``
    (with its leading dot, as that key is read) and is cleared."""
    from .data.dataset_keys import file_extension

    if not config.caption_extention:
        return config
    try:
        file_extension(config.caption_extention)
    except ValueError as exc:
        raise ConfigError.at("caption_extention", f" {exc}, got {config.caption_extention!r}") from None
    logger.info("caption_extention = %r (kohya's misspelt alias) replaces caption_extension = %r, as in kohya",
                config.caption_extention, config.caption_extension)
    return dataclasses.replace(config, caption_extension=with_leading_dot(config.caption_extention), caption_extention="")


def with_kohya_switches(config: Config, raw: dict[str, Any], check_paths: bool) -> Config:
    """kohya's switches and aliases that set other keys, applied to the parsed ``config`` (``raw``: the preset and
    command line as written, which tell a key given from our default), before the checks; each error names the key
    the user wrote:

    - ``tokenizer_cache_dir``: ``tokenizer_path`` (:func:`~.input_checks.with_tokenizer_cache_dir`; ``check_paths``:
      its folder holds a tokenizer).
    - ``caption_extention``: ``caption_extension`` (:func:`_with_caption_extention`).
    - ``use_8bit_adam`` / ``use_lion_optimizer``: the top-level ``optimizer_type`` ``"AdamW8bit"`` / ``"Lion"``, so the
      default of every stage without its own (kohya's ``get_optimizer``: refused beside each other or beside a
      non-empty top-level ``optimizer_type``, as kohya asserts; refused when every stage sets its own). The switch is
      then cleared, so the resolved config, read back, does not apply it again.
    - ``network_train_text_encoder_only``: kohya's default ``network_train_unet_only = false`` (ours is true) unless
      given; given true beside it, refused naming both (kohya would then train no LoRA module and stop on an empty
      parameter list).
    - ``mem_eff_attn``: kohya's own memory-efficient attention, which comes before xformers and sdpa in kohya's
      ``replace_unet_modules``: PyTorch SDPA (its memory-efficient kernels; the same attention) and no xformers."""
    config = _with_caption_extention(with_tokenizer_cache_dir(config, check_paths))
    switches = [key for key in OPTIMIZER_SWITCHES if getattr(config, key)]
    if len(switches) == 2:
        raise ConfigError.at("use_lion_optimizer", " = true beside use_8bit_adam = true: kohya refuses both (one "
                                                   "optimizer); set one of them, or optimizer_type")
    if switches:
        key, name = switches[0], OPTIMIZER_SWITCHES[switches[0]]
        if raw.get("optimizer_type"):
            raise ConfigError.at(key, f" = true (kohya's deprecated optimizer_type = {name!r}) beside optimizer_type = "
                                      f"{raw['optimizer_type']!r}: kohya refuses both; keep one of them")
        if all(stage.optimizer_type is not None for stage in config.stages):
            shadows = "; ".join(f"stages.{i}.optimizer_type = {s.optimizer_type!r}" for i, s in enumerate(config.stages))
            raise ConfigError.at(key, f" = true (optimizer_type = {name!r}) reaches no stage: {shadows}. Remove it, or "
                                      "set a stage's optimizer_type")
        logger.info("%s = true: optimizer_type = %r (kohya's deprecated switch)", key, name)
        config = dataclasses.replace(config, optimizer_type=name, **dict.fromkeys(OPTIMIZER_SWITCHES, False))
    if config.mem_eff_attn:
        logger.info("mem_eff_attn = true: PyTorch SDPA attention (kohya's memory-efficient attention comes first)")
        config = dataclasses.replace(config, mem_eff_attn=False, sdpa=True, xformers=False)
    if not config.network_train_text_encoder_only:
        return config
    if "network_train_unet_only" not in raw:
        return dataclasses.replace(config, network_train_unet_only=False)
    if config.network_train_unet_only:
        raise ConfigError.at("network_train_text_encoder_only", " = true beside network_train_unet_only = true: no "
                                                                "LoRA would train (kohya stops on an empty parameter "
                                                                "list); set one of them")
    return config
