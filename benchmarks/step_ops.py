"""Aten operator calls per training step of each path: a device-independent proxy for launch overhead.

    OMP_NUM_THREADS=1 python benchmarks/step_ops.py [--quick] [--model DIR] [--resolution 64] [--repeats 3]
        [--steps 4] [--warmup 2] [--paths inversion,full_table,lora,floor] [--sites] [--cpu_optimizer]
        [--work DIR]

The paths are ``step_time.py``'s (same model, data, presets and plain diffusers + peft code; default
model the SD1.5 architecture with random weights at 64 px, ``--quick`` the toy world at 32 px; batch
1, the ``_b4`` paths below 4). Each run (a forked process per path and round, rounds interleaved) does
``--warmup`` steps, then ``--steps`` timed steps (no instrumentation: process CPU s/step), ``--steps``
steps under a ``TorchDispatchMode`` that sees every aten operator call below autograd, backward
included, and ``--steps`` steps under ``sys.setprofile``. Per step:

- ``ops``: aten calls; ``kernels``: those that are not views, allocations or profiler marks
  (``detach``, ``view``, ``t``, ``empty``, ``item``...: no kernel on a GPU): the launch proxy the ratios
  use. It includes the few ops both sides run on host tensors (the noise drawn on the CPU, the data
  draws); ``gpu_kern``: ``kernels`` with each ``_foreach_*`` call counted as the launches CUDA's
  multi-tensor apply makes (one per 110 tensors for one list, 64 for two, 48, 36, 30 for more);
- ``reads``: host reads of device values, each a sync on a GPU (``item``/``bool``/``float``, ``tolist``,
  ``nonzero``, boolean-mask indexing), less those of tensors that stay on the host on a GPU too
  (torch's optimizers' step counters, ``pti_plugin/data``'s draws);
- ``moves``: ``Tensor.to``/``cuda`` calls naming a device and ``torch.tensor(..., device=)`` (on a GPU, a
  host tensor's copy waits for the device unless pinned and ``non_blocking``): no-ops on this CPU,
  counted, not timed;
- ``py_calls``: Python function calls and C functions called from Python (by package below the table):
  the host work a GPU run still does per step, counted rather than timed (on a loaded CPU the time
  outside aten ops, a small difference of two large noisy figures, was not stable enough to report:
  instrumented ops run slower than plain ones).

On a CUDA device torch's optimizers default to their ``foreach`` implementation and on the CPU to a
per-parameter loop; the runs here use ``foreach`` as on a GPU (``--cpu_optimizer``: the CPU's loop).
Printed: per path one op-counted step's counts (the step of median ``kernels`` over every round; a
path whose aten counts vary between steps or rounds says so; ``py_calls`` the median), the timings as
median (min-max) over rounds, then the aten calls the trainer's LoRA step runs beyond the floor's and
its inversion step beyond the full table's, by op name (``--sites``: also the kernels, reads and moves
of each by the innermost ``pti_plugin``/benchmark function that called them). The last line reads
``lora_ops_vs_floor=<f> inversion_ops_vs_full_table=<f>`` (ratios of ``kernels``).

``--paths`` also takes ``step_time``'s batch-4 paths (not run by default): ``lora_b4`` and the LoRA stage
with the ``pivot_locality`` plugin, ``locality_b4``, ``locality_cached_b4``, ``locality_every4_b4`` (the
last's counted steps differ, one in four regularised). With ``lora_b4`` and ``locality_cached_b4`` both
counted, a line gives the ``py_calls`` per step of each and their difference (the host work a regularised
step adds), and the last line ends with ``locality_cached_ops_vs_lora_b4=<f>`` (ratio of ``kernels``).
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_time  # noqa: E402  (sets OMP_NUM_THREADS, TQDM_DISABLE and the import path first)
import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

PATHS = ("inversion", "full_table", "lora", "floor")  # the default --paths
BATCH4_PATHS = tuple(p for p in step_time.PATHS if step_time.batch_of(p) == 4)  # only when --paths names them
RATIOS = {"lora_ops_vs_floor": ("lora", "floor"), "inversion_ops_vs_full_table": ("inversion", "full_table"),
          "locality_cached_ops_vs_lora_b4": ("locality_cached_b4", "lora_b4")}
NO_KERNEL = {"_local_scalar_dense", "_record_function_enter_new", "_record_function_exit", "_unsafe_view", "empty",
             "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_reshape_alias", "set_", "resize_"}
FOREACH_TENSORS_PER_LAUNCH = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}  # CUDA multi_tensor_apply, by list depth
READ_OPS = {"_local_scalar_dense", "nonzero", "masked_select"}
READ_METHODS = {"tolist", "numpy", "__array__"}  # value reads that dispatch no aten op on a CPU tensor
ROOT = Path(__file__).resolve().parents[1]
SITE_FOLDERS = (str(ROOT / "pti_plugin"), str(ROOT / "benchmarks"))
HOST_FOLDERS = (str(Path(torch.optim.__file__).parent), str(ROOT / "pti_plugin" / "data"))


def site_of(frame) -> str:
    """The innermost project function (``pti_plugin`` or ``benchmarks``) on the stack, ``file:function``; and
    ``[backward]`` when the autograd engine runs the op."""
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(SITE_FOLDERS) and Path(name).name != "step_ops.py":
            site = f"{Path(name).name}:{frame.f_code.co_name}"
            break
        frame = frame.f_back
    else:
        site = "?"
    return site + (" [backward]" if torch._C._current_autograd_node() is not None else "")


def is_kernel(func) -> bool:
    """Whether aten op ``func`` launches work on a GPU: not a view (``is_view``) nor an allocation-only op."""
    return not func.is_view and func.__name__.split(".")[0] not in NO_KERNEL


def gpu_launches(func, args) -> int:
    """Kernel launches of one call on CUDA: 1, or for a ``_foreach_*`` op one per chunk of its tensor lists."""
    name = func.__name__.split(".")[0]
    if not name.startswith("_foreach_"):
        return 1
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    depth = min(5, len(lists) + (0 if name.endswith("_") else 1))
    return max(1, math.ceil(len(lists[0]) / FOREACH_TENSORS_PER_LAUNCH[max(1, depth)])) if lists else 1


def is_read(func, args) -> bool:
    """Whether the call reads tensor values on the host: ``item``-like, ``nonzero``, or indexing by a boolean
    mask (which runs ``nonzero``)."""
    name = func.__name__.split(".")[0]
    if name in READ_OPS:
        return True
    if name in ("index", "index_put", "index_put_"):
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    return False


def on_host(frame) -> bool:
    """Whether a read comes from code whose tensors stay on the host on a GPU too (so no sync there): torch's
    optimizers' step counters and ``pti_plugin/data`` (the draws, CPU only by design)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(HOST_FOLDERS):
            return True
        frame = frame.f_back
    return False


