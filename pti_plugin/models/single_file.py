"""Loading an original-format single-file SD1.x checkpoint (``.safetensors`` / ``.ckpt``), offline.

A single file holds the original (CompVis/LDM) key layout: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE) and ``cond_stage_model.transformer.text_model.*`` (CLIP text encoder).
``load_single_file`` reads it safely, then builds each diffusers/transformers component with diffusers'
own single-file machinery:

- the file is read here, never by diffusers: ``.safetensors`` through ``load_safetensors`` (framing
  checked first; without mmap under ``disable_mmap_load_safetensors``), ``.ckpt``/``.pt``/``.pth``/``.bin`` only
  through ``safe_torch_load`` (``torch.load(weights_only=True)`` plus the allow-list for Lightning's
  ``ModelCheckpoint`` etc.); a ``state_dict`` wrapper is unwrapped;
- the UNet and VAE come from ``UNet2DConditionModel.from_single_file`` / ``AutoencoderKL.from_single_file``
  given the *state dict* (so diffusers' own loader, which would ``torch.load`` without the allow-list,
  never runs), ``config=`` a local folder of diffusers configs, ``subfolder=`` the component and
  ``local_files_only=True``;
- the text encoder comes from ``create_diffusers_clip_model_from_ldm``, the function
  ``StableDiffusionPipeline.from_single_file`` itself uses for ``CLIPTextModel``, with the same local
  config folder;
- the noise scheduler is a ``DDPMScheduler`` read from the config folder's ``scheduler/`` (as kohya
  trains SD1.5); a ``v_pred`` marker key in the file selects v-prediction and a ``ztsnr`` one the
  zero-terminal-SNR rescale.

The config folder defaults to the SD1.5 configs shipped in ``configs/sd15`` (any folder laid out like a
diffusers model, e.g. a diffusers model folder, also works). Nothing reaches the network: every config
read is from that local folder and no model repository name is ever resolved.

The tokenizer vocabulary is not in the checkpoint and the real CLIP vocabulary is not shipped;
``load_clip_tokenizer`` looks, in order, at ``tokenizer_path``, the Hugging Face cache
(``openai/clip-vit-large-patch14``, offline) and the BPE file that the ``open_clip_torch``
distribution carries (found through package metadata, without importing ``open_clip``), from which
CLIP's ``vocab.json``/``merges.txt`` are rebuilt exactly as CLIP's ``SimpleTokenizer`` builds its
vocabulary.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from ..config import ConfigError, first_of
from ..safe_load import load_safetensors, safe_torch_load
from ..text_files import path_not_found
from .model_checks import file_kind

logger = logging.getLogger(__name__)

#: The SD1.5 component configs shipped with the package (a diffusers folder without weights).
SD15_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "sd15"

#: The Hugging Face repository whose cached tokenizer files SD1.5 uses.
CLIP_REPO = "openai/clip-vit-large-patch14"
#: The distribution that carries CLIP's BPE merges file, and that file's name.
OPEN_CLIP_DISTRIBUTION = "open_clip_torch"
OPEN_CLIP_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
#: CLIP's vocabulary: 256 byte symbols, the same with ``</w>``, 48894 merges, then BOS and EOS.
CLIP_VOCAB_SIZE = 49408
CLIP_NUM_MERGES = 49152 - 256 - 2
#: How SD1.5's tokenizer is configured (its ``tokenizer_config.json``).
SD15_TOKENIZER_KWARGS = {
    "model_max_length": 77,
    "bos_token": BOS,
    "eos_token": EOS,
    "unk_token": EOS,
    "pad_token": EOS,
}

_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIXES = ("first_stage_model.", "vae.")
_CLIP_PREFIX = "cond_stage_model.transformer.text_model."
_CLIP_MARKER = _CLIP_PREFIX + "embeddings.position_embedding.weight"
#: diffusers' names for the model types it recognises that are not SD1.x (SDXL base files load as family sdxl).
_OTHER_FAMILIES = {
    "v2": "Stable Diffusion 2.x",
    "inpainting": "SD1.x inpainting (9 input channels)",
    "inpainting_v2": "SD2.x inpainting",
    "xl_base": "SDXL",
    "xl_refiner": "SDXL refiner",
    "xl_inpaint": "SDXL inpainting",
    "playground-v2-5": "Playground v2.5",
    "upscale": "SD x4 upscaler",
}


# --------------------------------------------------------------------------------------------------
# The checkpoint file


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an original-format checkpoint file, read without running anything from it.

    ``.safetensors``: through ``load_safetensors`` (framing checked first; memory-mapped, or read whole inside
    ``safe_load.without_mmap``, kohya's ``disable_mmap_load_safetensors``). ``.ckpt``/``.pt``/``.pth``/``.bin``: only
    through ``safe_torch_load`` (raises ``UnsafeFileError`` for a code-running pickle; read, never mapped).
    A ``state_dict`` wrapper (Lightning checkpoints) is unwrapped; non-tensor entries are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path_not_found(path, "single-file checkpoint"))
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        state = load_safetensors(path)  # framing checked; read without mmap under disable_mmap_load_safetensors
    elif suffix in PICKLE_SUFFIXES:
        state = safe_torch_load(path)
    else:
        raise ConfigError(
            f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors, or .ckpt/.pt/.pth/.bin"
        )
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        kind = file_kind(k for k in state if isinstance(k, str))  # an A1111 embedding nests its tensors
        raise ConfigError(f"{path}: {'this is ' + kind if kind else 'holds no tensors'}")
    return _normalise_clip_keys(tensors)


def _normalise_clip_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old SD1.x files name the text encoder ``cond_stage_model.transformer.embeddings.*`` (no
    ``text_model.``, an older transformers layout); give them the current names (as AUTOMATIC1111 does)."""
    old = "cond_stage_model.transformer."
    if any(k.startswith(_CLIP_PREFIX) for k in state):
        return state
    renamed = {}
    for key, value in state.items():
        if key.startswith(old) and key[len(old) :].split(".", 1)[0] in ("embeddings", "encoder", "final_layer_norm"):
            key = _CLIP_PREFIX + key[len(old) :]
        renamed[key] = value
    return renamed


