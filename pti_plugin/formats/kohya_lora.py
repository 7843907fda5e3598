"""kohya-format LoRA files: conversion from/to peft through a family's key table, metadata, save/load.

A kohya LoRA names each adapted module (SD1.5: ``lora_unet_<diffusers UNet path>`` or
``lora_te_text_model_encoder_layers_<i>_<module>``, the path with ``.`` replaced by ``_``) and
stores three tensors per module: ``<name>.lora_down.weight`` (peft ``lora_A``),
``<name>.lora_up.weight`` (peft ``lora_B``) and ``<name>.alpha`` (a 0-dim tensor; the update is
scaled by ``alpha / rank``). Names come from, and are checked against, the model family's
:class:`~pti_plugin.models.family.KeyTable` (the family's architecture written out), never from the
module names the installed diffusers or transformers happen to use (transformers 5 dropped the
``text_model.`` prefix of ``CLIPTextModel``; AUTOMATIC1111 and kohya expect it). Every function
takes ``table``; without it, SD1.5's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic_io import atomic_write_with, check_finite
from ..models.family import TEXT_ENCODER_PREFIX, UNET_PREFIX, KeyTable, key_table

BUNDLE_PREFIX = "bundle_emb."
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
#: kohya's ``ss_base_model_version`` by model family (AUTOMATIC1111 and Forge read it to tell SD1.x from SDXL LoRAs).
BASE_MODEL_VERSIONS = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


class LoraFormatError(ValueError):
    """A LoRA file or state dict that does not fit the family's kohya format; the message names the key."""


def _table(table: KeyTable | None) -> KeyTable:
    return table if table is not None else key_table("sd15")


def sd15_kohya_lora_names(text_encoder: bool = True, conv: bool = False) -> set[str]:
    """Every kohya module name a LoRA for SD1.5 may hold (see ``models/sd15.py``): the 192 UNet names of
    kohya ``networks.lora``, the 72 text-encoder ones when ``text_encoder``, the 86 LoCon ones when ``conv``."""
    table = key_table("sd15")
    return table.names(table.components if text_encoder else ("unet",), conv=conv)


def split_kohya_key(key: str, table: KeyTable | None = None) -> tuple[str, str]:
    """``"<module name>.<suffix>"`` -> (module name, suffix); the suffix is one of ``LORA_SUFFIXES``.

    Raises ``LoraFormatError`` naming the key if it is not a LoRA key for a module of the table's family.
    """
    name, _, suffix = key.partition(".")
    if suffix not in LORA_SUFFIXES:
        raise LoraFormatError(f"unexpected key {key!r}: expected <module>.lora_down.weight, .lora_up.weight or .alpha")
    if _table(table).by_name(name) is None:
        raise LoraFormatError(f"unexpected key {key!r}: {name!r} is not a module that a kohya LoRA of this model family adapts")
    return name, suffix


def unexpected_keys(keys: Iterable[str], allow_bundled: bool = True, table: KeyTable | None = None) -> list[str]:
    """Keys that no module of the family would take (bundled embeddings count as expected when ``allow_bundled``)."""
    bad = []
    for key in keys:
        if allow_bundled and key.startswith(BUNDLE_PREFIX):
            continue
        try:
            split_kohya_key(key, table)
        except LoraFormatError:
            bad.append(key)
    return bad


def _peft_module_path(key: str) -> str:
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise LoraFormatError(f"unexpected peft LoRA key {key!r}: expected <module>.lora_A.weight or .lora_B.weight")