class OpCounter(TorchDispatchMode):
    """Counts aten calls (all, kernels, CUDA launches, host reads); with ``sites``, where from."""

    def __init__(self, sites: bool = False):
        super().__init__()
        self.sites = sites
        self.reset()

    def reset(self) -> None:
        self.ops = collections.Counter()  # op name -> calls
        self.no_kernel: set[str] = set()  # names of the ops counted that launch no kernel
        self.by_site = collections.Counter()  # (site, op name) -> kernel calls
        self.kernels = self.gpu_kernels = self.reads = 0
        self.read_sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.ops[name] += 1
        kernel = is_kernel(func)
        if kernel:
            self.kernels += 1
            self.gpu_kernels += gpu_launches(func, args)
        else:
            self.no_kernel.add(name)
        read = is_read(func, args) and not on_host(sys._getframe(1))
        self.reads += read
        if self.sites and (kernel or read):
            site = site_of(sys._getframe(1))
            self.by_site[(site, name)] += kernel
            if read:
                self.read_sites[f"{site} {name}"] += 1
        return func(*args, **(kwargs or {}))


class MoveCounter(TorchFunctionMode):
    """Counts the calls that copy a host tensor to a device on a GPU (``Tensor.to``/``cuda`` naming a device,
    ``torch.tensor``/``as_tensor`` with one) and the value reads that dispatch no aten op (``tolist``)."""

    def __init__(self, ops: OpCounter):
        super().__init__()
        self.ops = ops
        self.reset()

    def reset(self) -> None:
        self.moves = 0
        self.move_sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        names_device = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])
        if name == "cuda" or (name == "to" and names_device) or (name in ("tensor", "as_tensor") and kwargs.get("device")):
            self.moves += 1
            if self.ops.sites:
                self.move_sites[site_of(sys._getframe(1))] += 1
        elif name in READ_METHODS and not on_host(sys._getframe(1)):
            self.ops.reads += 1
            if self.ops.sites:
                self.ops.read_sites[f"{site_of(sys._getframe(1))} {name}"] += 1
        return func(*args, **kwargs)


