"""The toy recipe's settings (:class:`RecipeConfig`, written to ``DIR/recipe.json``) and the two
helpers every stage of the recipe uses: a timestamped ``log`` and an atomic ``torch.save``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path


#: How the toy model is sampled unless a caller says otherwise: its evaluations during training and every
#: study of it (DDIM steps, classifier-free guidance scale).
SAMPLE_STEPS = 25
GUIDANCE = 3.0

@dataclass
class RecipeConfig:
    """Every setting of the recipe (written to ``recipe.json``)."""

    seed: int = 0
    num_scenes: int = 40000
    two_tone_fraction: float = 0.25  # share of pretraining scenes that are two-tone (world v2)
    # VAE stage
    vae_channels: tuple[int, ...] = (16, 32)
    vae_steps: int = 4000
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_patchwork_fraction: float = 0.5
    # The VAE is fully convolutional: it trains on random vae_crop x vae_crop crops (even offsets,
    # so the 2x downsampling grid stays aligned), 4x cheaper per image than whole 32x32 images, and
    # on whole images for the last vae_full_image_steps. 800 whole-image steps (world v1) left
    # the VAE too blurry for two-tone objects and the character's 3 px dot.
    vae_crop: int = 16
    vae_full_image_steps: int = 300
    # diffusion stage
    unet_channels: tuple[int, ...] = (32, 64, 128, 128)
    unet_heads: tuple[int, ...] = (1, 2, 4, 4)
    unet_layers_per_block: int = 1
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_intermediate: int = 256
    batch_size: int = 32
    lr: float = 4e-4
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    # timestep curriculum: phases [from_step, fraction, min_t]; from `from_step` on (the last such
    # phase applies), a `fraction` of each batch draws t uniformly from [min_t, T) instead of
    # [0, T). The caption alone must decide the layout (position) only at the highest noise
    # levels (below them the noisy latents already show where the object is), which uniform
    # sampling visits rarely: in world v1's run, with uniform t only, the model ignored position
    # words for 3000+ steps, and [900, T) did not fix it either; [975, T) did within ~500 steps.
    # World v2's run uses [975, T) from step 0.
    high_noise_phases: list = field(default_factory=lambda: [[0, 0.5, 975]])
    # data curriculum: phases [from_step, fraction]; from `from_step` on (the last such phase
    # applies), a `fraction` of each batch is drawn from the two-tone scenes only, the rest
    # uniformly from all scenes (so 1/3 here with two_tone_fraction 0.25 makes half of each batch
    # two-tone). The scenes and their cached latents stay the same; with no phase active the
    # batches are drawn exactly as without this setting.
    two_tone_phases: list = field(default_factory=list)
    # caption curriculum: phases [from_step, probability]; from `from_step` on (the last such phase
    # applies), a two-tone scene is captioned by its look name alone (world.LOOK_NAMES, e.g. `a kavo
    # at the top left`) with this probability. With no phase active captions are drawn exactly as
    # without this setting.
    name_caption_phases: list = field(default_factory=list)
    # bookkeeping
    checkpoint_minutes: float = 3.0
    eval_minutes: float = 10.0
    eval_prompts: int = 36
    guidance_scale: float = GUIDANCE
    num_inference_steps: int = SAMPLE_STEPS
    scheduler: dict = field(
        default_factory=lambda: {
            "num_train_timesteps": 1000,
            "beta_schedule": "squaredcos_cap_v2",
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
            "clip_sample": False,
            "steps_offset": 1,
        }
    )


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace`` it into place."""
    import torch  # here, so that reading the settings does not load torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
