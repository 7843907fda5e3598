"""The kohya-style command line both ``train_pti.py`` and the dataset preview read: ``--preset FILE``, ``--KEY VALUE``
overrides (kohya's names and value forms), ``--set a.b=v``."""

from __future__ import annotations

import itertools
import logging
import textwrap
import typing

from .config import SIZE_KEYS, Config, ConfigError, field_names, parse_size, parse_value
from .config_loading import _split_set
from .kohya_config_file import first_text_encoder_lr
from .kohya_options import REFUSED_OPTIONS

logger = logging.getLogger(__name__)


def _usage_lines(flag: str, key: str) -> str:
    """``flag``'s lines of :data:`USAGE`: the documentation of the Config key ``key`` (the text ``--list_keys`` prints,
    so that the two say the same), wrapped under the column of the others."""
    text = Config.__dataclass_fields__[key].metadata["doc"].rstrip(".")
    return textwrap.fill(text[:1].lower() + text[1:], 110, initial_indent=f"  {flag:<22} ", subsequent_indent=" " * 25)


USAGE = """usage: train_pti.py [--preset FILE] [--KEY VALUE ...] [--set NESTED.KEY=VALUE ...]

  --preset FILE          a TOML preset (see presets/); without it, the built-in defaults
  --KEY VALUE            override any top-level preset key (kohya names), e.g. --learning_rate 1e-4;
                         a boolean key alone means true (--gradient_checkpointing); a list key takes
                         every value up to the next flag (--network_args conv_dim=4 conv_alpha=1);
                         a size takes W,H (--resolution 640,512)
  --config_file FILE     a kohya --config_file TOML (.toml added when missing): read over the preset,
                         beneath the flags you type (as kohya); its relative paths are the current folder's
  --set KEY=VALUE        override a nested key, e.g. --set stages.0.steps=10
  --resume STATE_FOLDER  continue a run from a state it saved (save_state: <output_name>-state-stepNNNNNNNN),
                         bit-identical to the uninterrupted run; a stopped run prints the command
""" + _usage_lines("--overwrite", "overwrite") + """
  --list_keys            print every preset key with its default and documentation
"""


def _keys_typed(test) -> set[str]:
    """The top-level keys whose declared type passes ``test``."""
    hints = typing.get_type_hints(Config)
    return {name for name in field_names(Config) if test(hints[name])}


def parse_args(argv: list[str]) -> tuple[str | None, dict, list[str]]:
    """Split ``argv`` into (preset path, top-level overrides, ``--set`` items). As in kohya, a list key takes
    every value up to the next flag (``--network_args conv_dim=4 conv_alpha=1``), and a size takes ``W,H``
    (``--resolution 512,768``); a TOML literal (``[...]``) is read as one. A value is read as kohya's parser reads
    it (:func:`_typed`): a string option keeps the text (``--output_name 2024``), a number takes Python's
    forms (``.5``, ``1e-4``). A flag given twice keeps its last value, as in kohya (a list flag's is named); so does a
    key given both as ``--key`` and by ``--set key=...`` (:func:`_last_of_flag_and_set`)."""
    preset, overrides, sets = None, {}, []
    known = set(field_names(Config)) | {"preset", "set"}
    bool_keys = {f for f in known - {"preset", "set"} if isinstance(getattr(Config(), f), bool)}
    # kohya: nargs="*"; text_encoder_lr too (networks.lora trains every text encoder at its first rate)
    list_keys = _keys_typed(lambda kind: kind in (list[str], list[float])) | {"text_encoder_lr"}
    number_lists = _keys_typed(lambda kind: kind == list[float]) | {"text_encoder_lr"}  # each value a number
    ratio_keys = _keys_typed(lambda kind: set(typing.get_args(kind)) == {int, float})  # kohya's int_or_float
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}\n{USAGE}")
        key, eq, inline = arg[2:].partition("=")
        _refuse_an_abbreviation(key, known)
        _last_of_flag_and_set(key, inline if eq else (argv[i + 1] if i + 1 < len(argv) else ""), overrides, sets)
        following = list(itertools.takewhile(lambda a: not a.startswith("--"), argv[i + 1:]))
        if key in list_keys and key in overrides:
            logger.warning("--%s given twice: the last one, %s, replaces %s (as kohya's argparse)", key,
                           " ".join(following) if not eq else inline, overrides[key])
        if key in list_keys and not eq:  # every value up to the next flag
            toml_list = len(following) == 1 and following[0].startswith("[")
            overrides[key] = (parse_value(following[0]) if toml_list else
                              [_typed(key, v, float) for v in following] if key in number_lists else following)
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
            overrides[key] = [_typed(key, value, float) if key in number_lists else value]
        elif key in SIZE_KEYS and not value.startswith("["):  # kohya's "W,H" (a TOML list as one)
            overrides[key] = parse_size(value, key, f"--{key} (command line)")
        elif key in ratio_keys and value.endswith("%"):
            overrides[key] = _percent(key, value)
        else:
            overrides[key] = _typed(key, value)
        i += 1
    if isinstance(overrides.get("text_encoder_lr"), list):  # kohya: none given is unset
        rate = first_text_encoder_lr(overrides.pop("text_encoder_lr"), "--text_encoder_lr (command line)")
        overrides.update({} if rate is None else {"text_encoder_lr": rate})
    return preset, overrides, sets


