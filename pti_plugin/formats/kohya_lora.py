"""kohya-format LoRA files for SD1.5: the fixed key map, conversion from/to peft, metadata, save/load.

A kohya LoRA names each adapted module ``lora_unet_<diffusers UNet path>`` or
``lora_te_text_model_encoder_layers_<i>_<module>`` (the path with ``.`` replaced by ``_``) and
stores three tensors per module: ``<name>.lora_down.weight`` (peft ``lora_A``),
``<name>.lora_up.weight`` (peft ``lora_B``) and ``<name>.alpha`` (a 0-dim tensor; the update is
scaled by ``alpha / rank``). Names are produced from and checked against a map of SD1.5's
architecture written out below, never from the module names the installed diffusers or
transformers happen to use (transformers 5 dropped the ``text_model.`` prefix of
``CLIPTextModel``; AUTOMATIC1111 and kohya expect it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..atomic_io import save_safetensors_atomic

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
BUNDLE_PREFIX = "bundle_emb."
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")

# SD1.5's UNet, as kohya's ``networks.lora`` and diffusers name it.
_BLOCK_OUT_CHANNELS = (320, 640, 1280, 1280)
_LAYERS_PER_BLOCK = 2
_DOWN_HAS_ATTENTION = (True, True, True, False)
_UP_HAS_ATTENTION = (False, True, True, True)
#: The 10 linear layers of a ``BasicTransformerBlock`` that kohya's LoRA adapts.
_TRANSFORMER_BLOCK_LEAVES = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)
# SD1.5's text encoder (CLIP ViT-L/14): 12 layers, attention and MLP linears.
_TEXT_LAYERS = 12
_TEXT_LAYER_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


class LoraFormatError(ValueError):
    """A LoRA file or state dict that does not fit the SD1.5 kohya format; the message names the key."""


def _transformer_paths(transformer: str) -> list[str]:
    """``proj_in``, the block's 10 linears and ``proj_out`` of one ``Transformer2DModel`` (one block each in SD1.5)."""
    block = f"{transformer}.transformer_blocks.0"
    return [f"{transformer}.proj_in"] + [f"{block}.{leaf}" for leaf in _TRANSFORMER_BLOCK_LEAVES] + [f"{transformer}.proj_out"]


def _resnet_paths(resnet: str, in_channels: int, out_channels: int) -> list[str]:
    """What kohya adapts inside a ``ResnetBlock2D`` with ``conv_dim`` set (``conv_shortcut`` only where channels change)."""
    paths = [f"{resnet}.conv1", f"{resnet}.time_emb_proj", f"{resnet}.conv2"]
    if in_channels != out_channels:
        paths.append(f"{resnet}.conv_shortcut")
    return paths


@functools.cache
def _sd15_unet_paths() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(attention paths, conv paths) of SD1.5's UNet, in diffusers/kohya dotted form."""
    attention, conv = [], []
    channels = _BLOCK_OUT_CHANNELS[0]
    skip_channels = [channels]  # channels of each skip connection, pushed in down order
    for b, (out, has_attn) in enumerate(zip(_BLOCK_OUT_CHANNELS, _DOWN_HAS_ATTENTION)):
        for i in range(_LAYERS_PER_BLOCK):
            conv += _resnet_paths(f"down_blocks.{b}.resnets.{i}", channels, out)
            channels = out
            if has_attn:
                attention += _transformer_paths(f"down_blocks.{b}.attentions.{i}")
            skip_channels.append(channels)
        if b < len(_BLOCK_OUT_CHANNELS) - 1:
            conv.append(f"down_blocks.{b}.downsamplers.0.conv")
            skip_channels.append(channels)
    for i in range(2):
        conv += _resnet_paths(f"mid_block.resnets.{i}", channels, channels)
    attention += _transformer_paths("mid_block.attentions.0")
    for b, (out, has_attn) in enumerate(zip(reversed(_BLOCK_OUT_CHANNELS), _UP_HAS_ATTENTION)):
        for i in range(_LAYERS_PER_BLOCK + 1):
            conv += _resnet_paths(f"up_blocks.{b}.resnets.{i}", channels + skip_channels.pop(), out)
            channels = out
            if has_attn:
                attention += _transformer_paths(f"up_blocks.{b}.attentions.{i}")
        if b < len(_BLOCK_OUT_CHANNELS) - 1:
            conv.append(f"up_blocks.{b}.upsamplers.0.conv")
    return tuple(attention), tuple(conv)


def _sd15_text_encoder_paths() -> list[str]:
    """SD1.5 text-encoder module paths in the ``text_model.``-prefixed form kohya and A1111 use."""
    return [
        f"text_model.encoder.layers.{i}.{leaf}" for i in range(_TEXT_LAYERS) for leaf in _TEXT_LAYER_LEAVES
    ]