class PyCallCounter:
    """Python calls per step through ``sys.setprofile``: Python functions entered (by the package of their code)
    and C functions called from Python (by the package of the caller); this file's own calls left out."""

    def __init__(self) -> None:
        self.calls: collections.Counter = collections.Counter()
        self._packages: dict[str, str | None] = {}

    def package(self, filename: str) -> str | None:
        if filename not in self._packages:
            path = filename.replace("\\", "/")
            if Path(path).name == "step_ops.py":
                found = None
            elif "/site-packages/" in path:
                found = path.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
            elif path.startswith(str(ROOT)):
                found = Path(path).relative_to(ROOT).parts[0].removesuffix(".py")
            else:
                found = "python"
            self._packages[filename] = found
        return self._packages[filename]

    def __call__(self, frame, event, arg) -> None:
        if event in ("call", "c_call") and (package := self.package(frame.f_code.co_filename)):
            self.calls[package] += 1

    def start(self) -> None:
        self.calls = collections.Counter()
        sys.setprofile(self)

    def stop(self) -> dict[str, int]:
        sys.setprofile(None)
        return dict(self.calls)


class OpClock(step_time.Clock):
    """``step_time``'s clock for ``--warmup`` steps, then ``--steps`` timed, ``--steps`` counted under
    :class:`OpCounter` and :class:`MoveCounter`, and ``--steps`` counted under :class:`PyCallCounter`
    (``spec["steps"]`` is the three together: see :func:`main`)."""

    def __init__(self, warmup: int, k: int, sites: bool):
        super().__init__(warmup)
        self.k, self.counter = k, OpCounter(sites)
        self.moves, self.python = MoveCounter(self.counter), PyCallCounter()
        self.steps: list[dict] = []
        self.py_steps: list[dict] = []

    @classmethod
    def of(cls, spec: dict) -> OpClock:
        """The run's clock (made in its process before its first step, so the optimizer's choice follows)."""
        if not spec["cpu_optimizer"]:
            use_foreach_optimizers()
        return cls(spec["warmup"], spec["steps"] // 3, spec["sites"])

    def step_end(self) -> None:
        done, w, k = len(self.wall), self.warmup, self.k  # done: step ends so far, this one included
        if w + k < done <= w + 2 * k:  # an op-counted step ended
            self.moves.__exit__(None, None, None)
            self.counter.__exit__(None, None, None)
            c = self.counter
            self.steps.append({"ops": sum(c.ops.values()), "kernels": c.kernels, "gpu_kernels": c.gpu_kernels,
                               "reads": c.reads, "moves": self.moves.moves, "by_op": dict(c.ops), "no_kernel": sorted(c.no_kernel),
                               "by_site": dict(c.by_site), "read_sites": dict(c.read_sites),
                               "move_sites": dict(self.moves.move_sites)})
        elif w + 2 * k < done <= w + 3 * k:  # a call-counted step ended
            self.py_steps.append(self.python.stop())
        super().step_end()
        if w + k <= done < w + 2 * k:  # the next step is op-counted
            self.counter.reset()
            self.moves.reset()
            self.counter.__enter__()
            self.moves.__enter__()
        elif w + 2 * k <= done < w + 3 * k:
            self.python.start()

    def result(self) -> dict:
        w, c, k, n = self.wall, self.cpu, self.warmup, self.k
        for step, calls in zip(self.steps, self.py_steps):
            step["py_calls"], step["py_by_package"] = sum(calls.values()), calls
        return {"cpu": (c[k + n] - c[k]) / n, "wall": (w[k + n] - w[k]) / n, "counted": self.steps}


def use_foreach_optimizers() -> None:
    """Make torch's optimizers take their ``foreach`` path on the CPU too, as they do by default on CUDA."""
    import torch.optim.optimizer as optimizer

    supported = optimizer._get_foreach_kernels_supported_devices
    optimizer._get_foreach_kernels_supported_devices = lambda: [*supported(), "cpu"]


COUNTS = ("ops", "kernels", "gpu_kernels", "reads", "moves", "py_calls")


def typical_step(runs: list[dict]) -> tuple[dict, bool]:
    """The op-counted step whose kernel count is the median over every counted step of every round (its
    ``py_calls``: the median of the call-counted steps'), and whether the aten counts varied between steps or
    rounds (the Python calls do: tqdm refreshes on a timer)."""
    steps = sorted((s for r in runs for s in r["counted"]), key=lambda s: s["kernels"])
    varies = len({tuple(s[k] for k in COUNTS[:4]) for s in steps}) > 1
    typical = dict(steps[len(steps) // 2])
    typical["py_calls"] = int(statistics.median(s["py_calls"] for s in steps))
    return typical, varies


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def report(results: dict[str, list[dict]], sites: bool) -> dict[str, float]:
    """Print the tables; return the ratios whose two paths ran."""
    typical = {p: typical_step(runs) for p, runs in results.items()}
    width = max(12, *map(len, results))
    print(f"\n{'path':{width}s} {'ops':>6s} {'kernels':>7s} {'gpu_kern':>8s} {'reads':>5s} {'moves':>5s} {'py_calls':>8s}  "
          f"{'CPU s/step (timed steps)':>26s}")
    for path, runs in results.items():
        step, varies = typical[path]
        print(f"{path:{width}s} " + " ".join(f"{step[k]:>{w}d}" for k, w in zip(COUNTS, (6, 7, 8, 5, 5, 8)))
              + f"  {spread([r['cpu'] for r in runs]):>26s}" + ("  (aten counts vary between steps or rounds)" if varies else ""))
    print("\nPython calls per step by package: " + "; ".join(
        f"{p} " + ", ".join(f"{k} {v}" for k, v in sorted(s[0]["py_by_package"].items(), key=lambda x: -x[1]))
        for p, s in typical.items()))
    for name, (path, against) in RATIOS.items():
        if path in typical and against in typical:
            extra_ops(path, typical[path][0], against, typical[against][0], sites)
    if {"lora_b4", "locality_cached_b4"} <= set(typical):
        plain, regularised = (typical[p][0]["py_calls"] for p in ("lora_b4", "locality_cached_b4"))
        print(f"\npy_calls per step: lora_b4 {plain}, locality_cached_b4 {regularised} "
              f"({regularised - plain:+d} per regularised step)")
    return {name: typical[p][0]["kernels"] / typical[a][0]["kernels"]
            for name, (p, a) in RATIOS.items() if p in typical and a in typical}


def extra_ops(path: str, step: dict, against: str, other: dict, sites: bool) -> None:
    diff = collections.Counter(step["by_op"])
    diff.subtract(other["by_op"])
    views = set(step["no_kernel"]) | set(other["no_kernel"])

    def listed(sign: int, kernels: bool) -> str:
        found = sorted(((n, sign * c) for n, c in diff.items() if sign * c > 0 and (n not in views) == kernels),
                       key=lambda x: (-x[1], x[0]))
        return ", ".join(f"{n} {'+' if sign > 0 else '-'}{c}" for n, c in found) or "nothing"

    print(f"\n{path} runs per step beyond {against}, kernels by op: {listed(1, True)}; "
          f"and calls that launch none: {listed(1, False)}")
    print(f"{path} runs fewer than {against}: kernels {listed(-1, True)}; others {listed(-1, False)}")
    if not sites:
        return
    for label, s in ((path, step), (against, other)):
        per_site = collections.defaultdict(collections.Counter)
        for (site, op), n in s["by_site"].items():
            if n:
                per_site[site][op] += n
        print(f"\n{label}: kernel calls per step by site")
        for site, ops in sorted(per_site.items(), key=lambda x: -sum(x[1].values())):
            top = ", ".join(f"{op} {n}" for op, n in ops.most_common(8))
            print(f"  {sum(ops.values()):6d}  {site}: {top}{', ...' if len(ops) > 8 else ''}")
        print(f"{label}: reads " + (", ".join(f"{k} x{n}" for k, n in s["read_sites"].items()) or "none")
              + "; moves " + (", ".join(f"{k} x{n}" for k, n in s["move_sites"].items()) or "none"))


def parse_args(argv) -> argparse.Namespace:
    from pti_plugin.script_args import argument_parser

    parser = argument_parser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the toy world's shipped weights at 32 px")
    parser.add_argument("--model", type=Path, default=None, help="a diffusers folder (default: random SD1.5 architecture)")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 (--quick: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (every path once per round)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps, then as many counted steps, per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help="comma-separated subset of " + ",".join(PATHS + BATCH4_PATHS) + " (batch 4: the _b4 paths)")
    parser.add_argument("--sites", action="store_true", help="also attribute the kernels, reads and moves to call sites")
    parser.add_argument("--cpu_optimizer", action="store_true", help="the optimizers' CPU default (per-parameter loop)")
    parser.add_argument("--work", type=Path, default=None, help="folder for the built model and runs (default: temporary)")
    args = parser.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    if unknown := [p for p in args.paths if p not in PATHS + BATCH4_PATHS]:
        parser.error(f"--paths: unknown {unknown}; choose among {', '.join(PATHS + BATCH4_PATHS)}")
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1:
        parser.error("--steps, --warmup and --repeats: at least 1")
    args.optimizer, args.device = "AdamW", "cpu"
    args.resolution = args.resolution or (32 if args.quick else 64)
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    import importlib
    import logging

    logging.disable(logging.WARNING)
    importlib.import_module("pti_plugin.trainer")  # imported once here, reused by every forked run

    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        spec = step_time.prepare(args, work) | {"clock": OpClock, "steps": 3 * args.steps, "sites": args.sites,
                                                 "cpu_optimizer": args.cpu_optimizer, "batch": 1}
        batches = " (_b4 paths: 4)" if set(args.paths) & set(BATCH4_PATHS) else ""
        print(f"model {spec['model']}, {spec['resolution']} px, AdamW ({'CPU loop' if args.cpu_optimizer else 'foreach'}), "
              f"fp32, 1 thread, LoRA rank {step_time.LORA_DIM}, batch 1{batches}; {args.repeats} interleaved rounds of "
              f"{args.warmup} warm-up + {args.steps} timed + {args.steps} op-counted + {args.steps} call-counted steps", flush=True)
        runs = Path(tempfile.mkdtemp(prefix="runs-", dir=work))  # each invocation's own output folders

        def run_one(path: str, round_index: int) -> dict:
            out = str(runs / f"{path}-{round_index}")
            result = step_time.run_forked(path, spec | {"out": out, "batch": step_time.batch_of(path)})
            print(f"  round {round_index} {path:12s} {result['cpu']:.4f} s CPU/step, "
                  f"{result['counted'][0]['kernels']} kernels/step", flush=True)
            return result

        results = step_time.interleaved_rounds(args.paths, args.repeats, run_one)
    ratios = report(results, args.sites)
    if ratios:
        print(" ".join(f"{k}={v:.3f}" for k, v in ratios.items()))
    return ratios


if __name__ == "__main__":
    main()
