"""Stage 1 of the toy recipe: the VAE and the encoded scene set.

A small ``AutoencoderKL`` with one downsampling step (``(3, 32, 32)`` images -> ``(4, 16, 16)``
latents) is trained on world scenes mixed with random "patchwork" images, so that it also encodes
appearances the world never shows (the PTI character); then frozen, ``scaling_factor`` = 1 /
latent std. :func:`load_or_train_vae` reads ``DIR/vae.pt`` and ``DIR/latents.pt`` when present,
else trains / encodes and writes them atomically.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from .detectors import score_generations
from .recipe_config import RecipeConfig, atomic_save, log
from .world import (
    CELL_CENTRES,
    IMAGE_SIZE,
    SHAPES,
    make_caption,
    render_character,
    render_scene,
    sample_pretraining_scene,
    shape_coverage,
)


def build_vae(cfg: RecipeConfig) -> AutoencoderKL:
    """AutoencoderKL with one downsampling step: ``(3, 32, 32)`` <-> ``(4, 16, 16)``."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, 32, 32, 3)`` -> float32 ``(N, 3, 32, 32)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def random_patchwork(rng: np.random.Generator) -> np.ndarray:
    """A random image outside the world's palette: 1-3 shapes of random colours (some split in
    two colours, top/bottom or left/right) at random places and sizes on a random background, and
    half the time a small dot.
    Returns uint8 ``(32, 32, 3)``."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = rng.uniform(0, 255, 3)
    for _ in range(int(rng.integers(1, 4))):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        cx, cy = rng.uniform(2, IMAGE_SIZE - 2, 2)
        size = float(rng.uniform(5, 16))
        alpha = shape_coverage(shape, float(cx), float(cy), size)[..., None]
        colour = rng.uniform(0, 255, 3)
        img = img * (1 - alpha) + colour * alpha
        if rng.random() < 0.5:  # second colour on one half
            half = shape_coverage("square", float(cx), float(cy), IMAGE_SIZE * 2.0)
            if rng.random() < 0.5:
                half = shape_coverage("square", float(cx), float(cy) - IMAGE_SIZE, IMAGE_SIZE * 2.0)
            else:
                half = shape_coverage("square", float(cx) - IMAGE_SIZE, float(cy), IMAGE_SIZE * 2.0)
            a2 = alpha * half[..., None]
            img = img * (1 - a2) + rng.uniform(0, 255, 3) * a2
    if rng.random() < 0.5:  # a small dot (2-4 px), so the VAE can also carry fine details
        cx, cy = rng.uniform(2, IMAGE_SIZE - 2, 2)
        dot = shape_coverage("circle", float(cx), float(cy), float(rng.uniform(2, 4)))[..., None]
        img = img * (1 - dot) + rng.uniform(0, 255, 3) * dot
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def train_vae(cfg: RecipeConfig, vae: AutoencoderKL, rng: np.random.Generator) -> float:
    """Train ``vae`` in place (MSE + tiny KL) and return its latent std (for ``scaling_factor``)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    t0 = time.time()
    for step in range(cfg.vae_steps):
        imgs = np.stack(
            [
                random_patchwork(rng) if rng.random() < cfg.vae_patchwork_fraction else render_scene(sample_pretraining_scene(rng))
                for _ in range(cfg.vae_batch_size)
            ]
        )
        x = to_tensor(imgs)
        if step < cfg.vae_steps - cfg.vae_full_image_steps and cfg.vae_crop < IMAGE_SIZE:
            i0, j0 = 2 * rng.integers(0, (IMAGE_SIZE - cfg.vae_crop) // 2 + 1, 2)
            x = x[:, :, i0 : i0 + cfg.vae_crop, j0 : j0 + cfg.vae_crop]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.vae_kl_weight * posterior.kl().mean()
        lr = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step} mse {mse.item():.5f} ({(time.time() - t0) / (step + 1):.2f} s/step)")
    vae.eval()
    vae.requires_grad_(False)
    with torch.no_grad():
        probe = to_tensor(np.stack([render_scene(sample_pretraining_scene(rng)) for _ in range(512)]))
        return float(vae.encode(probe).latent_dist.mean.std())


def encode_scenes(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std, float32 ``(N, 4, 16, 16)`` each, of uint8 images ``(N, 32, 32, 3)``."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            dist = vae.encode(to_tensor(images[i : i + batch_size])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def load_or_train_vae(cfg: RecipeConfig, out: Path) -> tuple[AutoencoderKL, torch.Tensor, torch.Tensor, list]:
    """Stage 1: returns vae, latent mean/std, scenes. The VAE comes from ``vae.pt`` (trained and
    saved when absent) and the encoded scenes from ``latents.pt`` (encoded and saved when absent),
    so a run folder holding only ``vae.pt`` (a few hundred KB, small enough to commit) skips the
    VAE's training."""
    vae = build_vae(cfg)
    scene_rng = np.random.default_rng([cfg.seed, 1])
    scenes = [sample_pretraining_scene(scene_rng, cfg.two_tone_fraction) for _ in range(cfg.num_scenes)]
    if (out / "vae.pt").exists():
        saved = torch.load(out / "vae.pt")
        vae.load_state_dict(saved["state_dict"])
        vae.register_to_config(scaling_factor=saved["scaling_factor"])
    else:
        torch.manual_seed(cfg.seed)
        std = train_vae(cfg, vae, np.random.default_rng([cfg.seed, 3]))
        vae.register_to_config(scaling_factor=1.0 / std)
        log(f"vae latent std {std:.4f} -> scaling_factor {1.0 / std:.4f}")
        atomic_save({"state_dict": vae.state_dict(), "scaling_factor": 1.0 / std}, out / "vae.pt")
    vae.eval().requires_grad_(False)
    if (out / "latents.pt").exists():
        data = torch.load(out / "latents.pt")
        return vae, data["mean"], data["std"], scenes
    mean, lstd = encode_scenes(vae, np.stack([render_scene(s) for s in scenes]))
    with torch.no_grad():
        recon = vae.decode(mean[:300]).sample
    recon = np.clip(np.rint((recon.permute(0, 2, 3, 1).numpy() + 1) * 127.5), 0, 255).astype(np.uint8)
    figures = score_generations([make_caption(s) for s in scenes[:300]], recon)
    log("vae reconstructions: " + " ".join(f"{k}={v:.3f}" for k, v in figures.items()))
    log(f"vae character (with its detail) mean abs error {character_recon_error(vae):.2f} / 255")
    atomic_save({"mean": mean, "std": lstd}, out / "latents.pt")
    return vae, mean, lstd, scenes


def character_recon_error(vae: AutoencoderKL) -> float:
    """Mean absolute RGB error (0-255) of the VAE's reconstructions of the character at 9 places,
    inside a 5x5 window on its centre (where the detail is)."""
    centres = [(CELL_CENTRES[c] + d, CELL_CENTRES[r] - d) for r in range(3) for c in range(3) for d in (0.3,)]
    images = np.stack([render_character(cx, cy) for cx, cy in centres])
    with torch.no_grad():
        recon = vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample
    recon = (recon.permute(0, 2, 3, 1).numpy() + 1) * 127.5
    errors = [np.abs(recon[k, int(cy) - 2 : int(cy) + 3, int(cx) - 2 : int(cx) + 3] - images[k, int(cy) - 2 : int(cy) + 3, int(cx) - 2 : int(cx) + 3]).mean()
              for k, (cx, cy) in enumerate(centres)]
    return float(np.mean(errors))