def _last_of_flag_and_set(key: str, value: str, overrides: dict, sets: list[str]) -> None:
    """``--key`` and ``--set key=...`` (or ``--set key.sub=...``) on one command line: the later one wins, as a flag
    given twice (kohya: the last one), with a warning naming the one it replaces. ``key``, ``value``: the argument being
    read (``value``: the ``--set`` item); ``overrides``, ``sets``: the earlier ones, the replaced one taken out."""
    if key == "set":
        path = _split_set(value)[0]
        if path in overrides:  # a flag's key has no dot: only --set key=... replaces it whole
            logger.warning("--set %s replaces the earlier --%s %s (the last one wins, as for a flag given twice)",
                           value, path, overrides.pop(path))
        return
    earlier = [item for item in sets if _split_set(item)[0] == key or _split_set(item)[0].startswith(key + ".")]
    if key != "preset" and earlier:
        logger.warning("--%s replaces the earlier --set %s (the last one wins, as for a flag given twice)", key,
                       ", --set ".join(earlier))
        sets[:] = [item for item in sets if item not in earlier]


def _refuse_an_abbreviation(key: str, known: set[str]) -> None:
    """kohya's argparse reads a flag that begins exactly one option's name as that option (``--learning_r`` is
    ``--learning_rate``); pti-plugin takes a flag only as typed in full, so such a flag is refused naming the option
    it begins, not as an unknown key."""
    names = known | set(REFUSED_OPTIONS)
    if key in names:
        return
    begun = [name for name in names if name.startswith(key)]
    if len(begun) == 1:
        raise ConfigError(f"command line: --{key} is no key; it begins --{begun[0]} only, and a parser such as kohya's "
                          f"takes such an abbreviation, but pti-plugin takes a flag only as typed in full: write --{begun[0]}",
                          key)


def _typed(key: str, text: str, kind: typing.Any = None) -> typing.Any:
    """``--key text`` read as kohya's parser reads it: the text itself for a string option (``--output_name 2024``,
    ``--training_comment true``), Python's ``int()``/``float()`` for a number (``.5``, ``1.``, ``5E-5``; a steps or
    fraction key, kohya's ``int_or_float``, an int where ``int()`` reads it: ``--lr_warmup_steps .1`` or ``10``);
    anything else, or a number that does not read as one, a TOML literal (refused naming the key when it is the wrong
    type). ``kind``: the type to read ``text`` as, instead of ``key``'s declared one."""
    declared = kind or typing.get_type_hints(Config).get(key)
    kinds = set(typing.get_args(declared) or (declared,)) - {type(None)}
    if kinds == {str}:
        return text
    for number in (int, float):
        if number in kinds and kinds <= {int, float}:
            try:
                return number(text)
            except ValueError:
                pass
    return parse_value(text)


def _percent(key: str, value: str) -> float:
    """kohya's ``--lr_warmup_steps 10%``: the ratio 0.1 of the stage's steps."""
    try:
        return float(value[:-1]) / 100
    except ValueError:
        raise ConfigError(f"--{key} {value!r} is not a percentage (e.g. 10%)") from None
