"""Start-time checks of everything a user can hand the trainer, before any model loads.

``check_inputs(config)`` is called at the end of configuration validation. Each problem raises
:class:`~pti_plugin.config.ConfigError` naming the key and the culprit (file, tensor, line):

- every number is finite (TOML and the command line accept ``inf``/``nan``), ``seed`` is >= 0;
- ``token_string`` and ``output_name`` fit every place they are used: file names (no ``/``,
  ``\\``, control characters, not too long), the LoRA's bundled-embedding key (no ``.``) and the
  tokenizer (one word);
- ``caption_extension`` without its dot (``"txt"``) is read as ``".txt"``, as kohya does, with a
  warning;
- path keys point at the right kind of thing (a folder for ``train_data_dir``, a file for
  ``dataset_config`` ...), ``output_dir`` (and ``logging_dir`` when a tracker logs) can be written;
- the ``dataset_config`` TOML has the right shape at every level (tables and arrays of tables);
- the ``sample_prompts`` file parses;
- ``log_prefix``/``log_tracker_name``/``log_tracker_config`` fit the tracker (``tracking.py``), the
  ``metadata_thumbnail`` image reads;
- the starting files ``weights`` and ``network_weights`` load through the safe loaders and hold
  finite values only, as do the ``base_weights`` LoRAs (one ``base_weights_multiplier`` each);
- a ``vae`` file or folder is a VAE of the model's architecture (``models/vae_file.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import string
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import DATA_PATH_KEYS, EMBEDDED, Config, ConfigError
from .formats.model_spec import thumbnail_data_url
from .text_files import read_toml_file
from .tracking import check_tracker_options

logger = logging.getLogger(__name__)

#: The longest suffix a run adds to ``output_name``/``token_string`` in a file name, plus the
#: temporary-file wrapping of an atomic write: ``.<name>-interrupted-step00000000.safetensors.XXXXXXXX.tmp``.
_LONGEST_ADDITION = len(".-interrupted-step00000000.safetensors.XXXXXXXX.tmp")
_FILE_NAME_FORBIDDEN = set('/\\:*?"<>|')
#: Windows device names: a file whose name is one of them before its first dot (``NUL.safetensors``) cannot be made
#: or copied there (writes go to the device); the rule of Python's ``ntpath.isreserved``.
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {f"{p}{i}" for p in ("COM", "LPT") for i in
                                                                       [*"123456789", "\u00b9", "\u00b2", "\u00b3"]}
_MAX_SEED = 2**63 - 1
_FLOAT32_MAX = 3.4028234663852886e38  # training runs in float32 at most
#: Denoising steps a sample may take: the schedulers refuse more than the 1000 training timesteps of SD1.5/SDXL
#: (before: a traceback when the first sample ran, after training).
MAX_SAMPLE_STEPS = 1000
#: The largest sample width or height (px, ``--w``/``--h``): four times SDXL's 1024 px. Beyond it a typo
#: (``--w 100000``) would try to allocate a huge latent when the first sample runs, after training.
MAX_SAMPLE_SIZE = 4096


def check_inputs(config: Config, check_paths: bool = True, data_only: bool = False) -> None:
    """Run every start-time check on ``config`` (see the module docstring); ``data_only`` (a tool that loads no
    model): of the paths, only the data's (``DATA_PATH_KEYS``)."""
    check_finite_numbers(config)
    if not 0 <= config.seed <= _MAX_SEED:
        raise ConfigError.at("seed", f" must be between 0 and {_MAX_SEED}, got {config.seed}")
    if config.sample_steps > MAX_SAMPLE_STEPS:
        raise ConfigError.at("sample_steps", f" must be at most {MAX_SAMPLE_STEPS} (the model's training timesteps), "
                                             f"got {config.sample_steps}")
    check_token_string(config.token_string)
    check_token_outside_separators(config)
    if problem := template_problem(config.caption_template):
        raise ConfigError.at("caption_template", f" = {config.caption_template!r} {problem}")
    check_name_fits("output_name", config.output_name)
    if not config.caption_extension.startswith("."):
        logger.warning("caption_extension %r has no leading dot; reading it as %r (as kohya does)",
                       config.caption_extension, with_leading_dot(config.caption_extension))
    if not check_paths:
        return
    check_path_kinds(config, DATA_PATH_KEYS if data_only else _FOLDER_KEYS + _FILE_KEYS)
    if config.dataset_config:
        check_dataset_config_shape(Path(config.dataset_config))
    if data_only:
        return
    check_output_dir_writable(Path(config.output_dir).expanduser())
    if config.log_with and config.logging_dir:  # the tracker's folder, made once training starts
        check_output_dir_writable(Path(config.logging_dir).expanduser(), "logging_dir")
    check_tracker_options(config)  # log_prefix, log_tracker_name, log_tracker_config (tracking.py)
    if config.metadata_thumbnail:  # kohya's modelspec.thumbnail: the image is read now, not at the first save
        _wrap("metadata_thumbnail", lambda: thumbnail_data_url(config.metadata_thumbnail))
    if config.sample_prompts:
        check_sample_prompts(Path(config.sample_prompts))
    check_starting_files(config)
    check_clip_skip(config)
    if config.resume:
        check_resume_folder(Path(config.resume), config.token_string)
    model = Path(config.pretrained_model_name_or_path).expanduser()
    if config.pretrained_model_name_or_path != EMBEDDED and model.is_file():
        _wrap("pretrained_model_name_or_path", lambda: check_model_framing(model))
    elif config.pretrained_model_name_or_path != EMBEDDED and model.is_dir():
        from .models.model_checks import MODEL_KEY, model_folder_problem

        if problem := model_folder_problem(model, config.model_family):  # its JSON files only, before the data scan
            raise ConfigError.at(MODEL_KEY, f": {problem}")
    if config.vae:  # after the model's own checks: the VAE's shapes are checked against its VAE config
        from .models.vae_file import check_vae_source

        check_vae_source(config.vae, _component_config(config, "vae"))


