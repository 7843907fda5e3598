"""Loading a base model from local files only: a diffusers folder (or the embedded default).

Nothing is ever downloaded: every ``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import EMBEDDED, ConfigError
from .sd15 import SD15Family

logger = logging.getLogger(__name__)


@dataclass
class BaseModel:
    """The components of a Stable Diffusion model, as loaded (float32, on the CPU)."""

    family: SD15Family
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    noise_scheduler: object
    prediction_type: str
    source: str


def resolve_model_path(value: str) -> Path:
    """The local folder or file a ``pretrained_model_name_or_path`` value designates."""
    if value == EMBEDDED:
        from ..embedded_default import default_model_dir

        return default_model_dir()
    return Path(value).expanduser()


def load_base_model(
    path_value: str, clip_skip: int = 1, v_parameterization: bool = False, single_file_config: str = "",
    tokenizer_path: str = "", max_token_length: int = 75,
) -> BaseModel:
    """Load the model at ``path_value``: a diffusers folder, a single ``.safetensors``/``.ckpt`` SD1.5
    checkpoint (see ``single_file.py``), or ``@embedded``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model_path(path_value)
    if path.is_file():
        from .single_file import load_single_file

        unet, vae, text_encoder, tokenizer, noise_scheduler = load_single_file(
            path, config_dir=single_file_config or None, tokenizer_path=tokenizer_path
        )
    elif (path / "model_index.json").is_file():
        kwargs = {"local_files_only": True}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kwargs)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kwargs)
    else:
        raise ConfigError(
            f"base model not found: looked for a diffusers folder with model_index.json, or a "
            f".safetensors/.ckpt file, at {path}"
        )
    prediction_type = "v_prediction" if v_parameterization else noise_scheduler.config.prediction_type
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.float()
    return BaseModel(SD15Family(clip_skip, max_token_length), unet, vae, text_encoder, tokenizer, noise_scheduler, prediction_type, str(path))


def configure_attention(unet: nn.Module, xformers: bool, sdpa: bool, device: torch.device) -> str:
    """Choose the UNet's attention implementation and return its name for the log.

    xformers when asked for, installed and on CUDA; else PyTorch SDPA when asked for; else the
    plain implementation.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if xformers:
        if device.type != "cuda":
            logger.warning("xformers has no CPU kernels; using PyTorch SDPA instead")
        else:
            try:
                unet.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as exc:  # not installed or incompatible build
                logger.warning("xformers unavailable (%s); using PyTorch SDPA instead", exc)
        sdpa = True
    unet.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
    return "sdpa" if sdpa else "plain"
