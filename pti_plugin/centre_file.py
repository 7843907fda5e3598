"""The centre file: per-token-position empirical centres of a text encoder's outputs.

Written by ``analysis/ellipsoid_check.py`` (:mod:`pti_plugin.ellipsoid`), read by the
pivot-locality plugin's ``centered`` geometry (``centre_file`` option). One safetensors file:

tensors
    ``centre``           ``[L, d]`` (``L`` = 77 for SD1.x) the empirical centre of the UNet
                         conditioning at each token position (see ``metadata["centre_definition"]``);
    ``layernorm_gamma``  ``[d]`` the final LayerNorm's weight (γ);
    ``layernorm_beta``   ``[d]`` the final LayerNorm's bias (β); a family whose conditioning has no
                         final LayerNorm (SDXL) stores γ = 1 and β = 0 and ``metadata["layernorm"]``
                         false, and its ``centre`` is that of the concatenated states ``[77, d1 + d2]``
                         (``metadata["encoders"]`` lists each encoder's name and width, in order);
    optional extras      any further named tensors (the ellipsoid check adds ``centre_all_tokens``
                         ``[L, d]``, ``eos_centre`` ``[d]`` and ``word_count`` ``[L]``).

metadata (safetensors' string header)
    ``pti_centre_format`` = ``"1"``, and every key of the ``metadata`` dict given to
    :func:`save_centre_file`, each value stored as JSON text (so numbers, lists and dicts survive
    the round trip). The ellipsoid check records the model identity (path and a short hash of the
    text-encoder weights), ``clip_skip``, the prompt set's name, size and hash, and the token-index
    conventions.

Every write is atomic (:func:`pti_plugin.atomic_io.save_safetensors_atomic`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic_io import save_safetensors_atomic
from .text_files import path_not_found

#: Metadata key marking a centre file, and its format version.
FORMAT_KEY = "pti_centre_format"
FORMAT_VERSION = "1"
#: The tensors every centre file holds.
REQUIRED_KEYS = ("centre", "layernorm_gamma", "layernorm_beta")


class CentreFileError(ValueError):
    """A centre file is missing, malformed, or does not fit the model it is used with."""


@dataclass
class CentreFile:
    """A loaded centre file.

    centre: ``[L, d]``; gamma, beta: ``[d]``; metadata: the dict given at save time (JSON values
    decoded); extra: any further tensors of the file; path: where it was read from.
    """

    centre: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    metadata: dict
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None

    @property
    def dim(self) -> int:
        return int(self.centre.shape[-1])

    @property
    def num_positions(self) -> int:
        return int(self.centre.shape[0])

    def origin(self) -> str:
        """Where the centres come from, for a run's start-up lines: ``file <path> (measured on <model>, clip_skip <n>,
        <size> sentences: <prompt set>)``, from what the metadata records (the ellipsoid check records all three)."""
        model, prompts = self.metadata.get("model"), self.metadata.get("prompt_set")
        said = [f"measured on {model['path']}"] if isinstance(model, dict) and model.get("path") else []
        said += [f"clip_skip {self.metadata['clip_skip']}"] if "clip_skip" in self.metadata else []
        if isinstance(prompts, dict) and prompts.get("size"):
            said.append(f"{prompts['size']} sentences: {prompts.get('name', '?')}")
        where = self.path.resolve() if self.path is not None else "(in memory)"
        return f"file {where} ({', '.join(said) if said else 'its metadata records no model or sentences'})"


def save_centre_file(
    path: str | os.PathLike,
    centre: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    metadata: dict,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a centre file atomically and return its path.

    centre ``[L, d]``, gamma ``[d]``, beta ``[d]`` are stored as given (dtype kept); ``metadata``
    values must be JSON-serialisable; ``extra_tensors`` (optional) adds named tensors, which may not
    reuse the three required names.
    """
    path = Path(path)
    centre, gamma, beta = (torch.as_tensor(t).detach().cpu() for t in (centre, gamma, beta))
    _check_shapes(path, centre, gamma, beta)
    if FORMAT_KEY in metadata:
        raise CentreFileError(f"centre file {path}: metadata key {FORMAT_KEY!r} is reserved")
    header = {str(k): json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    header[FORMAT_KEY] = FORMAT_VERSION
    tensors = {"centre": centre, "layernorm_gamma": gamma, "layernorm_beta": beta}
    for key, value in (extra_tensors or {}).items():
        if key in tensors:
            raise CentreFileError(f"centre file {path}: extra tensor {key!r} clashes with a required key")
        tensors[key] = torch.as_tensor(value).detach().cpu()
    save_safetensors_atomic(path, tensors, header)
    return path


def load_centre_file(path: str | os.PathLike, expected_dim: int | None = None) -> CentreFile:
    """Read a centre file; ``expected_dim`` (the text encoder's width) is checked when given.

    Raises :class:`CentreFileError` naming the file when it is missing, lacks a required tensor,
    has inconsistent shapes, or has the wrong width.
    """
    from safetensors import safe_open

    from .safe_load import check_safetensors

    given, path = path, Path(path).expanduser()
    if not path.is_file():
        raise CentreFileError(path_not_found(given, "centre file"))
    try:
        check_safetensors(path)  # the project's one framing check (extents, dtype x shape)
        with safe_open(str(path), framework="pt") as handle:
            header = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # not a safetensors file, truncated, ...
        raise CentreFileError(f"centre file {path}: cannot be read as safetensors ({exc})") from exc
    missing = [k for k in REQUIRED_KEYS if k not in tensors]
    if missing:
        raise CentreFileError(
            f"centre file {path}: missing tensor(s) {missing}; found {sorted(tensors)} "
            f"(a centre file holds {list(REQUIRED_KEYS)})"
        )
    centre, gamma, beta = (tensors.pop(k) for k in REQUIRED_KEYS)
    _check_shapes(path, centre, gamma, beta)
    if expected_dim is not None and centre.shape[-1] != expected_dim:
        raise CentreFileError(
            f"centre file {path}: width {centre.shape[-1]} does not match the text encoder's width "
            f"{expected_dim} (it was made for another model)"
        )
    header.pop(FORMAT_KEY, None)
    metadata = {}
    for key, text in header.items():
        try:
            metadata[key] = json.loads(text)
        except json.JSONDecodeError:
            metadata[key] = text  # a header written by another tool: keep the raw string
    return CentreFile(centre, gamma, beta, metadata, tensors, path)


def _check_shapes(path: Path, centre: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    if centre.dim() != 2:
        raise CentreFileError(f"centre file {path}: 'centre' must be [positions, width], got {list(centre.shape)}")
    d = centre.shape[1]
    for name, t in (("layernorm_gamma", gamma), ("layernorm_beta", beta)):
        if t.shape != (d,):
            raise CentreFileError(
                f"centre file {path}: {name!r} has shape {list(t.shape)}; expected [{d}] (the centre's width)"
            )