# ----------------------------------------------------------------------------- numbers

def _non_finite(value: Any, where: str) -> str | None:
    """The dotted key of the first non-finite float in ``value`` (nested lists/tables), or None."""
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= _FLOAT32_MAX):
        return where
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite(item, f"{where}.{key}")
        if found:
            return found
    return None


def check_finite_numbers(config: Config) -> None:
    """Refuse NaN/inf anywhere in the preset (top-level keys, stages, plugin options)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "stages":
            value = [dataclasses.asdict(stage) for stage in value]
        found = _non_finite(value, field.name)
        if found:
            raise ConfigError.at(found, f" must be a finite number within float32 range, "
                              f"got {_lookup(config, found)!r}")


def _lookup(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node[part]
        else:
            node = getattr(node, part)
    return node


# ----------------------------------------------------------------------------- names

def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or its nearest existing parent) takes."""
    existing = nearest_existing(folder)
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def nearest_existing(folder: Path) -> Path:
    """``folder`` (made absolute) or its nearest parent that exists: where a folder not made yet would go."""
    folder = folder.resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_name_fits(key: str, name: str, limit: int = 255) -> None:
    """``name`` is usable as the start of a file name: no separators, control characters, or excess length."""
    bad = sorted({c for c in name if c in _FILE_NAME_FORBIDDEN or unicodedata.category(c).startswith("C")})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ConfigError.at(key, f" = {name!r} contains {shown}, which cannot be part of a file name")
    if name in (".", "..") or name != name.strip():
        raise ConfigError.at(key, f" = {name!r} is not a usable file name")
    if name.partition(".")[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
        raise ConfigError.at(key, f" = {name!r} is a device name on Windows ({name.partition('.')[0]}): files named "
                                  f"{name}.safetensors cannot be made or copied there; choose another name")
    room = limit - _LONGEST_ADDITION
    if len(name.encode("utf-8")) > room:
        raise ConfigError.at(key, f" is {len(name.encode('utf-8'))} bytes long; file names built from it "
                          f"would exceed the file system's {limit}-byte limit: use at most {room} bytes")


def check_token_string(token: str) -> None:
    """The token is one word usable as a file name, a bundled-embedding key (no ``.``) and a tokenizer token."""
    if not token or any(c.isspace() for c in token):
        raise ConfigError.at("token_string", f" must be one word (no spaces, tabs or line breaks), got {token!r}")
    if "." in token:
        raise ConfigError.at("token_string", f" = {token!r} contains '.', which the LoRA's bundled-embedding "
                          "key (bundle_emb.<token>.string_to_param) cannot hold; choose a token without dots")
    check_name_fits("token_string", token)


def check_token_outside_separators(config: Config) -> None:
    """The token holds none of the caption separators (``,`` and the configured ones): shuffling, tag dropout and
    keep_tokens would cut it in two, and its pivot would never train."""
    separators = dict.fromkeys([",", config.caption_separator, config.keep_tokens_separator, config.secondary_separator])
    found = [sep for sep in separators if sep and sep in config.token_string]
    if found:
        raise ConfigError.at("token_string", f" = {config.token_string!r} contains the caption separator {found[0]!r}, "
                                             "which splits captions into tags; choose a token without it")


def template_problem(template: str, slot: str = "the token") -> str | None:
    """Why ``template`` is not a caption template (exactly one ``{}``, where ``slot`` goes; other braces doubled),
    else None. The rule of ``caption_template``, pivot_locality's ``templates`` and ellipsoid_check's ``--template``."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        return f"is not a template ({exc}); write a literal brace as {{{{ or }}}}"
    if fields != [("", "", None)]:
        return f"needs exactly one {{}} where {slot} goes, found {len(fields)} field(s)" + (
            "" if all(f == ("", "", None) for f in fields) else " other than {}")
    return None


def with_leading_dot(extension: str) -> str:
    """``caption_extension`` as kohya reads it: ``"txt"`` is ``".txt"``."""
    return extension if not extension or extension.startswith(".") else "." + extension


def check_caption_extension(where: str, extension: str) -> None:
    """A file extension (``.txt``, ``txt``, ``.caption``): the rule of ``data/dataset_keys.py``."""
    from .data.dataset_keys import file_extension

    try:
        file_extension(extension)
    except ValueError as exc:
        raise ConfigError(f"{where} {exc}, got {extension!r}") from None


# ----------------------------------------------------------------------------- paths

_FOLDER_KEYS = ("train_data_dir", "reg_data_dir", "resume", "single_file_config", "tokenizer_path")
_FILE_KEYS = ("dataset_config", "in_json", "sample_prompts", "weights", "network_weights", "config_file")


def check_path_kinds(config: Config, keys: tuple[str, ...]) -> None:
    """Folders where folders are expected, files where files are (of the path keys ``keys``)."""
    for key in keys:
        value = getattr(config, key)
        if not value or value == EMBEDDED:
            continue
        path = Path(value).expanduser()
        if not path.exists():
            continue  # the missing-path check names it
        if key in _FOLDER_KEYS and not path.is_dir():
            raise ConfigError.at(key, f": {path} is a file, not a folder")
        if key in _FILE_KEYS and not path.is_file():
            raise ConfigError.at(key, f": {path} is not a regular file")


def check_output_dir_writable(folder: Path, key: str = "output_dir") -> None:
    """``folder`` (or, when it does not exist yet, its nearest existing parent) is a folder we can write in; a
    problem names ``key`` (``output_dir``, ``logging_dir``)."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise ConfigError.at(key, f": {existing} is a file, not a folder" if existing == folder else
                             f": {existing} is a file, so {folder} cannot be created")
    try:
        fd, probe = tempfile.mkstemp(prefix=".pti-write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError.at(key, f": cannot write in {existing} ({exc.strerror}); "
                                  "choose a folder you can write to") from None


