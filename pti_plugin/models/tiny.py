"""A tiny, randomly initialised SD1.5-shaped model written as a diffusers folder.

Used by the tests (as a fixture) and as the embedded default until trained toy-world weights are
shipped. It keeps SD1.5's block structure (three cross-attention down blocks and a plain one,
two layers per block, 16 transformer blocks) at small widths, so every code path of the real
model (LoRA targets, kohya key names, LayerNorm-ended text encoder) is exercised.

:func:`default_model_dir` is the model ``@embedded`` names: the shipped toy-world weights, else this model built
once into the cache folder (:mod:`pti_plugin.cache_folder`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..cache_folder import build_once
from .word_vocab import BOS, EOS, write_tokenizer_files

#: Text width of the tiny model (SD1.5: 768).
TINY_TEXT_DIM = 32
#: The trained toy-world model shipped in the package (a diffusers folder), the embedded default when present.
SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "toy_world" / "weights"
_TINY_MODEL_NAME = "tiny-sd15-random-v1"


def tiny_vae(**extra):
    """The tiny models' VAE: 32 px images, one downsampling (latents ``[4, 16, 16]``); ``extra`` config values."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **extra,
    )


def build_tiny_sd(out_dir: str | Path, seed: int = 0, words: tuple[str, ...] = ()) -> Path:
    """Write a random tiny SD1.5-shaped model to ``out_dir`` (a diffusers folder) and return it.

    Images are 32 px; the VAE downsamples once (latents ``[4, 16, 16]``).
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir)
    tok_dir = write_tokenizer_files(words, out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = tiny_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
            eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
            pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def default_model_dir() -> Path:
    """The shipped toy-world model, else the cached tiny random model (built on first use)."""
    if (SHIPPED_WEIGHTS / "model_index.json").is_file():
        return SHIPPED_WEIGHTS
    return build_once(_TINY_MODEL_NAME, lambda out: build_tiny_sd(out, seed=0))
