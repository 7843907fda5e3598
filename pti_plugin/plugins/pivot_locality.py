"""Pivot locality: in LoRA stages, the fine-tuned model must match the frozen one near the pivot.

For a template ``T`` (default: the preset's caption template) the pivot prompt ``T(tok1)`` and the
class prompt ``T(class word)`` (the class word in the same n slots as the n pivot tokens) give
encoder outputs ``H_p`` and ``H_c`` ([77, d]). Each regularisation sample picks a (template, class
word) pair and a fraction ``s`` of the pivot->class angle, interpolates per token position
``H_r = slerp(H_p, H_c, s)`` (``geometry``: ``auto``: the exact LayerNorm slerp where the conditioning ends with one LayerNorm (SD1.5), see ``geometry.py``),
takes noisy latents ``x_t`` at a timestep ``t`` (the step's own noisy training latents, or pure
Gaussian latents at a random timestep; with ``timestep_range = [low, high]`` the timestep is drawn
in that band, a batch row's clean latents re-noised there), and adds

    weight * mse(eps_lora(x_t, t, H_r), eps_frozen(x_t, t, H_r))

to the loss. ``eps_frozen`` is the same UNet with its LoRA switched off, under ``no_grad``. Each
side builds its conditioning with its own text encoder: LoRA on for the trained side (with
gradients when the text-encoder LoRA trains), LoRA off for the frozen side. The pivot is a fixed
input of the regulariser: no gradient of this term reaches the pivot vectors, even in a LoRA stage
that continues the inversion. The LoRA-on rows ride on the step's main UNet call (``extra_rows``);
the loss is computed in ``extra_losses`` and logged as ``loss/pivot_locality/mse``.

Every random draw (pair, fraction, latents, timestep, anchor choice) comes from a generator seeded
by (seed, stage, step, first slot of the micro-batch, sample) or, for anchor pools, by (seed,
stage, anchor, latent size): runs are reproducible across processes and resume.

Logged (``state.logs``): ``pivot_locality/angle_layernorm_deg`` (angle between the pivot's and the
class word's normalised pre-LayerNorm states at the pivot slots), ``angle_centered_deg`` (about the
centre), ``angle_raw_deg`` (about the origin), ``fraction`` (mean fraction of the step), and every
``probe_every_n_steps`` the mean |eps_lora - eps_frozen| on a fixed probe set at fractions 0, 0.25,
0.5 and 1 (``deviation_f0.50`` ...). The settings are saved in the LoRA metadata as
``pti_pivot_locality`` (JSON).

The centre (``geometry = "centered"``, and the centred angle in every geometry) comes from
``centre_file``, the file ``analysis/ellipsoid_check.py`` writes (format: ``pti_plugin/centre_file.py``;
its width, positions, clip_skip and LayerNorm gamma/beta must match this model), else it is the
mean encoder output (LoRA off) over a small built-in prompt set, per token position.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import geometry
from ..config import ConfigError, doc
from ..data.captions import pivot_token_strings
from ..data.sample_order import sample_generator
from ..hooks import Batch, MainPrediction, Plugin, TrainerState, UNetRows
from ..input_checks import template_problem
from ..models.family import Conditioning
from ..text_files import path_not_found
from . import locality_centre

logger = logging.getLogger(__name__)

_SAMPLE_TAG, _POOL_TAG, _PICK_TAG, _PROBE_TAG = 0x10CA1, 0x10CA2, 0x10CA3, 0x10CA4
PROBE_FRACTIONS = (0.0, 0.25, 0.5, 1.0)

def _error(message: str) -> ConfigError:
    return ConfigError(f"plugins.pivot_locality: {message}")


@dataclass
class _Sample:
    pair: int
    fraction: float
    source_row: int = -1  # latents = "batch": the row of the step's batch
    noise: torch.Tensor | None = None  # latents = "noise": x_t [4, h, w]
    timestep: int = 0


@dataclass
class _Pending:
    """What ``extra_rows`` prepared for ``extra_losses`` in the same micro-step (its rows ride on the main UNet call)."""

    samples: list[_Sample]
    frozen_cond: Conditioning | None  # r rows; None when cached targets are used
    noisy: torch.Tensor  # [r, 4, h, w]
    timesteps: torch.Tensor  # [r]
    target: torch.Tensor | None  # cached frozen predictions [r, 4, h, w]


class PivotLocality(Plugin):
    name = "pivot_locality"

    @dataclass
    class Options:
        class_words: list[str] = doc(
            "Class words (one drawn per sample), each one token (repeated in the n pivot slots) or exactly n tokens; "
            "empty = the preset's init_word.", factory=list)
        templates: list[str] = doc(
            'Prompt templates, "{}" marks the token (one drawn per sample); empty = the preset\'s caption_template.',
            factory=list)
        fractions: list[float] = doc(
            'Fractions of the pivot->class angle for fraction_sampling = "fixed", each in (0, 1] '
            "(0.5: half the angle; 1.0: the class prompt itself, the peers' endpoint variant).", factory=lambda: [0.5])
        fraction_sampling: str = doc(
            '"fixed": one of fractions per sample; "uniform": uniform in [min_fraction, max_fraction].', "fixed")
        min_fraction: float = doc(
            'Lower end of "uniform" fractions (> 0: the pivot itself is what the main loss fits).', 0.1)
        max_fraction: float = doc('Upper end of "uniform" fractions (<= 1).', 0.5)
        weight: float = doc("Weight of the locality MSE added to the loss on regularised steps.", 1.0)
        every_n_steps: int = doc("Regularise every N optimizer steps of an active stage (its first step included).", 1)
        num_samples: int = doc("Regularisation samples (extra UNet rows) per micro-batch of a regularised step.", 1)
        latents: str = doc(
            '"batch": the step\'s own noisy training latents and timesteps; "noise": Gaussian latents at a random '
            "timestep.", "batch")
        timestep_range: list[int] = doc(
            "[low, high]: draw each row's timestep uniformly in low..high (inclusive) instead; with latents = "
            '"batch" the row re-noises its clean training latents there with fresh noise. Empty = the step\'s own '
            "timesteps (batch) or the whole schedule (noise). E.g. the band where a model decides positions "
            "(analysis/position_timesteps.py).", factory=list)
        geometry: str = doc(
            '"layernorm": exact slerp of the normalised pre-LayerNorm states; "centered": slerp about a centre (per '
            'text encoder, and the pooled embedding likewise); "linear": lerp; "auto": layernorm where the '
            "conditioning ends with one LayerNorm (SD1.5), else centered (SDXL).", "auto")
        centre_file: str = doc(
            'Centre file of analysis/ellipsoid_check.py (per-position centres) for "centered" and the centred angle; '
            "empty = estimated from built-in prompts.", "")
        anchor_pool: int = doc(
            "K fixed anchors (latents, timestep, pair, fraction) per stage and latent size, each step picks from "
            'them; 0 = fresh anchors every step. Needs latents = "noise".', 0)
        cache_anchors: bool = doc(
            "Precompute the anchor pool's frozen predictions (no frozen UNet pass per step); needs anchor_pool and "
            "stages that train neither a text-encoder LoRA nor the pivot.", False)
        stages: list[str] = doc("Names of the stages where it is active; empty = every lora stage.", factory=list)
        probe_every_n_steps: int = doc(
            "Log the mean |eps_lora - eps_frozen| at fractions 0, 0.25, 0.5, 1 on a fixed probe set every N steps "
            "(0 = off).", 100)

    def __init__(self, options: Any):
        super().__init__(options)
        o = options
        if o.fraction_sampling not in ("fixed", "uniform"):
            raise _error(f'fraction_sampling must be "fixed" or "uniform", got {o.fraction_sampling!r}')
        if o.fraction_sampling == "fixed":
            if not o.fractions:
                raise _error('fractions is empty; give at least one (e.g. [0.5]) or use fraction_sampling = "uniform"')
            bad = [f for f in o.fractions if not 0 < f <= 1]
            if bad:
                raise _error(f"fractions must lie in (0, 1] (0 is the pivot itself, which the main loss fits), got {bad}")
        elif not 0 < o.min_fraction <= o.max_fraction <= 1:
            raise _error(f"need 0 < min_fraction <= max_fraction <= 1, got {o.min_fraction} and {o.max_fraction}")
        if o.timestep_range and (len(o.timestep_range) != 2 or not 0 <= o.timestep_range[0] <= o.timestep_range[1]):
            raise _error(f"timestep_range must be [low, high] with 0 <= low <= high, got {o.timestep_range}")
        if o.latents not in ("batch", "noise"):
            raise _error(f'latents must be "batch" or "noise", got {o.latents!r}')
        if o.geometry not in ("auto", "layernorm", "centered", "linear"):
            raise _error(f'geometry must be "auto", "layernorm", "centered" or "linear", got {o.geometry!r}')
        for key in ("every_n_steps", "num_samples"):
            if getattr(o, key) < 1:
                raise _error(f"{key} must be >= 1, got {getattr(o, key)}")
        if o.weight < 0 or not math.isfinite(o.weight):
            raise _error(f"weight must be a finite number >= 0, got {o.weight}")
        if o.anchor_pool < 0 or o.probe_every_n_steps < 0:
            raise _error("anchor_pool and probe_every_n_steps must be >= 0")
        if o.anchor_pool and o.latents != "noise":
            raise _error('anchor_pool needs latents = "noise": with latents = "batch" the anchors are the step\'s own latents')
        if o.cache_anchors and (o.latents != "noise" or not o.anchor_pool):
            raise _error('cache_anchors needs latents = "noise" and a fixed anchor pool (anchor_pool = K > 0, e.g. 16): '
                         'with latents = "batch" every step brings new latents, so there is nothing to cache')
        for template in o.templates:
            if problem := template_problem(template):
                raise _error(f"templates entry {template!r} {problem}")
        if o.centre_file and not Path(o.centre_file).expanduser().is_file():
            raise _error(path_not_found(o.centre_file, "centre_file"))
        self._stage_active = False

    # ------------------------------------------------------------------ setup
    def on_setup(self, state: TrainerState) -> None:
        config, o = state.config, self.options
        stage_names = {s.name: s for s in config.stages}
        unknown = [n for n in o.stages if n not in stage_names]
        if unknown:
            raise _error(f"stages {unknown} are not stages of this preset ({sorted(stage_names)})")
        if o.timestep_range and o.timestep_range[1] >= state.num_train_timesteps:
            raise _error(f"timestep_range {o.timestep_range} reaches past the schedule's last timestep "
                         f"({state.num_train_timesteps - 1})")
        not_lora = [n for n in o.stages if stage_names[n].kind != "lora"]
        if not_lora:
            raise _error(f"stages {not_lora} are inversion stages: the regulariser constrains LoRA fine-tuning only")
        self.active_stages = list(o.stages) or [s.name for s in config.stages if s.kind == "lora"]
        if not self.active_stages:
            logger.warning("pivot_locality: the preset has no lora stage; the plugin does nothing")
        self._te_has_lora = any(state.stage_trains(s).text_encoder_lora for s in config.stages)
        if o.cache_anchors:  # early, from the schedule's plan of each stage
            for name in self.active_stages:
                trains = state.stage_trains(stage_names[name])
                if trains.text_encoder_lora or trains.pivot:
                    raise self._cache_refusal(name, "text encoder LoRA" if trains.text_encoder_lora else "pivot")

        norms = state.final_layer_norms()
        self.ln = norms[0] if len(norms) == 1 and isinstance(norms[0], torch.nn.LayerNorm) else None
        # its (frozen) affine, float32 on the training device: with cache_text_encoder_outputs the text
        # encoders, this LayerNorm with them, sit on the CPU during a stage while cached endpoints stay here
        self._ln_affine = None if self.ln is None else tuple(p.detach().float().to(state.device) for p in (self.ln.weight, self.ln.bias))
        widths = state.conditioning_widths()  # each encoder's share of the hidden states' width
        bounds = torch.tensor(widths).cumsum(0).tolist()
        self.slices = [slice(lo, hi) for lo, hi in zip([0] + bounds[:-1], bounds)]  # per encoder
        self._size_conditioning = state.size_conditioning
        if o.geometry == "layernorm" and self.ln is None:
            raise _error('geometry = "layernorm" needs a conditioning that ends with one LayerNorm, and this model '
                         'family\'s conditioning does not; use geometry = "centered"')
        self.geometry = o.geometry
        if o.geometry == "auto":
            self.geometry = "layernorm" if self.ln is not None else "centered"
            if self.ln is None:
                state.info("pivot_locality: this model's conditioning is taken before any final LayerNorm (SDXL: "
                           "penultimate states of both encoders), so the exact LayerNorm slerp does not apply; using "
                           "the centered geometry (slerp about the empirical centre, per token position and encoder, "
                           "and for the pooled embedding)")

        self.pivot_ids, self.class_ids, self.slots, self.pairs = self._prompt_ids(state)
        self.pooled_centre: torch.Tensor | None = None
        self.centre, self.centre_source, centre_origin = self._load_centre(state)
        if self.centre is not None and self.pooled_centre is None and self.geometry == "centered":
            _, self.pooled_centre = locality_centre.estimate_centre(state)  # a centre file holds the per-token centre only
        self._num_train_timesteps = state.num_train_timesteps
        self._last_shape: tuple[int, ...] | None = None
        if self.active_stages:
            state.info(f"pivot_locality: stages {self.active_stages}, geometry {self.geometry}, weight {o.weight:g}, "
                  f"{self._fraction_text()}, latents {o.latents}; centre: {centre_origin}; class prompts: "
                  + "; ".join(repr(p["class_prompt"]) for p in self.pairs))

    def _fraction_text(self) -> str:
        o = self.options
        if o.fraction_sampling == "fixed":
            return f"fractions {o.fractions}"
        return f"fractions uniform in [{o.min_fraction:g}, {o.max_fraction:g}]"

    @staticmethod
    def _cache_refusal(stage: str, what: str) -> ConfigError:
        return _error(f"cache_anchors is refused in stage {stage!r}, which trains the {what}: the anchors' conditionings "
                      "change every step, so their frozen predictions cannot be cached. Turn cache_anchors off, or "
                      "train the UNet LoRA only in that stage (network_train_unet_only = true, train_pivot = false)")

    def _prompt_ids(self, state: TrainerState):
        """Token ids of every (template, class word) pair: pivot prompts [P, 77] ([P, encoders, 77] for SDXL), class
        prompts likewise, pivot slots [P, n]."""
        config, o = state.config, self.options
        n = config.num_vectors_per_token
        templates = list(o.templates) or [config.caption_template]
        class_words = list(o.class_words)
        if not class_words:
            class_words = [" ".join(config.init_words)]
        pivot_ids, class_ids, slots, pairs = [], [], [], []
        token_ids = state.pivot.token_ids.cpu()
        for template in templates:
            if template.count("{}") != 1:
                raise _error(f'template {template!r} must contain "{{}}" (the token) exactly once')
            prompt = template.format(" ".join(pivot_token_strings(config.token_string, n)))
            ids = state.tokenize([prompt])[0].cpu()  # [77], or [encoders, 77] (SDXL): the same positions in each
            first = ids if ids.dim() == 1 else ids[0]
            where = torch.nonzero(first[:, None] == token_ids[None, :])  # [(position, which vector)]
            if len(where) != n or not torch.equal(where[:, 1], torch.arange(n)) or not torch.equal(
                where[:, 0], where[0, 0] + torch.arange(n)
            ):
                raise _error(f"template {template!r}: the pivot tokens do not appear once each, in order, within the "
                             f"{first.shape[0]} token positions (is the template too long?)")
            positions = where[:, 0]
            for word in class_words:
                word_ids = state.word_token_ids(word)
                if len(word_ids) == 1:
                    fill, words_in_slots = word_ids * n, " ".join([word] * n)
                elif len(word_ids) == n:
                    fill, words_in_slots = list(word_ids), word
                else:
                    raise _error(
                        f"class word {word!r} is {len(word_ids)} tokens for this tokenizer, but the pivot occupies "
                        f"{n} token slot(s) (num_vectors_per_token = {n}): the per-position slerp needs the class "
                        "prompt to put the class word in exactly the pivot's slots. Use a single-token class word"
                        + (f" or one of {n} tokens" if n > 1 else f", or num_vectors_per_token = {len(word_ids)}")
                    )
                cls = ids.clone()
                cls[..., positions] = torch.tensor(fill, dtype=cls.dtype)
                pivot_ids.append(ids)
                class_ids.append(cls)
                slots.append(positions)
                pairs.append({"template": template, "class_word": word, "class_prompt": template.format(words_in_slots)})
        return torch.stack(pivot_ids), torch.stack(class_ids), torch.stack(slots), pairs

    def _load_centre(self, state: TrainerState) -> tuple[torch.Tensor | None, str, str]:
        """The centre for the ``centered`` geometry and the centred angle (None without a use), where it came from
        as the LoRA's metadata records it, and as the start-up line says it."""
        o = self.options
        if o.centre_file:
            try:
                loaded = locality_centre.load_centre(state, o.centre_file, self.pivot_ids, self.ln)
            except locality_centre.CentreMismatch as exc:
                raise _error(str(exc)) from exc
            return loaded.centre, f"file:{Path(o.centre_file).name}", loaded.origin()
        if self.geometry != "centered" and self.ln is None:
            return None, "none", f"none (geometry {self.geometry})"
        centre, self.pooled_centre = locality_centre.estimate_centre(state)
        prompts = len(locality_centre.CENTRE_PROMPTS)
        return centre, f"estimated:{prompts} built-in prompts", f"estimated from {prompts} built-in prompts (no centre_file)"

    # ------------------------------------------------------------------ stage
    def on_stage_start(self, state: TrainerState) -> None:
        self._stage_active = state.stage.name in self.active_stages
        self._endpoints: dict[str, dict[str, torch.Tensor]] = {}
        self._pools: dict[tuple[int, ...], dict[str, Any]] = {}
        self._pending: _Pending | None = None
        self._angle_logs: dict[str, float] = {}
        if not self._stage_active:
            return
        self._te_lora_trains = state.plan.trains.text_encoder_lora
        self._pivot_trains = state.plan.trains.pivot
        if self.options.cache_anchors and (self._te_lora_trains or self._pivot_trains):
            raise self._cache_refusal(state.stage.name, "text encoder LoRA" if self._te_lora_trains else "pivot")
        with torch.no_grad():
            self._angle_logs = self._angles(self._side_endpoints(state, trained_side=True, grad=False))

    def _compute_endpoints(self, state: TrainerState, lora_on: bool, grad: bool) -> dict[str, torch.Tensor]:
        """Encoder states of every pair's pivot prompt (``h_p``, and ``xhat_p`` with a final LayerNorm) and class
        prompt (``h_c``, ``xhat_c``): float32 [P, 77, d], with the text-encoder LoRA on or off. The pivot is a
        fixed input: no gradient of this term reaches it."""
        ids = torch.cat([self.pivot_ids, self.class_ids]).to(state.device)
        with torch.set_grad_enabled(grad):
            if self.ln is None:
                cond = state.encode(ids, lora=lora_on, pivot_grad=False)
                states = {"h": cond.hidden_states.float()}
                states |= {"pooled": v.float() for k, v in cond.added_cond_kwargs.items() if k == "text_embeds"}
                states |= {"time_ids": v for k, v in cond.added_cond_kwargs.items() if k == "time_ids"}
            else:
                x = state.pre_layernorm_states(ids, lora=lora_on, pivot_grad=False)
                with state.autocast():
                    h = F.layer_norm(x.float(), self.ln.normalized_shape, *self._ln_affine, self.ln.eps)  # float32 affine (CPU: no bf16)
                states = {"h": h, "xhat": geometry.normalise_like_layernorm(x, self.ln.eps)}
        P = self.pivot_ids.shape[0]
        return {f"{k}_p": v[:P] for k, v in states.items()} | {f"{k}_c": v[P:] for k, v in states.items()}

    def _side_endpoints(self, state: TrainerState, trained_side: bool, grad: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`_compute_endpoints` for the trained side (text-encoder LoRA on; with gradients when ``grad`` and
        that LoRA trains) or the frozen side (LoRA off), kept through the stage when they cannot change."""
        lora_on = trained_side and self._te_has_lora  # without a text-encoder LoRA both sides agree
        key = "trained" if lora_on else "frozen"
        varies = lora_on and self._te_lora_trains
        constant = not self._pivot_trains and not varies
        if constant and key in self._endpoints:
            return self._endpoints[key]
        out = self._compute_endpoints(state, lora_on, grad and varies)
        if constant:
            out = {k: v.detach() for k, v in out.items()}
            self._endpoints[key] = out
        return out

    def _interpolate(self, ends: dict[str, torch.Tensor], pairs: list[int], fractions: list[float],
                     sizes: torch.Tensor | None = None) -> Conditioning:
        """The conditioning of ``H_r`` (float32 [r, 77, d]) for pair indices and fractions of the pivot->class
        angle; with a pooled embedding (SDXL) that is interpolated the same way, and ``sizes`` [r, 6] (None:
        the family's default) give the size conditioning."""
        index = torch.tensor(pairs, device=ends["h_p"].device)
        s = torch.tensor(fractions, dtype=torch.float32, device=index.device)[:, None]  # [r, 1] over positions
        if self.geometry == "layernorm":
            hidden = geometry.layernorm_slerp(ends["xhat_p"][index], ends["xhat_c"][index], s, *self._ln_affine)
        else:  # per encoder's slice of the width: each encoder's states are their own ellipsoid
            h_p, h_c = ends["h_p"][index], ends["h_c"][index]
            hidden = torch.cat([self._slerp(h_p[..., part], h_c[..., part], s,
                                            None if self.centre is None else self.centre[..., part])
                                for part in self.slices], dim=-1)
        extra = {}
        if "pooled_p" in ends:
            extra["text_embeds"] = self._slerp(ends["pooled_p"][index], ends["pooled_c"][index], s[:, 0], self.pooled_centre)
        if sizes is not None:
            extra |= self._size_conditioning(sizes)
        elif "time_ids_p" in ends:
            extra["time_ids"] = ends["time_ids_p"][index]
        return Conditioning(hidden, extra)

    def _slerp(self, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, centre: torch.Tensor | None) -> torch.Tensor:
        """The centered slerp or the lerp of ``a`` toward ``b`` (same shapes) by fractions ``s``."""
        if self.geometry == "centered":
            return geometry.centered_slerp(a, b, s, centre)
        return geometry.lerp(a, b, s)

    def _angles(self, ends: dict[str, torch.Tensor]) -> dict[str, float]:
        """Pivot->class angles (degrees) at the pivot slots, mean over pairs and vectors, in each geometry."""
        gather = lambda t: t.gather(1, self.slots.to(t.device)[..., None].expand(-1, -1, t.shape[-1]))  # [P, n, d]
        h_p, h_c = gather(ends["h_p"]), gather(ends["h_c"])
        logs = {"pivot_locality/angle_raw_deg": float(torch.rad2deg(geometry.angle(h_p, h_c)).mean())}
        if "xhat_p" in ends:
            logs["pivot_locality/angle_layernorm_deg"] = float(
                torch.rad2deg(geometry.layernorm_angle(gather(ends["xhat_p"]), gather(ends["xhat_c"]))).mean())
        if self.centre is not None:
            centre = self.centre if self.centre.dim() == 1 else gather(self.centre.expand_as(ends["h_p"]))
            logs["pivot_locality/angle_centered_deg"] = float(torch.rad2deg(geometry.centered_angle(h_p, h_c, centre)).mean())
            if len(self.slices) > 1:  # the geometry works per encoder: its angle per encoder (te1, te2, ...)
                for i, part in enumerate(self.slices, start=1):
                    angle = geometry.centered_angle(h_p[..., part], h_c[..., part], centre[..., part])
                    logs[f"pivot_locality/angle_centered_te{i}_deg"] = float(torch.rad2deg(angle).mean())
        return logs

    # ------------------------------------------------------------------ sampling
    def _fraction(self, generator: torch.Generator) -> float:
        o = self.options
        if o.fraction_sampling == "fixed":
            return float(o.fractions[int(torch.randint(len(o.fractions), (), generator=generator))])
        return float(o.min_fraction + (o.max_fraction - o.min_fraction) * torch.rand((), generator=generator))

    def _draw(self, generator: torch.Generator, shape: tuple[int, ...] | None, batch_size: int, i: int) -> _Sample:
        sample = _Sample(pair=int(torch.randint(len(self.pairs), (), generator=generator)), fraction=self._fraction(generator))
        if shape is None:
            sample.source_row = i % batch_size
        else:
            sample.noise = torch.randn(shape, generator=generator)
            sample.timestep = int(torch.randint(self._num_train_timesteps, (), generator=generator))
        if self.options.timestep_range:  # drawn after the above, so that runs without a range keep their draws
            low, high = self.options.timestep_range
            sample.timestep = int(torch.randint(low, high + 1, (), generator=generator))
            if shape is None:  # fresh noise for the batch row's clean latents
                sample.noise = torch.randn(self._last_shape, generator=generator)
        return sample

    def _pool(self, state: TrainerState, shape: tuple[int, ...], sizes: torch.Tensor | None) -> dict[str, Any]:
        """The stage's anchor pool for latents of ``shape``: samples, and when cached their rows and frozen targets
        (at ``sizes`` [6], the size conditioning of the batch that first needs the pool)."""
        if shape in self._pools:
            return self._pools[shape]
        seed, stage = state.config.seed, state.stage_index
        samples = [self._draw(sample_generator(seed, stage, k, *shape, _POOL_TAG), shape, 1, k)
                   for k in range(self.options.anchor_pool)]
        pool: dict[str, Any] = {"samples": samples}
        if self.options.cache_anchors:
            with torch.no_grad():
                rows = None if sizes is None else sizes.expand(len(samples), -1)
                cond = self._interpolate(self._side_endpoints(state, True, False), [s.pair for s in samples],
                                         [s.fraction for s in samples], rows)
                noisy, t = self._stack_latents(state, samples)
                frozen = self._interpolate(self._side_endpoints(state, False, False), [s.pair for s in samples],
                                           [s.fraction for s in samples], rows)
                targets = [self._frozen_prediction(state, noisy[i : i + 8], t[i : i + 8], frozen.rows(slice(i, i + 8)))
                           for i in range(0, len(samples), 8)]
            pool |= {"cond": cond, "noisy": noisy, "t": t, "target": torch.cat(targets)}
        self._pools[shape] = pool
        return pool

    def _stack_latents(self, state: TrainerState, samples: list[_Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        noisy = torch.stack([s.noise for s in samples]).to(state.device)
        t = torch.tensor([s.timestep for s in samples], dtype=torch.long, device=state.device)
        return noisy, t

    @torch.no_grad()
    def _frozen_prediction(self, state: TrainerState, noisy: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``eps_frozen``: the base model's UNet (LoRA off), without gradients: [r, 4, h, w]."""
        with state.frozen():
            return state.unet(noisy, t, cond).detach()

    def _active_now(self, state: TrainerState) -> bool:
        return self._stage_active and state.stage_step % self.options.every_n_steps == 0 and self.options.weight > 0

    # ------------------------------------------------------------------ hooks of the step
    def extra_rows(self, state: TrainerState, batch: Batch) -> UNetRows | None:
        self._pending = None
        if not self._stage_active:
            return None
        self._last_shape = tuple(batch.latents.shape[1:])
        if not self._active_now(state):
            return None
        o, shape = self.options, tuple(batch.latents.shape[1:])
        seed, stage, step, first_slot = state.config.seed, state.stage_index, state.stage_step, batch.slots[0]
        if o.anchor_pool:
            pool = self._pool(state, shape, None if batch.sizes is None else batch.sizes[:1])
            pick = sample_generator(seed, stage, step, first_slot, _PICK_TAG)
            index = torch.randint(o.anchor_pool, (o.num_samples,), generator=pick).tolist()
            samples = [pool["samples"][k] for k in index]
            if o.cache_anchors:
                index_t = torch.tensor(index, device=pool["noisy"].device)
                self._pending = _Pending(samples, None, pool["noisy"][index_t], pool["t"][index_t], pool["target"][index_t])
                return UNetRows(self._pending.noisy, self._pending.timesteps, pool["cond"].rows(index_t))
        else:
            noise_shape = shape if o.latents == "noise" else None
            samples = [self._draw(sample_generator(seed, stage, step, first_slot, i, _SAMPLE_TAG), noise_shape,
                                  batch.latents.shape[0], i) for i in range(o.num_samples)]
        pairs, fractions = [s.pair for s in samples], [s.fraction for s in samples]
        if o.latents == "noise":
            noisy, t = self._stack_latents(state, samples)
            sizes = None if batch.sizes is None else batch.sizes[:1].expand(len(samples), -1)  # the batch's size
        else:  # the step's own noisy latents (set on the batch before on_step_start), at their own sizes
            rows = torch.tensor([s.source_row for s in samples], device=batch.noisy_latents.device)
            noisy, t = batch.noisy_latents[rows], batch.timesteps[rows]
            if o.timestep_range:
                t = torch.tensor([s.timestep for s in samples], dtype=batch.timesteps.dtype, device=t.device)
                noise = torch.stack([s.noise for s in samples]).to(batch.latents)
                noisy = state.add_noise(batch.latents[rows], noise, t).to(batch.noisy_latents.dtype)
            sizes = None if batch.sizes is None else batch.sizes[rows]
        trained = self._interpolate(self._side_endpoints(state, True, grad=True), pairs, fractions, sizes)
        with torch.no_grad():
            frozen = self._interpolate(self._side_endpoints(state, False, grad=False), pairs, fractions, sizes)
        self._pending = _Pending(samples, frozen, noisy, t, None)
        return UNetRows(noisy, t, trained)

    def extra_losses(
        self, state: TrainerState, batch: Batch, main: MainPrediction, rows: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        pending, self._pending = self._pending, None
        if pending is None or rows is None:
            return {}
        target = pending.target
        if target is None:
            target = self._frozen_prediction(state, pending.noisy, pending.timesteps, pending.frozen_cond)
        loss = self.options.weight * F.mse_loss(rows.float(), target.float())
        state.logs["pivot_locality/fraction"] = sum(s.fraction for s in pending.samples) / len(pending.samples)
        return {"mse": loss}

    def on_step_end(self, state: TrainerState, logs: dict[str, float]) -> None:
        if not self._stage_active:
            return
        if self._pivot_trains or self._te_lora_trains:
            with torch.no_grad():
                self._angle_logs = self._angles(self._side_endpoints(state, trained_side=True, grad=False))
        state.logs.update(self._angle_logs)
        every = self.options.probe_every_n_steps
        if every and state.stage_step % every == 0 and self._last_shape is not None:
            state.logs.update({f"pivot_locality/deviation_f{f:.2f}": v
                               for f, v in self.deviation(state, PROBE_FRACTIONS, self._last_shape).items()})

    # ------------------------------------------------------------------ diagnostics and metadata
    @torch.no_grad()
    def deviation(
        self, state: TrainerState, fractions: tuple[float, ...] | list[float], shape: tuple[int, ...], num_latents: int = 2
    ) -> dict[float, float]:
        """Mean |eps_lora - eps_frozen| on a fixed probe set (Gaussian latents [num_latents, *shape] drawn from the
        seed, timesteps spread over the schedule, every pair) at each of ``fractions``. Usable at any time after
        ``on_setup``; the trained side is the model as it stands (LoRA as currently switched)."""
        generator = sample_generator(state.config.seed, _PROBE_TAG)
        P = len(self.pairs)
        noisy = torch.randn((num_latents, *shape), generator=generator).to(state.device).repeat(P, 1, 1, 1)
        t = (torch.linspace(0.1, 0.9, num_latents) * self._num_train_timesteps).long().to(state.device).repeat(P)
        pairs = [p for p in range(P) for _ in range(num_latents)]
        trained_ends = self._compute_endpoints(state, lora_on=True, grad=False)
        frozen_ends = self._compute_endpoints(state, lora_on=False, grad=False)
        out = {}
        for f in fractions:
            trained = self._interpolate(trained_ends, pairs, [f] * len(pairs))
            frozen = self._interpolate(frozen_ends, pairs, [f] * len(pairs))
            lora = state.unet(noisy, t, trained).float()
            out[float(f)] = float((lora - self._frozen_prediction(state, noisy, t, frozen).float()).abs().mean())
        return out

    def on_before_save(self, state: TrainerState, files: dict[str, Any]) -> None:
        settings = dataclasses.asdict(self.options) | {
            "stages": self.active_stages,
            "class_prompts": [p["class_prompt"] for p in self.pairs],
            "centre": self.centre_source,
        }
        files["metadata"]["pti_pivot_locality"] = json.dumps(settings)