# ----------------------------------------------------------------------------- dataset_config shape

_TABLE_ARRAYS = {"datasets": "[[datasets]]", "subsets": "[[datasets.subsets]]"}


def check_dataset_config_shape(path: Path) -> None:
    """``[general]`` a table, ``datasets`` an array of tables, each ``subsets`` an array of tables."""
    try:
        raw = read_toml_file(path)
    except ValueError as exc:
        raise ConfigError(f"dataset_config {path} {exc}") from None
    if "general" in raw and not isinstance(raw["general"], dict):
        raise ConfigError(f"dataset_config {path}: 'general' must be a table ([general]), got {raw['general']!r}")
    _check_table_array(raw, "datasets", path, "")
    for d, dataset in enumerate(raw.get("datasets", [])):
        _check_table_array(dataset, "subsets", path, f"datasets.{d}.")
    for where, table in [("general", raw.get("general", {}))] + [
        (f"datasets.{d}", ds) for d, ds in enumerate(raw.get("datasets", []))
    ] + [(f"datasets.{d}.subsets.{s}", sub) for d, ds in enumerate(raw.get("datasets", []))
         for s, sub in enumerate(ds.get("subsets", []))]:
        ext = table.get("caption_extension")
        if isinstance(ext, str):
            check_caption_extension(f"dataset_config {path} {where}: caption_extension", ext)
        if isinstance(ext, str) and not ext.startswith("."):
            logger.warning("dataset_config %s %s: caption_extension %r has no leading dot; reading it as %r "
                           "(as kohya does)", path, where, ext, "." + ext)


