"""Command line of ``train_pti.py``: ``--preset FILE``, kohya-style ``--KEY VALUE`` overrides, ``--set a.b=v``."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import sys
import time
import traceback

# Training reads local files only, so nothing in its process may reach the Hugging Face Hub: bitsandbytes, which peft
# and diffusers import, otherwise asks it for an optional CPU kernel at import. Set before any library loads (this
# package's __init__ loads none), for train_pti.py and the pti-train console script alike; the user's value wins.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .command_line import USAGE, parse_args  # noqa: E402
from .config import Config, ConfigError, StageConfig  # noqa: E402
from .config_loading import load_config, named_where_given  # noqa: E402
from .setting_sources import Origins, sources_lines  # noqa: E402
from .main_process_checks import launcher_rank, main_process_printed, tell_refusal_printed, told_elsewhere  # noqa: E402
from .outputs import trainer_is_the_program  # noqa: E402
from .stop_signals import StopSignalled, stop_raises  # noqa: E402


def list_keys() -> str:
    """Every preset key with its default and documentation (``--list_keys``); ``stages``' default as a preset writes
    its ``[[stages]]`` tables, followed by the keys of such a table."""
    import dataclasses

    import toml

    lines = []
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name != "stages":
            lines.append(f"{f.name} = {default!r}\n    {f.metadata.get('doc', '')}")
            continue
        tables = [{k: v for k, v in dataclasses.asdict(stage).items() if v is not None} for stage in default]
        written = toml.dumps({"stages": tables}).replace("\n\n", "\n").strip().replace("\n", "\n    ")
        lines.append(f"stages = (the two a preset without [[stages]] trains)\n    {written}\n"
                     f"    {f.metadata.get('doc', '')} The keys of a [[stages]] table:")
        lines += [f"    stages.N.{s.name} = {s.default!r}\n        {s.metadata.get('doc', '')}"
                  for s in dataclasses.fields(StageConfig)]
    return "\n".join(lines)


#: The loggers whose info lines the console shows while the configuration is read (process 0): the keys of a preset or
#: kohya config_file that are left out (the kohya_ss GUI's ``epoch``, ``no_half_vae = true``: README, "with an info
#: line"), as kohya's console shows its info lines. Otherwise it shows warnings and errors (and the run's progress).
INFO_SHOWN = ("pti_plugin.config", "pti_plugin.kohya_config_file")


@contextlib.contextmanager
def info_lines_shown(shown: bool):
    """Within it, the info lines of :data:`INFO_SHOWN` reach the console when ``shown``; their levels are restored."""
    loggers = [logging.getLogger(name) for name in INFO_SHOWN] if shown else []
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


#: seconds a process whose refusal process 0 prints waits for it (see :func:`_fail`)
QUIET_WAIT_S = 30
#: seconds it waits on once process 0 has printed, for the launcher to stop it (process 0's exit then comes first)
SAID_GRACE_S = 5


def _fail(message: str, code: int, quiet: bool = False, alike: bool = False) -> int:
    """Print ``message`` as the last thing this process writes (progress bars and logs flushed
    first), and return ``code``. Under ``accelerate launch`` the launcher then adds its own
    ``CalledProcessError`` lines below it (``accelerate launch --quiet`` leaves them out). ``quiet``: another
    process prints the same message (a multi-process run's refusal is said once, by process 0); this one waits
    for it to be said first, as the launcher stops every process when one exits with an error. ``alike``: another
    process of a multi-process run may have found the same (a refusal of the data or the model, found by each): this
    one says nothing when process 0 prints the same message, and its own when process 0 prints another, says it
    passed this stretch of the set-up without a refusal, or says nothing within :data:`QUIET_WAIT_S`."""
    started = time.monotonic()
    if quiet or alike:
        said = main_process_printed(QUIET_WAIT_S)  # at once when process 0 has printed or passed on ("")
        left = max(0.0, QUIET_WAIT_S - (time.monotonic() - started))
        if said == message or (quiet and said != ""):  # the launcher stops this process once process 0 has exited
            time.sleep(left if said is None else min(SAID_GRACE_S, left))
            return code
    sys.stdout.flush()
    for handler in logging.getLogger().handlers:
        handler.flush()
    print(message, file=sys.stderr, flush=True)
    if launcher_rank() == 0:
        tell_refusal_printed(message)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run training; returns the process exit code (2 for configuration errors)."""
    if argv is None:  # this process is the command: at its exit, the interpreter's last collections need not walk
        atexit.register(gc.freeze)  # the millions of objects torch and the model libraries hold (seconds a process)
    trainer_is_the_program(argv is None)  # only then do printed commands name the script as started
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    if "--list_keys" in argv:
        print(list_keys())
        return 0
    other_rank = launcher_rank() != 0  # another process of a multi-process run: process 0 says what every one finds
    logging.basicConfig(level=logging.ERROR if other_rank else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sources = Origins()
    try:
        preset, overrides, sets = parse_args(argv)
        with info_lines_shown(not other_rank):
            config = load_config(preset, overrides, sets, sources=sources)
    except ConfigError as exc:  # the same on every process (the same command and files): said once
        return _fail(f"error: {exc}", 2, quiet=other_rank)
    if config.debug_dataset:  # kohya's: show the dataset, train nothing
        from .dataset_preview import main as preview

        return preview(argv, config)  # the config loaded above: each of its warnings said once
    for line in [] if other_rank else sources_lines(sources):  # the run's first lines: where each setting came from
        print(line, flush=True)
    from .atomic_io import WriteFailedError
    from .data.captions import CaptionError
    from .formats.embedding import EmbeddingFormatError
    from .formats.kohya_lora import LoraFormatError
    from .safe_load import BadSafetensorsError, UnreadableFileError, UnsafeFileError
    from .plugin_calls import PluginError
    from .trainer import NonFiniteLossError, Trainer, TrainingInterrupted

    user_errors = (ConfigError, CaptionError, EmbeddingFormatError, LoraFormatError, BadSafetensorsError,
                   UnsafeFileError, UnreadableFileError, FileExistsError, FileNotFoundError)
    try:
        trainer = Trainer(config)
        with stop_raises(after=trainer.stops):  # until the run's own handler, which saves and stops after a step
            outputs = trainer.run()
    except ConfigError as exc:  # found once the model or data is there: named as the user gave it, as above
        return _fail(f"error: {named_where_given(exc, overrides, sets)}", 2, quiet=told_elsewhere(exc), alike=other_rank)
    except user_errors as exc:  # alike: each process reads the same data and model files
        return _fail(f"error: {exc}", 2, quiet=told_elsewhere(exc), alike=other_rank)
    except NonFiniteLossError as exc:
        return _fail(f"error: {exc}", 3)
    except PluginError as exc:  # the plugin's own frames above the line that names it, what was saved below
        traceback.clear_frames(exc.__traceback__)  # the stopped stage's progress bar is closed now, not after the line
        return _fail(f"{exc.plugin_traceback}error: {exc}", 5)
    except WriteFailedError as exc:  # a full disk, a file-size limit, a read-only folder: the file named
        return _fail(f"error: {exc}", 4)
    except TrainingInterrupted as exc:
        return _fail(str(exc), 128 + exc.signum)
    except StopSignalled as exc:
        return _fail(f"stopped by {exc} while the run was setting up, before its first step: nothing new was trained "
                     "or saved; run the same command again to start it", 128 + exc.signum)
    except KeyboardInterrupt:
        return _fail("stopped at once (second interrupt); no file was left half-written", 130)
    for kind, path in outputs.items() if trainer.accelerator.is_main_process else ():  # the files process 0 wrote
        print(f"{kind}: {', '.join(map(str, path)) if isinstance(path, list) else path}")
    return 0
