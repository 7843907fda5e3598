"""The last finite weights: kept before every optimizer step, put back when the step made them NaN/inf.

A step with finite loss and gradients can still overflow the weights (an absurd learning rate, an
optimizer blow-up). ``WeightGuard.keep`` copies the trainable tensors (pivot and LoRA: small) into
reused buffers with one fused copy; ``finite`` answers, as a device tensor (no sync: the caller reads
it with the step's other values), whether the weights are all finite, and ``restore`` copies the kept
values back so that what the NaN guard saves is the state before the failing step.
"""

from __future__ import annotations

import torch


def finite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor on the tensors' device: whether every value of ``tensors`` is finite (no
    device sync; no overflow for large finite values). An empty list is finite."""
    if not tensors:
        return torch.tensor(True)
    with torch.no_grad():
        zeros = torch._foreach_sub(tensors, tensors)  # 0 where finite, NaN at NaN/inf
        return torch.isfinite(torch.stack(torch._foreach_norm(zeros))).all()


class WeightGuard:
    def __init__(self) -> None:
        self._params: list[torch.Tensor] | None = None
        self._kept: list[torch.Tensor] = []

    def keep(self, params: list[torch.Tensor]) -> None:
        """Copy ``params`` (the buffers are reallocated only when the list of parameters changes)."""
        if self._params is not params:
            self._params, self._kept = params, [torch.empty_like(p) for p in params]
        with torch.no_grad():  # the parameters themselves, not a detached view of each (one call, no per-tensor op)
            torch._foreach_copy_(self._kept, params)

    def finite(self) -> torch.Tensor:
        """:func:`finite_flag` of the kept parameters' current values (True before any ``keep``)."""
        return finite_flag(self._params or [])

    def restore(self) -> None:
        """Put the kept values back into the parameters."""
        if self._params is None:
            return
        with torch.no_grad():  # in place into the leaves: allowed without gradient recording
            torch._foreach_copy_(self._params, self._kept)