def _check_table_array(parent: dict[str, Any], key: str, path: Path, prefix: str) -> None:
    value = parent.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"dataset_config {path}: '{prefix}{key}' must be {_TABLE_ARRAYS[key]} tables, got {value!r}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ConfigError(f"dataset_config {path}: '{prefix}{key}.{i}' must be a table ({_TABLE_ARRAYS[key]}), "
                              f"got {item!r}")


# ----------------------------------------------------------------------------- sample prompts and starting files

def check_sample_prompts(path: Path) -> None:
    """Parse every prompt now (as sampling will), so a bad flag or key is not found after training."""
    from .sampling import MIN_SAMPLE_SIDE, kohya_sample_side, parse_prompt_entry, prompt_file_entries

    try:
        entries = prompt_file_entries(path)
    except ValueError as exc:
        raise ConfigError.at("sample_prompts", f": {path} {exc}") from None
    if not entries:
        logger.warning("sample_prompts %s holds no prompt (only blank or # lines, or no prompt table): no samples will be made", path)
    for where, entry in entries:
        try:
            prompt = parse_prompt_entry(entry)
        except ValueError as exc:
            raise ConfigError.at("sample_prompts", f": {path} {where}: {exc}") from None
        # a line's flags, a table's keys (kohya's names for them)
        w, h, s, scale, seed = ("--w", "--h", "--s", "--l", "--d") if isinstance(entry, str) else (
            "width", "height", "sample_steps", "scale", "seed")
        for flag, value in ((w, prompt.width), (h, prompt.height), (s, prompt.steps)):
            if problem := _sample_option_problem(value, steps=flag == s):
                raise ConfigError.at("sample_prompts", f": {path} {where}: {flag} {problem}")
            if flag != s and value is not None and (side := kohya_sample_side(value)) != value:
                logger.warning("sample_prompts %s %s (%r): %s %d is sampled at %d px, as kohya rounds it (down to a "
                               "multiple of 8, at least %d)", path, where, prompt.prompt, flag, value, side, MIN_SAMPLE_SIDE)
        if not math.isfinite(prompt.guidance):
            raise ConfigError.at("sample_prompts", f": {path} {where}: {scale} must be finite")
        if prompt.seed is not None and not 0 <= prompt.seed <= _MAX_SEED:
            raise ConfigError.at("sample_prompts", f": {path} {where}: {seed} must be between 0 and {_MAX_SEED}, "
                                                   f"got {prompt.seed}")


