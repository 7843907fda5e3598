"""The model a run trains: the base model (through its family adapter) with one pivot per text
encoder and the LoRA adapters, and the switches the trainer and the plugin contract use.

:class:`TrainableModel` is where "LoRA on/off", "the pivot's gradient cut" and "the base model,
frozen" are implemented once; the trainer and the plugins ask for them by name
(:meth:`encode`, :meth:`frozen`, :meth:`predict`). Components are named as in the family's key
table: ``"unet"`` and the family's ``text_encoder_names``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .family import Conditioning, ModelFamily
from .loading import BaseModel
from .lora import attach_lora, lora_layers, lora_parameters, lora_state_dict, set_lora_enabled, split_conv3x3
from .pivot import PivotEmbedding, add_pivot_token

#: Captions whose token ids :meth:`TrainableModel.tokenize` keeps.
TOKEN_MEMO = 4096
#: kohya's ``fp8_base`` dtype, and the layers whose frozen weights it stores in it (:meth:`TrainableModel.store_fp8`):
#: those whose operation autocast casts to the compute dtype on every device.
FP8 = torch.float8_e4m3fn
FP8_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA a run attaches: kohya's ``network_dim``/``network_alpha``, LoCon's ``conv_dim``/``conv_alpha``
    (0: no LoCon layers), and whether the text encoders take one and the UNet does (kohya attaches none to the
    UNet of a run that trains only the text encoders' LoRA, so its file holds no ``lora_unet_*`` module)."""

    rank: int
    alpha: float
    conv_rank: int = 0
    conv_alpha: float = 1.0
    text_encoders: bool = False
    unet: bool = True