def peft_to_kohya(
    states: Mapping[str, Mapping[str, torch.Tensor]],
    alpha: float | Mapping[str, float],
    dtype: torch.dtype | None = None,
    table: KeyTable | None = None,
) -> dict[str, torch.Tensor]:
    """peft-format LoRA state dicts by component (``{"unet": ..., "text_encoder": ...}``) -> kohya tensors.

    ``alpha`` is one value for every module or a mapping from peft module path to value. Weights are
    cast to ``dtype`` when given; alphas are float32 0-dim tensors. Every module must be a row of the
    family's key table (``LoraFormatError`` names the first peft key that is not) and have both halves.
    """
    table = _table(table)
    out: dict[str, torch.Tensor] = {}
    for component, state in states.items():
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            path = _peft_module_path(key)
            modules.setdefault(path, {})["lora_down.weight" if ".lora_A." in key else "lora_up.weight"] = tensor
        for path, halves in modules.items():
            row = table.by_path(component, path)
            if row is None:
                raise LoraFormatError(f"peft key {path!r} ({component}) is not a module of this model family's kohya key table")
            if len(halves) != 2:
                raise LoraFormatError(f"peft LoRA for {path!r} ({component}) lacks lora_A or lora_B")
            for suffix, tensor in halves.items():
                tensor = tensor.detach()
                out[f"{row.kohya_name}.{suffix}"] = tensor.to(dtype) if dtype is not None else tensor
            value = alpha if not isinstance(alpha, Mapping) else alpha[path]
            out[f"{row.kohya_name}.alpha"] = torch.tensor(float(value), dtype=torch.float32)
    return out