def _kohya_name(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


@functools.cache
def _sd15_name_map() -> dict[str, tuple[str, str, bool]]:
    """kohya name -> (component ``"unet"``/``"text_encoder"``, dotted path, is a conv-only (LoCon) module)."""
    attention, conv = _sd15_unet_paths()
    names = {_kohya_name(UNET_PREFIX, p): ("unet", p, False) for p in attention}
    names.update({_kohya_name(UNET_PREFIX, p): ("unet", p, True) for p in conv})
    names.update({_kohya_name(TEXT_ENCODER_PREFIX, p): ("text_encoder", p, False) for p in _sd15_text_encoder_paths()})
    return names


def sd15_kohya_lora_names(text_encoder: bool = True, conv: bool = False) -> set[str]:
    """Every kohya module name a LoRA for SD1.5 may hold.

    The base set is kohya ``networks.lora``'s default: in each of the 16 ``Transformer2DModel``s,
    ``proj_in``, ``proj_out`` and the 10 attention/feed-forward linears (192 UNet names), plus the
    72 attention and MLP linears of the text encoder when ``text_encoder``. ``conv`` adds what kohya
    adapts with ``conv_dim`` (LoCon): each ResNet block's ``conv1``, ``conv2``, ``time_emb_proj``
    and ``conv_shortcut`` (where it has one) and the down/upsampler convs (86 names).
    """
    return {
        name
        for name, (component, _, is_conv) in _sd15_name_map().items()
        if (component == "unet" or text_encoder) and (conv or not is_conv)
    }


def split_kohya_key(key: str) -> tuple[str, str]:
    """``"<module name>.<suffix>"`` -> (module name, suffix); the suffix is one of ``LORA_SUFFIXES``.

    Raises ``LoraFormatError`` naming the key if it is not a LoRA key for an SD1.5 module.
    """
    name, _, suffix = key.partition(".")
    if suffix not in LORA_SUFFIXES:
        raise LoraFormatError(f"unexpected key {key!r}: expected <module>.lora_down.weight, .lora_up.weight or .alpha")
    if name not in _sd15_name_map():
        raise LoraFormatError(f"unexpected key {key!r}: {name!r} is not a module of SD1.5 that a kohya LoRA adapts")
    return name, suffix


def unexpected_keys(keys: Iterable[str], allow_bundled: bool = True) -> list[str]:
    """Keys that no SD1.5 module would take (bundled embeddings count as expected when ``allow_bundled``)."""
    bad = []
    for key in keys:
        if allow_bundled and key.startswith(BUNDLE_PREFIX):
            continue
        try:
            split_kohya_key(key)
        except LoraFormatError:
            bad.append(key)
    return bad


def _peft_module_path(key: str) -> str:
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise LoraFormatError(f"unexpected peft LoRA key {key!r}: expected <module>.lora_A.weight or .lora_B.weight")


def _text_encoder_canonical(path: str) -> str:
    """A text-encoder module path with the ``text_model.`` prefix, whatever transformers' version."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def to_kohya(
    unet_lora: Mapping[str, torch.Tensor],
    text_encoder_lora: Mapping[str, torch.Tensor],
    alpha: float | Mapping[str, float],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """peft-format LoRA state dicts (as ``models.lora.lora_state_dict`` returns) -> kohya tensors.

    ``alpha`` is one value for every module or a mapping from peft module path to value. Weights are
    cast to ``dtype`` when given; alphas are float32 0-dim tensors. Every produced name is checked
    against the SD1.5 map (``LoraFormatError`` names the first peft key that does not fit), and every
    module must have both halves.
    """
    out: dict[str, torch.Tensor] = {}
    for component, state, prefix in (("unet", unet_lora, UNET_PREFIX), ("text_encoder", text_encoder_lora, TEXT_ENCODER_PREFIX)):
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            path = _peft_module_path(key)
            modules.setdefault(path, {})["lora_down.weight" if ".lora_A." in key else "lora_up.weight"] = tensor
        for path, halves in modules.items():
            canonical = _text_encoder_canonical(path) if component == "text_encoder" else path
            name = _kohya_name(prefix, canonical)
            if _sd15_name_map().get(name, (None,))[0] != component:
                raise LoraFormatError(f"peft key {path!r} ({component}) maps to {name!r}, which is not an SD1.5 module")
            if len(halves) != 2:
                raise LoraFormatError(f"peft LoRA for {path!r} ({component}) lacks lora_A or lora_B")
            for suffix, tensor in halves.items():
                tensor = tensor.detach()
                out[f"{name}.{suffix}"] = tensor.to(dtype) if dtype is not None else tensor
            value = alpha if not isinstance(alpha, Mapping) else alpha[path]
            out[f"{name}.alpha"] = torch.tensor(float(value), dtype=torch.float32)
    return out


@functools.cache
def _installed_text_encoder_has_prefix() -> bool:
    """Whether the installed transformers' ``CLIPTextModel`` nests its modules under ``text_model.``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        max_position_embeddings=4, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    with torch.device("meta"):
        return hasattr(CLIPTextModel(config), "text_model")


def _module_names(model: torch.nn.Module | Iterable[str] | None) -> set[str] | None:
    if model is None:
        return None
    if isinstance(model, torch.nn.Module):
        return {name for name, _ in model.named_modules()}
    return set(model)


def from_kohya(
    tensors: Mapping[str, torch.Tensor],
    unet: torch.nn.Module | Iterable[str] | None = None,
    text_encoder: torch.nn.Module | Iterable[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """kohya LoRA tensors (ours or anyone's, SD1.5) -> (unet peft dict, text-encoder peft dict, alphas).

    ``bundle_emb.*`` keys are skipped (read them with ``formats.embedding``); any other key that no
    SD1.5 module takes raises ``LoraFormatError`` naming the first one. Names map back through the
    fixed SD1.5 map, so the result is unambiguous. ``unet`` / ``text_encoder`` (a model or its module
    names) check that each module exists there and choose the text-encoder path form (with or
    without ``text_model.``); without them the installed transformers' form is used. Alphas are keyed
    by peft module path; a module without an ``alpha`` gets its rank (kohya's and A1111's default).
    """
    unet_names, te_names = _module_names(unet), _module_names(text_encoder)
    te_prefixed = (
        any(n.startswith("text_model.") for n in te_names) if te_names is not None else _installed_text_encoder_has_prefix()
    )
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            continue
        name, suffix = split_kohya_key(key)
        grouped.setdefault(name, {})[suffix] = tensor
    unet_lora: dict[str, torch.Tensor] = {}
    te_lora: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for name, parts in grouped.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise LoraFormatError(f"LoRA module {name!r} lacks lora_down.weight or lora_up.weight")
        component, path, _ = _sd15_name_map()[name]
        if component == "text_encoder" and not te_prefixed:
            path = path.removeprefix("text_model.")
        known = unet_names if component == "unet" else te_names
        if known is not None and path not in known:
            raise LoraFormatError(f"key {name}.lora_down.weight: the given {component} has no module {path!r}")
        target = unet_lora if component == "unet" else te_lora
        target[f"{path}.lora_A.weight"] = parts["lora_down.weight"]
        target[f"{path}.lora_B.weight"] = parts["lora_up.weight"]
        rank = parts["lora_down.weight"].shape[0]
        alphas[path] = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
    return unet_lora, te_lora, alphas


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
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """kohya-compatible ``ss_*`` header entries plus our own ``pti_*`` entries (``extra``).

    ``tag_frequency`` is kohya's ``{dataset folder: {tag: count}}``; ``training_started_at`` a Unix
    time; ``conv_dim``/``conv_alpha`` (LoCon) go to ``ss_network_args`` as kohya writes them. All
    values are strings, as safetensors requires. ``extra`` keys must start with ``pti_``.
    """
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(network_dim)),
        "ss_network_alpha": str(float(network_alpha)),
        "ss_base_model_version": "sd_v1",
        "ss_output_name": output_name,
        "ss_training_started_at": str(float(training_started_at)),
        "ss_steps": str(int(steps)),
        "ss_learning_rate": str(float(learning_rate)),
        "ss_tag_frequency": json.dumps(tag_frequency or {}),
    }
    if (conv_dim is None) != (conv_alpha is None):
        raise ValueError("conv_dim and conv_alpha go together (kohya's network_args for LoCon)")
    if conv_dim is not None:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(int(conv_dim)), "conv_alpha": str(float(conv_alpha))})
    for key, value in (extra or {}).items():
        if not key.startswith("pti_") or not isinstance(value, str):
            raise ValueError(f"extra metadata must be 'pti_*' keys with string values, got {key!r}: {type(value).__name__}")
        meta[key] = value
    return meta