def check_checkpoint_kind(path: Path, state: dict[str, torch.Tensor], family: str) -> None:
    """Refuse, naming the file, a checkpoint diffusers recognises as another family than ``family`` (``sd15`` or
    ``sdxl``) or as a kind pti-plugin does not train (SD2.x, inpainting, upscaler ...)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    kind = infer_diffusers_model_type(state)
    if kind == "xl_base" and family != "sdxl":
        raise ConfigError(f"{path}: this is an SDXL checkpoint, read as SD1.x; set model_family = 'auto' or 'sdxl'")
    if kind == "v1" and family != "sd15" and _CLIP_MARKER in state:  # "v1" is also diffusers' answer for unknown files
        raise ConfigError(f"{path}: this is an SD1.x checkpoint, read as SDXL; set model_family = 'auto' or 'sd15'")
    if kind in _OTHER_FAMILIES and kind != "xl_base":
        raise ConfigError(f"{path}: this looks like a {_OTHER_FAMILIES[kind]} checkpoint, which is not supported: "
                          "pti-plugin trains SD1.x and SDXL base models")


def check_sd1_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse, naming the file, a checkpoint of another family or one lacking a component."""
    check_checkpoint_kind(path, state, "sd15")
    missing = []
    if not any(k.startswith(_UNET_PREFIX) for k in state):
        missing.append(f"the UNet ({_UNET_PREFIX}*)")
    if not any(k.startswith(_VAE_PREFIXES) for k in state):
        missing.append(f"the VAE ({_VAE_PREFIXES[0]}*)")
    if _CLIP_MARKER not in state:
        missing.append(f"the CLIP text encoder ({_CLIP_PREFIX}*)")
    if missing:
        what = file_kind(state)
        raise ConfigError(f"{path}: this is {what}" if what else
                          f"{path}: not a complete SD1.x checkpoint: no weights for {', '.join(missing)} "
                          f"(the file holds {len(state)} tensors)")


