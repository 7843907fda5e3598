"""The tracker's folder, project name and init arguments: kohya's ``log_prefix``, ``log_tracker_name`` and
``log_tracker_config`` (``train_util.prepare_accelerator`` and ``init_trackers``).

kohya logs into ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>`` (local time at start), and accelerate's TensorBoard
tracker into the project's sub-folder of it: ``.../<log_tracker_name>`` (kohya's default: the script's name;
pti-plugin's: ``pti``). pti-plugin adds the prefix and timestamp folder only when ``log_prefix`` is set: without it the
tracker logs into ``<logging_dir>/pti`` as it always did (``logging_dir`` defaults to ``<output_dir>/logs``).
``log_tracker_config`` is a TOML file of init arguments by tracker (``[tensorboard]``: ``SummaryWriter``'s
``comment``, ``flush_secs`` ...); only TensorBoard is supported here, so another tracker's table is refused.
kohya's ``log_config`` adds the run's top-level settings to the hyperparameters the tracker stores at its start
(:func:`logged_config`; kohya's ``get_sanitized_config_or_none``).
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

from .config import Config, ConfigError
from .text_files import path_not_found, read_toml_file

DEFAULT_TRACKER_NAME = "pti"
SUPPORTED_TRACKERS = ("tensorboard",)
_TRACKER_KEYS = ("log_prefix", "log_tracker_name", "log_tracker_config", "log_config")
#: The keys kohya's ``log_config`` leaves out (paths that name the user's folders), as pti-plugin spells them:
#: ``tokenizer_path`` is kohya's ``tokenizer_cache_dir``.
MASKED_KEYS = ("pretrained_model_name_or_path", "vae", "tokenizer_path", "train_data_dir", "reg_data_dir", "output_dir",
               "logging_dir")


def tracker_logging_dir(config: Config, output_dir: Path, now: float | None = None) -> Path:
    """The folder accelerate's tracker logs under (the project name's sub-folder is added by the tracker)."""
    base = Path(config.logging_dir).expanduser().resolve() if config.logging_dir else output_dir / "logs"
    if not config.log_prefix:
        return base
    return base / (config.log_prefix + time.strftime("%Y%m%d%H%M%S", time.localtime(now)))


def tracker_name(config: Config) -> str:
    return config.log_tracker_name or DEFAULT_TRACKER_NAME


def tracker_init_kwargs(config: Config) -> dict[str, dict[str, Any]]:
    """The tracker init arguments of ``log_tracker_config`` by tracker name ({} without it)."""
    if not config.log_tracker_config:
        return {}
    return read_toml_file(Path(config.log_tracker_config).expanduser())


def hparam_value(value: Any) -> Any:
    """A hyperparameter as accelerate's trackers take it: a bool, int, float or string as it is, anything else (a list,
    a table) as its ``str()``, as kohya passes them."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def logged_config(config: Config, resolved: dict[str, Any]) -> dict[str, Any]:
    """kohya's ``log_config``: the resolved preset's top-level keys (``resolved``: ``resolution.resolved_dict``, where
    every stage default is in the stages, logged as ``stages.<i>.<key>`` anyway) less :data:`MASKED_KEYS`, each value
    as :func:`hparam_value` gives it. Empty without ``log_config``."""
    if not config.log_config:
        return {}
    return {key: hparam_value(value) for key, value in resolved.items() if key not in MASKED_KEYS + ("stages",)}


def _summary_writer_arguments() -> set[str] | None:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return None
    return set(inspect.signature(SummaryWriter.__init__).parameters) - {"self", "log_dir", "logdir", "args", "kwargs"}


def check_tracker_options(config: Config) -> None:
    """``log_prefix``, ``log_tracker_name``, ``log_tracker_config`` and ``log_config`` at start: each needs a tracker;
    the prefix and name are plain folder names; the TOML file reads, holds only a ``[tensorboard]`` table, of
    ``SummaryWriter``'s arguments."""
    for key in _TRACKER_KEYS:
        if getattr(config, key) and not config.log_with:  # kohya's log_config logs nothing then, silently
            value = "true" if getattr(config, key) is True else repr(getattr(config, key))
            raise ConfigError.at(key, f" = {value} needs a tracker: set log_with = \"tensorboard\" (or logging_dir, as "
                                      "kohya)")
    for key in ("log_prefix", "log_tracker_name"):
        value = getattr(config, key)
        if value and (any(c in value for c in '/\\\0') or value in (".", "..")):
            raise ConfigError.at(key, f" = {value!r} must be a plain folder name (it names a folder of the logs)")
    if not config.log_tracker_config:
        return
    key, path = "log_tracker_config", Path(config.log_tracker_config).expanduser()
    if not path.is_file():
        raise ConfigError.at(key, f": {path_not_found(config.log_tracker_config, 'file')}")
    try:
        tables = tracker_init_kwargs(config)
    except OSError as exc:
        raise ConfigError.at(key, f": {path} is not readable: {exc}") from None
    except ValueError as exc:
        raise ConfigError.at(key, f": {path} {exc}") from None
    for name, table in tables.items():
        if name not in SUPPORTED_TRACKERS:
            raise ConfigError.at(key, f": {path} configures tracker {name!r}, which pti-plugin does not support "
                                      f"(only {', '.join(SUPPORTED_TRACKERS)}; log_with = {config.log_with!r})")
        if not isinstance(table, dict):
            raise ConfigError.at(key, f": {path}: [{name}] must be a table of init arguments, got {table!r}")
        allowed = _summary_writer_arguments()
        unknown = sorted(set(table) - allowed) if allowed is not None else []
        if unknown:
            raise ConfigError.at(key, f": {path}: [{name}] has {', '.join(map(repr, unknown))}, not arguments of "
                                      f"SummaryWriter (accepted: {', '.join(sorted(allowed))})")
