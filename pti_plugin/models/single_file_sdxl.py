"""Loading an original-format single-file SDXL checkpoint (as model sites distribute Illustrious, NoobAI,
Pony), offline.

The file holds the original (sgm) layout: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
(VAE), ``conditioner.embedders.0.transformer.text_model.*`` (CLIP ViT-L) and
``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG). It is read and checked exactly as an SD1.x
file is (``single_file.read_checkpoint``: safetensors framing, or the allow-listed pickle load), then
each component is built by diffusers' own single-file conversion, given the state dict and the
SDXL configs shipped in ``configs/sdxl`` (or ``single_file_config``), ``local_files_only``:
``UNet2DConditionModel``/``AutoencoderKL.from_single_file`` and
``create_diffusers_clip_model_from_ldm`` for ``CLIPTextModel`` and ``CLIPTextModelWithProjection``
(the functions ``StableDiffusionXLPipeline.from_single_file`` uses). Both tokenizers share CLIP's
vocabulary, found as for SD1.x (``single_file.load_clip_tokenizer``); the second pads with ``!``.

v-prediction: a ``v_pred`` marker key (NoobAI-XL v-pred files carry it) selects it, as does
``v_parameterization``; a ``ztsnr`` key selects the zero-terminal-SNR schedule.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..config import ConfigError
from .family import LoadedComponents
from .model_checks import file_kind
from .single_file import (_build, _diagnose, check_checkpoint_kind, load_clip_tokenizer, read_checkpoint,
                          scheduler_from_markers)

#: The SDXL component configs shipped with the package (a diffusers folder without weights).
SDXL_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sdxl"
_NEEDED_CONFIGS = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
                   "scheduler/scheduler_config.json")
#: One key of each component in the original layout.
_COMPONENT_MARKERS = {
    "the UNet (model.diffusion_model.*)": "model.diffusion_model.",
    "the VAE (first_stage_model.*)": "first_stage_model.",
    "CLIP ViT-L (conditioner.embedders.0.transformer.*)": "conditioner.embedders.0.transformer.",
    "OpenCLIP ViT-bigG (conditioner.embedders.1.model.*)": "conditioner.embedders.1.model.",
}


def check_sdxl_checkpoint(path: Path, state: dict) -> None:
    """Refuse, naming the file, an SDXL refiner/inpainting file or one lacking a component."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    kind = infer_diffusers_model_type(state)
    if kind in ("xl_refiner", "xl_inpaint"):
        raise ConfigError(f"{path}: this is an SDXL {kind.removeprefix('xl_')} checkpoint; train on a base SDXL model")
    check_checkpoint_kind(path, state, "sdxl")
    missing = [name for name, prefix in _COMPONENT_MARKERS.items() if not any(k.startswith(prefix) for k in state)]
    if missing:
        what = file_kind(state)
        raise ConfigError(f"{path}: this is {what}" if what else
                          f"{path}: not a complete SDXL checkpoint: no weights for {', '.join(missing)} "
                          f"(the file holds {len(state)} tensors)")


def load_sdxl_single_file(path: str | Path, config_dir: str | Path | None = None, tokenizer_path: str = "") -> LoadedComponents:
    """An original-format SDXL single file as :class:`LoadedComponents` (float32, CPU); see the module docstring."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path).expanduser()
    config_dir = Path(config_dir).expanduser() if config_dir is not None else SDXL_CONFIG_DIR
    absent = [name for name in _NEEDED_CONFIGS if not (config_dir / name).is_file()]
    if absent:
        raise ConfigError.at("single_file_config", f": {config_dir} is not a folder of SDXL component configs: "
                                                   f"missing {', '.join(absent)}")
    state = read_checkpoint(path)  # the file first: a corrupt or unsafe file is named before anything else
    check_sdxl_checkpoint(path, state)
    tokenizer = load_clip_tokenizer(tokenizer_path)
    tokenizer_2 = copy.deepcopy(tokenizer)  # the same vocabulary, found and read once
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!" (its tokenizer_2 config)

    common = {"config": str(config_dir), "local_files_only": True, "low_cpu_mem_usage": True}
    unet = _build("UNet", path, config_dir,
                  lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **common),
                  lambda: _diagnose(UNet2DConditionModel, "unet", state, config_dir, "UNet"))
    vae = _build("VAE", path, config_dir,
                 lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **common),
                 lambda: _diagnose(AutoencoderKL, "vae", state, config_dir, "VAE"))
    encoders = []
    for cls, subfolder, name in ((CLIPTextModel, "text_encoder", "CLIP ViT-L text encoder"),
                                 (CLIPTextModelWithProjection, "text_encoder_2", "OpenCLIP ViT-bigG text encoder")):
        encoders.append(_build(name, path, config_dir, lambda cls=cls, subfolder=subfolder: create_diffusers_clip_model_from_ldm(
            cls, state, subfolder=subfolder, config=str(config_dir), local_files_only=True)))
    scheduler = scheduler_from_markers(path, state, config_dir)
    state = None  # the tensors are released (the loaders above are done with them)
    return LoadedComponents(unet, vae, tuple(encoders), (tokenizer, tokenizer_2), scheduler)

