"""Fixed denoising probes: the training images noised with fixed noise at fixed timesteps.

The model-internal proxies (reconstruction and editability without CLIP) evaluate the UNet on
the same inputs for every run and both models: each training image's VAE posterior mean, noised
with ``draws`` Gaussian noises drawn from a generator seeded by (``seed``, image, draw), at each
timestep of ``timestep_fractions`` x ``num_train_timesteps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Timesteps of the probes, as fractions of the scheduler's training timesteps.
TIMESTEP_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class Probes:
    """``latents`` (clean), ``noise``, ``noisy`` ``[N, 4, h, w]`` and ``timesteps`` ``[N]``, on the run's device."""

    latents: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor
    timesteps: torch.Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]


@torch.no_grad()
def make_probes(run, max_images: int = 8, timestep_fractions=TIMESTEP_FRACTIONS, draws: int = 1, seed: int = 0) -> Probes:
    """The probes of ``run``'s training images (the first ``max_images``; images of the first bucket only)."""
    total = run.noise_scheduler.config.num_train_timesteps
    steps = [min(total - 1, int(round(f * total))) for f in timestep_fractions]
    pixels = [p for p in run.training_pixels(max_images)]
    pixels = [p for p in pixels if p.shape == pixels[0].shape]
    latents, noise, ts = [], [], []
    for index, pix in enumerate(pixels):
        x0 = run.encode_latents(pix[None])[0]
        for draw in range(draws):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 1009 + draw)
            for t in steps:
                latents.append(x0)
                noise.append(torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype))
                ts.append(t)
    latents_t, noise_t = torch.stack(latents), torch.stack(noise)
    t_t = torch.tensor(ts, dtype=torch.long, device=latents_t.device)
    noisy = run.noise_scheduler.add_noise(latents_t, noise_t, t_t)
    return Probes(latents_t, noise_t, noisy, t_t)


@torch.no_grad()
def predictions(run, probes: Probes, prompt_text: str, batch_size: int = 16) -> torch.Tensor:
    """The UNet's predictions ``[N, 4, h, w]`` (float32) for every probe with one filled prompt,
    with the run's current LoRA state."""
    cond = run.conditioning([prompt_text])
    out = []
    for i in range(0, len(probes), batch_size):
        noisy = probes.noisy[i : i + batch_size]
        rows = cond.map(lambda c: c.expand(len(noisy), *c.shape[1:]))
        out.append(run.unet(noisy, probes.timesteps[i : i + batch_size], rows).float())
    return torch.cat(out)
