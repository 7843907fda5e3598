"""Subject localisation from cross-attention, without extra weights.

A *heatmap* is the mean share of cross-attention that each latent pixel gives to the subject's
token positions (``tok1``..., or the class word for the base model), averaged over every
cross-attention layer (upsampled to the latent size) and every denoising step
(:mod:`.attention_capture`). From it:

- the *layout distribution* ``p = (H - min H) / sum(H - min H)`` (min-subtracted, so the uniform
  floor of attention does not pull the centroid to the centre; a constant map gives the uniform
  distribution);
- the *centroid* ``(x, y) = sum p * (pixel centre)``, in image fractions (0..1, x to the right,
  y downwards);
- the *spread*: ``sqrt(sum p * |pixel - centroid|^2)``, in image fractions (RMS radius of the mass).

Generated images are localised during generation (:func:`generate_with_heatmaps`); training
images are encoded, noised to a mid timestep and passed once through the UNet with their caption
(:func:`training_heatmaps`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .attention_capture import capture_cross_attention, subject_weights
from .prompts import subject_positions, subject_token_ids


@dataclass(frozen=True)
class HeatmapStats:
    """Centroid ``(x, y)`` and spread of a heatmap, in image fractions."""

    x: float
    y: float
    spread: float


def pixel_centres(height: int, width: int) -> torch.Tensor:
    """``[H*W, 2]`` (x, y) centres of a ``height x width`` grid's pixels, in image fractions."""
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1)


def layout_distribution(heatmap: torch.Tensor) -> torch.Tensor:
    """``[..., H, W]`` heatmaps -> min-subtracted maps that sum to 1 (float64)."""
    h = heatmap.double()
    flat = h.reshape(*h.shape[:-2], -1)
    flat = flat - flat.min(dim=-1, keepdim=True).values
    total = flat.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(flat, 1.0 / flat.shape[-1])
    p = torch.where(total > 0, flat / total.clamp_min(1e-300), uniform)
    return p.reshape(h.shape)


def heatmap_stats(heatmap: torch.Tensor) -> HeatmapStats:
    """Centroid and spread of one heatmap ``[H, W]``."""
    p = layout_distribution(heatmap).reshape(-1)
    pos = pixel_centres(*heatmap.shape[-2:])
    centroid = (p[:, None] * pos).sum(0)
    spread = torch.sqrt((p * ((pos - centroid) ** 2).sum(1)).sum())
    return HeatmapStats(float(centroid[0]), float(centroid[1]), float(spread))


def centroids(heatmaps: torch.Tensor) -> np.ndarray:
    """``[n, H, W]`` -> ``[n, 2]`` centroids (x, y) in image fractions."""
    return np.array([[s.x, s.y] for s in map(heatmap_stats, heatmaps)], dtype=np.float64).reshape(-1, 2)


def resample(heatmaps: torch.Tensor, grid: int) -> torch.Tensor:
    """Layout distributions ``[n, grid, grid]`` of heatmaps ``[n, H, W]`` (area-averaged, renormalised)."""
    p = layout_distribution(heatmaps).float()[:, None]
    if p.shape[-2:] != (grid, grid):
        p = F.interpolate(p, size=(grid, grid), mode="area") if p.shape[-1] >= grid else F.interpolate(
            p, size=(grid, grid), mode="bilinear", align_corners=False
        )
    p = p[:, 0].double()
    return p / p.sum(dim=(-2, -1), keepdim=True)


def _subject_rows(run, prompts: list[str], subject: str) -> list[list[int]]:
    ids = run.token_positions_ids(prompts)
    subject_ids = subject_token_ids(run.tokenizer, subject)
    return [subject_positions(row, subject_ids) for row in ids]


@torch.no_grad()
def generate_with_heatmaps(
    run,
    prompt: str,
    tuned: bool,
    seeds: list[int],
    steps: int = 25,
    guidance: float = 7.5,
    size: tuple[int, int] | None = None,
    negative_prompt: str = "",
    capture: bool = True,
    capture_timesteps: tuple[int, int] | None = None,
) -> tuple[np.ndarray, torch.Tensor | None]:
    """Generate one image per seed for ``prompt`` and localise the subject in each.

    ``prompt`` holds ``{}`` for the subject: the pivot (``tuned``, LoRA on) or the class word (base
    model, LoRA off). Seeds drive CPU generators, so a seed gives the same initial noise on any
    device and for both models. Returns ``(images uint8 [n, H, W, 3], heatmaps [n, H/f, W/f])``
    (heatmaps None when ``capture`` is false; ``capture_timesteps``: only the sampler steps whose
    timestep lies in that range feed the heatmaps).
    """
    images, collector, latent_hw, first = _sample_capturing(run, prompt, tuned, seeds, steps, guidance, size,
                                                            negative_prompt, capture, capture_timesteps)
    return images, (collector.heatmaps(latent_hw)[first:] if capture else None)


