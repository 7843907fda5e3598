"""kohya's accelerator options (``train_util.prepare_accelerator``): ``torch_compile`` with ``dynamo_backend``,
``ddp_timeout``, ``ddp_gradient_as_bucket_view`` and ``ddp_static_graph``, as accelerate ``Accelerator`` keyword
arguments, and their start-up checks (called from ``config_checks``, before any model loads).

What is compiled: accelerate compiles the modules given to ``Accelerator.prepare``. The trainer prepares, per
stage, the modules that hold trainable parameters: the UNet when its LoRA trains, each text encoder when its LoRA
or the pivot trains (kohya prepares its network, the UNet and the text encoders it trains). The prepared module
runs only in a forward with gradients (``TrainableModel.predict`` / ``encode``); the forwards without gradients
(pivot locality's frozen forward, validation, sampling), a text encoder called with its LoRA off or the pivot
fixed, and the modules a stage does not train run the plain modules: never compiled.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
from typing import Any

import torch

from .config import Config, ConfigError
from .main_process_checks import passed_without_refusal

logger = logging.getLogger(__name__)

#: kohya's ``--dynamo_backend`` choices (``train_util.add_training_arguments``), its default first.
KOHYA_BACKENDS = ("inductor", "eager", "aot_eager", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                  "fx2trt", "onnxrt", "tensort", "ipex", "tvm")
#: The value that compiles nothing (before this option existed, the only one accepted).
OFF = "no"
#: The longest ``ddp_timeout``: the minutes a ``datetime.timedelta`` holds (a longer one overflowed building it).
MAX_TIMEOUT_MINUTES = datetime.timedelta.max // datetime.timedelta(minutes=1)


def accelerator_kwargs(config: Config) -> dict[str, Any]:
    """The ``Accelerator`` keyword arguments of these options, as kohya's ``prepare_accelerator`` builds them; none
    when they are off (accelerate's own settings then, as before)."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    kwargs: dict[str, Any] = {}
    if config.torch_compile and config.dynamo_backend != OFF:
        kwargs["dynamo_backend"] = config.dynamo_backend
    handlers = []
    if config.ddp_timeout:  # kohya: unset or 0 leaves accelerate's default
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=config.ddp_timeout)))
    if config.ddp_gradient_as_bucket_view or config.ddp_static_graph:
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=config.ddp_gradient_as_bucket_view,
                                                      static_graph=config.ddp_static_graph))
    if handlers:
        kwargs["kwargs_handlers"] = handlers
    return kwargs


def prepare_for_stage(accelerator: Any, module: torch.nn.Module) -> Any:
    """``accelerator.prepare(module)`` for this stage. accelerate marks what it prepared (``_is_accelerate_prepared``)
    and hands a marked module back as it is; a compiled module sets the mark on the module it wraps, so a later
    stage would get that module back plain (neither compiled nor, with several processes, DDP-wrapped): an earlier
    stage's mark is dropped first."""
    module.__dict__.pop("_is_accelerate_prepared", None)
    passed_without_refusal()  # several processes: DDP's wrapping waits for every one (a refusal is said at once)
    return accelerator.prepare(module)


def check_accelerator_options(config: Config) -> None:
    """kohya's choices of ``dynamo_backend`` (and ``"no"``), a ``ddp_timeout`` >= 0 that a timedelta holds, and a
    backend that this machine can run when ``torch_compile`` is on; without it, a ``dynamo_backend`` other than the
    default is unused (as in kohya): a warning naming both keys."""
    if config.dynamo_backend not in (*KOHYA_BACKENDS, OFF):
        raise ConfigError.at("dynamo_backend", f" must be one of {[*KOHYA_BACKENDS, OFF]}, got {config.dynamo_backend!r}")
    if config.ddp_timeout is not None and not 0 <= config.ddp_timeout <= MAX_TIMEOUT_MINUTES:
        raise ConfigError.at("ddp_timeout", f" is in minutes and must be >= 0 and <= {MAX_TIMEOUT_MINUTES} (0 or "
                                            f"unset: accelerate's default), got {config.ddp_timeout!r}")
    if not config.torch_compile:
        if config.dynamo_backend not in (KOHYA_BACKENDS[0], OFF):
            logger.warning("dynamo_backend = %r is unused without torch_compile = true (kohya ignores it too)",
                           config.dynamo_backend)
        return
    if config.dynamo_backend == OFF:
        raise ConfigError.at("torch_compile", f' = true with dynamo_backend = "{OFF}" compiles nothing: choose a backend '
                                              f'(kohya\'s default is "{KOHYA_BACKENDS[0]}") or set torch_compile = false')
    problem = _backend_problem(config.dynamo_backend)
    if problem:
        raise ConfigError.at("dynamo_backend", f" = {config.dynamo_backend!r} with torch_compile = true: {problem}")


def _backend_problem(backend: str) -> str | None:
    """Why ``backend`` cannot compile here (None when it can): unknown to accelerate or to this PyTorch, or
    ``inductor`` on a machine without CUDA and without a C++ compiler (inductor builds C++ for the CPU)."""
    from accelerate.utils import DynamoBackend

    if backend.upper() not in DynamoBackend.__members__:
        return "accelerate has no such backend (kohya lists it, but its Accelerator refuses it)"
    available = torch.compiler.list_backends(exclude_tags=())
    if backend not in available:
        return f"this PyTorch has no such backend (it has {', '.join(b for b in available if '_TESTING' not in b)})"
    if backend == "inductor" and not torch.cuda.is_available():
        return _cpp_compiler_problem()
    return None


def _cpp_compiler_problem() -> str | None:
    """Why inductor finds no C++ compiler for the CPU (None when it finds one): torch's own search where this PyTorch
    has it (``torch._inductor.cpp_builder``, private; absent from older versions), else the compilers on the PATH
    (``$CXX``, g++, c++, clang++)."""
    why = None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        names = [n for n in (os.environ.get("CXX"), "g++", "c++", "clang++") if n]
        if not any(shutil.which(n) for n in names):
            why = f"none of {names} on the PATH"
    else:
        try:
            get_cpp_compiler()
        except Exception as exc:  # torch's InvalidCxxCompiler and its Windows checks
            why = str(exc)
    return None if why is None else (f"inductor compiles C++ on the CPU and found no C++ compiler ({why}); install one "
                                     "or use \"eager\"")
