"""Reconstruction: does the fine-tuned model draw the character of the training images?

- ``clip_image_image`` (when a local CLIP model is given; higher = better): the mean cosine
  similarity, in CLIP image-embedding space, between every generation of the pivot prompt
  ``T(tok1)`` (one per seed) and every training image (the textual-inversion paper's measure).
  The base model's value (class prompt ``T(class word)``, LoRA off) is the reference.
- ``proxy_denoise_mse`` (no CLIP; lower = better; a model-internal proxy, not a perceptual
  score): the mean squared error of the UNet's prediction on the training images noised with
  fixed noise at fixed timesteps (:mod:`.probes`), conditioned on the pivot prompt. It is the
  training loss on a fixed, caption-free probe set: how well the pivot prompt alone explains the
  training images. The base model with the class prompt is the reference.
"""

from __future__ import annotations

import numpy as np
import torch

from .localisation import generate_images
from .probes import Probes, make_probes, predictions


def clip_image_similarity(scorer, generated: np.ndarray | list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Mean cosine similarity over all (generated, reference) image pairs."""
    a = scorer.image_embeddings(list(generated))
    b = scorer.image_embeddings(list(reference))
    return float((a @ b.T).mean())


@torch.no_grad()
def proxy_denoise_mse(run, tuned: bool = True, probes: Probes | None = None, prompt: str = "{T}") -> float:
    """Mean denoising error on the probes with ``prompt`` (default the template) filled with the subject."""
    probes = probes or make_probes(run)
    with run.lora(tuned):
        pred = predictions(run, probes, run.prompt(prompt, tuned))
    target = run.target(probes.latents, probes.noise, probes.timesteps).float()
    return float(((pred - target) ** 2).mean())


def measure_reconstruction(
    run,
    scorer=None,
    seeds: list[int] = (0, 1, 2, 3),
    steps: int = 25,
    guidance: float = 7.5,
    probes: Probes | None = None,
    include_base: bool = True,
    prompt: str = "{T}",
) -> dict[str, float | str | bool]:
    """``{"reconstruction_metric", "reconstruction", "reconstruction_base", "reconstruction_higher_is_better"}``.

    With ``scorer`` (a :class:`~.clip_scores.ClipScorer`): ``clip_image_image``; else
    ``proxy_denoise_mse``. ``reconstruction_base`` is nan when ``include_base`` is false.
    """
    base = float("nan")
    if scorer is not None:
        reference = run.training_images_uint8()
        value = clip_image_similarity(scorer, generate_images(run, prompt, True, list(seeds), steps, guidance), reference)
        if include_base:
            base = clip_image_similarity(scorer, generate_images(run, prompt, False, list(seeds), steps, guidance), reference)
        return {"reconstruction_metric": "clip_image_image", "reconstruction": value, "reconstruction_base": base,
                "reconstruction_higher_is_better": True}
    probes = probes or make_probes(run)
    value = proxy_denoise_mse(run, True, probes, prompt)
    if include_base:
        base = proxy_denoise_mse(run, False, probes, prompt)
    return {"reconstruction_metric": "proxy_denoise_mse", "reconstruction": value, "reconstruction_base": base,
            "reconstruction_higher_is_better": False}
