"""Per-step cost of the NaN guard's weight copy and check, against the AdamW step it guards.

    OMP_NUM_THREADS=1 python benchmarks/weight_guard_overhead.py [--rank 4] [--steps 30] [--device cpu|cuda]

The LoRA tensors have the shapes of the SD1.5 UNet's kohya-default targets (192 modules, read from
the shipped SD1.5 config on the meta device: nothing is downloaded or allocated for the UNet
itself) at ``--rank``, with random gradients. Each step times ``WeightGuard.keep`` +
``finite`` (read as the trainer does) and the AdamW step separately (median over ``--steps`` after 3 warm-up
steps). The last line reads ``params=<n> guard_ms=<x> adamw_ms=<y> ratio=<x/y>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pti_plugin.script_args import argument_parser, device, positive_int


def lora_tensors(rank: int, device: str) -> list[torch.nn.Parameter]:
    from diffusers import UNet2DConditionModel

    from pti_plugin.models.family import key_table
    from pti_plugin.models.single_file import SD15_CONFIG_DIR

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD15_CONFIG_DIR / "unet")))
    params = []
    for path in key_table("sd15").peft_targets("unet", unet):
        module = unet.get_submodule(path)
        n_in = getattr(module, "in_features", None) or module.in_channels
        n_out = getattr(module, "out_features", None) or module.out_channels
        params += [torch.nn.Parameter(torch.randn(rank, n_in, device=device) * 0.01),
                   torch.nn.Parameter(torch.zeros(n_out, rank, device=device))]
    return params


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argument_parser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=positive_int, default=4, help="LoRA rank (>= 1)")
    parser.add_argument("--steps", type=positive_int, default=30, help="measured steps, after 3 warm-up steps (>= 1)")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from pti_plugin.weight_guard import WeightGuard

    args = parse_args(argv)
    params = lora_tensors(args.rank, args.device)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    guard = WeightGuard()
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    guard_times, step_times = [], []
    for step in range(args.steps + 3):
        for p in params:
            p.grad = torch.randn_like(p)
        sync()
        start = time.perf_counter()
        guard.keep(params)
        sync()
        middle = time.perf_counter()
        optimizer.step()
        sync()
        after_step = time.perf_counter()
        if not bool(guard.finite()):  # the trainer reads this flag with the logged loss terms
            guard.restore()
        sync()
        end = time.perf_counter()
        if step >= 3:
            guard_times.append((middle - start) + (end - after_step))
            step_times.append(after_step - middle)
    guard_ms, step_ms = statistics.median(guard_times) * 1e3, statistics.median(step_times) * 1e3
    print(f"{len(params) // 2} LoRA modules, rank {args.rank}, {args.device}")
    print(f"params={sum(p.numel() for p in params)} guard_ms={guard_ms:.2f} adamw_ms={step_ms:.2f} ratio={guard_ms / step_ms:.2f}")


if __name__ == "__main__":
    main()