# --------------------------------------------------------------------------------------------------
# Components


def _check_config_dir(config_dir: Path) -> None:
    needed = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"]
    absent = [name for name in needed if not (config_dir / name).is_file()]
    if absent:
        raise ConfigError.at("single_file_config", f": {config_dir} is not a folder of diffusers component "
                                                   f"configs: missing {', '.join(absent)}")


def _describe_missing(component: str, empty: list[str]) -> str:
    return f"the {component} weights are incomplete: {len(empty)} tensors missing ({first_of(empty, 5)})"


def _check_loaded(module: nn.Module, component: str, path: Path, config_dir: Path) -> None:
    """Weights the file lacks stay on the meta device; refuse that (naming the file and tensors)."""
    empty = [name for name, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if empty:
        raise ConfigError(f"{path}: {_describe_missing(component, empty)} for the config in {config_dir}")


def _diagnose(cls, subfolder: str, state: dict, config_dir: Path, component: str) -> str | None:
    """Why diffusers' conversion of ``state`` does not fit the config: shapes that differ, else tensors
    it lacks (for error messages; ``None`` when no such reason is found)."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    try:
        config = cls.load_config(str(config_dir), subfolder=subfolder, local_files_only=True)
        with init_empty_weights():
            expected = cls.from_config(config).state_dict()
        convert = SINGLE_FILE_LOADABLE_CLASSES[cls.__name__]["checkpoint_mapping_fn"]
        converted = convert(checkpoint=state, config=config)
    except Exception:  # the diagnosis is best effort; the original error is reported anyway
        return None
    mismatched = [
        f"{name}: file {list(converted[name].shape)}, config {list(t.shape)}"
        for name, t in expected.items()
        if name in converted and hasattr(converted[name], "shape") and converted[name].shape != t.shape
    ]
    if mismatched:
        shown = first_of(mismatched, 3, "; ")
        return (
            f"the {component} weights have other shapes than the config describes ({len(mismatched)} tensors, "
            f"e.g. {shown}): the file is another architecture"
        )
    missing = sorted(set(expected) - set(converted))
    return _describe_missing(component, missing) if missing else None


def _build(component: str, path: Path, config_dir: Path, make, diagnose=None):
    """Run ``make`` (a diffusers loader), wrapping its errors with the file, component and config folder."""
    try:
        module = make()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes an error naming the file
        reason = (diagnose() if diagnose is not None else None) or f"could not build the {component} from it ({exc})"
        raise ConfigError(f"{path}: {reason}, with the config in {config_dir}") from exc
    _check_loaded(module, component, path, config_dir)
    # `.float()`, not `.to(dtype=...)`: diffusers' `ModelMixin.to` warns on every dtype cast.
    return module.cpu().float()


def load_single_file(
    path: str | Path, config_dir: str | Path | None = None, tokenizer_path: str = ""
) -> tuple[nn.Module, nn.Module, nn.Module, object, object]:
    """Load an original-format SD1.x single file as ``(unet, vae, text_encoder, tokenizer, noise_scheduler)``.

    All modules are float32, on the CPU, in eval mode. ``config_dir`` is a folder of diffusers component
    configs (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``); it defaults to the shipped SD1.5
    configs. ``tokenizer_path`` is a folder with ``vocab.json``/``merges.txt`` (see
    ``load_clip_tokenizer`` for the fallbacks). The file is read and checked before the tokenizer is
    looked for, so a corrupt or unsafe file is named first. Nothing is downloaded; nothing from a pickle runs.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    path = Path(path).expanduser()
    config_dir = Path(config_dir).expanduser() if config_dir is not None else SD15_CONFIG_DIR
    _check_config_dir(config_dir)
    state = read_checkpoint(path)  # the file first: a corrupt or unsafe file is named before anything else
    check_sd1_checkpoint(path, state)
    tokenizer = load_clip_tokenizer(tokenizer_path)

    # `config=` must be a str (diffusers rejects a Path), and with `config=` diffusers applies no
    # default subfolder, so each component names its own. No `torch_dtype`: the models are built in
    # float32 and each tensor is cast to its parameter's dtype as it loads; with a `torch_dtype`
    # diffusers would cast the whole model before `_check_loaded` could report missing weights.
    # `low_cpu_mem_usage=True` (diffusers' default when accelerate is installed) builds the model on the
    # meta device, so a weight the file lacks cannot silently stay random: it fails to load.
    common = {"config": str(config_dir), "local_files_only": True, "low_cpu_mem_usage": True}
    unet = _build(
        "UNet",
        path,
        config_dir,
        lambda: UNet2DConditionModel.from_single_file(state, subfolder="unet", **common),
        lambda: _diagnose(UNet2DConditionModel, "unet", state, config_dir, "UNet"),
    )
    vae = _build(
        "VAE",
        path,
        config_dir,
        lambda: AutoencoderKL.from_single_file(state, subfolder="vae", **common),
        lambda: _diagnose(AutoencoderKL, "vae", state, config_dir, "VAE"),
    )
    text_encoder = _build(
        "text encoder",
        path,
        config_dir,
        lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModel,
            state,
            subfolder="text_encoder",
            config=str(config_dir),
            local_files_only=True,
        ),
    )
    noise_scheduler = scheduler_from_markers(path, state, config_dir)
    state = None  # the tensors are released (the loaders above are done with them)
    return unet, vae, text_encoder, tokenizer, noise_scheduler


