"""A VAE in place of the base model's (``vae``, kohya's ``--vae``), read offline and without running code.

``vae`` names one of:

- a single file: ``.safetensors``, or ``.ckpt``/``.pt``/``.pth``/``.bin`` through the allow-listed unpickler
  (``single_file.read_checkpoint``: framing checked, a ``state_dict`` wrapper unwrapped), whose keys are the
  original (LDM) layout of A1111's ``models/VAE`` files (``encoder.down.0.block.0.conv1.weight``) or diffusers'
  (``encoder.down_blocks.0.resnets.0.conv1.weight``, old attention names included), with or without the
  ``first_stage_model.`` prefix of a whole checkpoint (whose VAE is then taken, as kohya does);
- a diffusers folder: an ``AutoencoderKL`` folder (``config.json`` and its weights), or a model folder with a
  ``vae/`` subfolder; its weights file is read by the same safe loader.

A ``.safetensors`` file of either kind is read without mmap under ``disable_mmap_load_safetensors`` (as the base
model's single file is; kohya itself maps its ``--vae``).

The original layout is converted by diffusers' own ``convert_ldm_vae_checkpoint`` (the conversion
``AutoencoderKL.from_single_file`` runs for a model's VAE in ``single_file.py``), old diffusers attention names by
diffusers' own key fix-up. The replacement must be this model's VAE architecture: its tensors must have exactly the
shapes of the model's VAE (a folder's ``config.json`` must also describe the same architecture); it is built from
the model's VAE config, so the model's latent settings (``scaling_factor``, ``force_upcast`` ...) stay, as kohya
keeps its model's scaling factor. SD1.5 and SDXL VAEs have the same architecture and cannot be told apart by their
shapes; a folder whose ``scaling_factor`` differs from the model's is warned about.

:func:`check_vae_source` runs with the preset's checks, before the data is scanned or any model loads (a file's
framing; a safetensors header's key names and shapes against the model's VAE config when that is known without
loading; a folder's config); :func:`load_vae` replaces the loaded model's VAE. Each problem is a
:class:`~pti_plugin.config.ConfigError` naming the key ``vae`` and the file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from .family import read_json
from .model_checks import _WEIGHT_FILES, _check_weights_file, file_kind
from .single_file import _VAE_PREFIXES, PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, _describe_missing, read_checkpoint

logger = logging.getLogger(__name__)

#: The preset key this module reads.
VAE_KEY = "vae"
#: Keys only the original (LDM) layout and only diffusers' layout have.
_LDM_MARKERS = ("encoder.down.", "decoder.up.")
_DIFFUSERS_MARKERS = ("encoder.down_blocks.", "decoder.up_blocks.")
#: Settings of a VAE config that describe the model's latent space (or tiling), not the weights' architecture:
#: the model's are kept.
_LATENT_SETTINGS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "sample_size")
_LAYOUTS = ("expected VAE weights: encoder.*/decoder.* keys in the original layout (encoder.down.0.block.0.conv1.weight) "
            "or diffusers' (encoder.down_blocks.0.resnets.0.conv1.weight), optionally under first_stage_model.")


def _error(tail: str) -> ConfigError:
    return ConfigError.at(VAE_KEY, f": {tail}")


def vae_source(path: Path) -> tuple[Path, dict | None]:
    """The weights file that ``path`` (a file or a diffusers folder) names, and the folder's VAE config (None for a
    single file)."""
    if path.is_file():
        if path.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
            raise _error(f"{path}: unknown file type {path.suffix!r}; expected a .safetensors file, a .ckpt/.pt/.pth/.bin "
                         "file, or a diffusers VAE folder")
        return path, None
    folder = next((f for f in (path, path / "vae") if (f / "config.json").is_file()), None)
    if folder is None:
        raise _error(f"{path}: no config.json there nor in {path / 'vae'}: expected a VAE file or a diffusers VAE folder "
                     "(an AutoencoderKL folder, or a model folder with vae/)")
    try:
        config = read_json(folder / "config.json")
        if config.get("_class_name") != "AutoencoderKL":
            raise ConfigError(f"{folder / 'config.json'} describes {config.get('_class_name') or 'no class'}, "
                              "not a VAE (AutoencoderKL)")
        _check_weights_file(folder)
    except ConfigError as exc:
        raise _error(str(exc)) from None
    weights = next((folder / name for name in _WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise _error(f"{folder}: its weights are sharded (*.index.json); a VAE is read from one weights file")
    return weights, config


def empty_vae(config: Mapping) -> nn.Module:
    """An ``AutoencoderKL`` of ``config`` on the meta device (no memory): its config and tensor shapes."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights():
        return AutoencoderKL.from_config(dict(config))


