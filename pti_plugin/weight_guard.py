"""The last finite weights: kept before every optimizer step, put back when the step made them NaN/inf.

A step with finite loss and gradients can still overflow the weights (an absurd learning rate, an
optimizer blow-up). ``WeightGuard.keep`` copies the trainable tensors (pivot and LoRA: small) into
reused buffers with one fused copy; ``restore_if_non_finite`` checks them with one device sync and,
when any is non-finite, copies the kept values back so that what the NaN guard saves is the state
before the failing step.
"""

from __future__ import annotations

import torch


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite (one device sync; no overflow for large finite values)."""
    if not tensors:
        return True
    with torch.no_grad():
        zeros = torch._foreach_sub(tensors, tensors)  # 0 where finite, NaN at NaN/inf
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(zeros))).all())


class WeightGuard:
    def __init__(self) -> None:
        self._params: list[torch.Tensor] | None = None
        self._kept: list[torch.Tensor] = []

    def keep(self, params: list[torch.Tensor]) -> None:
        """Copy ``params`` (the buffers are reallocated only when the list of parameters changes)."""
        if self._params is not params:
            self._params, self._kept = params, [torch.empty_like(p) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(self._kept, [p.detach() for p in params])

    def restore_if_non_finite(self) -> bool:
        """Put the kept values back when any parameter is non-finite; return whether it did."""
        if self._params is None or all_finite(self._params):
            return False
        with torch.no_grad():
            torch._foreach_copy_([p.detach() for p in self._params], self._kept)
        return True
