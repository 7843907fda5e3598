"""Checks of the base model a user names (``pretrained_model_name_or_path``), before and as it loads.

- :func:`not_a_model_folder`: what a folder without ``model_index.json`` is (empty, one component's folder, a
  folder of single files);
- :func:`file_kind`: what a single file that lacks a base model's weights is (a LoRA, an embedding, a VAE
  alone, one diffusers component's weights), from its key names;
- :func:`check_model_folder`: a diffusers folder holds each subfolder its family reads, with the files that
  component's loader needs, and (from the JSON configs, before any weight loads) an architecture the
  family trains; :func:`model_folder_problem` runs it on a folder before anything loads (the trainer's
  start-time checks, the scripts' usage errors); :func:`load_folder` then loads the components, naming the
  subfolder whose loader fails;
- :func:`architecture_problem`: THE rule of which architectures a family trains (SD2.x, inpainting and
  other UNets, an SDXL model read as SD1.5 and the reverse), applied to configs, whatever the source.

Each problem is a :class:`~pti_plugin.config.ConfigError` naming the file or folder;
:func:`~pti_plugin.models.loading.load_base_model` puts the key in front.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..config import ConfigError
from ..text_files import path_not_found
from .family import EMBEDDING_KEYS, detect_family, read_json

#: The preset key that names the base model.
MODEL_KEY = "pretrained_model_name_or_path"
#: How the messages name each family.
FAMILY_NAMES = {"sd15": "SD1.x", "sdxl": "SDXL"}
#: The subfolders of each family's diffusers model folder that training reads (its loader's order).
FAMILY_FOLDERS = {"sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
                  "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")}
_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: The files each component subfolder needs before its loader runs (any one group); others: ``config.json``.
_COMPONENT_FILES = {
    "scheduler": (("scheduler_config.json",),),
    "tokenizer": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
    "tokenizer_2": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
}
#: The weights files diffusers (UNet, VAE) and transformers (text encoders) read without a ``variant``.
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")
_WEIGHT_NAMES = _WEIGHT_FILES + tuple(name + ".index.json" for name in _WEIGHT_FILES)  # sharded weights
#: Text width of Stable Diffusion 2.x's OpenCLIP ViT-H encoder (SD1.x: 768, SDXL: 768 + 1280).
_SD2_TEXT_WIDTH = 1024
#: What a UNet with other than 4 input channels is (the latents have 4).
_IN_CHANNELS = {9: "an inpainting UNet (9 input channels: latents, mask, masked image)",
                8: "an instruct-pix2pix UNet (8 input channels)", 5: "a depth-to-image UNet (5 input channels)"}


def not_a_model_folder(path: Path) -> str:
    """Why the folder ``path``, which has no ``model_index.json``, is not a base model."""
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        return f"{path}: the folder cannot be read ({exc.strerror})"
    if not entries:
        return f"{path} is an empty folder; expected a diffusers model folder (with model_index.json) or a single file"
    config = path / "config.json"
    if config.is_file():
        try:
            what = f"{read_json(config).get('_class_name', 'a model')}: config.json"
        except ConfigError:  # a damaged component is still a component: say what was passed
            what = "its config.json unreadable"
        return (f"{path} holds one diffusers component ({what}), not a whole model; pass the model "
                "folder above it, the one with model_index.json")
    files = [name for name in entries if name.lower().endswith(_MODEL_SUFFIXES)]
    if files:
        return (f"{path} has no model_index.json, so it is not a diffusers folder; it holds {', '.join(files[:3])}: "
                "to train on a single-file checkpoint, pass the file itself")
    return f"{path} has no model_index.json: expected a diffusers model folder (model_index.json, unet/, vae/ ...)"


def file_kind(keys: Iterable[str]) -> str | None:
    """What a file with these tensor names is when it is a known kind of file that is not a base model, else None."""
    keys = list(keys)
    lora = next((k for k in keys if k.startswith(("lora_unet_", "lora_te")) or any(
        part in k for part in (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1", ".lokr_w1"))), None)
    if lora is not None:
        return f"a LoRA (key {lora!r}), not a base model; a LoRA to start from goes in network_weights"
    embedding = next((k for k in keys if k in EMBEDDING_KEYS or k.startswith("string_to_param")), None)
    if embedding is not None:
        return (f"a textual-inversion embedding (key {embedding!r}), not a base model; an embedding to start the "
                "pivot from goes in weights")
    if keys and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in keys):
        return "a VAE alone (encoder.*/decoder.* keys), not a base model; a VAE to use instead of the model's goes in vae"
    for prefix, what in (("down_blocks.", "a diffusers UNet's weights"), ("text_model.", "a text encoder's weights")):
        if any(k.startswith(prefix) for k in keys):
            return (f"{what} alone (keys {prefix}*), not a whole model; pass the diffusers model folder (with "
                    "model_index.json) or a single-file checkpoint")
    return None


def check_model_folder(path: Path, family: str, folders: Sequence[str]) -> None:
    """The diffusers folder ``path`` holds each of ``folders`` with the files its loader needs, and its UNet and
    text-encoder configs describe an architecture ``family`` trains (read before any weight loads)."""
    absent = [name for name in folders if not (path / name).is_dir()]
    if absent:
        raise ConfigError(f"not a complete {FAMILY_NAMES[family]} diffusers folder: no "
                          f"{', '.join(s + '/' for s in absent)} in {path}")
    for name in folders:
        groups = _COMPONENT_FILES.get(name, (("config.json",),))
        if not any(all((path / name / f).is_file() for f in group) for group in groups):
            wanted = " or ".join(" and ".join(group) for group in groups)
            raise ConfigError(f"{path / name}: no {wanted} in the {name}/ folder (an incomplete copy or download?)")
        if name not in _COMPONENT_FILES:
            _check_weights_file(path / name)
    encoders = [name for name in folders if name.startswith("text_encoder")]
    widths = [read_json(path / name / "config.json").get("hidden_size") for name in encoders]
    if problem := architecture_problem(family, read_json(path / "unet" / "config.json"), widths):
        raise ConfigError(f"{path}: {problem}")


def model_folder_problem(path: Path, model_family: str = "auto") -> str | None:
    """Why the folder ``path`` is not a diffusers model that can be trained (:func:`not_a_model_folder`,
    an unreadable ``model_index.json``, :func:`check_model_folder` for its family: ``model_family``, or the one
    ``model_index.json`` names), else None. Reads only JSON files: the trainer calls it before anything
    loads, and the scripts that take a model folder for their usage errors."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            return path_not_found(path, "base model", path.absolute(), "a diffusers folder with model_index.json")
        return "is a file, not a diffusers model folder"
    if not (path / "model_index.json").is_file():
        return not_a_model_folder(path)
    try:
        family, why = (model_family, "set by model_family") if model_family != "auto" else detect_family(path)
    except ConfigError as exc:  # model_index.json unreadable
        return str(exc)
    try:
        if family in FAMILY_FOLDERS:  # a registered third-party family checks its own folder when it loads
            check_model_folder(path, family, FAMILY_FOLDERS[family])
    except ConfigError as exc:
        return f"{exc} (model family {family!r}: {why})"
    return None


