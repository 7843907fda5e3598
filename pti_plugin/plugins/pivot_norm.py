"""Pivot norm control (the preset's ``pivot_norm``): keep the pivot vectors near their init word's norm.

``"init"``: after every optimizer step of a stage that trains the pivot, each vector is projected
back to its initial vector's norm. ``"decay"``: the loss gains
``pivot_norm_weight * sum_i (|v_i| - |v0_i|)^2`` (logged as ``loss/pivot_norm/penalty``) while the
pivot trains. ``"free"``: nothing. Active in every run (it reads the top-level keys); it uses only
the plugin contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hooks import Batch, MainPrediction, Plugin, TrainerState


class PivotNorm(Plugin):
    name = "pivot_norm"

    @dataclass
    class Options:
        pass

    def on_stage_start(self, state: TrainerState) -> None:
        self._active = state.config.pivot_norm != "free" and state.plan is not None and state.plan.trains.pivot

    def extra_losses(
        self, state: TrainerState, batch: Batch, main: MainPrediction, rows: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        if not self._active or state.config.pivot_norm != "decay":
            return {}
        return {"penalty": state.config.pivot_norm_weight * sum(p.norm_penalty() for p in state.pivots)}

    def on_step_end(self, state: TrainerState, logs: dict[str, float]) -> None:
        if self._active and state.config.pivot_norm == "init" and not logs.get("skipped_nonfinite"):
            for pivot in state.pivots:
                pivot.renormalise_to_init()
