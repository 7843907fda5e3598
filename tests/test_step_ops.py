"""``benchmarks/step_ops.py``'s counters on synthetic steps whose operator calls are known (no timing asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import step_ops  # noqa: E402


def _counted(step, sites: bool = False):
    counter = step_ops.OpCounter(sites)
    with counter, step_ops.MoveCounter(counter) as moves:
        step()
    return counter, moves


def test_counts_kernels_views_and_foreach_launches_of_a_known_step():
    a, b = torch.ones(3), torch.ones(3)
    tensors = [torch.ones(2) for _ in range(200)]

    def step():
        c = torch.add(a, b)  # kernel
        d = c.mul(2)  # kernel
        d.view(3, 1).t()  # two views: no kernel
        torch._foreach_add(tensors, 1.0)  # one call; on CUDA ceil(200 / 64) launches (a list in, a list out)
        torch._foreach_mul_(tensors, 2.0)  # in place, one list: ceil(200 / 110)

    counter, _ = _counted(step)
    assert counter.ops == {"add": 1, "mul": 1, "view": 1, "t": 1, "_foreach_add": 1, "_foreach_mul_": 1}
    assert counter.kernels == 4
    assert counter.gpu_kernels == 2 + 4 + 2
    assert counter.reads == 0


def test_counts_the_backward_and_the_reads_and_moves():
    w = torch.ones(4, 4, requires_grad=True)
    x = torch.ones(2, 4)

    def step():
        loss = (x @ w).sum()  # mm, sum
        loss.backward()  # ones_like (the seed), expand (view), mm and t (views) for w's gradient
        bool(torch.isfinite(loss))  # one read (item), isfinite's kernels
        loss.detach().to("cpu")  # one move (a no-op on the CPU, counted all the same)
        torch.stack([loss.detach(), loss.detach()]).tolist()  # one read without an aten op

    counter, moves = _counted(step, sites=True)
    assert counter.ops["mm"] == 2 and counter.ops["sum"] == 1 and counter.ops["ones_like"] == 1
    assert counter.reads == 2 and moves.moves == 1
    assert any(site.endswith("[backward]") for site, _ in counter.by_site)  # the gradient's mm ran in the engine


def test_reads_of_host_tensors_are_not_syncs():
    """An optimizer's step counters stay on the host on a GPU: their ``item`` calls are no device reads."""
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([p], lr=0.1, foreach=True)
    p.grad = torch.ones(3)
    optimizer.step()  # creates the state
    p.grad = torch.ones(3)
    counter, _ = _counted(optimizer.step)
    assert counter.ops["_local_scalar_dense"] >= 1 and counter.reads == 0


@pytest.mark.parametrize("calls", [2, 7])
def test_python_calls_counted_exactly(calls):
    def nothing():
        return None

    def count(n: int) -> int:
        counter = step_ops.PyCallCounter()
        counter.start()
        for _ in range(n):
            nothing()
        return sum(counter.stop().values())

    assert count(calls) - count(0) == calls


def test_clock_counts_only_its_counted_steps():
    """warm-up 1, then 2 timed, 2 op-counted and 2 call-counted steps: each step runs ``1 + step`` kernels and
    Python calls, but the op-counted ones 3 kernels; the clock reports those, and the call-counted steps' calls."""
    clock = step_ops.OpClock(warmup=1, k=2, sites=False)
    a = torch.ones(3)

    def bump(t):
        return t + 1

    clock.start()
    for step in range(1 + 3 * 2):
        for _ in range(3 if 3 <= step < 5 else 1 + step):
            a = bump(a)
        clock.step_end()
    result = clock.result()
    assert [s["kernels"] for s in result["counted"]] == [3, 3]
    assert [s["py_calls"] for s in result["counted"]] == [6, 7]


def test_paths_take_the_batch4_paths_and_refuse_unknown_ones(capsys):
    """The default paths stay the four batch-1 ones; ``--paths`` also takes step_time's batch-4 paths and refuses a
    name it does not know."""
    assert step_ops.parse_args([]).paths == list(step_ops.PATHS)
    assert step_ops.parse_args(["--paths", "lora_b4,locality_cached_b4"]).paths == ["lora_b4", "locality_cached_b4"]
    with pytest.raises(SystemExit):
        step_ops.parse_args(["--paths", "lora_b4,locality_b5"])
    assert "locality_b5" in capsys.readouterr().err