def _check_weights_file(folder: Path) -> None:
    """``folder`` (a component with weights) holds them under a name its loader reads without a ``variant``."""
    if any((folder / name).is_file() for name in _WEIGHT_NAMES):
        return
    others = sorted(f.name for f in folder.iterdir() if f.name.endswith((".safetensors", ".bin")))
    if not others:
        raise ConfigError(f"{folder}: no weights file (*.safetensors or *.bin) in the {folder.name}/ folder "
                          "(an incomplete copy or download?)")
    raise ConfigError(f"{folder}: its weights are {', '.join(others[:3])}, but the loader reads "
                      f"{' or '.join(_WEIGHT_FILES)} (a variant such as "
                      "fp16 is not chosen here): rename the file to the default name")


def load_folder(path: Path, family: str, classes: Mapping[str, type]) -> dict[str, object]:
    """Each component of the diffusers folder ``path`` (subfolder -> class), offline, after
    :func:`check_model_folder`; a loader's failure is a ``ConfigError`` naming the subfolder."""
    check_model_folder(path, family, list(classes))
    parts = {}
    for subfolder, cls in classes.items():
        try:
            parts[subfolder] = cls.from_pretrained(path, subfolder=subfolder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any loader failure (missing weights, bad JSON, shapes) names the folder
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{path / subfolder}: the {subfolder} cannot be loaded ({reason})") from exc
    return parts


def architecture_problem(family: str, unet: Mapping, text_widths: Sequence[int | None]) -> str | None:
    """Why a UNet config and its text encoders' widths are not an architecture ``family`` trains, else None."""
    sdxl_unet = unet.get("addition_embed_type") == "text_time"
    cross = unet.get("cross_attention_dim")
    in_channels = unet.get("in_channels", 4)
    if family == "sd15" and sdxl_unet:
        return ("this is an SDXL model (its UNet takes SDXL's pooled-text and size conditioning), read as SD1.x; "
                "set model_family = 'auto' or 'sdxl'")
    if family == "sd15" and _SD2_TEXT_WIDTH in (cross, *text_widths):
        return (f"this is a Stable Diffusion 2.x model (text width {_SD2_TEXT_WIDTH}, OpenCLIP ViT-H), which is "
                "not supported: pti-plugin trains SD1.x and SDXL models")
    if family == "sdxl" and not sdxl_unet:
        return ("this UNet has no SDXL size conditioning (addition_embed_type 'text_time'): not an SDXL base model; "
                "for an SD1.x model set model_family = 'auto' or 'sd15'")
    if in_channels != 4:
        what = _IN_CHANNELS.get(in_channels, f"a UNet with {in_channels} input channels")
        return f"this is {what}; training needs a base model whose UNet takes the 4 latent channels"
    widths = [w for w in text_widths if isinstance(w, int)]
    expected = sum(widths) if family == "sdxl" else (widths[0] if widths else None)
    if isinstance(cross, int) and expected is not None and len(widths) == len(text_widths) and cross != expected:
        return (f"the UNet's cross_attention_dim {cross} does not match the text encoder width {expected} "
                f"({' + '.join(map(str, widths))}): the components come from different models")
    return None