def to_kohya(
    unet_lora: Mapping[str, torch.Tensor],
    text_encoder_lora: Mapping[str, torch.Tensor],
    alpha: float | Mapping[str, float],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """SD1.5's :func:`peft_to_kohya`: the UNet's and the text encoder's peft state dicts."""
    return peft_to_kohya({"unet": unet_lora, "text_encoder": text_encoder_lora}, alpha, dtype)


def _module_names(model: torch.nn.Module | Iterable[str] | None) -> set[str] | None:
    if model is None:
        return None
    if isinstance(model, torch.nn.Module):
        return {name for name, _ in model.named_modules()}
    return set(model)


def kohya_to_peft(
    tensors: Mapping[str, torch.Tensor],
    models: Mapping[str, torch.nn.Module | Iterable[str] | None] | None = None,
    table: KeyTable | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
    """kohya LoRA tensors (ours or anyone's) -> (peft state dict by component, alphas by peft module path).

    ``bundle_emb.*`` keys are skipped (read them with ``formats.embedding``); any other key that the
    family's table lacks raises ``LoraFormatError`` naming the first one. ``models`` (a model or its
    module names, by component) check that each module exists there and choose the path form (e.g.
    with or without CLIP's ``text_model.``); without them the installed library's form is used. A
    module without an ``alpha`` gets its rank (kohya's and A1111's default).
    """
    table, models = _table(table), dict(models or {})
    names = {component: _module_names(model) for component, model in models.items()}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            continue
        name, suffix = split_kohya_key(key, table)
        grouped.setdefault(name, {})[suffix] = tensor
    states: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for name, parts in grouped.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise LoraFormatError(f"LoRA module {name!r} lacks lora_down.weight or lora_up.weight")
        row = table.by_name(name)
        known = names.get(row.component)
        path = table.installed_path(row, known)
        if known is not None and path not in known:
            raise LoraFormatError(f"key {name}.lora_down.weight: the given {row.component} has no module {path!r}")
        target = states.setdefault(row.component, {})
        target[f"{path}.lora_A.weight"] = parts["lora_down.weight"]
        target[f"{path}.lora_B.weight"] = parts["lora_up.weight"]
        rank = parts["lora_down.weight"].shape[0]
        alphas[path] = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
    return states, alphas


def from_kohya(
    tensors: Mapping[str, torch.Tensor],
    unet: torch.nn.Module | Iterable[str] | None = None,
    text_encoder: torch.nn.Module | Iterable[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """SD1.5's :func:`kohya_to_peft`: (unet peft dict, text-encoder peft dict, alphas)."""
    states, alphas = kohya_to_peft(tensors, {"unet": unet, "text_encoder": text_encoder})
    return states.get("unet", {}), states.get("text_encoder", {}), alphas


def kohya_metadata(
    *,
    network_dim: int,
    network_alpha: float,
    output_name: str,
    training_started_at: float,
    steps: int,
    learning_rate: float,
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    conv_dim: int | None = None,
    conv_alpha: float | None = None,
    lora_dropouts: Mapping[str, float] | None = None,
    extra: Mapping[str, str] | None = None,
    family: str = "sd15",
    training_comment: str | None = None,
    num_validation_images: int = 0,
) -> dict[str, str]:
    """kohya-compatible ``ss_*`` header entries plus our own ``pti_*`` entries (``extra``).

    ``tag_frequency`` is kohya's ``{dataset folder: {tag: count}}``; ``training_started_at`` a Unix
    time; ``conv_dim``/``conv_alpha`` (LoCon) and ``lora_dropouts`` (``rank_dropout``/``module_dropout`` by name)
    go to ``ss_network_args`` as kohya writes them. All
    values are strings, as safetensors requires. ``extra`` keys must start with ``pti_``. ``family``
    (``sd15``, ``sdxl``) sets ``ss_base_model_version``. ``training_comment`` (kohya's option) goes to
    ``ss_training_comment`` as given; when None the key is left out (kohya writes the string ``"None"``).
    ``num_validation_images``: the images ``validation_split`` holds out, each once (kohya's validation dataset counts
    no repeats and holds out no regularisation images), 0 without validation: ``ss_num_validation_images``.
    ``ss_v2`` and ``ss_lowram`` read ``"False"`` (kohya's options refused here). The dataset, bucket, epoch and session
    keys: :mod:`.kohya_dataset_metadata`.
    """
    meta = {
        "ss_network_module": "networks.lora",
        "ss_full_fp16": "False",  # kohya's str(bool(args.full_fp16)): refused here (kohya writes no key for full_bf16)
        "ss_v2": "False",  # kohya's str(bool(args.v2)), False for SD1.x and SDXL (SD2.x's v2 is refused here)
        "ss_lowram": "False",  # kohya's str(args.lowram): refused here
        "ss_network_dim": str(int(network_dim)),
        "ss_network_alpha": str(float(network_alpha)),
        "ss_base_model_version": BASE_MODEL_VERSIONS[family],
        "ss_output_name": output_name,
        "ss_training_started_at": str(float(training_started_at)),
        "ss_steps": str(int(steps)),
        "ss_learning_rate": str(float(learning_rate)),
        "ss_tag_frequency": json.dumps(tag_frequency or {}),
        "ss_num_validation_images": str(int(num_validation_images)),
    }
    if (conv_dim is None) != (conv_alpha is None):
        raise ValueError("conv_dim and conv_alpha go together (kohya's network_args for LoCon)")
    if training_comment is not None:
        meta["ss_training_comment"] = training_comment
    args = {"conv_dim": str(int(conv_dim)), "conv_alpha": str(float(conv_alpha))} if conv_dim is not None else {}
    args |= {key: str(float(value)) for key, value in (lora_dropouts or {}).items()}
    if args:
        meta["ss_network_args"] = json.dumps(args)
    for key, value in (extra or {}).items():
        if not key.startswith("pti_") or not isinstance(value, str):
            raise ValueError(f"extra metadata must be 'pti_*' keys with string values, got {key!r}: {type(value).__name__}")
        meta[key] = value
    return meta


#: kohya's ``SS_METADATA_MINIMUM_KEYS``: what its ``no_metadata`` keeps of a LoRA's ``ss_*`` keys (beside the model spec).
MINIMUM_METADATA_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                         "ss_network_args")


def minimum_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """kohya's ``no_metadata``: the keys of :data:`MINIMUM_METADATA_KEYS` that ``metadata`` holds, nothing else."""
    return {key: metadata[key] for key in MINIMUM_METADATA_KEYS if key in metadata}


#: kohya's training-setting keys (``train_network.py``'s metadata) that pti-plugin writes, each from the option of
#: kohya's name and meaning (a Config key), written as kohya writes it: ``str(args.<option>)`` ("True"/"False" for a
#: switch, "0.1" for a float, "l2" for a string). Run-wide here, as in kohya.
KOHYA_SETTINGS = {
    "ss_gradient_checkpointing": "gradient_checkpointing",
    "ss_gradient_accumulation_steps": "gradient_accumulation_steps",
    "ss_mixed_precision": "mixed_precision",
    "ss_clip_skip": "clip_skip",
    "ss_max_token_length": "max_token_length",
    "ss_cache_latents": "cache_latents",
    "ss_seed": "seed",
    "ss_noise_offset": "noise_offset",
    "ss_multires_noise_iterations": "multires_noise_iterations",
    "ss_multires_noise_discount": "multires_noise_discount",
    "ss_adaptive_noise_scale": "adaptive_noise_scale",
    "ss_zero_terminal_snr": "zero_terminal_snr",
    "ss_max_grad_norm": "max_grad_norm",
    "ss_network_dropout": "network_dropout",
    "ss_scale_weight_norms": "scale_weight_norms",
    "ss_caption_dropout_rate": "caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs": "caption_dropout_every_n_epochs",
    "ss_caption_tag_dropout_rate": "caption_tag_dropout_rate",
    "ss_prior_loss_weight": "prior_loss_weight",
    "ss_min_snr_gamma": "min_snr_gamma",
    "ss_ip_noise_gamma": "ip_noise_gamma",
    "ss_debiased_estimation": "debiased_estimation_loss",
    "ss_noise_offset_random_strength": "noise_offset_random_strength",
    "ss_ip_noise_gamma_random_strength": "ip_noise_gamma_random_strength",
    "ss_loss_type": "loss_type",
    "ss_huber_schedule": "huber_schedule",
    "ss_huber_scale": "huber_scale",
    "ss_huber_c": "huber_c",
    "ss_fp8_base": "fp8_base",
    "ss_fp8_base_unet": "fp8_base_unet",
    "ss_validation_seed": "validation_seed",
    "ss_validation_split": "validation_split",
    "ss_max_validation_steps": "max_validation_steps",
    "ss_validate_every_n_epochs": "validate_every_n_epochs",
    "ss_validate_every_n_steps": "validate_every_n_steps",
    "ss_resize_interpolation": "resize_interpolation",
}
#: The options of :data:`KOHYA_SETTINGS` whose kohya default is None, which means what pti-plugin's default means
#: (off; the last layer for clip_skip; 75 tokens for max_token_length): at pti-plugin's default the value is written
#: ``"None"``, as kohya writes it for a run without the option.
KOHYA_NONE_DEFAULTS = frozenset({"clip_skip", "max_token_length", "noise_offset", "multires_noise_iterations",
                                 "adaptive_noise_scale", "min_snr_gamma", "ip_noise_gamma"})


def kohya_settings_metadata(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, str]:
    """The :data:`KOHYA_SETTINGS` keys from each option's value (``values``, by option) as kohya writes them; an
    option of :data:`KOHYA_NONE_DEFAULTS` at its pti-plugin default (``defaults``) is ``"None"``."""
    return {key: "None" if option in KOHYA_NONE_DEFAULTS and values[option] == defaults[option] else str(values[option])
            for key, option in KOHYA_SETTINGS.items()}


@functools.lru_cache(maxsize=8)
def _file_hashes(path: str, size: int, mtime_ns: int) -> tuple[str, str]:
    """kohya's ``model_hash`` (sha256 of the 64 KiB at 1 MiB, 8 hex digits: A1111's old hash) and
    ``calculate_sha256`` (the whole file) of ``path``; ``size`` and ``mtime_ns`` key the cache (once per file)."""
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        old = hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]
        handle.seek(0)
        new = hashlib.file_digest(handle, "sha256").hexdigest()
    return old, new


def kohya_source_metadata(kind: str, source: str) -> dict[str, str]:
    """kohya's keys naming a model file a run started from: ``kind`` ``"sd_model"`` (``pretrained_model_name_or_path``:
    ``ss_sd_model_name``, ``ss_sd_model_hash``, ``ss_new_sd_model_hash``) or ``"vae"`` (``vae``: ``ss_vae_*``). As
    kohya: an existing path is named by its base name with both hashes (a folder's: ``"IsADirectory"``), anything
    else (``@embedded``) as given, without hashes."""
    if not os.path.exists(source):
        return {f"ss_{kind}_name": source}
    if os.path.isdir(source):
        old = new = "IsADirectory"
    else:
        stat = os.stat(source)
        old, new = _file_hashes(os.path.realpath(source), stat.st_size, stat.st_mtime_ns)
    return {f"ss_{kind}_hash": old, f"ss_new_{kind}_hash": new, f"ss_{kind}_name": os.path.basename(source)}


def kohya_weight_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                        serialised: bytes | memoryview | None = None) -> dict[str, str]:
    """The hashes kohya's save adds to a LoRA's metadata (``precalculate_safetensors_hashes``), of the safetensors file
    holding ``tensors`` with ``metadata``'s ``ss_*`` keys alone: ``sshs_model_hash``, the sha256 of the data after the
    header (the hash sd-webui-additional-networks indexes LoRAs by; it does not depend on the metadata), and
    ``sshs_legacy_hash``, that extension's old hash: the sha256 of the 64 KiB at 1 MiB, 8 hex digits.

    ``serialised``: ``tensors`` as ``safetensors.torch.save`` wrote them under another header (the file being saved).
    Its data is that file's; where that file's data starts follows from the header's JSON with the other keys left
    out (checked: the same reckoning must give this header's own length), so nothing is serialised again. Without it,
    or when the reckoning fails or that file's header passes 1 MiB, the ``ss_*`` file is serialised, as kohya does."""
    from safetensors.torch import save

    training = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    data = memoryview(serialised) if serialised is not None else None
    start = None if data is None else _data_start_with(data, training)  # where the ss_* file's data starts
    if start is None:  # the ss_* file itself
        data = memoryview(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, training))
        legacy = data[0x100000:0x110000]
    body = data[_data_start(data) :]
    if start is not None:  # the ss_* file's bytes at 1 MiB, in this file's data
        legacy = body[0x100000 - start : 0x110000 - start]
    return {"sshs_model_hash": hashlib.sha256(body).hexdigest(), "sshs_legacy_hash": hashlib.sha256(legacy).hexdigest()[:8]}