def _architecture(module: nn.Module) -> dict:
    """``module``'s config less the latent settings and private entries (lists for tuples, as JSON reads them)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in module.config.items()
            if not k.startswith("_") and k not in _LATENT_SETTINGS}


def architecture_problem(own: Mapping, model: nn.Module) -> str | None:
    """Why a VAE folder's ``config.json`` (``own``) is not the architecture of ``model`` (the model's VAE, or its
    :func:`empty_vae`), else None."""
    mine, theirs = _architecture(empty_vae(own)), _architecture(model)
    differ = [k for k in sorted(mine.keys() | theirs.keys()) if mine.get(k) != theirs.get(k)]
    if not differ:
        return None
    shown = "; ".join(f"{k} {mine.get(k)!r} here, {theirs.get(k)!r} in the model's" for k in differ[:3])
    return f"its config.json describes another VAE architecture than the model's ({shown})"


def vae_tensors(state: Mapping[str, torch.Tensor], model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The VAE tensors of ``state`` (read from ``path``) under diffusers' names for ``model`` (a VAE of the target
    architecture, its config used by the conversion); empty when ``state`` holds no VAE."""
    prefix = next((p for p in _VAE_PREFIXES if any(k.startswith(p) for k in state)), "")
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(k.startswith(_LDM_MARKERS) for k in own):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        try:
            own = convert_ldm_vae_checkpoint(own, model.config)
        except Exception as exc:  # noqa: BLE001 - a malformed file's conversion failure names the file
            raise _error(f"{path}: its original-layout VAE keys cannot be converted ({type(exc).__name__}: {exc})") from None
    elif not any(k.startswith(_DIFFUSERS_MARKERS) for k in own):
        return {}
    # query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0 (diffusers' names before 0.14); renamed in place
    fix = getattr(model, "_fix_state_dict_keys_on_load", None) or model._convert_deprecated_attention_blocks
    fix(own)
    return own


def not_a_vae(path: Path, keys: list[str]) -> str:
    """Why the file ``path`` with tensor names ``keys`` (none of a VAE) is not one."""
    if any(k.startswith("model.diffusion_model.") for k in keys):
        what = "a UNet's weights (model.diffusion_model.* keys)"
    else:
        kind = file_kind(keys)
        what = kind.partition(", not")[0] if kind else f"{len(keys)} tensors such as {keys[0]!r}" if keys else "no tensors"
    return f"{path}: not a VAE: it holds {what}; {_LAYOUTS}"


