"""The denoising objective: per-sample noise (offset, pyramid, input perturbation), timesteps, target, the
per-sample loss (``loss_type``, kohya's masked loss) and its timestep weights (Min-SNR, kohya's v-prediction scalings,
debiased estimation).

The keys keep kohya sd-scripts' meaning (``train_util.get_noise_noisy_latents_and_timesteps``,
``custom_train_functions``); what differs is that every draw is per sample, from the sample's own generator
(strengths kohya draws once per batch are drawn per sample), so a sample's draws do not depend on its batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import Config, ConfigError

#: kohya caps the SNR at this value in its v-prediction scalings and debiased estimation (the SNR of timestep 0 is
#: about 1.2e3 on SD's schedule).
SNR_CAP = 1000.0


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, config: Config,
               latent_abs_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian noise ``shape`` = [C, H, W] (float32, CPU) from ``generator``, with kohya's noise offset (a
    per-channel constant; ``noise_offset_random_strength``: its strength scaled by a uniform draw;
    ``adaptive_noise_scale``: plus that x ``latent_abs_mean`` [C, 1, 1], the |channel mean| of the sample's latents,
    clamped at 0) and pyramid (multi-resolution) noise when enabled."""
    channels, height, width = shape
    noise = torch.randn(shape, generator=generator)
    if config.noise_offset:
        strength = config.noise_offset
        if config.noise_offset_random_strength:
            strength = config.noise_offset * torch.rand((), generator=generator)
        if config.adaptive_noise_scale:
            strength = (strength + config.adaptive_noise_scale * latent_abs_mean).clamp_min(0.0)
        noise = noise + strength * torch.randn((channels, 1, 1), generator=generator)
    if config.multires_noise_iterations:
        for i in range(1, config.multires_noise_iterations + 1):
            h, w = max(1, height // 2**i), max(1, width // 2**i)
            level = torch.randn((1, channels, h, w), generator=generator)
            noise = noise + F.interpolate(level, size=(height, width), mode="bilinear")[0] * config.multires_noise_discount**i
            if h == 1 and w == 1:
                break
        noise = noise / noise.std()
    return noise


def timestep_bounds(config: Config, num_train_timesteps: int) -> tuple[int, int]:
    """kohya's training timesteps: uniform in [low, high) = [min_timestep, max_timestep) (max_timestep unset: the
    schedule's ``num_train_timesteps``); low == high: that one timestep."""
    return config.min_timestep, num_train_timesteps if config.max_timestep is None else config.max_timestep


def draw_sample(shape: tuple[int, ...], generator: torch.Generator, config: Config, num_train_timesteps: int,
                latent_abs_mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample's draws from its generator, in this order: the noise (:func:`draw_noise`), the timestep, then the
    input perturbation (``ip_noise_gamma``; with ``ip_noise_gamma_random_strength`` its strength's uniform draw
    first). Returns the target's noise [C, H, W], the timestep (0-dim int64) and the noise added to the UNet's input
    (the target's noise itself unless ``ip_noise_gamma``). An option left off draws nothing."""
    noise = draw_noise(shape, generator, config, latent_abs_mean)
    low, high = timestep_bounds(config, num_train_timesteps)
    timestep = torch.randint(low, high, (), generator=generator) if low < high else torch.tensor(high)
    if not config.ip_noise_gamma:
        return noise, timestep, noise
    gamma = config.ip_noise_gamma
    if config.ip_noise_gamma_random_strength:
        gamma = config.ip_noise_gamma * torch.rand((), generator=generator)
    return noise, timestep, noise + gamma * torch.randn(shape, generator=generator)


def draw_batch(generators: list[torch.Generator], latents: torch.Tensor, config: Config,
               num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`draw_sample` for each row of ``latents`` [b, C, H, W] from its generator, on ``latents``' device: the
    target's noise [b, C, H, W] float32, the timesteps [b] int64 and the UNet input's noise (the same tensor as the
    target's unless ``ip_noise_gamma``). ``adaptive_noise_scale`` reads the latents' channel means (a device sync)."""
    shape = tuple(latents.shape[1:])
    means = [None] * len(generators)
    if config.noise_offset and config.adaptive_noise_scale:
        means = list(latents.detach().float().mean(dim=(2, 3), keepdim=True).abs().cpu())  # [b] of [C, 1, 1]
    draws = [draw_sample(shape, g, config, num_train_timesteps, m) for g, m in zip(generators, means)]
    noise = torch.stack([d[0] for d in draws]).to(latents.device)
    timesteps = torch.stack([d[1] for d in draws]).to(latents.device)
    inputs = torch.stack([d[2] for d in draws]).to(latents.device) if config.ip_noise_gamma else noise
    return noise, timesteps, inputs


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def _snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha-bar / (1 - alpha-bar) at each timestep [b] (float32)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1 - alphas_cumprod).clamp_min(1e-8)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights [b] (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
    snr = _snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr.clamp_min(1e-8)


def timestep_weighted(per_sample: torch.Tensor, noise_scheduler, timesteps: torch.Tensor, config: Config,
                      prediction_type: str) -> torch.Tensor:
    """The per-sample loss [b] with its timestep weights, in kohya's order: Min-SNR (``min_snr_gamma``), then with
    the SNR capped at :data:`SNR_CAP`: x SNR / (SNR + 1) (``scale_v_pred_loss_like_noise_pred``), + that loss x
    ``v_pred_like_loss`` x (SNR + 1) / SNR, x 1 / sqrt(SNR) or, for v-prediction, 1 / (SNR + 1)
    (``debiased_estimation_loss``)."""
    if config.min_snr_gamma > 0:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, config.min_snr_gamma, prediction_type)
    if not (config.scale_v_pred_loss_like_noise_pred or config.v_pred_like_loss or config.debiased_estimation_loss):
        return per_sample
    snr = _snr(noise_scheduler, timesteps).clamp_max(SNR_CAP).to(per_sample.device)
    if config.scale_v_pred_loss_like_noise_pred:
        per_sample = per_sample * (snr / (snr + 1))
    if config.v_pred_like_loss:
        per_sample = per_sample + per_sample / (snr / (snr + 1)) * config.v_pred_like_loss
    if config.debiased_estimation_loss:
        per_sample = per_sample * (1 / (snr + 1) if prediction_type == "v_prediction" else 1 / snr.sqrt())
    return per_sample


def check_against_model(config: Config, noise_scheduler, prediction_type: str) -> None:
    """The noise and loss keys that need the model, checked as it loads (before training): the timesteps against its
    schedule, the v-prediction options against its target (kohya's rules), and no infinite loss weight at a
    zero-SNR timestep (``zero_terminal_snr``). Raises ConfigError naming the key."""
    total = int(noise_scheduler.config.num_train_timesteps)
    if config.max_timestep is not None and config.max_timestep > total:
        raise ConfigError.at("max_timestep", f" = {config.max_timestep} is past this model's schedule of {total} timesteps "
                                             f"(0 to {total - 1}; timesteps are drawn below max_timestep, so at most {total})")
    if config.min_timestep > total - 1:
        raise ConfigError.at("min_timestep", f" = {config.min_timestep} is past this model's schedule of {total} timesteps "
                                             f"(0 to {total - 1})")
    if config.scale_v_pred_loss_like_noise_pred and prediction_type != "v_prediction":
        raise ConfigError.at("scale_v_pred_loss_like_noise_pred", " scales a v-prediction loss like a noise-prediction "
                             f"one, and this model trains {prediction_type!r} (kohya refuses it without v_parameterization)")
    if config.v_pred_like_loss and prediction_type == "v_prediction":
        raise ConfigError.at("v_pred_like_loss", " adds a v-prediction-like loss to a noise-prediction loss, and this "
                             "model trains 'v_prediction' (kohya refuses it with v_parameterization)")
    low, high = timestep_bounds(config, total)
    last = high - 1 if low < high else high
    infinite = [key for key, on in (("v_pred_like_loss", config.v_pred_like_loss), ("debiased_estimation_loss",
                config.debiased_estimation_loss and prediction_type != "v_prediction")) if on]
    if infinite and float(_snr(noise_scheduler, torch.tensor([last]))[0]) == 0:
        raise ConfigError.at(infinite[0], f": the schedule's SNR is 0 at timestep {last} (zero_terminal_snr), where this "
                                          f"weight (1 / SNR or 1 / sqrt(SNR)) is infinite; set max_timestep = {last} or lower")


def huber_threshold(noise_scheduler, timesteps: torch.Tensor, config: Config) -> torch.Tensor:
    """kohya's threshold c [b] of the pseudo-Huber losses at each timestep (``huber_schedule``): "snr":
    (1 - huber_c) / (1 + sigma)^2 + huber_c with sigma = sqrt((1 - alpha-bar) / alpha-bar) (huber_c at zero SNR, near
    1 at high SNR); "exponential": huber_scale x huber_c^(t / num_train_timesteps); "constant": huber_c x huber_scale."""
    if config.huber_schedule == "snr":
        sigmas = _snr(noise_scheduler, timesteps).rsqrt()  # infinite at zero SNR: c = huber_c there
        return (1 - config.huber_c) / (1 + sigmas) ** 2 + config.huber_c
    if config.huber_schedule == "exponential":
        rate = -math.log(config.huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-rate * timesteps.float()) * config.huber_scale
    if config.huber_schedule == "constant":
        return torch.full(timesteps.shape, config.huber_c * config.huber_scale, device=timesteps.device)
    raise ValueError(f"unsupported huber_schedule {config.huber_schedule!r}")


def apply_loss_mask(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """kohya's ``apply_masked_loss``: the per-element loss [b, C, h, w] times ``mask`` ([b, 1, H, W] or [b, H, W] in
    [0, 1]) area-interpolated to (h, w) (a mask already latent-sized, as the trainer's are, is used as it is: area
    interpolation to the same size is the identity, bit for bit); ``loss`` itself when None.
    A plain product: the per-sample mean that follows still divides by every element, masked or not (kohya)."""
    if mask is None:
        return loss
    mask = mask.to(device=loss.device, dtype=loss.dtype)
    mask = mask.unsqueeze(1) if mask.dim() == 3 else mask
    return loss * (mask if mask.shape[2:] == loss.shape[2:] else F.interpolate(mask, size=loss.shape[2:], mode="area"))


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor, noise_scheduler, timesteps: torch.Tensor,
                    config: Config, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss per sample [b], the mean over its elements of ``loss_type``'s: squared error ("l2"), absolute error
    ("l1"), or kohya's pseudo-Huber 2c (sqrt(d^2 + c^2) - c) ("huber") and 2 (sqrt(d^2 + c^2) - c) ("smooth_l1"),
    c from :func:`huber_threshold`; each element first multiplied by ``loss_mask`` (:func:`apply_loss_mask`)."""
    prediction, target = prediction.float(), target.float()
    if config.loss_type == "l2":
        return apply_loss_mask(F.mse_loss(prediction, target, reduction="none"), loss_mask).mean(dim=(1, 2, 3))
    if config.loss_type == "l1":
        return apply_loss_mask(F.l1_loss(prediction, target, reduction="none"), loss_mask).mean(dim=(1, 2, 3))
    if config.loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"unsupported loss_type {config.loss_type!r}")
    c = huber_threshold(noise_scheduler, timesteps, config).to(prediction.device).view(-1, 1, 1, 1)
    loss = 2 * (torch.sqrt((prediction - target) ** 2 + c**2) - c)
    return apply_loss_mask(c * loss if config.loss_type == "huber" else loss, loss_mask).mean(dim=(1, 2, 3))
