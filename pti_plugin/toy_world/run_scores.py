"""Scores of one finished PTI run on the toy world: the ground truth beside the model-internal metrics.

:func:`score_run` loads a run (:func:`pti_plugin.metrics.load_run`), generates with fixed seeds for
the fine-tuned model (the pivot ``tok1``, LoRA on) and the base model (the class word, LoRA off) on

- neutral prompts :data:`NEUTRAL_PROMPTS` (no position asked: the model places the subject itself),
- position edits :data:`~pti_plugin.metrics.prompts.POSITION_EDIT_PROMPTS` (the four corners),
- background edits :data:`BACKGROUND_EDITS` (black never appears in the character's data),

and returns a flat, JSON-ready dict. **Ground truth** (the toy world's detectors, keys ``gt_*``;
``*_base`` = the base model with the class word):

- ``gt_reconstruction``: fraction of neutral generations in which :func:`~.detectors.detect_character`
  finds the character (two colours in order, a disc); ``gt_character_match``: the partial credit
  (mean fraction of those three traits found), which moves before the whole character appears;
  ``gt_detail``: fraction of neutral generations showing the character's private white dot
  (:func:`~.detectors.has_detail`); ``gt_appearance_error``: their mean graded error against the
  rendered character (:func:`~.detectors.appearance_error`, lower = better, never saturates);
- ``gt_edit_position`` / ``gt_edit_background``: fraction of edit generations whose object sits in
  the asked cell / whose background is the asked one; ``gt_editability`` is their mean;
- ``gt_leakage``: the position-leakage score ``L = 1 - sqrt(r_D r_A)`` of the neutral generations
  computed from detected object centres (family ``groundtruth`` of
  :func:`~pti_plugin.metrics.measure_position_leakage`); ``gt_training_cell_fraction``: fraction of
  neutral generations whose object lies in a cell the training images use (3 of 9 cells; about
  1/3 for a model that places objects at random); ``gt_position_entropy``: entropy of the neutral
  generations' cells over log 9.

**Model-internal** (what a real-model run has, no detector): ``attention_leakage`` (the same
leakage score from cross-attention heatmaps of ``tok1``, neutral prompts), ``proxy_denoise_mse``
(reconstruction, lower = better), ``proxy_edit_direction_cos`` (editability on the same edit
prompts), the pivot's distances (``pivot_l2_from_init`` from the training log, output-space angles)
and ``lora_delta_norm`` (:func:`~pti_plugin.metrics.evaluate.run_movement`). Every family/group of the leakage summary is also kept, flattened as
``<family>_<group>_<key>``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic_io import atomic_write_text
from ..metrics.editability import proxy_edit_direction
from ..metrics.evaluate import finite_or_none, run_movement
from ..metrics.leakage import measure_position_leakage
from ..metrics.localisation import generate_images
from ..metrics.probes import make_probes
from ..metrics.prompts import POSITION_EDIT_PROMPTS
from ..metrics.reconstruction import proxy_denoise_mse
from ..metrics.run_model import load_run
from ..outputs import run_dir_finished
from ..settings_cache import read_cache
from .detectors import appearance_error, detect, detect_character, has_detail, position_entropy
from .recipe_config import GUIDANCE, SAMPLE_STEPS
from .world import CHARACTER_CELLS, IMAGE_SIZE, parse_caption

#: Prompts that ask for no position (``{T}`` = the run's template, ``{}`` = the subject).
NEUTRAL_PROMPTS = ("{T}", "{} on a white background")
#: Prompts that ask for another background than the character's data shows (white, gray).
BACKGROUND_EDITS = ("{T} on a black background", "{} on a black background")
#: The cache of a run's scores beside it (:func:`scores_of`).
SCORES_FILE = "bench_scores.json"
#: Bump when the scores change meaning, so that cached scores are recomputed.
SCORES_VERSION = 2
#: (model-internal metric, ground truth, expected sign of the correlation, runs it is computed over): what each
#: internal score should track (the research bench's correlations, ``sweeps.bench_report``; the internal metrics'
#: LoRA-run proxies, ``protocol.internal_metrics``).
CORRELATIONS = (
    ("attention_leakage", "gt_leakage", +1, "lora"),
    ("attention_leakage", "gt_training_cell_fraction", +1, "lora"),
    ("proxy_denoise_mse", "gt_reconstruction", -1, "lora"),
    ("proxy_denoise_mse", "gt_character_match", -1, "lora"),
    ("proxy_edit_direction_cos", "gt_editability", +1, "lora"),
    ("proxy_denoise_mse", "gt_character_match", -1, "inversion"),
    ("proxy_edit_direction_cos", "gt_editability", +1, "inversion"),
    ("proxy_denoise_mse", "gt_reconstruction", -1, "all"),
    ("proxy_denoise_mse", "gt_character_match", -1, "all"),
    ("proxy_edit_direction_cos", "gt_editability", +1, "all"),
)


@dataclass(frozen=True)
class ScoreSettings:
    """Generation settings of :func:`score_run`: seeds ``0..seeds-1``, DDIM steps, guidance; probes' images."""

    seeds: int = 16
    steps: int = SAMPLE_STEPS
    guidance: float = GUIDANCE
    max_images: int = 8

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def locate_object(image: np.ndarray) -> tuple[float, float] | None:
    """The detected object's centre in image fractions ``(x, y)``, or None (the leakage measurement's locator)."""
    found = detect(image)
    if found.centroid is None:
        return None
    return found.centroid[0] / IMAGE_SIZE, found.centroid[1] / IMAGE_SIZE


