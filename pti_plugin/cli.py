"""Command line of ``train_pti.py``: ``--preset FILE``, kohya-style ``--KEY VALUE`` overrides, ``--set a.b=v``."""

from __future__ import annotations

import logging
import sys

from .command_line import USAGE, parse_args
from .config import Config, ConfigError
from .config_loading import load_config, named_where_given
from .stop_signals import StopSignalled, stop_raises


def list_keys() -> str:
    import dataclasses

    lines = []
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{f.name} = {default!r}\n    {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def _fail(message: str, code: int) -> int:
    """Print ``message`` as the last thing this process writes (progress bars and logs flushed
    first), and return ``code``. Under ``accelerate launch`` the launcher then adds its own
    ``CalledProcessError`` lines below it (``accelerate launch --quiet`` leaves them out)."""
    sys.stdout.flush()
    for handler in logging.getLogger().handlers:
        handler.flush()
    print(message, file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run training; returns the process exit code (2 for configuration errors)."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    if "--list_keys" in argv:
        print(list_keys())
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        preset, overrides, sets = parse_args(argv)
        config = load_config(preset, overrides, sets)
    except ConfigError as exc:
        return _fail(f"error: {exc}", 2)
    if config.debug_dataset:  # kohya's: show the dataset, train nothing
        from .dataset_preview import main as preview

        return preview(argv)
    from .atomic_io import WriteFailedError
    from .data.captions import CaptionError
    from .formats.embedding import EmbeddingFormatError
    from .formats.kohya_lora import LoraFormatError
    from .safe_load import BadSafetensorsError, UnreadableFileError, UnsafeFileError
    from .trainer import NonFiniteLossError, Trainer, TrainingInterrupted

    user_errors = (ConfigError, CaptionError, EmbeddingFormatError, LoraFormatError, BadSafetensorsError,
                   UnsafeFileError, UnreadableFileError, FileExistsError, FileNotFoundError)
    try:
        trainer = Trainer(config)
        with stop_raises(after=trainer.stops):  # until the run's own handler, which saves and stops after a step
            outputs = trainer.run()
    except ConfigError as exc:  # found once the model or data is there: named as the user gave it, as above
        return _fail(f"error: {named_where_given(exc, overrides, sets)}", 2)
    except user_errors as exc:
        return _fail(f"error: {exc}", 2)
    except NonFiniteLossError as exc:
        return _fail(f"error: {exc}", 3)
    except WriteFailedError as exc:  # a full disk, a file-size limit, a read-only folder: the file named
        return _fail(f"error: {exc}", 4)
    except TrainingInterrupted as exc:
        return _fail(str(exc), 128 + exc.signum)
    except StopSignalled as exc:
        return _fail(f"stopped by {exc} while the run was setting up, before its first step: nothing new was trained "
                     "or saved; run the same command again to start it", 128 + exc.signum)
    except KeyboardInterrupt:
        return _fail("stopped at once (second interrupt); no file was left half-written", 130)
    for kind, path in outputs.items():
        print(f"{kind}: {', '.join(map(str, path)) if isinstance(path, list) else path}")
    return 0
