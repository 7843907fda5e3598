"""A dict that refuses changes: ``Config.plugins`` and its tables, which plugins read through ``state.config``.

A ``dict`` still (JSON, TOML, ``dataclasses.asdict``, ``isinstance`` checks and comparisons see one), but every
change is refused with the key's path, and a copy (``copy``, ``deepcopy``, ``pickle``) is a read-only one too.
"""

from __future__ import annotations

from typing import Any, NoReturn


class ReadOnlyDict(dict):
    """A ``dict`` whose items cannot be set, removed or updated (``where``: the dotted path of the mapping)."""

    __slots__ = ("where",)

    def __init__(self, items: Any = (), where: str = "config") -> None:
        super().__init__(items)
        self.where = where

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(f"{self.where} is read-only (the run's settings, as the preset gave them)")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return type(self), (dict(self), self.where)

    def copy(self) -> dict:
        """A plain, changeable copy (as ``dict(self)``)."""
        return dict(self)


def read_only_tables(tables: Any, where: str) -> Any:
    """``tables`` (a dict of tables: ``plugins``) read-only at both levels; anything else unchanged (its type check
    names it)."""
    if not isinstance(tables, dict):
        return tables
    return ReadOnlyDict({name: ReadOnlyDict(value, f"{where}.{name}") if isinstance(value, dict) else value
                         for name, value in tables.items()}, where)