def _sample_option_problem(value: int | None, steps: bool) -> str | None:
    """Why a prompt's width or height (px) or, with ``steps``, its steps ``value`` cannot sample, else None (None: not
    given)."""
    if value is None:
        return None
    if steps:
        return None if 1 <= value <= MAX_SAMPLE_STEPS else (
            f"must be between 1 and {MAX_SAMPLE_STEPS} (the model's training timesteps), got {value}")
    if value < 0:  # kohya's prompt line takes digits only; its 0 (or a table's negative) becomes 64
        return f"must not be negative, got {value}"
    from .sampling import kohya_sample_side

    if kohya_sample_side(value) > MAX_SAMPLE_SIZE:  # the side kohya samples
        return f"must be at most {MAX_SAMPLE_SIZE} px (a larger sample would not fit in memory), got {value}"
    return None


def with_tokenizer_cache_dir(config: Config, check: bool) -> Config:
    """kohya's ``tokenizer_cache_dir``: the folder where kohya keeps the CLIP tokenizer it downloaded once, as
    ``<dir>/openai_clip-vit-large-patch14`` (``strategy_base._load_tokenizer``), becomes ``tokenizer_path`` (and the key
    is cleared, so the resolved config reads back the same). ``check``: that folder holds the tokenizer (pti-plugin
    never downloads it). Beside ``tokenizer_path`` it is refused naming both."""
    if not config.tokenizer_cache_dir:
        return config
    from .models.single_file import CLIP_REPO, tokenizer_folder

    if config.tokenizer_path:
        raise ConfigError.at("tokenizer_cache_dir", f" and tokenizer_path ({config.tokenizer_path!r}) both name the "
                                                    "tokenizer: set one of them")
    folder = Path(config.tokenizer_cache_dir).expanduser() / CLIP_REPO.replace("/", "_")
    if check and tokenizer_folder(folder, subfolder=False) is None:  # kohya loads the folder itself
        raise ConfigError.at("tokenizer_cache_dir", f": {folder} holds no CLIP tokenizer (vocab.json, merges.txt), "
                                                    "where kohya saves the one it downloads; pti-plugin never downloads "
                                                    "it: copy a CLIP tokenizer folder there, or set tokenizer_path")
    return dataclasses.replace(config, tokenizer_path=str(folder), tokenizer_cache_dir="")


def check_starting_files(config: Config) -> None:
    """``weights`` and ``network_weights`` load through the safe loaders and hold finite values only (the LoRA files,
    ``network_weights`` and each of ``base_weights``: :func:`check_lora_tensors`). Each LoRA file is read once: its
    tensors are kept for the run (:mod:`pti_plugin.checked_files`)."""
    from .atomic_io import first_non_finite
    from .checked_files import keep
    from .formats.embedding import load_embedding
    from .formats.kohya_lora import load_lora

    if config.weights:
        tensors = _wrap("weights", lambda: {"vectors": load_embedding(config.weights, token=config.token_string)})
        if bad := first_non_finite(tensors):
            raise ConfigError.at("weights", _non_finite_message(config.weights, bad))
    files = {}
    if config.network_weights:
        files[config.network_weights] = _wrap("network_weights", lambda: load_lora(config.network_weights)[0])
        check_lora_tensors("network_weights", config.network_weights, files[config.network_weights])
    if config.base_weights or config.base_weights_multiplier:  # the LoRA files merged into the model: see there
        from .base_weights import KEY, multipliers_of, read_file

        multipliers_of(config.base_weights, config.base_weights_multiplier)  # one multiplier per file
        for path in config.base_weights:
            files[path] = read_file(path)  # through the safe loader
            check_lora_tensors(KEY, path, files[path])
    keep(files)  # the trainer takes these: each file read once


def _non_finite_message(path: str, tensor: str) -> str:
    return f": {path} holds non-finite values (NaN or inf) in tensor {tensor!r}; it cannot start a run"