def shape_problem(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    """Why the VAE ``tensors`` do not fit the model's VAE (its state dict ``expected``): other shapes (another
    architecture: the latent channels named when they differ), tensors missing; else None."""
    wrong = [k for k, t in expected.items() if k in tensors and tuple(tensors[k].shape) != tuple(t.shape)]
    if wrong:
        channels, key = "", "decoder.conv_in.weight"  # [width, latent channels, 3, 3]
        if key in tensors and key in expected and tensors[key].shape[1:2] != expected[key].shape[1:2]:
            channels = f" (its latents have {tensors[key].shape[1]} channels, the model's {expected[key].shape[1]})"
        shown = "; ".join(f"{k}: file {list(tensors[k].shape)}, model {list(expected[k].shape)}" for k in wrong[:3])
        return (f"a VAE of another architecture than the model's{channels}: {len(wrong)} tensors have other shapes, "
                f"e.g. {shown}")
    missing = sorted(set(expected) - set(tensors))
    return _describe_missing("VAE", missing) + " for the model's VAE" if missing else None


def _header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors a safetensors file's header declares, as meta tensors of their shapes (nothing read)."""
    from ..safe_load import check_safetensors

    header = check_safetensors(path)
    return {k: torch.empty(v["shape"], device="meta") for k, v in header.items() if k != "__metadata__"}


def _read_state(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``weights`` (``single_file.read_checkpoint``); of a whole ``.safetensors`` checkpoint, only its
    VAE's (``first_stage_model.*``), so the UNet and text encoders are never read into memory (nor, under
    ``disable_mmap_load_safetensors``, read at all: ``safe_load.load_safetensors`` reads only those tensors)."""
    if weights.suffix.lower() in SAFETENSORS_SUFFIXES:
        keys = list(_header_tensors(weights))
        prefix = next((p for p in _VAE_PREFIXES if any(k.startswith(p) for k in keys)), None)
        if prefix is not None and not all(k.startswith(prefix) for k in keys):
            from ..safe_load import load_safetensors

            return load_safetensors(weights, [k for k in keys if k.startswith(prefix)])
    return read_checkpoint(weights)


def check_vae_source(value: str, model_vae_config: Path | None) -> None:
    """The start-time check of ``vae = value`` (see the module docstring); ``model_vae_config``: the ``config.json``
    of the model's VAE when it is known without loading anything (its shapes are then checked), else None."""
    from ..safe_load import check_pytorch_framing

    path = Path(value).expanduser()
    weights, own = vae_source(path)
    model = None
    if model_vae_config is not None:
        try:
            model = empty_vae(read_json(model_vae_config))
        except Exception:  # noqa: BLE001 - the model's own checks name a broken config
            model = None
    if own is not None and model is not None and (problem := architecture_problem(own, model)):
        raise _error(f"{path}: {problem}")
    try:
        if weights.suffix.lower() not in SAFETENSORS_SUFFIXES:
            check_pytorch_framing(weights)  # its keys are read when the model loads
            return
        tensors = _header_tensors(weights)
    except ValueError as exc:  # BadSafetensorsError, UnreadableFileError
        raise _error(str(exc)) from None
    converted = vae_tensors(tensors, model if model is not None else empty_vae(own or {}), weights)
    if not converted:
        raise _error(not_a_vae(weights, sorted(tensors)))
    if model is not None and (problem := shape_problem(converted, model.state_dict())):
        raise _error(f"{weights}: {problem}")


def load_vae(value: str, model_vae: nn.Module) -> nn.Module:
    """The VAE ``vae = value`` names, in place of ``model_vae`` (the loaded model's): built from ``model_vae``'s
    config with the file's weights (CPU, eval mode, the file's dtype)."""
    path = Path(value).expanduser()
    weights, own = vae_source(path)
    if own is not None:
        if problem := architecture_problem(own, model_vae):
            raise _error(f"{path}: {problem}")
        theirs = model_vae.config.get("scaling_factor")
        if own.get("scaling_factor", theirs) != theirs:
            logger.warning("vae %s: its config's scaling_factor %s differs from the model's %s (a VAE for another "
                           "model family?); the model's is used, as kohya does", path, own["scaling_factor"], theirs)
    try:
        state = _read_state(weights)
    except ValueError as exc:  # its ConfigError, UnsafeFileError, UnreadableFileError, BadSafetensorsError
        raise _error(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any reader failure names the file
        raise _error(f"{weights}: cannot be read ({type(exc).__name__}: {exc})") from None
    vae = empty_vae(model_vae.config)
    tensors = vae_tensors(state, vae, weights)
    if not tensors:
        raise _error(not_a_vae(weights, sorted(state)))
    expected = vae.state_dict()
    if problem := shape_problem(tensors, expected):
        raise _error(f"{weights}: {problem}")
    vae.load_state_dict({k: tensors[k].contiguous() for k in expected}, strict=True, assign=True)
    logger.info("VAE from %s (vae), in place of the model's", weights)
    return vae.eval()
