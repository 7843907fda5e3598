"""One call that measures a finished run: what the LR sweep records per run.

:func:`evaluate_run` loads the run (:mod:`.run_model`) and returns a flat, JSON-ready dict:
the training log's final pivot distance (token-embedding space), the output-space angles and the
LoRA weight change (:mod:`.movement`), reconstruction (:mod:`.reconstruction`), editability
(:mod:`.editability`) and, when asked, the position-leakage summary (:mod:`.leakage`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .editability import measure_editability
from .leakage import HEADLINE_GROUP, measure_position_leakage
from .movement import lora_delta_norm, output_space_angles
from .probes import make_probes
from .reconstruction import measure_reconstruction
from .prompts import EDIT_PROMPTS, NEUTRAL_PROMPTS, POSITION_EDIT_PROMPTS
from ..outputs import read_training_log
from .run_model import load_run, tensors_digest


def final_log_entry(log_path: str | Path, stage: str | None = None) -> dict:
    """The last entry of the training log (of ``stage`` when given; :func:`~pti_plugin.outputs.read_training_log`,
    which leaves out a line cut short by a crash); {} when there is none."""
    entries = [e for e in read_training_log(log_path) if stage is None or e.get("stage") == stage]
    return entries[-1] if entries else {}


def run_movement(run, stage: str | None = None) -> dict:
    """How far a loaded run moved: the pivot's distance, angle and norm from the training log's last
    entry (of ``stage`` when given), the embedding file's digest, the output-space angles and the
    LoRA weight change."""
    name = run.lora_path.name[: -len(".safetensors")]
    entry = final_log_entry(run.lora_path.with_name(f"{name}.log.jsonl"), stage)
    embedding = run.lora_path.with_name(f"{run.token}.safetensors")
    out: dict = {
        "pivot_l2_from_init": entry.get("pivot_l2_from_init"),
        "pivot_angle_from_init_deg": entry.get("pivot_angle_from_init_deg"),
        "pivot_norm": entry.get("pivot_norm"),
        "pivot_digest": tensors_digest(embedding) if embedding.is_file() else None,
    }
    return out | output_space_angles(run) | lora_delta_norm(run.lora_path)


def finite_or_none(value):
    """``value``, or None for a non-finite float (JSON has no nan)."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def json_ready(value):
    """``value`` with numpy scalars made Python numbers and every non-finite float, in nested dicts, lists
    and tuples, replaced by None (JSON has no nan)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    return finite_or_none(value)


def evaluate_run(
    run_dir: str | Path,
    output_name: str | None = None,
    clip_model_path: str | None = None,
    seeds: list[int] = (0, 1, 2, 3),
    steps: int = 25,
    guidance: float = 7.5,
    leakage: bool = False,
    leakage_seeds: list[int] | None = None,
    inversion_stage: str | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    include_base: bool = True,
    scorer=None,
    log=None,
    max_images: int = 8,
    leakage_prompts: list[str] | None = None,
    leakage_edit_prompts: list[str] | None = None,
) -> dict:
    """Measure the run in ``run_dir`` (see the module docstring). ``inversion_stage``: the stage
    whose last log entry gives the pivot distance (default: the last entry of the log).
    ``scorer``: an already loaded :class:`~.clip_scores.ClipScorer` (else one is loaded from
    ``clip_model_path`` when given). ``max_images``: training images used by the proxies.
    ``leakage_prompts`` / ``leakage_edit_prompts``: the leakage measurement's neutral and
    position-edit prompts (default :data:`~.prompts.NEUTRAL_PROMPTS`, :data:`~.prompts.POSITION_EDIT_PROMPTS`)."""
    run = load_run(run_dir, output_name, device=device, dtype=dtype)
    if scorer is None and clip_model_path:
        from .clip_scores import ClipScorer

        scorer = ClipScorer(clip_model_path, device=run.device)
    out = run_movement(run, inversion_stage)
    probes = make_probes(run, max_images) if scorer is None else None
    out |= measure_reconstruction(run, scorer, seeds, steps, guidance, probes, include_base)
    out |= measure_editability(run, scorer, EDIT_PROMPTS, seeds, steps, guidance, probes, include_base)
    if leakage:
        measurement = measure_position_leakage(
            run, list(leakage_prompts or NEUTRAL_PROMPTS),
            list(POSITION_EDIT_PROMPTS if leakage_edit_prompts is None else leakage_edit_prompts),
            list(leakage_seeds or seeds), steps, guidance, log=log,
        )
        for family, groups in measurement.summary.items():
            for group, values in groups.items():
                for key, value in values.items():
                    # unprefixed: the headline (heatmap, neutral prompts); "heatmap_all_...": all prompts
                    prefix = "" if (family, group) == ("heatmap", HEADLINE_GROUP) else f"{family}_{group}_"
                    out[f"{prefix}{key}"] = value
    return {k: finite_or_none(v) for k, v in out.items()}