def check_lora_tensors(key: str, path: str, tensors: dict[str, Any]) -> None:
    """The tensors read from the kohya LoRA file ``path`` given as ``key`` (``network_weights``, a ``base_weights``
    file): LoRA tensors under kohya's key suffixes (:func:`check_lora_keys`), finite values only."""
    from .atomic_io import first_non_finite

    check_lora_keys(key, path, tensors)
    if bad := first_non_finite(tensors):
        raise ConfigError.at(key, _non_finite_message(path, bad))


def check_lora_keys(key: str, path: str, names: Iterable[str]) -> None:
    """The tensor names ``names`` of the LoRA file ``path`` given as ``key`` are LoRA tensors under kohya's key
    suffixes: an empty file, or another kind of file, is named now."""
    from .formats.kohya_lora import BUNDLE_PREFIX, LORA_SUFFIXES

    lora = [k for k in names if not k.startswith(BUNDLE_PREFIX)]
    if not lora:
        raise ConfigError.at(key, f": {path} holds no LoRA tensors (no lora_down/lora_up/alpha key)")
    if other := [k for k in lora if k.partition(".")[2] not in LORA_SUFFIXES]:
        raise ConfigError.at(key, f": {path} is not a kohya LoRA: key {other[0]!r} ({len(other)} in all) does not end "
                                  f"in {', '.join('.' + s for s in LORA_SUFFIXES)}")


def _wrap(key: str, action):
    """``action()``, its file errors (unsafe pickle, broken safetensors, wrong format) as ConfigError naming ``key``."""
    try:
        return action()
    except ConfigError:
        raise
    except ValueError as exc:  # UnsafeFileError, BadSafetensorsError, the format errors
        raise ConfigError.at(key, f": {exc}") from None


def check_model_framing(path: Path) -> None:
    """A single-file model's framing (safetensors header and extents, or the start of a PyTorch
    file), cheap checks before the whole file is read once the run starts."""
    from .safe_load import check_pytorch_framing, check_safetensors

    (check_safetensors if path.suffix == ".safetensors" else check_pytorch_framing)(path)


def check_resume_folder(folder: Path, token_string: str) -> None:
    """The state folder is complete, its ``progress.json`` parses, its pivot was trained for ``token_string``
    (when it records it) and its pickles pass the safe loader, their tensors mapped, not read: the resume reads them
    once the model is built, and compares the tensor shapes with the run's."""
    from .safe_load import check_safetensors, safe_torch_load
    from .resume import check_resume_token, read_progress

    check_resume_token(read_progress(folder), token_string)
    _wrap("resume", lambda: check_safetensors(folder / "trainable.safetensors"))
    for name in ("optimizer.pt", "lr_scheduler.pt"):
        _wrap("resume", lambda: safe_torch_load(folder / name, mmap=True))


def _component_config(config: Config, component: str = "text_encoder", name: str = "config.json") -> Path | None:
    """The ``config.json`` (``name``) of the model's ``component`` (``text_encoder``, ``vae``; ``scheduler`` with
    ``scheduler_config.json``) the run will use, when it can be found without loading anything (a single file's:
    SD1.5's shipped configs, whose text encoder and VAE have the architecture of SDXL's first text encoder and VAE,
    unless ``single_file_config`` names others)."""
    from .models.single_file import SD15_CONFIG_DIR

    value = config.pretrained_model_name_or_path
    if value == EMBEDDED:
        from .embedded_default import SHIPPED_WEIGHTS

        folder = SHIPPED_WEIGHTS
    else:
        model = Path(value).expanduser()
        folder = model if model.is_dir() else Path(config.single_file_config).expanduser() if config.single_file_config else SD15_CONFIG_DIR
    path = folder / component / name
    return path if path.is_file() else None


def check_clip_skip(config: Config) -> None:
    """``clip_skip`` counts layers from the end: at most the text encoder's number of layers."""
    import json

    path = _component_config(config)
    if path is None:
        return
    try:
        layers = json.loads(path.read_text(encoding="utf-8"))["num_hidden_layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # the model loader names a broken config
    if config.clip_skip > layers:
        raise ConfigError.at("clip_skip", f" = {config.clip_skip}: the model's text encoder has {layers} "
                          f"layers ({path}); use 1 to {layers}")
