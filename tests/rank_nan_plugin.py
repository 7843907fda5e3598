"""A test plugin for two-process runs: a NaN loss term on the second process only, at one global step.

``rank_nan``: at global step ``at_step`` (1-based) the process with index 1 adds a NaN term; every
process records its pivot after each step in ``<output_dir>/pivots-rank<i>.pt`` (the test reads them).
Installed through the entry-point group by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pti_plugin.hooks import Plugin


class RankNan(Plugin):
    name = "rank_nan"

    @dataclass
    class Options:
        at_step: int = 2

    def on_setup(self, state) -> None:
        self.pivots: list[torch.Tensor] = []

    def extra_losses(self, state, batch, main, rows):
        if state.accelerator.process_index == 1 and state.global_step + 1 == self.options.at_step:
            return {"bad": torch.tensor(float("nan"), device=state.device)}
        return {}

    def on_step_end(self, state, logs) -> None:
        self.pivots.append(state.pivot.vectors.detach().cpu().clone())
        torch.save(self.pivots, state.output_dir / f"pivots-rank{state.accelerator.process_index}.pt")
