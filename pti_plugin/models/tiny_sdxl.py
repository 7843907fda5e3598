"""A tiny, randomly initialised SDXL-shaped model written as a diffusers folder.

Used by the tests. It keeps SDXL's structure at small widths: a plain down block then two
cross-attention ones (1 and 2 transformer blocks deep), a 2-deep mid block, mirrored up blocks,
linear ``proj_in``/``proj_out``, the ``text_time`` added conditioning (pooled text embedding plus
six size/crop ids), and two text encoders of different widths whose per-token states are
concatenated (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, the second tokenizer padding
with ``!`` as SDXL's does). The tokenizers use the word vocabulary of ``word_vocab.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny import tiny_vae
from .word_vocab import BOS, EOS, write_tokenizer_files

#: Widths of the tiny model's two text encoders (SDXL: 768 and 1280).
TINY_SDXL_TEXT_DIMS = (32, 48)
#: Width of each of the six size/crop time ids' embeddings (SDXL: 256).
TINY_SDXL_TIME_EMBED_DIM = 8


def _text_encoder(cls, tokenizer, width: int, **extra):
    from transformers import CLIPTextConfig

    ids = tokenizer.convert_tokens_to_ids
    return cls(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=ids(BOS), eos_token_id=ids(EOS),
        pad_token_id=ids(EOS), **extra,
    ))


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0, words: tuple[str, ...] = ()) -> Path:
    """Write a random tiny SDXL-shaped model to ``out_dir`` (a diffusers folder) and return it.

    Images are 32 px; the VAE downsamples once (latents ``[4, 16, 16]``). The same ``seed`` and
    ``words`` give the same weights.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out_dir)
    tok_dir = write_tokenizer_files(words, out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True, pad_token="!")
    d1, d2 = TINY_SDXL_TEXT_DIMS
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=d1 + d2,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + d2,
        norm_num_groups=8,
    )
    vae = tiny_vae(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE settings
    text_encoder = _text_encoder(CLIPTextModel, tokenizer, d1)
    text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, tokenizer_2, d2, projection_dim=d2, hidden_act="gelu")
    scheduler = EulerDiscreteScheduler(  # SDXL 1.0 base's scheduler settings
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    pipe.save_pretrained(out)
    return out
