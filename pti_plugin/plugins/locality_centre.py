"""The centre of pivot locality's ``centered`` geometry and centred angle: per token position, [77, d].

Either read from a centre file (the one ``analysis/ellipsoid_check.py`` writes, format in
``pti_plugin/centre_file.py``), checked against this model (width, token positions, clip_skip, final
LayerNorm gamma/beta), or estimated as the mean encoder output (LoRA off) over :data:`CENTRE_PROMPTS`.
"""

from __future__ import annotations

import dataclasses

import torch

from ..centre_file import CentreFile, CentreFileError, load_centre_file
from ..hooks import TrainerState


class CentreMismatch(ValueError):
    """The centre file cannot serve this model (the message names the file and what differs)."""


#: Prompts whose mean encoder output (per token position) is the centre when no centre_file is given.
CENTRE_PROMPTS = (
    "a photo of a cat",
    "an anime illustration of a girl with red hair",
    "a boy standing in the snow",
    "a city at night",
    "a picture of a dog on the beach",
    "a painting of a forest in autumn with a small river",
    "portrait of an old man",
    "a girl sitting on a chair in a white room",
    "a red car",
    "a bowl of fruit on a wooden table next to a window",
    "an anime illustration of a character",
    "a person with blue hair and a black coat standing in the rain",
    "a mountain landscape",
    "the ocean",
    "two children playing with a ball in a green park on a sunny day",
    "a castle on a hill",
    "a close-up photo of a yellow flower",
    "a knight in armour holding a sword",
    "a watercolor of a small house",
    "an illustration of a robot in a futuristic city with neon lights",
    "a solo girl",
    "a black and white photo of a street",
    "a cartoon of a fox",
    "a cup of coffee",
)


def load_centre(state: TrainerState, centre_file: str, pivot_ids: torch.Tensor,
                final_layer_norm: torch.nn.LayerNorm | None) -> CentreFile:
    """The centre file, its ``centre`` ([positions, d]) float32 on the device, after checking it was made for this
    model: ``pivot_ids`` [P, positions] (or [P, encoders, positions]) are the prompts it will centre."""
    positions = pivot_ids.shape[-1]
    with state.frozen():
        d = state.encode(pivot_ids[:1].to(state.device), lora=False).hidden_states.shape[-1]
    try:
        loaded = load_centre_file(centre_file, expected_dim=d)
    except CentreFileError as exc:
        raise CentreMismatch(f"centre_file: {exc}") from exc
    if loaded.num_positions != positions:
        raise CentreMismatch(f"centre_file {centre_file}: {loaded.num_positions} token positions, the prompts have {positions}")
    skip = loaded.metadata.get("clip_skip")
    if skip is not None and int(skip) != state.clip_skip:
        raise CentreMismatch(f"centre_file {centre_file} was measured with clip_skip = {skip}; this run uses "
                             f"clip_skip = {state.clip_skip} (re-run analysis/ellipsoid_check.py with it)")
    if final_layer_norm is not None:
        gamma = final_layer_norm.weight.detach().float().cpu()
        beta = final_layer_norm.bias.detach().float().cpu()
        if not (torch.allclose(loaded.gamma.float(), gamma, rtol=1e-3, atol=1e-3)
                and torch.allclose(loaded.beta.float(), beta, rtol=1e-3, atol=1e-3)):
            raise CentreMismatch(f"centre_file {centre_file}: its final-LayerNorm gamma/beta differ from this text "
                                 "encoder's: it was made for another model")
    return dataclasses.replace(loaded, centre=loaded.centre.float().to(state.device))


@torch.no_grad()
def estimate_centre(state: TrainerState) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean encoder output (LoRA off) over :data:`CENTRE_PROMPTS`, per token position: [77, d] float32; and the
    pooled embedding's centre (SDXL: the mean pooled output [d_pool]), None where there is no pooled embedding."""
    ids = state.tokenize(list(CENTRE_PROMPTS)).to(state.device)
    with state.frozen():
        cond = state.encode(ids, lora=False)
    pooled = cond.added_cond_kwargs.get("text_embeds")
    return cond.hidden_states.float().mean(dim=0), None if pooled is None else pooled.float().mean(dim=0)
