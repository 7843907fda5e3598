"""Editability: do edit prompts still work on the pivot?

- ``clip_text_image`` (when a local CLIP model is given; higher = better): the textual-inversion
  paper's protocol: generate each edit prompt with the pivot (``T(tok1) in the snow``, one image
  per seed) and take the mean cosine similarity between each image's CLIP embedding and the
  edit prompt *without* the token (``an anime illustration of in the snow``). The base model's
  value (class word, LoRA off, same text) is the reference.
- ``proxy_edit_direction_cos`` (no CLIP; higher = better, 1 = the edit acts on the pivot exactly
  as on the class word in the base model; a model-internal proxy): for each edit prompt ``E`` and
  each fixed probe ``x_t`` (:mod:`.probes`), the change the edit words make to the prediction,
  ``Δ_tuned = ε_tuned(x_t, E(tok1)) - ε_tuned(x_t, T(tok1))``, is compared with the change they
  make for the class word in the base model, ``Δ_base = ε_base(x_t, E(class)) - ε_base(x_t, T(class))``;
  the score is the mean cosine of the two (flattened per probe). A pivot that drifted off the
  text encoder's manifold swallows the edit (``Δ_tuned`` small or turned). Also reported:
  ``proxy_edit_magnitude_ratio`` = mean ``|Δ_tuned| / |Δ_base|`` (1 = same strength). The
  base model's value is 1 by construction.
"""

from __future__ import annotations

import torch

from .localisation import generate_images
from .probes import Probes, make_probes, predictions
from .prompts import EDIT_PROMPTS, fill, normalise_prompt


def edit_reference_text(run, prompt: str) -> str:
    """The edit prompt without its subject (the textual-inversion protocol's text)."""
    return fill(normalise_prompt(prompt, run.template, run.token), "")


@torch.no_grad()
def proxy_edit_direction(run, edit_prompts=EDIT_PROMPTS, probes: Probes | None = None, plain: str = "{T}") -> dict[str, float]:
    """``{"proxy_edit_direction_cos", "proxy_edit_magnitude_ratio"}`` (see the module docstring)."""
    probes = probes or make_probes(run)
    deltas = {}
    for tuned in (True, False):
        with run.lora(tuned):
            reference = predictions(run, probes, run.prompt(plain, tuned))
            deltas[tuned] = [predictions(run, probes, run.prompt(e, tuned)) - reference for e in edit_prompts]
    cos, ratio = [], []
    for d_tuned, d_base in zip(deltas[True], deltas[False]):
        a, b = d_tuned.flatten(1), d_base.flatten(1)
        cos.append(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12))
        ratio.append(a.norm(dim=1) / b.norm(dim=1).clamp_min(1e-12))
    return {"proxy_edit_direction_cos": float(torch.cat(cos).mean()), "proxy_edit_magnitude_ratio": float(torch.cat(ratio).mean())}


def clip_text_similarity(run, scorer, prompt: str, tuned: bool, seeds, steps: int, guidance: float) -> float:
    """Mean CLIP cosine between the generations of ``prompt`` and the prompt without its subject."""
    images = generate_images(run, prompt, tuned, list(seeds), steps, guidance)
    text = scorer.text_embeddings([edit_reference_text(run, prompt)])  # [1, D]
    return float((scorer.image_embeddings(list(images)) @ text.T).mean())


def measure_editability(
    run,
    scorer=None,
    edit_prompts=EDIT_PROMPTS,
    seeds=(0, 1, 2, 3),
    steps: int = 25,
    guidance: float = 7.5,
    probes: Probes | None = None,
    include_base: bool = True,
) -> dict[str, float | str | bool]:
    """``{"editability_metric", "editability", "editability_base", "editability_higher_is_better", ...}``.

    With ``scorer``: ``clip_text_image`` (mean over edit prompts); else ``proxy_edit_direction_cos``
    (plus ``proxy_edit_magnitude_ratio``).
    """
    if scorer is not None:
        value = sum(clip_text_similarity(run, scorer, e, True, seeds, steps, guidance) for e in edit_prompts) / len(edit_prompts)
        base = float("nan")
        if include_base:
            base = sum(clip_text_similarity(run, scorer, e, False, seeds, steps, guidance) for e in edit_prompts) / len(edit_prompts)
        return {"editability_metric": "clip_text_image", "editability": value, "editability_base": base,
                "editability_higher_is_better": True}
    proxy = proxy_edit_direction(run, edit_prompts, probes)
    return {"editability_metric": "proxy_edit_direction_cos", "editability": proxy["proxy_edit_direction_cos"],
            "editability_base": 1.0, "editability_higher_is_better": True,
            "proxy_edit_magnitude_ratio": proxy["proxy_edit_magnitude_ratio"]}
