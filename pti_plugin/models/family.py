"""The model-family adapter: what differs between model families, behind one protocol.

A family (SD1.5 today, SDXL next) owns: loading its text encoders and tokenizers (N of them), how
token ids become a :class:`Conditioning` (per-token hidden states plus any extra UNet conditioning:
SDXL's pooled embedding and size/crop ids travel in ``added_cond_kwargs``), the final LayerNorm(s)
the slerp geometry needs, ONE :class:`KeyTable` of the LoRA modules from which both the peft
targets and kohya's names come, the embedding file layout, and the diffusers pipeline class for
samples and reloads. The trainer, plugins, metrics and analysis ask a family through this protocol
(or through :class:`~pti_plugin.models.loading.BaseModel`, which binds a family to its loaded
modules); none of them imports a family module.

Families register in :data:`FAMILIES`; :func:`detect_family` reads a base model's files and says
which one it is (the preset's ``model_family`` overrides it).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..config import ConfigError

#: CLIP's window: the caption tokens its text encoders read between BOS and EOS (77 ids in all). A longer
#: ``max_token_length`` is kohya's 2 or 3 windows, each encoded on its own and stitched back.
CLIP_WINDOW = 75
#: The ids of one window: BOS, the window's tokens, EOS.
CLIP_WINDOW_IDS = CLIP_WINDOW + 2
#: The ``max_token_length`` values the families accept: 1, 2 or 3 windows (kohya's 75, 150, 225).
MAX_TOKEN_LENGTHS = tuple(CLIP_WINDOW * windows for windows in (1, 2, 3))


def check_max_token_length(max_token_length: int) -> None:
    """A ``ValueError`` unless ``max_token_length`` is one of :data:`MAX_TOKEN_LENGTHS`."""
    if max_token_length not in MAX_TOKEN_LENGTHS:
        *first, last = MAX_TOKEN_LENGTHS
        raise ValueError(f"max_token_length must be {', '.join(map(str, first))} or {last}")


@dataclass
class Conditioning:
    """What the UNet is conditioned on for a batch of prompts.

    ``hidden_states``: per-token states ``[B, L, d]`` (``encoder_hidden_states``);
    ``added_cond_kwargs``: extra UNet conditioning by diffusers' name, each ``[B, ...]`` (empty for
    SD1.5; SDXL: ``text_embeds`` [B, 1280] and ``time_ids`` [B, 6]).
    """

    hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    def unet_kwargs(self) -> dict[str, object]:
        """Keyword arguments of ``UNet2DConditionModel.forward`` that carry this conditioning."""
        kwargs: dict[str, object] = {"encoder_hidden_states": self.hidden_states}
        if self.added_cond_kwargs:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """The same conditioning with ``fn`` applied to every tensor (e.g. a dtype cast or row selection)."""
        return Conditioning(fn(self.hidden_states), {k: fn(v) for k, v in self.added_cond_kwargs.items()})

    def with_extra(self, extra: dict[str, torch.Tensor]) -> Conditioning:
        """The same conditioning with ``extra`` entries added to (or replacing those of) ``added_cond_kwargs``."""
        return Conditioning(self.hidden_states, self.added_cond_kwargs | extra)

    def rows(self, index: torch.Tensor | slice) -> Conditioning:
        return self.map(lambda t: t[index])

    def detach(self) -> Conditioning:
        return self.map(torch.Tensor.detach)

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Row-wise concatenation (every part must carry the same extra keys)."""
        keys = set(parts[0].added_cond_kwargs)
        if any(set(p.added_cond_kwargs) != keys for p in parts):
            raise ValueError("cannot concatenate conditionings with different added_cond_kwargs keys")
        dtype = parts[0].hidden_states.dtype
        return Conditioning(
            torch.cat([p.hidden_states.to(dtype) for p in parts]),
            {k: torch.cat([p.added_cond_kwargs[k] for p in parts]) for k in sorted(keys)},
        )


#: kohya's module-name prefixes, from which each family's key table builds its kohya names: ``lora_unet_``, and
#: ``lora_te_`` (one text encoder) or ``lora_te1_``/``lora_te2_``.
UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te"


@dataclass(frozen=True)
class LoraKey:
    """One module a kohya LoRA of this family may adapt.

    ``component``: which model holds it (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``);
    ``path``: its dotted module path in the reference architecture; ``kohya_name``: kohya's name;
    ``conv``: adapted only with kohya's LoCon ``conv_dim`` (ResNet and sampler layers).
    """

    component: str
    path: str
    kohya_name: str
    conv: bool = False


