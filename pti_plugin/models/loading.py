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
from ..safe_load import without_mmap
from ..text_files import path_not_found
from .disk_mapping import keep_in_memory
from .family import CLIP_WINDOW, Conditioning, ModelFamily, detect_family, make_family
from .model_checks import MODEL_KEY, architecture_problem, not_a_model_folder

logger = logging.getLogger(__name__)


@dataclass
class BaseModel:
    """A loaded base model (float32, on the CPU) bound to its family adapter.

    ``text_encoders``/``tokenizers``: one per encoder of the family, in the family's order. Code
    outside ``models/`` conditions through :meth:`tokenize` and :meth:`encode`, never through a
    family module.
    """

    family: ModelFamily
    unet: nn.Module
    vae: nn.Module
    text_encoders: tuple[nn.Module, ...]
    tokenizers: tuple[object, ...]
    noise_scheduler: object
    prediction_type: str
    source: str

    @property
    def text_encoder(self) -> nn.Module:
        """The first (for SD1.5 the only) text encoder."""
        return self.text_encoders[0]

    @property
    def tokenizer(self) -> object:
        """The first (for SD1.5 the only) tokenizer."""
        return self.tokenizers[0]

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids of ``captions`` as the family's conditioning takes them (CPU, int64)."""
        return self.family.tokenize(self.tokenizers, captions)

    def encode(self, input_ids: torch.Tensor, text_encoders: tuple[nn.Module, ...] | None = None,
               sizes: torch.Tensor | None = None) -> Conditioning:
        """The UNet conditioning of ``input_ids`` (through ``text_encoders``, default the model's own); ``sizes``
        [B, 6]: per-sample size conditioning where the family takes it (SDXL)."""
        return self.family.encode(text_encoders or self.text_encoders, input_ids, sizes)

    def pipeline(self, scheduler: object) -> object:
        """The family's diffusers pipeline over these modules (no safety checker), for samples and reloads."""
        import diffusers

        import inspect

        cls = getattr(diffusers, self.family.pipeline_class_name)
        modules = dict(zip(self.family.text_encoder_names, self.text_encoders))
        modules |= {n.replace("text_encoder", "tokenizer"): t for n, t in zip(self.family.text_encoder_names, self.tokenizers)}
        accepted = inspect.signature(cls.__init__).parameters  # SDXL's pipeline has no safety checker, a watermarker
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False, "add_watermarker": False}
        return cls(vae=self.vae, unet=self.unet, scheduler=scheduler, **modules, **{k: v for k, v in extra.items() if k in accepted})


def resolve_model_path(value: str) -> Path:
    """The local folder or file a ``pretrained_model_name_or_path`` value designates."""
    if value == EMBEDDED:
        from .tiny import default_model_dir

        return default_model_dir()
    return Path(value).expanduser()


def choose_family(path: Path, requested: str = "auto") -> tuple[str, str]:
    """(family name, why): detected from the weights at ``path``, or the preset's ``model_family``."""
    if requested != "auto":
        return requested, "set by model_family"
    return detect_family(path)