def safetensors_payload_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the data after the header of the safetensors file holding ``tensors``.

    This is kohya's ``sshs_model_hash`` (the hash sd-webui-additional-networks indexes LoRAs by); it
    does not depend on the metadata.
    """
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    (header_len,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest()


def save_lora(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a kohya LoRA file atomically, with ``metadata`` plus ``sshs_model_hash`` in its header.

    Refuses (``LoraFormatError``, naming the key) any key other than SD1.5 LoRA keys and bundled
    embeddings (Forge drops a LoRA with more than 12 keys it cannot map), non-string metadata, and
    non-finite tensors (``ValueError``).
    """
    bad = unexpected_keys(tensors)
    if bad:
        raise LoraFormatError(f"refusing to write {path}: unexpected key {bad[0]!r} ({len(bad)} in all)")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise ValueError(f"metadata value for {key!r} must be a string, got {type(value).__name__}")
    header = dict(metadata)
    header["sshs_model_hash"] = safetensors_payload_sha256(tensors)
    save_safetensors_atomic(path, dict(tensors), header)


def load_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA safetensors file -> (tensors, metadata), after ``check_safetensors``.

    No key checking here: callers decide (``from_kohya`` raises on the first unexpected key,
    ``inspect`` lists them all).
    """
    from safetensors import safe_open

    from .safe_load import check_safetensors

    check_safetensors(path)
    tensors = {}
    with safe_open(str(Path(path)), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    return tensors, metadata