class TrainableModel:
    """``base`` with ``pivots`` (one per text encoder) and LoRA adapters; see the module docstring.

    ``lora_alphas`` maps each LoRA module path (as in the peft state dicts) to its alpha.
    """

    def __init__(self, base: BaseModel, pivots: tuple[PivotEmbedding, ...], lora_alphas: dict[str, float]):
        self.base = base
        self.pivots = pivots
        self.lora_alphas = lora_alphas
        self._lora_on = False
        self._forwards: dict[str, Callable[..., object]] = {}
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        self._text_home: torch.device | None = None  # set while the text encoders wait on the CPU
        self.text_returns = 0  # times an encode brought them back from the CPU
        self._token_ids: dict[str, list] = {}  # caption -> its ids (see tokenize)
        self.weighted_captions = False  # kohya's weighted_captions: see tokenize_captions and weigh
        self._weighted: dict[str, tuple[list, list]] = {}  # caption -> its weighted ids and weights
        # the components that carry a LoRA (attached before this model is built, never after): the switch visits
        # only these, without walking the others' modules each time
        self._with_lora = [name for name, module in self.components().items() if lora_layers(module)]

    @classmethod
    def build(
        cls, base: BaseModel, token: str, num_vectors: int, init_words: list[str], lora: LoraSpec, seed: int
    ) -> TrainableModel:
        """Add the pivot tokens to every tokenizer/encoder and attach the LoRA (initialised from ``seed`` only).

        Raises ``ValueError`` for a token already in a vocabulary or an init word of several tokens.
        """
        pivots = tuple(
            add_pivot_token(tokenizer, te, token, num_vectors, init_words)
            for tokenizer, te in zip(base.tokenizers, base.text_encoders)
        )
        table = base.family.key_table
        unet_targets = table.peft_targets("unet", base.unet) if lora.unet else []
        overrides: dict[str, tuple[int, float]] = {}
        if lora.unet and lora.conv_rank:  # LoCon: 3x3 convolutions take conv_dim/conv_alpha, the other ResNet layers network_dim/alpha
            conv3x3, other = split_conv3x3(base.unet, table.peft_targets("unet", base.unet, conv=True))
            unet_targets = unet_targets + conv3x3 + other
            overrides = {path: (lora.conv_rank, lora.conv_alpha) for path in conv3x3}
        alphas = {path: overrides.get(path, (0, lora.alpha))[1] for path in unet_targets}
        with torch.random.fork_rng(devices=[]):  # LoRA init (peft draws from the global RNG) depends on the seed only
            torch.manual_seed(seed)
            if lora.unet:
                attach_lora(base.unet, unet_targets, lora.rank, lora.alpha, overrides)
            if lora.text_encoders:
                for name, te in zip(base.family.text_encoder_names, base.text_encoders):
                    targets = table.peft_targets(name, te)
                    alphas |= {path: lora.alpha for path in targets}
                    attach_lora(te, targets, lora.rank, lora.alpha)
        return cls(base, pivots, alphas)

    # ------------------------------------------------------------------ what it is
    @property
    def family(self) -> ModelFamily:
        return self.base.family

    @property
    def unet(self) -> nn.Module:
        """The UNet module itself (with its LoRA layers); :meth:`predict` runs it."""
        return self.base.unet

    @property
    def text_encoders(self) -> tuple[nn.Module, ...]:
        return self.base.text_encoders

    @property
    def text_encoder(self) -> nn.Module:
        """The first (for SD1.5 the only) text encoder."""
        return self.base.text_encoders[0]

    def components(self) -> dict[str, nn.Module]:
        """Every trainable-bearing module by component name (``"unet"``, then the text encoders)."""
        return {"unet": self.base.unet} | dict(zip(self.family.text_encoder_names, self.base.text_encoders))

    def lora_components(self) -> dict[str, nn.Module]:
        """The :meth:`components` that carry a LoRA (attached before this model is built, never after), by name."""
        components = self.components()
        return {name: components[name] for name in self._with_lora}

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids of ``captions`` as the family tokenizes them (CPU, int64). Each caption is tokenized once and
        its ids kept (up to :data:`TOKEN_MEMO` captions, then the memo starts again): a run's steps draw the same
        captions again and again, and a tokenizer call costs far more than building the tensor."""
        if not captions:
            return self.base.tokenize(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._token_ids]
        if missing:
            if len(self._token_ids) + len(missing) > TOKEN_MEMO:
                self._token_ids.clear()
            self._token_ids.update(zip(missing, self.base.tokenize(missing).tolist()))
        return torch.tensor([self._token_ids[c] for c in captions], dtype=torch.long)

    def tokenize_captions(self, captions: list[str]) -> torch.Tensor:
        """Token ids of training captions: :meth:`tokenize`, or with ``weighted_captions`` the ids of the captions'
        weighted pieces (:mod:`~pti_plugin.data.weighted_captions`; sample prompts and plugins' prompts stay plain)."""
        if not self.weighted_captions:
            return self.tokenize(captions)
        return torch.tensor([self._weighted_caption(c)[0] for c in captions], dtype=torch.long)

    def weigh(self, cond: Conditioning, captions: list[str]) -> Conditioning:
        """``cond`` (of :meth:`tokenize_captions`'s ids of ``captions``) with the captions' weights applied (kohya's
        ``weighted_captions``); ``cond`` itself when the option is off."""
        if not self.weighted_captions:
            return cond
        weights = torch.tensor([self._weighted_caption(c)[1] for c in captions])
        return self.family.weigh(self.base.text_encoders, cond, weights)

    def _weighted_caption(self, caption: str) -> tuple[list, list]:
        if caption not in self._weighted:
            if len(self._weighted) >= TOKEN_MEMO:
                self._weighted.clear()
            self._weighted[caption] = self.family.weighted_ids(self.base.tokenizers, caption)
        return self._weighted[caption]

    # ------------------------------------------------------------------ text encoders off the device
    @property
    def text_encoders_away(self) -> bool:
        return self._text_home is not None

    def offload_text_encoders(self) -> None:
        """Move the text encoders (with their pivots and LoRA) to the CPU until :meth:`restore_text_encoders`
        or the next :meth:`encode`; nothing happens when they already are on the CPU."""
        home = next(self.base.text_encoders[0].parameters()).device
        if home.type == "cpu":
            return
        for te in self.base.text_encoders:
            te.to("cpu")
        self._text_home = home

    def restore_text_encoders(self) -> bool:
        """The text encoders back where :meth:`offload_text_encoders` found them; True if they moved."""
        if self._text_home is None:
            return False
        for te in self.base.text_encoders:
            te.to(self._text_home)
        self._text_home = None
        return True

    def pivot_parameters(self) -> list[nn.Parameter]:
        return [p.vectors for p in self.pivots]

    def lora_parameters(self, component: str | None = None) -> list[nn.Parameter]:
        """LoRA parameters of one component (``"unet"``, ``"text_encoders"`` for all of them) or of all."""
        chosen = self.components()
        if component == "text_encoders":
            chosen = {k: v for k, v in chosen.items() if k != "unet"}
        elif component is not None:
            chosen = {component: chosen[component]}
        return [p for module in chosen.values() for p in lora_parameters(module)]

    def lora_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """peft-format LoRA weights by component (components without a LoRA left out)."""
        return {name: lora_state_dict(m) for name, m in self.components().items() if lora_parameters(m)}

    def load_network_weights(self, path: str, states: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float],
                             text_encoder_lora: bool) -> None:
        """Start the LoRA from the kohya LoRA file ``path`` (``network_weights``), read by the formats into peft
        ``states`` by component and ``alphas`` (``formats.kohya_lora.kohya_to_peft``); a file of other ranks, alphas
        or modules, or with weights of a component this run attaches no LoRA to (text encoders: no stage trains their
        LoRA; the UNet: the run's lora stages train only the text encoders'), is refused naming the key."""
        from ..config import ConfigError
        from .lora import load_lora_state_dict

        components = self.components()
        if "unet" in states and "unet" not in self._with_lora:
            raise ConfigError(f"key 'network_weights': {path} holds UNet LoRA weights, but no lora stage trains the UNet "
                              "LoRA (network_train_text_encoder_only = true, or train_unet = false in every lora stage), "
                              "so this run has none to start from them; set train_unet = true in a lora stage")
        if any(c != "unet" for c in states) and not text_encoder_lora:
            raise ConfigError(f"key 'network_weights': {path} holds text-encoder LoRA weights; "
                              "enable train_text_encoder in a lora stage (or network_train_unet_only = false)")
        expected = {(c, k): v.shape for c, sd in self.lora_state_dicts().items() for k, v in sd.items()}
        found = {(c, k): v.shape for c, sd in states.items() for k, v in sd.items()}
        wrong = [k for (c, k), shape in found.items() if expected.get((c, k)) != shape]
        wrong_alpha = [k for k, a in alphas.items() if a != self.lora_alphas.get(k)]
        if wrong or wrong_alpha:
            ranks = sorted({shape[0] for (_, k), shape in found.items() if ".lora_A." in k})
            raise ConfigError(
                f"key 'network_weights': {path} does not fit this run's LoRA "
                f"(first mismatch: {(wrong or wrong_alpha)[0]}; file ranks {ranks}, alphas {sorted(set(alphas.values()))}); "
                "set network_dim, network_alpha and network_args to match"
            )
        for component, state in states.items():
            load_lora_state_dict(components[component], state)

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        """Every tensor that training can change, by stable name (pivots and LoRA weights)."""
        named = {("pivot.vectors" if i == 0 else f"pivot{i + 1}.vectors"): v for i, v in enumerate(self.pivot_parameters())}
        for prefix, module in self.components().items():
            for name, param in module.named_parameters():
                if ".lora_" in name:
                    named[f"{prefix}.{name}"] = param
        return named

    def kept_float32(self, full_bf16: bool) -> set[int]:
        """The ids of the tensors that stay float32 while the frozen weights take the mixed-precision dtype: the
        trainable ones (the optimizer's full-precision weights), none with kohya's ``full_bf16`` (``mixed_precision
        = "bf16"``: the pivot and the LoRA are cast with the rest, so their gradients and optimizer state are bf16
        too, as kohya's ``network.to(weight_dtype)`` and its textual inversion's cast of the text encoders)."""
        return set() if full_bf16 else {id(p) for p in self.trainable_tensors().values()}

    def store_fp8(self, fp8_base: bool, fp8_base_unet: bool, autocast: Callable[[], contextlib.AbstractContextManager]) -> set[int]:
        """kohya's ``fp8_base_unet`` (the UNet) and ``fp8_base`` (the UNet and the text encoders; the UNet alone when
        both are set, as kohya): their frozen linear and convolution weights stored in ``float8_e4m3fn``, which autocast
        upcasts in each layer; returns the ids of the tensors so stored (none with both off: nothing is touched). The
        trainable tensors stay as they are, and so (as kohya) do the text encoders' embeddings: the token table (which
        the pivot reads) and the positions. The other frozen weights (the normalisations' affines) take float8's
        values, the same as kohya's, but keep their dtype (the trainer casts them to the mixed-precision dtype): CUDA's
        autocast runs a normalisation in float32 from float8 weights, the CPU's takes no float8 weight there. With
        float8 weights every forward needs ``autocast`` (the run's): it is the model's from now on, not from the first
        stage (:meth:`use_forwards`), so that an encode before it (a plugin's setup) runs too; and DDP leaves them out
        of its start-up broadcast (gloo, a CPU run's backend, cannot send float8; every process loaded the same)."""
        text = list(self.family.text_encoder_names) if fp8_base and not fp8_base_unet else []  # kohya: _unet wins
        names = ["unet"] + text if fp8_base or fp8_base_unet else []
        components, trained, stored = self.components(), {id(p) for p in self.trainable_tensors().values()}, set()
        for module in (m for name in names for m in components[name].modules() if not isinstance(m, nn.Embedding)):
            for param in module.parameters(recurse=False):
                if id(param) in trained:
                    continue
                if isinstance(module, FP8_LAYERS):
                    param.data = param.data.to(FP8)
                    stored.add(id(param))
                else:
                    param.data = param.data.to(FP8).to(param.dtype)
        if stored:
            self.autocast = autocast
        for name in names:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                components[name], [key for key, p in components[name].named_parameters() if id(p) in stored])
        return stored

    # ------------------------------------------------------------------ stage switches (trainer only)
    def set_trainable(self, parameters: list[nn.Parameter], lora_enabled: bool) -> dict[str, bool]:
        """Make exactly ``parameters`` require gradients and switch the LoRA on or off; returns which
        components now train."""
        ids = {id(p) for p in parameters}
        trains = {}
        for name, module in self.components().items():
            for param in module.parameters():
                param.requires_grad_(id(param) in ids)
            trains[name] = any(p.requires_grad for p in module.parameters())
        self._set_lora(lora_enabled)
        return trains

    def use_forwards(self, forwards: dict[str, Callable[..., object]], autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        """The stage's prepared (e.g. DDP-wrapped) module per component, and the autocast context."""
        self._forwards, self.autocast = dict(forwards), autocast

    def _set_lora(self, enabled: bool) -> None:
        for module in self.lora_components().values():
            set_lora_enabled(module, enabled)
        self._lora_on = enabled

    # ------------------------------------------------------------------ the contract's calls
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction ``[b, 4, h, w]`` with the LoRA as currently switched: the stage's prepared
        module when gradients are on, the plain module otherwise (no DDP collective without a backward)."""
        forward = self._forwards.get("unet", self.base.unet) if torch.is_grad_enabled() else self.base.unet
        with self.autocast():  # (no truth test of a module: a compiled one's raises TypeError)
            return forward(noisy, timesteps, **cond.unet_kwargs()).sample

    def encode(self, input_ids: torch.Tensor, lora: bool = True, pivot_grad: bool = True,
               sizes: torch.Tensor | None = None) -> Conditioning:
        """The conditioning of ``input_ids`` through the text encoders: ``lora``: their LoRA as the stage
        switched it (True) or off, the base encoders (False); ``pivot_grad``: with the pivot's gradient
        (True) or with the pivot as a fixed input (False); ``sizes`` [B, 6]: per-sample size conditioning
        (SDXL's time ids; ignored by SD1.5). Gradients flow as ``torch.is_grad_enabled()``."""
        self.text_returns += self.restore_text_encoders()
        with self._text_side(lora, pivot_grad) as encoders, self.autocast():
            return self.family.encode(encoders, input_ids, sizes)

    def pre_layernorm_states(self, input_ids: torch.Tensor, lora: bool = True, pivot_grad: bool = True) -> torch.Tensor:
        """Per-token states before the conditioning's final LayerNorm, switched as :meth:`encode`."""
        self.text_returns += self.restore_text_encoders()
        with self._text_side(lora, pivot_grad) as encoders, self.autocast():
            return self.family.pre_layernorm_states(encoders, input_ids)

    def final_layer_norms(self) -> tuple[nn.LayerNorm | None, ...]:
        return self.family.final_layer_norms(self.base.text_encoders)

    @contextlib.contextmanager
    def _text_side(self, lora: bool, pivot_grad: bool) -> Iterator[tuple[nn.Module, ...]]:
        switch = not lora and self._lora_on
        plain = switch or not pivot_grad or not torch.is_grad_enabled()
        names = self.family.text_encoder_names
        encoders = self.base.text_encoders if plain else tuple(self._forwards.get(n, m) for n, m in zip(names, self.base.text_encoders))
        with contextlib.ExitStack() as stack:
            if switch:
                stack.enter_context(self._lora_switched(False, text_only=True))
            if not pivot_grad:
                for pivot in self.pivots:
                    stack.enter_context(pivot.detached())
            yield encoders

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The base model: every LoRA off and no gradients inside the block; the previous switch after it."""
        with torch.no_grad(), self._lora_switched(False):
            yield

    @contextlib.contextmanager
    def _lora_switched(self, enabled: bool, text_only: bool = False) -> Iterator[None]:
        previous = self._lora_on
        modules = [module for name, module in self.lora_components().items() if not (text_only and name == "unet")]
        for module in modules:
            set_lora_enabled(module, enabled)
        if not text_only:
            self._lora_on = enabled
        try:
            yield
        finally:
            for module in modules:
                set_lora_enabled(module, previous)
            self._lora_on = previous
