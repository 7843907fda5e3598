"""A kohya ``--config_file`` TOML read as kohya sd-scripts reads it (``train_util.read_config_from_file``).

kohya adds ``.toml`` to a name without it, flattens the file's sections into one table of arguments, and hands
the values to its parser as they are (no conversion): ``resolution`` stays the string its parser keeps
(``"512,768"``), ``text_encoder_lr`` the list its ``nargs="*"`` writes (``networks.lora`` trains every text
encoder at the list's first rate), a switch may be written ``1`` (the kohya_ss GUI's
``persistent_data_loader_workers``), and a key that is no option of the parser is ignored. The kohya_ss GUI's
file holds a few such keys of its own (:data:`GUI_ONLY_KEYS`): they are left out with a line naming them; any
other unknown key stays an error naming it (kohya would ignore a misspelt option silently).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

#: Keys the kohya_ss GUI writes into the TOML it hands sd-scripts (``lora_gui.py``) that are no option of
#: ``train_network.py`` / ``sdxl_train_network.py``: kohya's parser keeps them unread. The value says what each is.
GUI_ONLY_KEYS = {
    "epoch": "the GUI's epoch count, from which it computes max_train_steps",
    "noise_offset_type": "the GUI's choice between noise_offset and multires_noise_iterations, which it writes too",
    "stop_text_encoder_training": "an option of kohya's train_db.py only",
    "train_inpainting": "an option of kohya's other trainers only",
}
#: The GUI's keys that ask for something kohya's train_network does not do either: named in a warning, the others in
#: an info line (their meaning is in the keys the GUI writes beside them).
GUI_KEYS_ASKING = ("stop_text_encoder_training", "train_inpainting")


def kohya_file_path(name: str | Path) -> Path:
    """kohya's ``--config_file`` name: ``.toml`` is added unless the name ends with it (``kohya`` reads
    ``kohya.toml``, ``kohya.cfg`` reads ``kohya.cfg.toml``)."""
    text = str(name)
    return Path(text if text.endswith(".toml") else text + ".toml").expanduser()


def kohya_arguments(raw: dict[str, Any], path: Path, switches: set[str]) -> dict[str, Any]:
    """The arguments of kohya config file ``path`` read as ``raw``: its sections flattened, the GUI's own keys
    (:data:`GUI_ONLY_KEYS`) left out, a ``dataset_config`` replacing the folder options beside it (kohya ignores
    them), ``text_encoder_lr`` as its first rate and a switch (a key of ``switches``) written ``0``/``1`` as a bool."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key not in ("plugins",):
            flat.update(value)
        else:
            flat[key] = value
    left_out = sorted(set(flat) & set(GUI_ONLY_KEYS))
    if left_out:
        logger.log(logging.WARNING if set(left_out) & set(GUI_KEYS_ASKING) else logging.INFO,
                   "kohya config_file %s: %s left out: no option of kohya's train_network (%s)", path,
                   ", ".join(left_out), "; ".join(f"{key}: {GUI_ONLY_KEYS[key]}" for key in left_out))
    ignored = [key for key in ("train_data_dir", "reg_data_dir", "in_json") if flat.get("dataset_config") and flat.get(key)]
    if ignored:  # kohya's train_network: the dataset config wins, the folder options are ignored with a warning
        logger.warning("kohya config_file %s: dataset_config = %r replaces %s (kohya ignores them beside it)", path,
                       flat["dataset_config"], ", ".join(f"{key} = {flat[key]!r}" for key in ignored))
    out = {key: value for key, value in flat.items() if key not in GUI_ONLY_KEYS and key not in ignored}
    if isinstance(out.get("text_encoder_lr"), list):
        out["text_encoder_lr"] = first_text_encoder_lr(out["text_encoder_lr"], f"kohya config_file {path}")
    for key, value in out.items():
        if key in switches and type(value) is int and value in (0, 1):
            out[key] = bool(value)  # kohya: a switch's value is only tested for truth
    return out


#: The data sources: one given over a layer (a kohya config_file over the presets beneath it, the command line over
#: both) replaces the layer's other one (with its companion keys), as kohya's dataset config replaces its folder
#: options. Both at one layer (the presets, one command line) stay an error.
DATA_SOURCES = {"train_data_dir": ("dataset_config",), "dataset_config": ("train_data_dir", "reg_data_dir", "in_json")}


def replace_data_source(raw: dict[str, Any], over: dict[str, Any], named: Callable[[str], str],
                        origins: dict[str, str] | None) -> dict[str, Any]:
    """``raw`` without the data source that ``over`` replaces (:data:`DATA_SOURCES`: over's ``dataset_config``
    replaces raw's ``train_data_dir``, and the reverse), with a warning naming what it replaced and where that came
    from (``origins``, updated: key -> a kohya config_file's; else the preset). ``named``: how ``over``'s key is
    named (``--dataset_config``, ``--set dataset_config``, ``config_file F: dataset_config``). ``over`` giving both
    replaces nothing."""
    origins = {} if origins is None else origins
    given = [key for key in DATA_SOURCES if over.get(key)]
    if len(given) != 1:
        return raw
    replaced = [key for key in DATA_SOURCES[given[0]] if raw.get(key) and key not in over]
    if replaced:
        whose: dict[str, list[str]] = {}
        for key in replaced:
            origin = origins.get(key, "preset")
            owner = "the preset's" if origin == "preset" else f"{origin}'s"
            whose.setdefault(owner, []).append(f"{key} = {raw[key]!r}")
        logger.warning("%s replaces %s", named(given[0]),
                       " and ".join(f"{owner} {', '.join(items)}" for owner, items in whose.items()))
    for key in replaced:
        origins.pop(key, None)
    return {k: v for k, v in raw.items() if k not in replaced}


def first_text_encoder_lr(rates: list[Any], where: str) -> Any:
    """kohya's ``text_encoder_lr`` list (``nargs="*"``): ``networks.lora`` trains every text encoder at its first
    rate, and an empty list is unset; a later, different rate is named in a warning (kohya ignores it silently)."""
    if not rates:
        return None
    if any(rate != rates[0] for rate in rates[1:]):
        logger.warning("%s: text_encoder_lr = %s: every text encoder trains at the first rate, %r, as kohya's "
                       "networks.lora does (it reads no second rate)", where, rates, rates[0])
    return rates[0]