def load_base_model(
    path_value: str, clip_skip: int = 1, v_parameterization: bool = False, single_file_config: str = "",
    tokenizer_path: str = "", max_token_length: int = CLIP_WINDOW, model_family: str = "auto",
    zero_terminal_snr: bool = False, vae: str = "", disable_mmap: bool = False,
) -> BaseModel:
    """Load the model at ``path_value``: a diffusers folder, a single ``.safetensors``/``.ckpt``
    checkpoint (see ``single_file.py``), or ``@embedded``; its family is detected (and logged) unless
    ``model_family`` names it. A model that cannot be trained (not a model, incomplete, another architecture)
    is a ``ConfigError`` naming ``pretrained_model_name_or_path`` and the file (see ``model_checks.py``).
    ``vae``: a VAE file or folder that replaces the model's (``vae_file.py``; its problems name ``vae``).
    ``disable_mmap`` (kohya's ``disable_mmap_load_safetensors``): a ``.safetensors`` single file or ``vae`` is read
    into memory, not memory-mapped (``safe_load.without_mmap``), and the modules' frozen weights are never mapped
    from a file later (``disk_mapping.keep_in_memory``); a diffusers folder is read by diffusers as always."""
    path = resolve_model_path(path_value)
    if path.is_dir() and not (path / "model_index.json").is_file():  # a model folder's own checks run as it loads
        raise ConfigError.at(MODEL_KEY, f": {not_a_model_folder(path)}")
    if not path.exists():
        wanted = "a diffusers folder with model_index.json, or a .safetensors/.ckpt file"
        raise ConfigError.at(MODEL_KEY, f": {path_not_found(path_value, 'base model', path, wanted)}")
    try:
        name, why = choose_family(path, model_family)
    except ValueError as exc:  # an unreadable model_index.json or safetensors header
        raise ConfigError.at(MODEL_KEY, f": {exc}") from exc
    hint = (f"model family {name!r}: {why}; " + ("'auto' detects it from the files" if model_family != "auto"
                                                 else "set model_family if the detection is wrong"))
    try:
        family = make_family(name, clip_skip=clip_skip, max_token_length=max_token_length)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc} (model family {name!r}: {why})") from exc
    logger.info("model family %s (%s)", name, why)
    if disable_mmap and path.is_dir():
        logger.warning("disable_mmap_load_safetensors: %s is a diffusers folder, which diffusers and transformers read "
                       "memory-mapped as always (as kohya does); the option covers single-file models and vae", path)
    try:
        with without_mmap(disable_mmap):
            parts = family.load(path, single_file_config, tokenizer_path)
        problem = architecture_problem(name, parts.unet.config, [int(te.config.hidden_size) for te in parts.text_encoders])
        if problem:  # a diffusers folder's configs were checked before loading; a single file's configs here
            raise ConfigError(f"{path}: {problem}")
    except ConfigError as exc:
        if exc.key is not None:  # another key's fault (tokenizer_path, single_file_config): named already
            raise
        raise ConfigError.at(MODEL_KEY, f": {exc} ({hint})") from exc
    except ValueError as exc:
        raise ConfigError.at(MODEL_KEY, f": {exc} ({hint})") from exc
    prediction_type = _prediction_type(path, parts.noise_scheduler.config, v_parameterization)
    if zero_terminal_snr and not parts.noise_scheduler.config.get("rescale_betas_zero_snr", False):
        # kohya's --zero_terminal_snr: the betas rescaled so the last step's alpha-bar is 0 (diffusers' rule)
        parts.noise_scheduler = type(parts.noise_scheduler).from_config(parts.noise_scheduler.config, rescale_betas_zero_snr=True)
    if vae:
        from .vae_file import load_vae

        with without_mmap(disable_mmap):
            parts.vae = load_vae(vae, parts.vae)
    for module in (parts.unet, parts.vae, *parts.text_encoders):
        module.requires_grad_(False)
        module.float()
        if disable_mmap:
            keep_in_memory(module)
    return BaseModel(family, parts.unet, parts.vae, parts.text_encoders, parts.tokenizers, parts.noise_scheduler,
                     prediction_type, str(path) + (f" with the VAE {Path(vae).expanduser()}" if vae else ""))


def _prediction_type(path: Path, scheduler_config, v_parameterization: bool) -> str:
    """The training target: v-prediction with ``v_parameterization``, else what the model declares (a diffusers
    folder's scheduler config, a single file's ``v_pred`` key). kohya ignores the declaration (epsilon unless
    ``--v_parameterization``): following it is said in the log; ``v_parameterization`` over an epsilon model
    is warned about."""
    declared = scheduler_config.prediction_type
    source = path / "scheduler" / "scheduler_config.json" if path.is_dir() else f"{path} (its v_pred key)"
    if declared == "v_prediction" and not v_parameterization:
        logger.info("the model declares prediction_type = 'v_prediction' (%s): training v-prediction, as the model "
                    "was trained (kohya would train epsilon without --v_parameterization)", source)
    if v_parameterization and declared != "v_prediction" and path.is_dir():
        logger.warning("v_parameterization = true, but the model's scheduler config (%s) says prediction_type = %r: "
                       "training v-prediction as asked; a model trained for %s learns a new target from it",
                       source, declared, declared)
    return "v_prediction" if v_parameterization else declared


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
