"""The denoising objective: per-sample noise (offset, pyramid), timesteps, target, Min-SNR weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_noise(
    shape: tuple[int, ...], generator: torch.Generator, noise_offset: float, multires_iterations: int, multires_discount: float
) -> torch.Tensor:
    """Gaussian noise ``shape`` = [C, H, W] (float32, CPU) from ``generator``, with kohya's noise
    offset (a per-channel constant) and pyramid (multi-resolution) noise when enabled."""
    channels, height, width = shape
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((channels, 1, 1), generator=generator)
    if multires_iterations:
        for i in range(1, multires_iterations + 1):
            h, w = max(1, height // 2**i), max(1, width // 2**i)
            level = torch.randn((1, channels, h, w), generator=generator)
            noise = noise + F.interpolate(level, size=(height, width), mode="bilinear")[0] * multires_discount**i
            if h == 1 and w == 1:
                break
        noise = noise / noise.std()
    return noise


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights [b] (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1 - alphas_cumprod).clamp_min(1e-8)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr.clamp_min(1e-8)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: [b]."""
    return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
