"""The kohya-style command line both ``train_pti.py`` and the dataset preview read: ``--preset FILE``, ``--KEY VALUE``
overrides (kohya's names and value forms), ``--set a.b=v``."""

from __future__ import annotations

import itertools
import typing

from .config import Config, ConfigError, field_names, parse_value

USAGE = """usage: train_pti.py [--preset FILE] [--KEY VALUE ...] [--set NESTED.KEY=VALUE ...]

  --preset FILE          a TOML preset (see presets/); without it, the built-in defaults
  --KEY VALUE            override any top-level preset key (kohya names), e.g. --learning_rate 1e-4;
                         a boolean key alone means true (--gradient_checkpointing); a list key takes
                         every value up to the next flag (--network_args conv_dim=4 conv_alpha=1);
                         a size takes W,H (--resolution 640,512)
  --set KEY=VALUE        override a nested key, e.g. --set stages.0.steps=10
  --list_keys            print every preset key with its default and documentation
"""


def _keys_typed(test) -> set[str]:
    """The top-level keys whose declared type passes ``test``."""
    hints = typing.get_type_hints(Config)
    return {name for name in field_names(Config) if test(hints[name])}


def parse_args(argv: list[str]) -> tuple[str | None, dict, list[str]]:
    """Split ``argv`` into (preset path, top-level overrides, ``--set`` items). As in kohya, a list key takes
    every value up to the next flag (``--network_args conv_dim=4 conv_alpha=1``), and a size takes ``W,H``
    (``--resolution 512,768``); a TOML literal (``[...]``) is read as one."""
    preset, overrides, sets = None, {}, []
    known = set(field_names(Config)) | {"preset", "set"}
    bool_keys = {f for f in known - {"preset", "set"} if isinstance(getattr(Config(), f), bool)}
    list_keys = _keys_typed(lambda kind: kind in (list[str], list[float]))  # kohya: nargs="*"
    number_lists = _keys_typed(lambda kind: kind == list[float])  # each value read as a number
    size_keys = _keys_typed(lambda kind: list[int] in typing.get_args(kind))  # an int or [W, H]
    ratio_keys = _keys_typed(lambda kind: set(typing.get_args(kind)) == {int, float})  # kohya's int_or_float
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}\n{USAGE}")
        key, eq, inline = arg[2:].partition("=")
        following = list(itertools.takewhile(lambda a: not a.startswith("--"), argv[i + 1:]))
        if key in list_keys and not eq:  # every value up to the next flag
            toml_list = len(following) == 1 and following[0].startswith("[")
            overrides[key] = (parse_value(following[0]) if toml_list else
                              [parse_value(v) for v in following] if key in number_lists else following)
            i += 1 + len(following)
            continue
        if not eq and not following and (key in bool_keys or key not in known):
            value = "true"  # a flag alone; an unknown or refused one is named by load_config
        elif eq:
            value = inline
        elif following:
            i += 1
            value = argv[i]
        else:
            raise ConfigError(f"--{key} needs a value")
        if key == "preset":
            preset = value
        elif key == "set":
            sets.append(value)
        elif key in list_keys and not value.startswith("["):
            overrides[key] = [parse_value(value) if key in number_lists else value]
        elif key in size_keys and "," in value and not value.startswith("["):
            overrides[key] = parse_value(f"[{value}]")  # kohya's "W,H"
        elif key in ratio_keys and value.endswith("%"):
            overrides[key] = _percent(key, value)
        else:
            overrides[key] = parse_value(value)
        i += 1
    return preset, overrides, sets


def _percent(key: str, value: str) -> float:
    """kohya's ``--lr_warmup_steps 10%``: the ratio 0.1 of the stage's steps."""
    try:
        return float(value[:-1]) / 100
    except ValueError:
        raise ConfigError(f"--{key} {value!r} is not a percentage (e.g. 10%)") from None