class KeyTable:
    """The one table of LoRA modules of a family: peft targets and kohya names both come from it.

    ``optional_prefixes`` maps a component to a path prefix the installed library may omit
    (transformers 5 dropped ``text_model.`` from ``CLIPTextModel``; kohya and A1111 keep it).
    ``prefix_probes`` maps a component to a function saying whether the installed library keeps
    that prefix (default: whether ``CLIPTextModel`` does).
    """

    def __init__(
        self, keys: Iterable[LoraKey], optional_prefixes: dict[str, str] | None = None,
        prefix_probes: dict[str, Callable[[], bool]] | None = None,
    ):
        self.keys = tuple(keys)
        self.optional_prefixes = dict(optional_prefixes or {})
        self.prefix_probes = dict(prefix_probes or {})
        self._by_name = {k.kohya_name: k for k in self.keys}
        self._by_path = {(k.component, k.path): k for k in self.keys}

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k.component for k in self.keys))

    def names(self, components: Iterable[str] | None = None, conv: bool = False) -> set[str]:
        """kohya names of ``components`` (default all); LoCon-only modules when ``conv``."""
        wanted = set(self.components if components is None else components)
        return {k.kohya_name for k in self.keys if k.component in wanted and (conv or not k.conv)}

    def by_name(self, kohya_name: str) -> LoraKey | None:
        return self._by_name.get(kohya_name)

    def canonical(self, component: str, path: str) -> str:
        """``path`` as the table writes it (with the component's optional prefix)."""
        prefix = self.optional_prefixes.get(component, "")
        return path if not prefix or path.startswith(prefix) else prefix + path

    def by_path(self, component: str, path: str) -> LoraKey | None:
        return self._by_path.get((component, self.canonical(component, path)))

    def installed_path(self, key: LoraKey, module_names: set[str] | None) -> str:
        """``key.path`` in the form the given module names use (``None``: the installed library's form)."""
        prefix = self.optional_prefixes.get(key.component, "")
        if not prefix:
            return key.path
        if module_names is None:
            prefixed = self.prefix_probes.get(key.component, installed_text_encoder_has_prefix)()
        else:
            prefixed = any(n.startswith(prefix) for n in module_names)
        return key.path if prefixed else key.path.removeprefix(prefix)

    def peft_targets(self, component: str, model: nn.Module, conv: bool = False) -> list[str]:
        """Module paths of ``model`` (as ``component``) that a LoRA trains: the table's rows it has.

        ``conv``: the LoCon rows instead of the default ones.
        """
        names = {n for n, _ in model.named_modules()}
        return sorted(
            path for key in self.keys
            if key.component == component and key.conv == conv
            and (path := self.installed_path(key, names)) in names
        )


@functools.cache
def installed_text_encoder_has_prefix(class_name: str = "CLIPTextModel") -> bool:
    """Whether the installed transformers' ``class_name`` (``CLIPTextModel`` or ``CLIPTextModelWithProjection``)
    nests its modules under ``text_model.``."""
    import transformers
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        max_position_embeddings=4, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=8,
    )
    with torch.device("meta"):
        return hasattr(getattr(transformers, class_name)(config), "text_model")


@dataclass(frozen=True)
class EmbeddingLayout:
    """How a family's pivot vectors (one ``[n, d_i]`` tensor per text encoder) are stored.

    ``standalone_keys``: the tensor names of the standalone embedding file, one per encoder
    (SD1.5: ``emb_params``; SDXL: ``clip_l``, ``clip_g``); ``bundle_keys``: the suffix after
    ``bundle_emb.<token>.`` inside a LoRA file, one per encoder.
    """

    standalone_keys: tuple[str, ...]
    bundle_keys: tuple[str, ...]


#: The tensor name of a one-encoder (SD1.5) embedding file: ours and kohya's.
STANDALONE_KEY = "emb_params"
#: The top-level tensor names of an embedding file: ours (SD1.5's layout), AUTOMATIC1111's, SDXL's pair.
EMBEDDING_KEYS = frozenset({STANDALONE_KEY, "string_to_param.*", "clip_l", "clip_g"})


@dataclass
class LoadedComponents:
    """A family's components as loaded: one text encoder and one tokenizer per encoder, in order."""

    unet: nn.Module
    vae: nn.Module
    text_encoders: tuple[nn.Module, ...]
    tokenizers: tuple[object, ...]
    noise_scheduler: object


