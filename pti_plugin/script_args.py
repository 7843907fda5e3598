"""Argument checks shared by the analysis and benchmark scripts.

Every script checks what a user typed in its ``parse_args``, before any model loads, and ends a bad value
with its usage error (``parser.error``: exit 2, the option named). The rules written once here:

- argparse types: :func:`int_at_least` (``positive_int``: whole numbers >= 1), :func:`finite_float` and
  :func:`finite_float_at_least` (NaN and inf refused), :func:`device` (a torch device this machine has);
- comma-separated lists: :func:`number_list` and :func:`positive_finite` (learning rates and weights);
- :func:`out_folder_problem` / :func:`check_out_folder`: an output folder that exists as a file, or lies
  under a file, or whose nearest existing parent cannot be written;
- :func:`argument_parser`: every script's parser, which takes a flag only as typed in full and whose ``--help``
  shows each option's default (:class:`DefaultsHelpFormatter`);
- :func:`sd15_folder_problem`: a ``--model`` of the toy-world scripts (SD1.x diffusers folders only; with the
  toy world's image size, toy-world models only);
- :func:`flag_message`: a loader's :class:`~pti_plugin.config.ConfigError` about a preset key, naming the
  script's flag instead (``--model`` for ``pretrained_model_name_or_path``).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with ``(default: ...)`` after an option's help, except where the help already says its
    default or there is none to show (None, an off flag, an empty value)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if ("default" in (action.help or "").lower() or default is None or default is False
                or (isinstance(default, (str, list, tuple)) and not default)):
            return action.help
        return super()._get_help_string(action)


def argument_parser(description: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """A script's parser. A flag is taken only as typed in full: argparse's default reads a prefix as the one
    flag it begins, so another script's flag or a slip was taken silently as something else (``--gpus 2`` as
    the bench's ``--gpus_per_run 2``); now it is an unrecognised argument (exit 2, the flag named). ``--help``
    shows every option's default (:class:`DefaultsHelpFormatter`)."""
    kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
    return argparse.ArgumentParser(description=description, allow_abbrev=False, **kwargs)


def int_at_least(minimum: int, why: str = ""):
    """An argparse type: a whole number >= ``minimum`` (argparse names the option in its error; ``why``, the
    reason for the minimum, is added to it in brackets)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}" + (f" ({why})" if why else ""))
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


#: An argparse type: a whole number >= 1 (steps, seeds, draws, ranks, repeats).
positive_int = int_at_least(1)


def finite_float(text: str) -> float:
    """An argparse type: a finite number (``nan`` and ``inf``, which ``float`` reads, are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def finite_float_at_least(minimum: float):
    """An argparse type: a finite number >= ``minimum``."""

    def parse(text: str) -> float:
        value = finite_float(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text!r}")
        return value

    parse.__name__ = f"finite_float_at_least_{minimum:g}"
    return parse


def number_list(text: str, cast=float) -> tuple:
    """``text``'s comma-separated values as ``cast`` (float or int). Raises ValueError saying what is wrong, for
    the caller to name its option: a value ``cast`` does not read, or no value at all."""
    try:
        values = tuple(cast(v) for v in text.split(",") if v.strip())
    except ValueError:
        kind = "integers" if cast is int else "numbers"
        raise ValueError(f"expected comma-separated {kind}, got {text!r}") from None
    if not values:
        raise ValueError(f"expected at least one value, got {text!r}")
    return values


def positive_finite(values: tuple[float, ...]) -> tuple[float, ...]:
    """``values`` when each is a positive finite number (learning rates, loss weights; NaN fails), else ValueError."""
    if bad := [v for v in values if not 0 < v < math.inf]:
        raise ValueError(f"expected positive finite numbers, got {', '.join(map(str, bad))}")
    return values


def device_problem(text: str) -> str | None:
    """Why ``text`` is not a torch device this machine can use (unknown name, no CUDA, no such GPU), else None."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        return f"not a torch device ({text!r}; expected cpu, cuda, cuda:N or mps)"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return f"{text!r}, but CUDA is not available on this machine (torch.cuda.is_available() is False); use cpu"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"{text!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        return f"{text!r}, but MPS is not available on this machine; use cpu"
    elif parsed.type not in ("cpu", "cuda", "mps"):
        return f"{text!r}: only cpu, cuda and mps devices are supported"
    return None


def device(text: str) -> str:
    """An argparse type for ``--device``: ``text`` unchanged when :func:`device_problem` finds nothing."""
    if problem := device_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return text


def out_folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a script's output folder (for its usage error naming the option), else None:
    it exists and is not a folder, or the nearest of its parents that exists is a file or cannot be written."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return "exists and is not a folder"
    from .input_checks import nearest_existing

    existing = nearest_existing(path)
    if not existing.is_dir():
        return f"cannot be created: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written: {existing} is not writable"
    return None


def check_out_folder(parser: argparse.ArgumentParser, path: Path | None, flag: str = "--out") -> None:
    """``parser.error`` naming ``flag`` and ``path`` when :func:`out_folder_problem` finds one (None: not given)."""
    if path is not None and (problem := out_folder_problem(path)):
        parser.error(f"{flag} {path}: {problem}")


def sd15_folder_problem(path: Path, image_size: int | None = None) -> str | None:
    """Why ``path`` is not an SD1.x diffusers model folder, else None: :func:`model_folder_problem`'s reasons, or
    another family's folder (an SDXL one). The toy-world scripts generate with SD1.x's pipeline: an SDXL
    folder failed there in the UNet's first call, after the model had loaded. With ``image_size`` (the toy world's
    scenes, which its detectors read), a model whose pipeline makes images of another size is refused too: a real
    SD1.5 model drew 512 px images for hours, which the detectors then misread (or a toy prompt word was refused
    with a traceback). Reads JSON files only."""
    from .models.family import detect_family
    from .models.model_checks import FAMILY_NAMES, model_folder_problem

    if problem := model_folder_problem(path):
        return problem
    family, why = detect_family(Path(path))
    if family != "sd15":
        return (f"an {FAMILY_NAMES.get(family, family)} model ({why}); this script generates with the SD1.x "
                "pipeline: pass an SD1.x diffusers folder")
    size = None if image_size is None else native_image_size(Path(path))
    if size is not None and size != image_size:
        return (f"a model whose images are {size} px, not a toy-world model; this script measures with the toy "
                f"world's detectors, which read its {image_size} px scenes: pass a toy-world model (the default, or "
                "one `python -m pti_plugin.toy_world.train_recipe` exported). On your own model, the analysis "
                "commands are analysis/ellipsoid_check.py --model and analysis/position_leakage.py --run")
    return None


def native_image_size(folder: Path) -> int | None:
    """The image size a diffusers SD1.x folder's pipeline generates by default (the UNet's ``sample_size`` times the
    VAE's downsampling, ``2 ** (len(block_out_channels) - 1)``, as diffusers' pipeline), read from the two
    ``config.json`` files; None when they do not say."""
    import json

    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        sample, levels = unet["sample_size"], len(vae["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * 2 ** (levels - 1) if isinstance(sample, int) else None


def flag_message(error: Exception, flags: dict[str, str]) -> str:
    """``error``'s message, naming the script's flag where it names a preset key the flag sets (``flags``: key ->
    flag, e.g. ``{"pretrained_model_name_or_path": "--model"}``): ``--model: <path>: <what is wrong>``."""
    key, tail = getattr(error, "key", None), getattr(error, "tail", None)
    if key in flags and tail is not None:
        return flags[key] + tail
    return str(error)
