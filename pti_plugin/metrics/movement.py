"""How far a run moved: the pivot in the text encoder's output space, and the LoRA's weight change.

- :func:`output_space_angles`: the angle, at the pivot's token positions, between the encoder
  output of ``T(tok1)`` (fine-tuned text encoder) and of ``T(class word)`` (base text encoder,
  the class word in the same slots), in two geometries: ``layernorm`` (between the normalised
  pre-LayerNorm states, the exact ellipsoid geometry of docs/method.md, "Where to interpolate, and how") and ``raw`` (between
  the UNet conditionings, about the origin). Mean over the pivot's vectors, in degrees. The
  token-embedding-space distance (input side) is in the training log
  (``pivot_l2_from_init``, ``pivot_angle_from_init_deg``).
- :func:`lora_delta_norm`: ``sqrt(sum_modules |ΔW|_F^2)`` with ``ΔW = (alpha / rank) up @ down``,
  from a kohya LoRA file, in total and for the UNet and text-encoder parts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .prompts import subject_positions, subject_token_ids


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise angle in degrees, ``2 atan2(|â - b̂|, |â + b̂|)`` (accurate near 0)."""
    ua = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    ub = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.rad2deg(2 * torch.atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1)))


@torch.no_grad()
def output_space_angles(run, prompt: str = "{T}") -> dict[str, float]:
    """``{"output_angle_layernorm_deg", "output_angle_raw_deg"}`` (nan when the class word is not one token; the
    layernorm angle nan where the conditioning has no final LayerNorm, e.g. SDXL, whose raw angle is taken on
    both encoders' states side by side)."""
    pivot_prompt = run.prompt(prompt, True)
    class_ids = subject_token_ids(run.tokenizer, run.class_word)
    nan = {"output_angle_layernorm_deg": float("nan"), "output_angle_raw_deg": float("nan")}
    if len(class_ids) != 1:
        return nan
    from .prompts import fill, normalise_prompt

    class_prompt = fill(normalise_prompt(prompt, run.template, run.token), " ".join([run.class_word] * run.num_vectors))
    positions = subject_positions(run.token_positions_ids([pivot_prompt])[0], subject_token_ids(run.tokenizer, run.pivot_text))
    norm = run.final_layer_norm()
    states = {}
    for tuned, text in ((True, pivot_prompt), (False, class_prompt)):
        with run.lora(tuned):
            xhat = None
            if norm is not None:
                pre = run.pre_layernorm_states([text])[0, positions]  # [n, d]
                xhat = torch.nn.functional.layer_norm(pre, pre.shape[-1:], eps=norm.eps)
            cond = run.encode([text])[0, positions].float()
        states[tuned] = (xhat, cond)
    layernorm = float(_angle_deg(states[True][0], states[False][0]).mean()) if norm is not None else float("nan")
    return {
        "output_angle_layernorm_deg": layernorm,
        "output_angle_raw_deg": float(_angle_deg(states[True][1], states[False][1]).mean()),
    }


def lora_delta_norm(path: str | Path) -> dict[str, float]:
    """``{"lora_delta_norm", "lora_delta_norm_unet", "lora_delta_norm_te"}`` of a kohya LoRA file."""
    from ..safe_load import load_safetensors

    tensors = load_safetensors(path)
    squares = {"unet": 0.0, "te": 0.0}
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        prefix = key[: -len(".lora_down.weight")]
        up = tensors[prefix + ".lora_up.weight"].double().flatten(1)  # [out, r]
        down = down.double().flatten(1)  # [r, in]
        rank = down.shape[0]
        alpha = float(tensors[prefix + ".alpha"]) if prefix + ".alpha" in tensors else float(rank)
        # |U D|_F^2 = sum((U^T U) * (D D^T)), without forming the [out, in] product
        square = float(((up.T @ up) * (down @ down.T)).sum()) * (alpha / rank) ** 2
        squares["unet" if prefix.startswith("lora_unet_") else "te"] += max(square, 0.0)
    return {
        "lora_delta_norm": (squares["unet"] + squares["te"]) ** 0.5,
        "lora_delta_norm_unet": squares["unet"] ** 0.5,
        "lora_delta_norm_te": squares["te"] ** 0.5,
    }
