"""A third-party plugin written against the documented plugin contract only (``pti_plugin.hooks``).

``prior_agreement``: in lora stages, for each sample of the micro-batch, one extra UNet row (fixed
Gaussian latents and timestep drawn from (seed, global step, slot)) conditioned on the class prompt
through the trained text encoders (``state.encode(..., pivot_grad=False)``), and the loss
``weight * mse(prediction, frozen prediction)`` where the frozen prediction is the base model's
(``state.frozen()``). It touches the model only through ``state.tokenize``, ``state.encode``,
``state.unet`` and ``state.frozen``, logs through ``state.logs`` and ``state.info``, and saves its
settings through ``on_before_save``. It is installed through the entry-point group by the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pti_plugin.hooks import Batch, MainPrediction, Plugin, TrainerState, UNetRows


class PriorAgreement(Plugin):
    name = "prior_agreement"

    @dataclass
    class Options:
        weight: float = 1.0
        prompt: str = "an anime illustration of character"

    def on_setup(self, state: TrainerState) -> None:
        self.ids = state.tokenize([self.options.prompt]).to(state.device)  # [1, L]
        state.info(f"prior_agreement: weight {self.options.weight:g} on {self.options.prompt!r}")

    def extra_rows(self, state: TrainerState, batch: Batch) -> UNetRows | None:
        self._rows = None
        if state.stage is None or state.stage.kind != "lora":
            return None
        noisy, timesteps = [], []
        for slot in batch.slots:  # one row per sample: the same rows whatever the number of processes
            generator = torch.Generator().manual_seed(state.config.seed * 100_003 + state.global_step * 1_009 + slot)
            noisy.append(torch.randn(batch.latents.shape[1:], generator=generator))
            timesteps.append(torch.randint(state.num_train_timesteps, (), generator=generator))
        noisy_t, t = torch.stack(noisy).to(state.device), torch.stack(timesteps).to(state.device)
        ids = self.ids.expand(len(batch.slots), -1)
        self._rows = (noisy_t, t, ids)
        return UNetRows(noisy_t, t, state.encode(ids, pivot_grad=False))

    def extra_losses(
        self, state: TrainerState, batch: Batch, main: MainPrediction, rows: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        if rows is None or self._rows is None:
            return {}
        noisy, t, ids = self._rows
        with state.frozen():
            target = state.unet(noisy, t, state.encode(ids, lora=False))
        return {"mse": self.options.weight * F.mse_loss(rows.float(), target.float())}

    def on_step_end(self, state: TrainerState, logs: dict[str, float]) -> None:
        state.logs["prior_agreement/stage_step"] = float(state.stage_step)

    def on_before_save(self, state: TrainerState, files: dict) -> None:
        files["metadata"]["pti_prior_agreement"] = json.dumps({"weight": self.options.weight, "prompt": self.options.prompt})