@torch.no_grad()
def generate_with_resolution_heatmaps(run, prompt: str, tuned: bool, seeds: list[int], steps: int = 25, guidance: float = 7.5,
                                      size: tuple[int, int] | None = None, all_layers: bool = False,
                                      capture_timesteps: tuple[int, int] | None = None,
                                      ) -> tuple[np.ndarray, dict[int | None, torch.Tensor]]:
    """:func:`generate_with_heatmaps` with one set of heatmaps per UNet resolution, from the same sampling:
    ``(images uint8 [n, H, W, 3], {pixels: heatmaps [n, H/f, W/f]})``, ``pixels`` the query positions of
    that resolution's cross-attention layers (256 for a 16x16 level), finest first; with ``all_layers``, last,
    ``None``: the maps of every layer together (what :func:`generate_with_heatmaps` returns; ``capture_timesteps``
    as there)."""
    images, collector, latent_hw, first = _sample_capturing(run, prompt, tuned, seeds, steps, guidance, size,
                                                            capture_timesteps=capture_timesteps)
    maps = {n: collector.heatmaps(latent_hw, pixels=n)[first:] for n in collector.resolutions}
    return images, maps | ({None: collector.heatmaps(latent_hw)[first:]} if all_layers else {})


def _sample_capturing(run, prompt: str, tuned: bool, seeds: list[int], steps: int, guidance: float,
                      size: tuple[int, int] | None, negative_prompt: str = "", capture: bool = True,
                      capture_timesteps: tuple[int, int] | None = None):
    """Sample ``prompt`` (see :func:`generate_with_heatmaps`), capturing the subject's cross-attention:
    ``(images uint8 [n, H, W, 3], collector or None, latent (h, w), first row of the conditional half)``."""
    width, height = size or run.default_size()
    text = run.prompt(prompt, tuned)
    with run.lora(tuned):
        cond = run.conditioning([text])  # hidden states [1, 77, d]
        uncond = run.conditioning([negative_prompt])
        n = len(seeds)
        positions = _subject_rows(run, [text], run.subject(tuned)) * n
        cfg = guidance > 1.0
        weights = subject_weights(([[]] * n if cfg else []) + positions, cond.hidden_states.shape[1])
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        with (capture_cross_attention(run.pipe.unet, weights, capture_timesteps) if capture
              else contextlib.nullcontext()) as collector:
            images = run.pipe(
                **run.pipeline_conditioning(cond, uncond, n),
                num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                height=height, width=width, output_type="np",
            ).images
    images = (np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8)
    factor = run.pipe.vae_scale_factor
    return images, collector, (height // factor, width // factor), (n if cfg else 0)


def generate_images(run, prompt: str, tuned: bool, seeds: list[int], steps: int = 25, guidance: float = 7.5,
                    size: tuple[int, int] | None = None) -> np.ndarray:
    """:func:`generate_with_heatmaps` without the attention capture: uint8 images ``[n, H, W, 3]``."""
    return generate_with_heatmaps(run, prompt, tuned, seeds, steps, guidance, size, capture=False)[0]


@torch.no_grad()
def training_heatmaps(
    run,
    tuned: bool = False,
    timestep: int = 500,
    noise_draws: int = 2,
    seed: int = 0,
    max_images: int | None = None,
) -> torch.Tensor:
    """Heatmaps ``[n_images, H/f, W/f]`` of the training images' subject.

    Each image is encoded (posterior mean), noised to ``timestep`` with ``noise_draws`` fixed
    noises (seeded by ``seed`` and the image index) and passed once through the UNet with its own
    caption, the token replaced by the subject: the class word on the base model (default, an
    observer that training has not biased) or the pivot on the fine-tuned model (``tuned``).
    The heatmap is the mean over the noise draws; images of other buckets than the first are
    resized (bilinear) to the first image's latent size.
    """
    return training_heatmaps_by_layers(run, [None], tuned, timestep, noise_draws, seed, max_images)[None]


@torch.no_grad()
def training_heatmaps_by_layers(run, layers: list[int | None], tuned: bool = False, timestep: int = 500,
                                noise_draws: int = 2, seed: int = 0,
                                max_images: int | None = None) -> dict[int | None, torch.Tensor]:
    """:func:`training_heatmaps` from the cross-attention layers with ``pixels`` query positions only (one UNet
    resolution), for each ``pixels`` of ``layers`` (None: every layer), all from one UNet pass per image:
    ``{pixels: [n_images, H/f, W/f]}``."""
    items = run.items if max_images is None else run.items[:max_images]
    images = run.training_pixels(max_images)
    out: dict[int | None, list[torch.Tensor]] = {pixels: [] for pixels in layers}
    with run.lora(tuned):
        for index, (item, pix) in enumerate(zip(items, images)):
            latents = run.encode_latents(pix[None])  # [1, 4, h, w]
            caption = run.prompt(item.caption, tuned)
            cond = run.conditioning([caption]).map(lambda c: c.expand(noise_draws, *c.shape[1:]))
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            noise = torch.randn((noise_draws, *latents.shape[1:]), generator=generator).to(latents.device, latents.dtype)
            t = torch.full((noise_draws,), timestep, dtype=torch.long, device=latents.device)
            noisy = run.noise_scheduler.add_noise(latents.expand(noise_draws, -1, -1, -1), noise, t)
            weights = subject_weights(_subject_rows(run, [caption], run.subject(tuned)) * noise_draws, cond.hidden_states.shape[1])
            with capture_cross_attention(run.pipe.unet, weights) as collector:
                run.unet(noisy, t, cond)
            for pixels, maps in out.items():
                heatmap = collector.heatmaps(tuple(latents.shape[-2:]), pixels).mean(0)
                if maps and heatmap.shape != maps[0].shape:
                    heatmap = F.interpolate(heatmap[None, None], size=maps[0].shape, mode="bilinear", align_corners=False)[0, 0]
                maps.append(heatmap)
    return {pixels: torch.stack(maps) for pixels, maps in out.items()}