def scheduler_from_markers(path: Path, state: dict[str, torch.Tensor], config_dir: Path):
    """The training ``DDPMScheduler`` of the config folder's ``scheduler/``; a ``v_pred`` marker key in the file
    selects v-prediction and a ``ztsnr`` one the zero-terminal-SNR rescale (the markers kohya and NoobAI write)."""
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_pretrained(str(config_dir), subfolder="scheduler", local_files_only=True)
    overrides = {}
    if "v_pred" in state:
        overrides["prediction_type"] = "v_prediction"
    if "ztsnr" in state:
        overrides["rescale_betas_zero_snr"] = True
    if overrides:
        logger.info("%s: marker keys select %s", path, overrides)
        noise_scheduler = DDPMScheduler.from_config(noise_scheduler.config, **overrides)
    return noise_scheduler


# --------------------------------------------------------------------------------------------------
# Tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte-to-symbol table, in CLIP's order (printable bytes first, then the rest as 256+n)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_from_bpe(bpe_gz: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges from ``bpe_simple_vocab_16e6.txt.gz``, as ``SimpleTokenizer`` builds them.

    The first line is a header; the next ``49152 - 256 - 2`` (48894) lines are the merges. The vocabulary
    is the 256 byte symbols, the same with ``</w>``, each merge's result, then ``<|startoftext|>`` and
    ``<|endoftext|>`` (49408 entries; the ids match Hugging Face's ``vocab.json`` for CLIP).
    """
    bpe_gz = Path(bpe_gz)
    with gzip.open(bpe_gz, "rb") as handle:
        lines = handle.read().decode("utf-8").split("\n")
    lines = lines[1 : CLIP_NUM_MERGES + 1]
    if len(lines) != CLIP_NUM_MERGES:
        raise ValueError(f"{bpe_gz}: holds {len(lines)} merges after its header; CLIP's vocabulary needs {CLIP_NUM_MERGES}")
    merges = []
    for number, line in enumerate(lines, start=2):
        parts = tuple(line.split())
        if len(parts) != 2:
            raise ValueError(f"{bpe_gz}: line {number} is not a merge of two symbols: {line!r}")
        merges.append(parts)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = dict(zip(tokens, range(len(tokens))))
    return vocab, merges


def write_clip_tokenizer_files(bpe_gz: str | Path, out_dir: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (Hugging Face's CLIP format) rebuilt from ``bpe_gz``."""
    vocab, merges = clip_vocab_from_bpe(bpe_gz)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return out


def find_open_clip_bpe() -> Path | None:
    """The BPE file installed with ``open_clip_torch``, found through its package metadata (no import)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(OPEN_CLIP_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    candidates = [f for f in (dist.files or []) if f.name == OPEN_CLIP_BPE_NAME]
    candidates.append(PurePosixPath("open_clip") / OPEN_CLIP_BPE_NAME)
    for candidate in candidates:
        located = Path(str(dist.locate_file(candidate)))
        if located.is_file():
            return located
    return None


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _find_cached_clip_files() -> tuple[str, str] | None:
    """``vocab.json`` and ``merges.txt`` of ``openai/clip-vit-large-patch14`` in the HF cache, if both are there."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    for name in ("vocab.json", "merges.txt"):
        hit = try_to_load_from_cache(CLIP_REPO, name)
        if not isinstance(hit, str) or not Path(hit).is_file():
            return None
        found.append(hit)
    return found[0], found[1]


def tokenizer_folder(folder: Path, subfolder: bool = True) -> Path | None:
    """The folder holding a CLIP tokenizer's ``vocab.json`` and ``merges.txt``: ``folder`` itself or (``subfolder``)
    its ``tokenizer/``; None when neither does."""
    for candidate in (folder, folder / "tokenizer") if subfolder else (folder,):
        if (candidate / "vocab.json").is_file() and (candidate / "merges.txt").is_file():
            return candidate
    return None


def load_clip_tokenizer(tokenizer_path: str = ""):
    """The CLIP tokenizer for a single-file SD1.x checkpoint, found offline.

    In order: ``tokenizer_path`` (a folder with ``vocab.json`` and ``merges.txt``, or one whose
    ``tokenizer/`` subfolder has them; its ``tokenizer_config.json`` is honoured where present, else
    SD1.5's settings apply; a set but unusable path is an error, never skipped), the Hugging
    Face cache (``openai/clip-vit-large-patch14``, offline), and the ``bpe_simple_vocab_16e6.txt.gz``
    file of an installed ``open_clip_torch`` (rebuilt into CLIP's vocabulary). Otherwise a ``ConfigError``
    lists the three places looked at.
    """
    from transformers import CLIPTokenizer

    if tokenizer_path:
        folder = Path(tokenizer_path).expanduser()
        found = tokenizer_folder(folder)
        if found is None:
            raise ConfigError.at("tokenizer_path", f": {folder}: no vocab.json and merges.txt there "
                                                   f"(nor in {folder / 'tokenizer'})")
        if not (found / "tokenizer_config.json").is_file():  # just the two files: SD1.5's settings
            return CLIPTokenizer(vocab=str(found / "vocab.json"), merges=str(found / "merges.txt"), **SD15_TOKENIZER_KWARGS)
        return CLIPTokenizer.from_pretrained(str(found), local_files_only=True)

    cached = _find_cached_clip_files()
    if cached is not None:
        logger.info("CLIP tokenizer: %s from the Hugging Face cache", CLIP_REPO)
        return CLIPTokenizer(vocab=cached[0], merges=cached[1], **SD15_TOKENIZER_KWARGS)

    bpe = find_open_clip_bpe()
    if bpe is not None:
        logger.info("CLIP tokenizer: rebuilt from %s", bpe)
        vocab, merges = clip_vocab_from_bpe(bpe)
        return CLIPTokenizer(vocab=vocab, merges=merges, **SD15_TOKENIZER_KWARGS)

    raise ConfigError(
        "no CLIP tokenizer found for the single-file checkpoint (its vocabulary is not in the file). Looked at:\n"
        "  1. tokenizer_path: not set (a folder with CLIP's vocab.json and merges.txt)\n"
        f"  2. the Hugging Face cache {_hf_cache_dir()}: no vocab.json and merges.txt of {CLIP_REPO} "
        "(looked offline)\n"
        f"  3. the {OPEN_CLIP_DISTRIBUTION} package: not installed, or without {OPEN_CLIP_BPE_NAME}\n"
        "Set tokenizer_path to a folder with vocab.json and merges.txt (e.g. the tokenizer/ folder of a "
        f"diffusers SD1.5 model), or install {OPEN_CLIP_DISTRIBUTION} (pip), which carries CLIP's BPE file.",
        key="tokenizer_path",
    )
