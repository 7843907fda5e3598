"""When does the toy world decide *where* an object goes, and does the regulariser look there?

H3 asks the pivot-locality regulariser to keep position leakage down; it can only do that at the
noise levels where a position is decided. This module measures that band with a *prompt switch*:
for a pair of prompts that differ only in position (``A`` = ``a red circle at the top left``,
``B`` = ``... at the bottom right``), each image is denoised with ``A``'s conditioning for the
first ``k`` sampler steps and ``B``'s for the rest (diffusers' ``callback_on_step_end`` swaps the
prompt embeddings). At ``k = 0`` the image is ``B``'s, at ``k = steps`` it is ``A``'s (both
bit-for-bit, the tests check it); the share of images whose object lands in ``A``'s cell rises
with ``k``, and the timesteps over which it rises are where the world commits to a position.

:func:`decision_band` reads the band off the curve: the timesteps (on the training scale,
``0..num_train_timesteps-1``) at which the share of ``A``'s cell, over the images in either cell,
crosses ``low`` and ``high`` (linear interpolation between switch points). :func:`band_coverage`
is the share of a timestep distribution inside the band: the trainer draws training timesteps,
and pivot locality's ``latents = "batch"`` rows reuse them, uniformly in ``[0, T)``, so the
regulariser's coverage of the band is its width over ``T``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..settings_cache import read_cache
from ..toy_world.detectors import detect
from ..toy_world.recipe_config import GUIDANCE, SAMPLE_STEPS

#: Pairs of prompts that differ only in the object's cell, with (row, col) of each prompt's cell.
POSITION_PAIRS = (
    ("a red circle at the top left", (0, 0), "a red circle at the bottom right", (2, 2)),
    ("a blue square at the bottom right", (2, 2), "a blue square at the top left", (0, 0)),
    ("a green triangle at the top right", (0, 2), "a green triangle at the bottom left", (2, 0)),
)


@dataclass(frozen=True)
class SwitchSettings:
    """Sampling of the switch experiment (the protocol's: DDIM 25 steps, guidance 3)."""

    seeds: int = 32
    sample_steps: int = SAMPLE_STEPS
    guidance: float = GUIDANCE
    switch_every: int = 2  # switch points k = 0, every, 2*every, ..., steps

    def switch_points(self) -> list[int]:
        points = list(range(0, self.sample_steps, self.switch_every))
        return points + [self.sample_steps]


def record_settings(settings: SwitchSettings, model_digest: str) -> dict:
    """The ``settings`` a band record is written with: the sampling, its switch points and the model's digest
    (:func:`~.premise.model_digest`), which a record measured otherwise must not be replaced under."""
    return asdict(settings) | {"switch_points": settings.switch_points(), "model_digest": model_digest}


def replace_problem(path: Path, measuring: dict) -> str | None:
    """Why the band record at ``path`` must not be replaced by one measured with ``measuring``
    (:func:`record_settings`): written with other settings (``--quick``, other seeds, another model), or not
    a record; None when there is none or it was measured alike (:func:`~pti_plugin.settings_cache.read_cache`)."""
    if not Path(path).exists() or read_cache(path, measuring, None) is not None:
        return None
    try:
        held = json.loads(Path(path).read_text(encoding="utf-8")).get("settings")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        held = None
    if isinstance(held, dict):
        changes = ", ".join(f"{key} {held.get(key, '(none)')} -> {measuring.get(key, '(none)')}"
                            for key in sorted(set(held) | set(measuring)) if held.get(key) != measuring.get(key))
        why = f"holds a band measured with other settings ({changes})"
    else:
        why = "is not a band record this script wrote"
    return f"{path} {why}: pass --replace to replace it and its .png, or another --out"


def sample_switched(pipe, cond_a: torch.Tensor, cond_b: torch.Tensor, uncond: torch.Tensor, switch_step: int,
                    settings: SwitchSettings, first_seed: int = 0) -> np.ndarray:
    """Images denoised with ``cond_a`` ``[n, L, d]`` for the first ``switch_step`` steps, then ``cond_b``
    (same shape); seed ``first_seed + k`` for row ``k`` -> uint8 ``[n, H, W, 3]``."""
    n = len(cond_a)
    negative = uncond.expand(n, -1, -1)
    after = torch.cat([negative, cond_b])  # classifier-free guidance: [uncond; cond], [2n, L, d]

    def swap(pipeline, step: int, timestep, tensors: dict) -> dict:
        if step + 1 == switch_step:  # the next step is the first with B's conditioning
            tensors["prompt_embeds"] = after.to(tensors["prompt_embeds"].dtype)
        return tensors

    images = pipe(
        prompt_embeds=cond_a if switch_step > 0 else cond_b, negative_prompt_embeds=negative,
        num_inference_steps=settings.sample_steps, guidance_scale=settings.guidance, output_type="np",
        generator=[torch.Generator().manual_seed(first_seed + k) for k in range(n)],
        callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"],
    ).images
    return (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)


def cell_shares(images: np.ndarray, cell_a: tuple[int, int], cell_b: tuple[int, int]) -> dict:
    """How many of ``images`` put their object in ``cell_a``, in ``cell_b``, elsewhere or nowhere."""
    cells = [(found.row, found.col) for found in map(detect, images)]
    return {"in_a": sum(c == cell_a for c in cells), "in_b": sum(c == cell_b for c in cells), "images": len(cells)}


def switch_timesteps(pipe, settings: SwitchSettings) -> list[int]:
    """The training-scale timestep of each sampler step (``[steps]``, descending)."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(settings.sample_steps)
    return [int(t) for t in scheduler.timesteps]


def measure_switches(base, pipe, settings: SwitchSettings, pairs=POSITION_PAIRS) -> dict:
    """Every pair at every switch point: counts of images in A's and B's cells, and the timestep of
    the first step that used B's conditioning (None at ``k = steps``: A throughout)."""
    from .premise import encode_text

    timesteps = switch_timesteps(pipe, settings)
    uncond = encode_text(base, [""])
    rows = []
    for prompt_a, cell_a, prompt_b, cell_b in pairs:
        cond_a = encode_text(base, [prompt_a] * settings.seeds)
        cond_b = encode_text(base, [prompt_b] * settings.seeds)
        for k in settings.switch_points():
            images = sample_switched(pipe, cond_a, cond_b, uncond, k, settings)
            rows.append({"prompt_a": prompt_a, "prompt_b": prompt_b, "switch_step": k,
                         "first_b_timestep": timesteps[k] if k < settings.sample_steps else None}
                        | cell_shares(images, cell_a, cell_b))
    return {"timesteps": timesteps, "rows": rows}


def share_curve(rows: list[dict], timesteps: list[int], num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Pooled over pairs: the switch timestep of each switch point (the timestep between the last A
    step and the first B step, on the training scale; descending) and the share of A's cell among
    images in A's or B's cell (``[points]`` each)."""
    points = sorted({r["switch_step"] for r in rows})
    steps = len(timesteps)
    bounds = [min(timesteps[0] + (timesteps[0] - timesteps[1]) / 2, num_train_timesteps - 1)] + [
        (timesteps[k - 1] + (timesteps[k] if k < steps else 0)) / 2 for k in range(1, steps + 1)]
    shares = []
    for k in points:
        in_a = sum(r["in_a"] for r in rows if r["switch_step"] == k)
        either = in_a + sum(r["in_b"] for r in rows if r["switch_step"] == k)
        shares.append(in_a / either if either else np.nan)
    return np.array([bounds[k] for k in points], dtype=np.float64), np.array(shares, dtype=np.float64)


def crossing_timestep(switch_t: np.ndarray, share: np.ndarray, level: float) -> float:
    """The timestep at which the share of A's cell first reaches ``level`` as the switch moves later
    (``switch_t`` descending), interpolated linearly; NaN if it never does."""
    for i in range(1, len(share)):
        lo, hi = share[i - 1], share[i]
        if lo < level <= hi:
            w = (level - lo) / (hi - lo)
            return float(switch_t[i - 1] + w * (switch_t[i] - switch_t[i - 1]))
    return float("nan")


def crossing_bracket(switch_t, share, level: float) -> tuple[float, float] | None:
    """The two switch points (timesteps, the noisier first) between which the share first reaches ``level``: where
    the measurement places the crossing that :func:`crossing_timestep` interpolates (None if it never does)."""
    for i in range(1, len(share)):
        if share[i - 1] < level <= share[i]:
            return float(switch_t[i - 1]), float(switch_t[i])
    return None


def band_resolution(record: dict) -> dict | None:
    """What a band record (``analysis/position_timesteps.py``'s JSON) measured, beside its interpolated ends: the
    switch points around each crossing (``high_bracket``: share 0.1, ``low_bracket``: 0.9) and the band's share of
    the uniform training timesteps by those points alone, from the narrowest band they allow to the widest
    (``coverage_range``, on the 1000-step schedule the toy world trains with); None where a crossing is not
    bracketed (or the record has no curve)."""
    t, share = record.get("switch_timesteps") or [], record.get("share_first_cell") or []
    high, low = crossing_bracket(t, share, 0.1), crossing_bracket(t, share, 0.9)
    if high is None or low is None:
        return None
    return {"high_bracket": high, "low_bracket": low,
            "coverage_range": (band_coverage(high[1], low[0]), band_coverage(high[0], low[1]))}


def decision_band(switch_t: np.ndarray, share: np.ndarray, low: float = 0.1, high: float = 0.9) -> tuple[float, float]:
    """``(t_high, t_low)``: the timesteps where A's share crosses ``low`` (noisier end) and ``high``."""
    return crossing_timestep(switch_t, share, low), crossing_timestep(switch_t, share, high)


def band_coverage(t_high: float, t_low: float, num_train_timesteps: int = 1000) -> float:
    """Share of uniform training timesteps ``0..T-1`` inside ``[t_low, t_high]``."""
    if not (np.isfinite(t_high) and np.isfinite(t_low)):
        return float("nan")
    return float(np.clip(t_high - t_low, 0, num_train_timesteps) / num_train_timesteps)


def switch_counts(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Pooled over pairs, per switch point in :func:`share_curve`'s order: images in A's cell, and in A's or B's."""
    points = sorted({r["switch_step"] for r in rows})
    in_a = np.array([sum(r["in_a"] for r in rows if r["switch_step"] == k) for k in points])
    either = in_a + np.array([sum(r["in_b"] for r in rows if r["switch_step"] == k) for k in points])
    return in_a, either


def band_plot(record: dict, path: Path) -> None:
    """The share of A's cell against the switch's timestep (95% Wilson interval per switch point, over the images
    of all pairs), the band interpolated from it, and where the measurement places each end (between the switch
    points around the crossing, :func:`band_resolution`); drawn from a band record, nothing measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import binomtest

    t, share = np.asarray(record["switch_timesteps"]), np.asarray(record["share_first_cell"])
    in_a, either = switch_counts(record["rows"])
    bounds = np.array([binomtest(int(a), int(n)).proportion_ci(method="wilson") if n else (np.nan, np.nan)
                       for a, n in zip(in_a, either)], dtype=np.float64).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.errorbar(t, share, yerr=[share - bounds[:, 0], bounds[:, 1] - share], fmt="o-", capsize=3,
                label="first prompt's cell kept (95% Wilson interval over the pairs' images)")
    ax.axvspan(record["t_low"], record["t_high"], alpha=0.25,
               label=f"band, share 0.1 to 0.9 by linear interpolation: {record['regulariser_coverage']:.0%} of the "
                     "uniform training timesteps")
    resolution = band_resolution(record)
    if resolution is not None:
        low, high = resolution["coverage_range"]
        for k, bracket in enumerate((resolution["high_bracket"], resolution["low_bracket"])):
            ax.axvspan(bracket[1], bracket[0], fill=False, hatch="//", edgecolor="grey", linewidth=0,
                       label=None if k else f"where each end can lie (between switch points): a band of {low:.0%} "
                                            f"to {high:.0%} of the training timesteps")
    ax.set_xlabel("timestep of the switch (training scale; noisier to the left)")
    ax.set_ylabel("share in the first cell")
    ax.set_xlim(1000, 0)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
