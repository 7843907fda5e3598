"""kohya's LoRA regularisation (``networks/lora.py``): ``network_dropout``, the ``rank_dropout`` and
``module_dropout`` network arguments, and ``scale_weight_norms`` (max-norm).

The dropouts act on each LoRA module's down-projection output (peft's ``lora_A``) in a training step only, as
kohya's ``LoRAModule.forward`` in training mode: ``module_dropout`` leaves the module out of the forward with that
probability (its output is the base layer's); ``network_dropout`` is ``F.dropout`` on the down output;
``rank_dropout`` zeroes whole ranks per sample and scales the update by ``1 / (1 - p)``. peft's ``lora_dropout``
(on the input) stays 0. The masks come from torch's global generator, as kohya's, but seeded per micro-batch from
(seed, stage, step, first sample slot) inside a fork of its state: a resumed run draws the same masks, gradient
checkpointing's recomputation (which restores the global state) too, and nothing outside the step sees the seeding.
Sampling, validation, the pivot-locality plugin's frozen pass (LoRA off) and the saved weights are untouched.

``scale_weight_norms``: after each optimizer step of a stage that trains a LoRA, kohya's
``apply_max_norm_regularization`` on the modules that train, logged with kohya's keys (:data:`MAX_NORM_LOGS`). The clamp
acts at every step, as kohya's; its three values stay on the device until a step the log writes reads them (kohya
logs every step; here the log writes every ``log_every_n_steps``-th step, a stage's last and a validating one), so the
steps in between wait on no read-back.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .config import Config, ConfigError, network_args
from .data.sample_order import sample_generator

# .models.lora (peft: seconds to import) is imported where a LoRA is at hand: the config check runs in processes
# that train none (a sweep's planning)

logger = logging.getLogger(__name__)

#: The part of the masks' seed that tells them from the step's other draws.
MASK_DRAWS = 0xD209
#: kohya's tracker keys for ``scale_weight_norms`` (``train_network.py`` ``generate_step_logs``).
MAX_NORM_LOGS = ("max_norm/keys_scaled", "norm/avg_key_norm", "max_norm/max_key_norm")


def check_lora_regularisation(config: Config) -> None:
    """``network_dropout`` in [0, 1), ``scale_weight_norms`` > 0 (``rank_dropout``/``module_dropout``: see
    ``config.network_args``), and no such key in a run without a lora stage (nothing they would act on)."""
    if config.network_dropout is not None and not 0 <= config.network_dropout < 1:
        raise ConfigError.at("network_dropout", f" must be in [0, 1) (a dropout probability), got "
                                                f"{config.network_dropout!r}")
    if config.scale_weight_norms is not None and not 0 < config.scale_weight_norms < math.inf:
        raise ConfigError.at("scale_weight_norms", f" must be a finite number > 0 (unset: no max-norm), got "
                                                   f"{config.scale_weight_norms!r}")
    given = [k for k in ("network_dropout", "scale_weight_norms") if getattr(config, k) is not None]
    given += [f"network_args {k}" for k in ("rank_dropout", "module_dropout") if k in network_args(config)]
    if given and not any(stage.kind == "lora" for stage in config.stages):
        raise ConfigError(f"preset: {', '.join(given)} regularise the LoRA, but no stage is a lora stage (the LoRA "
                          "never trains): remove them or add a lora stage")


class LoraDropout:
    """kohya's three LoRA dropouts as forward hooks on the ``lora_A`` modules of ``modules``; active only inside
    :meth:`step` and on modules in training mode (validation's eval mode turns them off)."""

    def __init__(self, modules: list[torch.nn.Module], dropout: float | None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        self.dropout, self.rank_dropout, self.module_dropout = (dropout or None, rank_dropout or None,
                                                                module_dropout or None)  # 0: off, as None
        from .models.lora import ADAPTER_NAME, lora_layers

        self._active = False
        self._downs = [layer.lora_A[ADAPTER_NAME] for module in modules for layer in lora_layers(module)
                       if ADAPTER_NAME in getattr(layer, "lora_A", {})]
        if self.dropout or self.rank_dropout or self.module_dropout:
            for down in self._downs:
                down.register_forward_hook(self._after_down)

    @property
    def enabled(self) -> bool:
        return bool(self._downs) and bool(self.dropout or self.rank_dropout or self.module_dropout)

    @contextlib.contextmanager
    def step(self, seed: int) -> Iterator[None]:
        """The dropouts on, with torch's global generators (CPU, and the LoRA's device) seeded by ``seed`` inside
        the block and restored after it; nothing when no dropout is set."""
        if not self.enabled:
            yield
            return
        device = self._downs[0].weight.device
        devices = [] if device.type == "cpu" else [device.index or 0]
        with torch.random.fork_rng(devices=devices, device_type="cuda" if device.type == "cpu" else device.type):
            torch.manual_seed(seed)
            self._active = True
            try:
                yield
            finally:
                self._active = False

    def _after_down(self, down: torch.nn.Module, args: tuple, lx: torch.Tensor) -> torch.Tensor | None:
        """kohya's ``LoRAModule.forward`` between ``lora_down`` and ``lora_up``: ``lx`` is the down output,
        [b, r] or [b, tokens, r] (linear), [b, r, h, w] (convolution)."""
        if not self._active or not down.training:
            return None
        if self.module_dropout is not None and torch.rand(1) < self.module_dropout:  # kohya: a CPU draw
            # the module's update is zero (its gradients too: zeros, where kohya's are None; DDP needs them)
            return lx.masked_fill(torch.ones((), dtype=torch.bool, device=lx.device), 0.0)
        if self.dropout is not None:
            lx = F.dropout(lx, p=self.dropout)
        if self.rank_dropout is not None:
            mask = torch.rand((lx.size(0), down.weight.shape[0]), device=lx.device) > self.rank_dropout
            mask = mask.unsqueeze(1) if lx.dim() == 3 else mask[..., None, None] if lx.dim() == 4 else mask
            lx = lx * mask * (1.0 / (1.0 - self.rank_dropout))  # kohya scales the update: "as if the rank changed"
        return lx


@torch.no_grad()
def apply_max_norm(layers: list, max_norm: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kohya's ``apply_max_norm_regularization`` on the peft LoRA ``layers``: each module's update ``up @ down`` (a
    3x3 down: ``down`` convolved with ``up``) times ``alpha / rank``, whose norm is clamped at ``max_norm`` by scaling
    ``up`` and ``down`` by the square root of the ratio; a module under the limit is left as it is, bit for bit.
    Returns (keys scaled, average norm, max norm) after the clamp, 0-dim tensors on the weights' device (no sync)."""
    from .models.lora import ADAPTER_NAME

    norms, scaled = [], []
    for layer in layers:
        down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        if up.dim() == 4 and up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
            updown = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        elif up.dim() == 4:  # kohya: a 3x3 down (LoCon)
            updown = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            updown = up @ down
        updown = updown * layer.scaling[ADAPTER_NAME]
        norm = updown.norm().clamp(min=max_norm / 2)
        ratio = norm.clamp(max=max_norm) / norm  # exactly 1 under the limit, and x * 1 is x
        up.mul_(ratio.sqrt())
        down.mul_(ratio.sqrt())
        scaled.append(ratio != 1)
        norms.append(updown.norm() * ratio)
    stacked = torch.stack(norms)
    return torch.stack(scaled).sum(), stacked.mean(), stacked.max()


class LoraRegularisation:
    """A run's kohya LoRA regularisation (see the module docstring); inert when none of its keys is set."""

    def __init__(self, config: Config, model):
        from .models.lora import ADAPTER_NAME, lora_layers

        args = network_args(config)
        self.seed, self.max_norm = config.seed, config.scale_weight_norms
        with_lora = list(model.lora_components().values())
        self.dropout = LoraDropout(with_lora, config.network_dropout, args.get("rank_dropout"),
                                   args.get("module_dropout"))
        # the adapter's LoRA layers (attached before the model is built, never after): found once, not every step
        self._layers = [layer for module in with_lora for layer in lora_layers(module) if ADAPTER_NAME in layer.lora_A]
        self._values: torch.Tensor | None = None  # the last step's max-norm values [3], on the device

    def step(self, stage_index: int, step: int, slots: list[int]) -> contextlib.AbstractContextManager[None]:
        """The dropouts of one micro-batch of optimizer step ``step`` whose samples are global ``slots`` (the first
        tells micro-batches and processes apart): the forward and backward inside it."""
        if not self.dropout.enabled:
            return contextlib.nullcontext()
        return self.dropout.step(sample_generator(self.seed, stage_index, step, slots[0], MASK_DRAWS).initial_seed())

    def after_step(self) -> None:
        """After an optimizer step: the max-norm clamp of the LoRA modules that train, its values kept on the device
        for :meth:`logs` (no read-back); nothing without ``scale_weight_norms`` or in a stage that trains no LoRA."""
        from .models.lora import ADAPTER_NAME

        self._values = None
        layers = [layer for layer in self._layers if layer.lora_A[ADAPTER_NAME].weight.requires_grad] if self.max_norm else []
        if layers:
            self._values = torch.stack([v.float() for v in apply_max_norm(layers, self.max_norm)])

    def logs(self) -> dict[str, float]:
        """kohya's three values (:data:`MAX_NORM_LOGS`) of the last :meth:`after_step`'s clamp, read back now (a
        device sync: called for the steps the log writes); {} when it clamped nothing."""
        if self._values is None:
            return {}
        return {key: int(v) if key == MAX_NORM_LOGS[0] else v for key, v in zip(MAX_NORM_LOGS, self._values.tolist())}