def _data_start(data: memoryview) -> int:
    """Where the tensor data starts in safetensors file ``data``: after the 8-byte little-endian header length and
    the header."""
    return 8 + struct.unpack("<Q", data[:8])[0]


def _data_start_with(data: memoryview, metadata: Mapping[str, str]) -> int | None:
    """Where the data would start in safetensors file ``data`` were its header's metadata ``metadata``: safetensors
    writes the header as compact JSON (UTF-8, escaped as Python's ``json`` does) padded with spaces to 8 bytes. None
    when the same reckoning does not give ``data``'s own header length, or the start passes 1 MiB."""
    text = bytes(data[8 : _data_start(data)]).rstrip(b" ")
    header = json.loads(text)

    def length(meta: Mapping[str, str]) -> int:
        return len(json.dumps(header | {"__metadata__": meta}, separators=(",", ":"), ensure_ascii=False).encode())

    if "__metadata__" not in header or length(header["__metadata__"]) != len(text):
        return None
    unpadded = length(metadata)
    start = 8 + unpadded + (-unpadded) % 8
    return start if start <= 0x100000 else None


#: The hashes' places in the header of the file being saved: as long as the hashes (sha256, 8 hex digits).
_HASH_PLACEHOLDERS = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}


def save_lora(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], table: KeyTable | None = None
) -> None:
    """Write a kohya LoRA file atomically, with ``metadata`` plus kohya's ``sshs_*`` hashes in its header.

    Refuses (``LoraFormatError``, naming the key) any key other than the family's LoRA keys and bundled
    embeddings (Forge drops a LoRA with more than 12 keys it cannot map), non-string metadata, and
    non-finite tensors (``ValueError``). The tensors are serialised once: with the hashes' places held, hashed
    (:func:`kohya_weight_hashes`), and written with the hashes in those places.
    """
    from safetensors.torch import save

    bad = unexpected_keys(tensors, table=table)
    if bad:
        raise LoraFormatError(f"refusing to write {path}: unexpected key {bad[0]!r} ({len(bad)} in all)")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise ValueError(f"metadata value for {key!r} must be a string, got {type(value).__name__}")
    check_finite(dict(tensors), str(path))
    data = memoryview(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                           dict(metadata) | _HASH_PLACEHOLDERS))
    start = _data_start(data)
    header = bytes(data[:start])
    for key, value in kohya_weight_hashes(tensors, metadata, data).items():
        # "key":"000…": once in the header (the quotes in a metadata text are escaped)
        held = json.dumps({key: _HASH_PLACEHOLDERS[key]}, separators=(",", ":"))[1:-1].encode()
        header = header.replace(held, held.replace(_HASH_PLACEHOLDERS[key].encode(), value.encode()), 1)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(header)
            handle.write(data[start:])

    atomic_write_with(path, write, size_hint=len(data))


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA safetensors file -> (tensors, metadata), after ``check_safetensors``.

    No key checking here: callers decide (``from_kohya`` raises on the first unexpected key,
    ``inspect`` lists them all).
    """
    from safetensors import safe_open

    from ..safe_load import check_safetensors

    check_safetensors(path)
    tensors = {}
    with safe_open(str(Path(path)), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    return tensors, metadata


def lora_file_dims(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> dict[str, int | float]:
    """kohya's ``dim_from_weights``: the ranks and alphas of the kohya LoRA file ``path`` (named in the messages), from
    its ``tensors`` (as :func:`load_lora` reads them; the start-up check's, :mod:`pti_plugin.checked_files`): the
    shapes of its ``lora_down`` tensors and its ``alpha`` tensors give ``network_dim``/``network_alpha`` of its linear
    and 1x1-convolution modules and, when it holds 3x3-convolution modules (LoCon), ``conv_dim``/``conv_alpha``. A
    module without an alpha has its rank (as kohya). pti-plugin trains one rank and alpha per kind, so a file of
    several (a resized LoRA) raises ``LoraFormatError``, as does one without linear modules."""
    found: dict[str, dict[tuple[int, float], list[str]]] = {"network": {}, "conv": {}}
    for key in sorted(k for k in tensors if k.endswith(".lora_down.weight") and not k.startswith(BUNDLE_PREFIX)):
        name, shape = key[: -len(".lora_down.weight")], tuple(tensors[key].shape)
        alpha_tensor = tensors.get(f"{name}.alpha")
        if alpha_tensor is not None and tuple(alpha_tensor.shape) not in ((), (1,)):
            raise LoraFormatError(f"{path}: {name}.alpha holds several values; a LoRA module's alpha is one number")
        alpha = float(alpha_tensor.item()) if alpha_tensor is not None else float(shape[0])
        kind = "conv" if len(shape) == 4 and shape[2:] != (1, 1) else "network"
        found[kind].setdefault((int(shape[0]), alpha), []).append(name)
    if not found["network"]:
        raise LoraFormatError(f"{path} holds no linear-layer LoRA module to take network_dim from")
    dims: dict[str, int | float] = {}
    for kind, pairs in found.items():
        if len(pairs) > 1:
            shown = ", ".join(f"rank {r} alpha {a:g} in {len(n)} module(s) such as {n[0]}"
                              for (r, a), n in sorted(pairs.items()))
            what = "3x3-convolution" if kind == "conv" else "linear-layer"
            raise LoraFormatError(f"{path} holds {what} LoRA modules "
                                  f"of several ranks or alphas: {shown}; pti-plugin trains one {kind}_dim and "
                                  f"{kind}_alpha for all of them")
        if pairs:
            (rank, alpha), = pairs
            dims |= {f"{kind}_dim": rank, f"{kind}_alpha": alpha}
    return dims


__all__ = [  # the prefixes: the key tables' (models.family), re-exported
    "BASE_MODEL_VERSIONS", "BUNDLE_PREFIX", "LORA_SUFFIXES", "TEXT_ENCODER_PREFIX", "UNET_PREFIX",
    "KOHYA_NONE_DEFAULTS", "KOHYA_SETTINGS", "LoraFormatError", "from_kohya", "kohya_metadata", "kohya_weight_hashes",
    "kohya_settings_metadata", "kohya_source_metadata", "kohya_to_peft", "load_lora", "lora_file_dims", "peft_to_kohya",
    "save_lora", "sd15_kohya_lora_names", "split_kohya_key", "to_kohya",
    "unexpected_keys",
]
