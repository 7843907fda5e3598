"""Interpolation paths between two prompts' conditionings on the toy world (hypothesis H4).

H4 says a slerp at the pivot's token index is legitimate: a state on the path between two encoder
outputs is one the UNet can read. This module checks it *functionally*: it walks from one prompt's
UNet conditioning to another's in each geometry of :mod:`pti_plugin.geometry`, generates images
along the way and reads them with the ground-truth detectors.

- **conditioning**: the whole ``[77, d]`` of each prompt (:func:`encode_states`); every token
  position is interpolated on its own (one fraction for all rows); rows where both prompts'
  conditionings are equal (the positions before the first differing word: the encoder is causal)
  are kept exactly, and fraction 0 / 1 is the start / end prompt's own conditioning, bit for bit
  (:func:`interpolate`);
- **geometries**: ``layernorm`` (:func:`~pti_plugin.geometry.layernorm_slerp` of the normalised
  pre-final-LayerNorm states, then gamma and beta), ``centered``
  (:func:`~pti_plugin.geometry.centered_slerp` about the mean conditioning of
  ``centre_captions`` toy-world training captions, per token position, padding included: the
  pivot-locality plugin's estimated centre, :func:`estimate_centre`) and ``linear``
  (:func:`~pti_plugin.geometry.lerp`);
- **generation**: ``seeds`` images per (geometry, fraction), seeds ``0..seeds-1`` for every one (paired
  across geometries and fractions; identical conditionings are generated once), DDIM
  ``sample_steps`` steps at guidance ``guidance`` (:func:`~.premise.sample`);
- **scores** (:func:`score_images`): ``validity`` (an object is detected), ``start_share`` /
  ``end_share`` (the detected attribute equals the start / end prompt's; an image without an object
  counts as neither), each with a 95% percentile bootstrap interval over the sampling seeds
  (:func:`~pti_plugin.metrics.replication.two_level_bootstrap` on one model: no training-seed
  replication);
- **path shape** (:func:`path_summary`): the lowest validity over the fractions, the steps where the
  end share falls by more than ``tolerance_z`` binomial standard errors
  (:func:`~pti_plugin.metrics.curves.share_decreases`) and the fraction where it first reaches 0.5
  (:func:`~pti_plugin.metrics.curves.first_crossing`).

- **H4's rule** (:func:`~.h4_verdict.functional_verdict`): the record keeps each image's 0/1 validity and
  end hit (``hits``, per geometry ``[fraction][seed]``) and the rule's paired comparisons of the geometries
  (``functional``); the research report recomputes them from ``hits``.

:func:`measure_paths` runs it all and returns a JSON-ready record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import geometry
from ..metrics.curves import first_crossing, share_decreases
from ..metrics.replication import two_level_bootstrap
from ..toy_world.detectors import Detection, detect
from ..toy_world.recipe_config import GUIDANCE, SAMPLE_STEPS
from ..toy_world.world import make_caption, parse_caption, sample_pretraining_scene
from .h4_verdict import functional_verdict

GEOMETRIES = ("layernorm", "centered", "linear")
ATTRIBUTES = ("colour", "shape", "position")
INTERVAL_NOTE = ("95% percentile bootstrap over sampling seeds only (one model, no training-seed replication); "
                 "it collapses onto 0 or 1 when every image agrees")


@dataclass(frozen=True)
class PathPair:
    """Two prompts and the attribute that changes between them (``colour``, ``shape`` or ``position``)."""

    name: str
    start: str
    end: str
    attribute: str


DEFAULT_PAIRS = (
    PathPair("colour", "a red circle", "a blue circle", "colour"),
    PathPair("shape", "a red circle", "a red square", "shape"),
    PathPair("position", "a red circle at the top left", "a red circle at the bottom right", "position"),
    PathPair("class_word", "a character", "a circle", "shape"),
)


@dataclass(frozen=True)
class PathSettings:
    """Every setting of the measurement (the command line's defaults; :meth:`quick` for tests)."""

    seeds: int = 16
    fractions: int = 11
    sample_steps: int = SAMPLE_STEPS
    guidance: float = GUIDANCE
    bootstrap: int = 2000
    tolerance_z: float = 2.0
    centre_captions: int = 512
    centre_seed: int = 0

    @classmethod
    def quick(cls) -> PathSettings:
        """A few seeds, fractions and steps: exercises every part in seconds (tests)."""
        return cls(seeds=4, fractions=3, sample_steps=2, bootstrap=200, centre_captions=64)

    def fraction_values(self) -> list[float]:
        """``fractions`` evenly spaced fractions from 0 to 1, both included."""
        return [k / (self.fractions - 1) for k in range(self.fractions)]


def stated_value(prompt: str, attribute: str):
    """The value of ``attribute`` a prompt states (a colour, a shape, a ``(row, col)`` cell), or None."""
    want = parse_caption(prompt)
    if attribute == "position":
        return None if want["row"] is None else (want["row"], want["col"])
    return want[attribute]


def detected_value(found: Detection, attribute: str):
    """The value of ``attribute`` the detectors read (None without an object)."""
    if attribute == "position":
        return None if found.row is None else (found.row, found.col)
    return getattr(found, attribute)


def check_pair(pair: PathPair) -> None:
    """Refuse a pair whose end prompt does not state its attribute, or states the start's value (ValueError)."""
    if pair.attribute not in ATTRIBUTES:
        raise ValueError(f"pair {pair.name!r}: attribute {pair.attribute!r} is not one of {ATTRIBUTES}")
    start, end = stated_value(pair.start, pair.attribute), stated_value(pair.end, pair.attribute)
    if end is None or start == end:
        raise ValueError(f"pair {pair.name!r}: {pair.end!r} must state a {pair.attribute} other than {pair.start!r}'s")


# ---------------------------------------------------------------------------------------------
# conditionings and their interpolation


@dataclass
class EncoderSpace:
    """What the geometries need of the text encoder: the final LayerNorm's ``gamma``, ``beta`` (float32
    ``(d,)``) and ``eps``, and the centre of the ``centered`` geometry (float32 ``(L, d)``)."""

    gamma: torch.Tensor
    beta: torch.Tensor
    eps: float
    centre: torch.Tensor


@dataclass
class Endpoints:
    """One pair's conditionings ``h_*`` and normalised pre-LayerNorm states ``xhat_*``: float32 ``(L, d)``."""

    h_a: torch.Tensor
    h_b: torch.Tensor
    xhat_a: torch.Tensor
    xhat_b: torch.Tensor


def final_layer_norm(base) -> torch.nn.LayerNorm:
    """The LayerNorm that ends the model's conditioning (ValueError for a family without one, e.g. SDXL)."""
    norms = base.family.final_layer_norms(base.text_encoders)
    if len(norms) != 1 or not isinstance(norms[0], torch.nn.LayerNorm):
        raise ValueError(f"{base.source}: the conditioning does not end with one LayerNorm (the layernorm geometry needs it)")
    return norms[0]


@torch.no_grad()
def encode_states(base, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, xhat)`` of ``prompts``: the UNet conditioning and the normalised pre-LayerNorm states,
    float32 ``(B, L, d)`` each."""
    ids = base.tokenize(prompts)
    h = base.encode(ids).hidden_states.float()
    x = base.family.pre_layernorm_states(base.text_encoders, ids)
    return h, geometry.normalise_like_layernorm(x, final_layer_norm(base).eps)


def centre_captions(count: int, seed: int) -> list[str]:
    """``count`` captions drawn as pretraining draws them (scenes and caption drops), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return [make_caption(sample_pretraining_scene(rng), rng) for _ in range(count)]


@torch.no_grad()
def estimate_centre(base, captions: list[str], batch: int = 256) -> torch.Tensor:
    """Mean conditioning over ``captions`` at each token position (padding included): float32 ``(L, d)``."""
    total = None
    for start in range(0, len(captions), batch):
        h = base.encode(base.tokenize(captions[start : start + batch])).hidden_states.double().sum(dim=0)
        total = h if total is None else total + h
    return (total / len(captions)).float()


def encoder_space(base, settings: PathSettings) -> EncoderSpace:
    ln = final_layer_norm(base)
    centre = estimate_centre(base, centre_captions(settings.centre_captions, settings.centre_seed))
    return EncoderSpace(ln.weight.detach().float(), ln.bias.detach().float(), float(ln.eps), centre)


def endpoints(base, pair: PathPair) -> Endpoints:
    h, xhat = encode_states(base, [pair.start, pair.end])
    return Endpoints(h[0], h[1], xhat[0], xhat[1])


def interpolate(kind: str, ends: Endpoints, fraction: float, space: EncoderSpace) -> torch.Tensor:
    """The conditioning a ``fraction`` of the way from ``h_a`` to ``h_b`` in geometry ``kind``: float32 ``(L, d)``.

    Each row (token position) moves on its own path; rows equal in both endpoints stay exactly
    ``h_a``'s; fraction 0 and 1 give ``h_a`` and ``h_b`` themselves (the layernorm path's
    ``gamma * xhat + beta`` rounds differently from the encoder's LayerNorm by ~1e-7).
    """
    if fraction == 0.0:
        return ends.h_a.clone()
    if fraction == 1.0:
        return ends.h_b.clone()
    if kind == "layernorm":
        path = geometry.layernorm_slerp(ends.xhat_a, ends.xhat_b, fraction, space.gamma, space.beta)
    elif kind == "centered":
        path = geometry.centered_slerp(ends.h_a, ends.h_b, fraction, space.centre)
    elif kind == "linear":
        path = geometry.lerp(ends.h_a, ends.h_b, fraction)
    else:
        raise ValueError(f"unknown geometry {kind!r}; known: {GEOMETRIES}")
    same_row = (ends.h_a == ends.h_b).all(dim=-1, keepdim=True)  # (L, 1)
    return torch.where(same_row, ends.h_a, path.float())


def layernorm_round_trip(ends: Endpoints, space: EncoderSpace) -> float:
    """Largest |gamma * xhat + beta - h| over both endpoints (the layernorm geometry's exactness check)."""
    rebuilt = space.gamma * torch.stack([ends.xhat_a, ends.xhat_b]) + space.beta
    return float((rebuilt - torch.stack([ends.h_a, ends.h_b])).abs().max())


# ---------------------------------------------------------------------------------------------
# generation and scores


class Generator:
    """Generates ``settings.seeds`` images (seeds 0..n-1) per conditioning, each distinct conditioning once."""

    def __init__(self, pipe, uncond: torch.Tensor, settings: PathSettings):
        self.pipe, self.uncond, self.settings = pipe, uncond, settings
        self.cache: dict[str, np.ndarray] = {}

    def images(self, cond: torch.Tensor) -> np.ndarray:
        """uint8 ``(seeds, 32, 32, 3)`` for one conditioning ``(L, d)``."""
        from .premise import sample

        key = hashlib.sha256(cond.contiguous().numpy().tobytes()).hexdigest()
        if key not in self.cache:
            self.cache[key] = sample(self.pipe, cond[None].expand(self.settings.seeds, -1, -1), self.uncond, self.settings)
        return self.cache[key]


def score_images(images: np.ndarray, pair: PathPair) -> dict[str, np.ndarray]:
    """Per image 0/1 ``valid``, ``start`` and ``end`` hits (float64 ``(n,)``; ``start`` all NaN when the
    start prompt does not state the attribute)."""
    start, end = stated_value(pair.start, pair.attribute), stated_value(pair.end, pair.attribute)
    found = [detected_value(detect(img), pair.attribute) for img in images]
    return {
        "valid": np.array([value is not None for value in found], dtype=np.float64),
        "start": np.array([np.nan if start is None else value == start for value in found], dtype=np.float64),
        "end": np.array([value == end for value in found], dtype=np.float64),
    }


def share_interval(hits: np.ndarray, draws: int) -> dict | None:
    """The share of hits with its sampling-seed bootstrap interval (None for an all-NaN column)."""
    if not np.isfinite(hits).any():
        return None
    return two_level_bootstrap(hits[None, :], draws=draws).to_dict()


def path_summary(fractions: list[float], validity: list[dict], end_share: list[dict], n: int, z: float) -> dict:
    """Lowest validity (and where), the end share's significant decreases and its first 0.5 crossing."""
    low = int(np.argmin([v["estimate"] for v in validity]))
    ends = [e["estimate"] for e in end_share]
    falls = share_decreases(ends, n, z)
    return {
        "min_validity": validity[low]["estimate"], "min_validity_fraction": fractions[low],
        "min_validity_interval": [validity[low]["lo"], validity[low]["hi"]],
        "nonmonotone_steps": len(falls), "decreasing_steps": [[fractions[k], fractions[k + 1]] for k in falls],
        "crossing_fraction": first_crossing(fractions, ends, 0.5),
    }


def measure_pair(pair: PathPair, base, space: EncoderSpace, generate: Generator, settings: PathSettings,
                 log: Callable[[str], None]) -> tuple[dict, dict[str, np.ndarray]]:
    """One pair's figures per geometry and fraction, and its images per geometry (uint8 ``(fractions, seeds, 32, 32, 3)``)."""
    ends = endpoints(base, pair)
    fractions = settings.fraction_values()
    result = {**dataclasses.asdict(pair), "start_value": stated_value(pair.start, pair.attribute),
              "end_value": stated_value(pair.end, pair.attribute),
              "equal_rows": int((ends.h_a == ends.h_b).all(dim=-1).sum()),
              "layernorm_round_trip_max_abs": layernorm_round_trip(ends, space), "geometries": {}}
    images = {}
    for kind in GEOMETRIES:
        stacks = [generate.images(interpolate(kind, ends, f, space)) for f in fractions]
        scores = [score_images(stack, pair) for stack in stacks]
        figures = {key: [share_interval(s[column], settings.bootstrap) for s in scores]
                   for key, column in (("validity", "valid"), ("start_share", "start"), ("end_share", "end"))}
        figures |= path_summary(fractions, figures["validity"], figures["end_share"], settings.seeds, settings.tolerance_z)
        hits = {key: [s[key].astype(int).tolist() for s in scores] for key in ("valid", "end")}
        result["geometries"][kind] = {"fractions": fractions, **figures, "hits": hits}
        images[kind] = np.stack(stacks)
        log(f"interpolation_paths: {pair.name} {kind}: min validity {figures['min_validity']:.3f}, "
            f"nonmonotone {figures['nonmonotone_steps']}, crossing {figures['crossing_fraction']}")
    return result, images


def geometry_summary(pairs: list[dict]) -> dict:
    """Per geometry over the pairs: lowest validity, total nonmonotone steps, crossing fraction per pair."""
    out = {}
    for kind in GEOMETRIES:
        per_pair = [p["geometries"][kind] for p in pairs]
        out[kind] = {"min_validity": min(g["min_validity"] for g in per_pair),
                     "nonmonotone": sum(g["nonmonotone_steps"] for g in per_pair),
                     "crossing_fraction": {p["name"]: p["geometries"][kind]["crossing_fraction"] for p in pairs}}
    return out


def measure_paths(model: Path, settings: PathSettings = PathSettings(), pairs: tuple[PathPair, ...] = DEFAULT_PAIRS,
                  log: Callable[[str], None] = lambda text: print(text, flush=True)) -> tuple[dict, dict]:
    """Every pair in every geometry on the diffusers folder ``model``.

    Returns ``(record, images)``: the JSON-ready figures, and per pair name per geometry the uint8
    images ``(fractions, seeds, 32, 32, 3)``.
    """
    from .premise import encode_text, load_base, model_digest

    for pair in pairs:
        check_pair(pair)
    started, cpu_started = time.time(), time.process_time()
    base, pipe = load_base(Path(model))
    space = encoder_space(base, settings)
    generate = Generator(pipe, encode_text(base, [""]), settings)
    results, images = [], {}
    for pair in pairs:
        result, images[pair.name] = measure_pair(pair, base, space, generate, settings, log)
        results.append(result)
    record = {
        "model": str(model), "model_digest": model_digest(Path(model)), "settings": dataclasses.asdict(settings),
        "geometries": list(GEOMETRIES), "summary": geometry_summary(results), "pairs": results,
        "functional": None,
        "notes": {
            "intervals": INTERVAL_NOTE,
            "shares": "over every image of a (geometry, fraction): an image without a detected object counts as "
                      "neither the start nor the end attribute; start_share is null when the start prompt does not "
                      "state the attribute",
            "nonmonotone": f"steps where the end share falls by more than {settings.tolerance_z:g} binomial standard "
                           "errors sqrt(p (1 - p) / seeds), p the mean of the two shares",
            "crossing_fraction": "first fraction where the end share reaches 0.5 (linear between fractions; null: never)",
            "centre": f"mean conditioning of {settings.centre_captions} toy-world pretraining captions (seed "
                      f"{settings.centre_seed}), per token position, padding included",
            "endpoints": "fraction 0 and 1 are the prompts' own conditionings in every geometry (generated once)",
            "hits": "per geometry: each image's 0/1 validity and end-attribute hit, [fraction][sampling seed]",
            "functional": "H4's rule (pti_plugin.protocol.h4_verdict): per pair, measure and two geometries, the paired "
                          "sign-flip test of the per-seed path means over the interior fractions, Bonferroni over "
                          "the comparisons",
        },
        "distinct_conditionings": len(generate.cache),
        "images_generated": len(generate.cache) * settings.seeds,
        "seconds": round(time.time() - started, 1), "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "threads": torch.get_num_threads(),
    }
    reading = functional_verdict(record)
    record["functional"] = {key: reading[key] for key in ("label", "alpha", "reason", "comparisons") if key in reading}
    return record, images