def _fraction(hits: list[bool]) -> float:
    return float(np.mean(hits)) if hits else float("nan")


def ground_truth(neutral: np.ndarray, position_edits: list[tuple[str, np.ndarray]],
                 background_edits: list[tuple[str, np.ndarray]]) -> dict[str, float]:
    """Ground-truth fractions of one model's generations (uint8 images ``[..., 32, 32, 3]``).

    ``neutral``: generations of the neutral prompts; ``*_edits``: ``(prompt text, images)`` pairs,
    the asked cell or background read from the prompt text.
    """
    neutral = neutral.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3)
    found = [detect_character(img) for img in neutral]
    cells = [(d.object.row, d.object.col) for d in found if d.object.row is not None]
    position_hits, background_hits = [], []
    for text, images in position_edits:
        asked = parse_caption(text)
        position_hits += [(found.row, found.col) == (asked["row"], asked["col"]) for found in map(detect, images)]
    for text, images in background_edits:
        asked = parse_caption(text)["background"]
        background_hits += [detect(img).background == asked for img in images]
    edit_position, edit_background = _fraction(position_hits), _fraction(background_hits)
    return {
        "gt_reconstruction": _fraction([d.is_character for d in found]),
        "gt_character_match": float(np.mean([d.match for d in found])) if found else float("nan"),
        "gt_detail": _fraction([has_detail(img, d.object) for img, d in zip(neutral, found)]),
        "gt_appearance_error": float(np.mean([appearance_error(img, d.object) for img, d in zip(neutral, found)]))
        if found else float("nan"),
        "gt_edit_position": edit_position,
        "gt_edit_background": edit_background,
        "gt_editability": float(np.nanmean([edit_position, edit_background])),
        "gt_training_cell_fraction": _fraction([cell in CHARACTER_CELLS for cell in cells]),
        "gt_position_entropy": position_entropy(cells),
    }


def score_run(run_dir: str | Path, settings: ScoreSettings = ScoreSettings(), device: str | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Measure the run in ``run_dir`` (see the module docstring); non-finite values become None."""
    run = load_run(run_dir, device=device)
    seeds = list(range(settings.seeds))
    out = run_movement(run)
    probes = make_probes(run, settings.max_images)
    out["proxy_denoise_mse"] = proxy_denoise_mse(run, True, probes)
    out["proxy_denoise_mse_base"] = proxy_denoise_mse(run, False, probes)
    out |= proxy_edit_direction(run, POSITION_EDIT_PROMPTS + BACKGROUND_EDITS, probes)

    measurement = measure_position_leakage(run, list(NEUTRAL_PROMPTS), list(POSITION_EDIT_PROMPTS), seeds,
                                           settings.steps, settings.guidance, locate=locate_object, log=log)
    for family, groups in measurement.summary.items():
        for group, values in groups.items():
            for key, value in values.items():
                out[f"{family}_{group}_{key}"] = value
    n_neutral = len(NEUTRAL_PROMPTS)
    for model, tuned in (("tuned", True), ("base", False)):
        images = measurement.images[model]  # [P, S, 32, 32, 3]
        position_edits = [(run.prompt(p, tuned), images[n_neutral + k]) for k, p in enumerate(POSITION_EDIT_PROMPTS)]
        background_edits = [(run.prompt(p, tuned), generate_images(run, p, tuned, seeds, settings.steps, settings.guidance))
                            for p in BACKGROUND_EDITS]
        figures = ground_truth(images[:n_neutral], position_edits, background_edits)
        suffix = "" if tuned else "_base"
        out |= {f"{key}{suffix}": value for key, value in figures.items()}
    out["gt_leakage"] = out.get("groundtruth_neutral_leakage_score")
    out["attention_leakage"] = out.get("heatmap_neutral_leakage_score")
    return {k: finite_or_none(v) for k, v in out.items()}


def score_settings(args) -> ScoreSettings:
    """The :class:`ScoreSettings` of a scorer's arguments (``seeds``, ``sample_steps``, ``guidance``, ``max_images``)."""
    return ScoreSettings(seeds=args.seeds, steps=args.sample_steps, guidance=args.guidance, max_images=args.max_images)


def scores_of(run_dir: Path, output_name: str, args, cached_only: bool = False) -> dict | None:
    """The run's scores (:func:`score_run`), from its cache :data:`SCORES_FILE` beside it when the settings match; None
    when the run has not finished (or, with ``cached_only``, has no matching cache). ``args``: the scorer's arguments
    (:func:`score_settings`'s, ``rescore``, ``device``)."""
    if not run_dir_finished(run_dir, output_name):
        return None
    settings = {"version": SCORES_VERSION} | score_settings(args).as_dict()
    cache = run_dir / SCORES_FILE
    cached = None if args.rescore else read_cache(cache, settings, "scores")
    if cached is not None:
        print(f"scores of {run_dir.name}: cached", flush=True)
        return cached
    if cached_only:
        return None
    print(f"score {run_dir}", flush=True)
    t0 = time.time()
    scores = score_run(run_dir, score_settings(args), device=args.device)
    atomic_write_text(cache, json.dumps({"settings": settings, "scores": scores, "seconds": round(time.time() - t0, 1)},
                                        indent=2) + "\n")
    return scores