class ModelFamily(Protocol):
    """What the trainer, plugins, metrics and analysis may ask of a model family."""

    name: str
    #: the diffusers pipeline class that samples from and reloads this family's models
    pipeline_class_name: str
    #: attribute names of the text encoders (and, with ``tokenizer``, the tokenizers) in that pipeline
    text_encoder_names: tuple[str, ...]
    key_table: KeyTable
    embedding_layout: EmbeddingLayout

    def load(self, path: Path, single_file_config: str = "", tokenizer_path: str = "") -> LoadedComponents:
        """Every component of the model at ``path`` (a diffusers folder or a single file), offline."""
    def tokenize(self, tokenizers: Sequence[object], captions: list[str]) -> torch.Tensor:
        """Token ids ``[B, N, L]`` per encoder would be a family's choice; SD1.5 returns ``[B, L]``."""
    def encode(self, text_encoders: Sequence[nn.Module], input_ids: torch.Tensor,
               sizes: torch.Tensor | None = None) -> Conditioning:
        """The UNet conditioning of ``input_ids``; ``sizes`` [B, 6]: per-sample original size, crop and target
        size for families whose UNet takes them (SDXL's ``time_ids``), ignored by the others."""
    def size_conditioning(self, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The extra UNet conditioning (``added_cond_kwargs`` entries) that ``sizes`` [B, 6] make; ``{}`` if none."""
    def conditioning_widths(self, text_encoders: Sequence[nn.Module]) -> tuple[int, ...]:
        """Each text encoder's share of the hidden states' width, in order."""
    def pre_layernorm_states(self, text_encoders: Sequence[nn.Module], input_ids: torch.Tensor) -> torch.Tensor | None:
        """Per-token states before the final LayerNorm when the conditioning ends with one, else None."""
    def final_layer_norms(self, text_encoders: Sequence[nn.Module]) -> tuple[nn.LayerNorm | None, ...]: ...
    def weighted_ids(self, tokenizers: Sequence[object], caption: str) -> tuple[list, list]:
        """kohya's ``weighted_captions``: ``caption``'s ids shaped as :meth:`tokenize` gives one caption's, and each
        id's weight, of the same shape (see ``data/weighted_captions.py``)."""
    def weigh(self, text_encoders: Sequence[nn.Module], cond: Conditioning, weights: torch.Tensor) -> Conditioning:
        """``cond`` with each text encoder's per-token rows times that encoder's ``weights`` (shaped as the ids of
        :meth:`weighted_ids`); the extra conditioning (SDXL's pooled output) unweighted."""


#: The families this package knows: name -> factory ``(clip_skip, max_token_length) -> family``.
FAMILIES: dict[str, Callable[..., ModelFamily]] = {}
#: Families recognised by detection but not implemented yet (refused by name).
KNOWN_UNSUPPORTED: dict[str, str] = {}


def register_family(name: str, factory: Callable[..., ModelFamily]) -> None:
    FAMILIES[name] = factory


def _ensure_builtin_families() -> None:
    import importlib

    for name in ("sd15", "sdxl"):
        if name not in FAMILIES:
            importlib.import_module(f".{name}", __package__)  # importing the module registers the family


def make_family(name: str, **options) -> ModelFamily:
    """The family ``name`` with its options (``clip_skip``, ``max_token_length``)."""
    _ensure_builtin_families()
    if name in KNOWN_UNSUPPORTED:
        raise ValueError(KNOWN_UNSUPPORTED[name])
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name](**options)


def key_table(name: str = "sd15") -> KeyTable:
    """The LoRA key table of family ``name`` (the formats' default is SD1.5's)."""
    return make_family(name).key_table


def embedding_layout(name: str = "sd15") -> EmbeddingLayout:
    return make_family(name).embedding_layout


#: Single-file key prefixes that identify a family (the original checkpoint layouts).
_SINGLE_FILE_MARKERS = (
    ("conditioner.embedders.1.model.", "sdxl"),
    ("conditioner.embedders.0.transformer.", "sdxl"),
    ("cond_stage_model.transformer.", "sd15"),
)
#: ``model_index.json`` pipeline class -> family.
_PIPELINE_FAMILIES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; a ``ConfigError`` naming the file when it cannot be read as one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON ({exc}): a damaged or incomplete copy of the model?") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def detect_family(path: Path) -> tuple[str, str]:
    """(family name, the evidence) for the base model at ``path``.

    A diffusers folder is read by its ``model_index.json`` pipeline class; a ``.safetensors`` file by
    its key names (the header only); a pickle checkpoint is not opened here and taken for SD1.5 (its
    loader checks the keys).
    """
    if path.is_dir():
        index = path / "model_index.json"
        cls = read_json(index).get("_class_name", "") if index.is_file() else ""
        if cls in _PIPELINE_FAMILIES:
            return _PIPELINE_FAMILIES[cls], f"model_index.json names {cls}"
        return "sd15", f"model_index.json names {cls or 'no pipeline class'}; assuming SD1.5"
    if path.suffix == ".safetensors":
        from ..safe_load import check_safetensors

        keys = [k for k in check_safetensors(path) if k != "__metadata__"]  # the header, read (never mapped)
        for prefix, name in _SINGLE_FILE_MARKERS:
            if any(k.startswith(prefix) for k in keys):
                return name, f"single file with {prefix}* keys"
        return "sd15", "single file without a known text-encoder layout; assuming SD1.5"
    return "sd15", "pickle checkpoint (keys checked by the loader); assuming SD1.5"
