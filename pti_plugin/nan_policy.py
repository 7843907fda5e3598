"""What a run does when a step goes non-finite: the ``nan_policy`` / ``max_nan_skips`` settings.

The trainer reads one flag per optimizer step (:func:`finite_on_every_process`: loss terms and
gradients finite, AND-ed over the processes so every process skips together) and hands a failing
step to :class:`NanPolicy`, which drops the gradients and skips, or raises
:class:`NonFiniteLossError` naming the term, the stage and the step. A step that overflowed the
weights is handled beside the optimizer step (``weight_guard.py``); this module says how to word and
count what went wrong.
"""

from __future__ import annotations

import math

import torch

from .weight_guard import finite_flag


class NonFiniteLossError(RuntimeError):
    """A loss term or gradient went NaN or inf; the message names the step, the stage and the term."""


def on_every_process(flag: torch.Tensor, accelerator) -> torch.Tensor:
    """``flag`` (0-dim bool on the device) AND-ed over the processes (no collective with one process)."""
    if accelerator.num_processes == 1:
        return flag
    return accelerator.reduce(flag.float(), reduction="sum") == accelerator.num_processes


def finite_on_every_process(values: torch.Tensor, trainable: list[torch.Tensor], accelerator,
                            grad_norm: torch.Tensor | None) -> torch.Tensor:
    """Whether a step's loss terms (``values``, ``[terms]``) and gradients are finite on every process:
    a 0-dim bool on the device, not yet read (the caller's read is the step's first device sync).

    ``grad_norm``: the gradients' total norm when the caller has clipped them already; it is non-finite
    when a gradient is (or when the norm overflows float32), so it answers for them without a second
    pass. Without it the gradients get a pass of their own, except under fp16, where the scaler skips
    inf-gradient steps itself."""
    if grad_norm is not None:  # one check over both (a finiteness check is four kernels on a GPU)
        values = torch.cat([values, grad_norm.reshape(1).to(values.device)])
    finite = torch.isfinite(values).all()
    if grad_norm is None and accelerator.scaler is None:
        finite = finite & finite_flag([p.grad for p in trainable if p.grad is not None]).to(finite.device)
    return on_every_process(finite, accelerator)


def optimizer_state_is_finite(optimizer) -> bool:
    """Whether every floating tensor in ``optimizer``'s state (accelerate's wrapper or a plain one) is finite."""
    state = getattr(optimizer, "optimizer", optimizer).state_dict()["state"]
    return all(torch.isfinite(v).all() for s in state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


class NanPolicy:
    """Counts consecutive skipped steps and decides, for a non-finite step, between skipping and stopping.

    ``policy`` is the config's ``nan_policy`` ("stop" or "skip"); ``max_skips`` its ``max_nan_skips``.
    """

    def __init__(self, policy: str, max_skips: int):
        self.policy, self.max_skips = policy, max_skips
        self.consecutive_skips = 0

    def step_was_finite(self) -> None:
        self.consecutive_skips = 0

    def skip_or_stop(self, per_term: dict[str, float], where: str, num_processes: int) -> str:
        """For a step whose loss or gradients are non-finite: the line to log when the step is skipped,
        or ``NonFiniteLossError`` when the policy says stop or the skips have run too long.

        ``per_term`` is this process's loss terms (name -> value); ``where`` reads like
        "at stage 0 ('inversion0'), step 3 (global step 3)"."""
        nonfinite = [name for name, value in per_term.items() if not math.isfinite(value)]
        culprit = f"loss term {nonfinite[0]!r}" if nonfinite else (
            "a gradient" if num_processes == 1 else "a gradient or a loss term on another process")
        message = f"{culprit} is non-finite {where}"
        self.consecutive_skips += 1
        if self.policy == "stop":
            raise NonFiniteLossError(message)
        if self.consecutive_skips > self.max_skips:
            raise NonFiniteLossError(f"{message} ({self.consecutive_skips} consecutive skipped steps)")
        return f"skipping step: {message}"
