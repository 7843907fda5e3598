"""Reading the text files a user writes (presets, kohya ``config_file`` and ``dataset_config`` TOML, sample prompts,
metadata JSON), with the habits of Windows editors in mind.

- UTF-8 with or without a byte-order mark (Notepad's "UTF-8 with BOM") is read; the mark is dropped. kohya reads
  these files as plain UTF-8, so there the mark sticks to the first key or line.
- CRLF line endings are read as line breaks (TOML and JSON take them; prompt lines are split on them).
- UTF-16 (Notepad's "Unicode") or other non-UTF-8 text is refused, saying how to save it as UTF-8 (kohya stops on
  it with a ``UnicodeDecodeError``).
- A TOML error on a line holding a backslash in a ``"..."`` string says that a Windows path there must be written
  in single quotes or with forward slashes (``"C:\\Users"`` is an invalid escape in TOML).

Each function raises ``ValueError`` with the problem after the file's name (``is not valid TOML: ...``); the
caller puts the file and its key in front.
"""

from __future__ import annotations

import codecs
import os
import posixpath
import re
import tomllib
from pathlib import Path
from typing import Any

_UTF16_32 = {codecs.BOM_UTF32_LE: "UTF-32", codecs.BOM_UTF32_BE: "UTF-32",
             codecs.BOM_UTF16_LE: "UTF-16", codecs.BOM_UTF16_BE: "UTF-16"}  # UTF-32 LE first: it starts as UTF-16 LE
_SAVE_AS = "save it as UTF-8 (Notepad: File > Save As, Encoding: UTF-8)"


def decode_user_text(data: bytes) -> str:
    """``data`` as UTF-8 text, a leading byte-order mark dropped; ValueError (saying how to fix it) otherwise."""
    for mark, name in _UTF16_32.items():
        if data.startswith(mark):
            hint = ' (Notepad\'s "Unicode")' if name == "UTF-16" else ""
            raise ValueError(f"is {name} text{hint}, not UTF-8: {_SAVE_AS}")
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ValueError(f"is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}; a Windows code page such "
                         f"as cp1252?): {_SAVE_AS}") from None


def read_user_text(path: str | Path) -> str:
    """The text of the file at ``path`` (:func:`decode_user_text`); OSError as ``open`` raises it."""
    return decode_user_text(Path(path).read_bytes())


_BACKSLASH_IN_BASIC_STRING = re.compile(r'"[^"\']*\\[^"]*"')


def toml_problem(text: str, exc: tomllib.TOMLDecodeError) -> str:
    """``is not valid TOML: <exc>``, with the line when tomllib names one, and the hint for Windows paths when that
    line holds a backslash in a ``"..."`` string."""
    message = f"is not valid TOML: {exc}"
    found = re.search(r"at line (\d+)", str(exc))
    lines = text.splitlines()
    if not found or not 0 < int(found.group(1)) <= len(lines):
        return message
    line = lines[int(found.group(1)) - 1].strip()
    message += f": {line}"
    if _BACKSLASH_IN_BASIC_STRING.search(line):
        message += ("\n  a backslash in a TOML \"...\" string starts an escape (\\U, \\d... are errors; \\t, \\n "
                    "become a tab, a line break): write a Windows path in single quotes ('C:\\Users\\me\\data') "
                    "or with forward slashes (\"C:/Users/me/data\")")
    return message


def load_toml_text(text: str) -> dict[str, Any]:
    """``text`` parsed as TOML; ValueError from :func:`toml_problem`."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(toml_problem(text, exc)) from None


def read_toml_file(path: str | Path) -> dict[str, Any]:
    """The TOML file at ``path`` read as a user may have saved it (:func:`read_user_text`, :func:`load_toml_text`)."""
    try:
        text = read_user_text(path)
    except ValueError as exc:
        raise ValueError(f"is not valid TOML: it {exc}") from None
    return load_toml_text(text)


_DRIVE = re.compile(r"(?:^|/)([A-Za-z]):[\\/](.*)$")  # C:\..., also once a preset's folder is put in front
_LINE_BREAKS = "\t\n\r\b\f"


def windows_path_hint(value: str) -> str:
    """For a path that was not found: what in it looks like a Windows habit, as a sentence to append ("" when
    nothing does, or on Windows, where these are ordinary paths)."""
    if os.name == "nt":
        return ""
    if any(c in value for c in _LINE_BREAKS):
        return ("; it holds a tab or a line break: in a TOML \"...\" string \\t and \\n are escapes, so write a "
                "Windows path in single quotes or with forward slashes")
    if drive := _DRIVE.search(value):
        letter, rest = drive.group(1), drive.group(2).replace("\\", "/")
        return (f"; it looks like a Windows path (drive {letter.upper()}:), which this machine cannot open: give "
                f"the folder's path on this machine (under WSL: /mnt/{letter.lower()}/{rest})")
    if "\\" in value:
        return (f"; '\\' is part of a file name here, not a folder separator: write "
                f"{posixpath.normpath(value.replace(chr(92), '/'))!r} (forward slashes, no trailing backslash)")
    return ""


def path_not_found(value: str | os.PathLike, what: str = "path", at: os.PathLike | None = None, kind: str = "") -> str:
    """``<what> not found: looked for <the absolute path>`` (the one form of this message), with
    :func:`windows_path_hint` of ``value``, the path as the user wrote it. ``at``: where it was looked for, when not
    at ``value`` itself (a path relative to the file that names it); ``kind``: what was looked for there, said in
    brackets after the path."""
    looked = str(Path(value if at is None else at).expanduser().resolve())
    shown = repr(looked) if any(c in looked for c in _LINE_BREAKS) else looked
    return f"{what} not found: looked for {shown}{f' ({kind})' if kind else ''}{windows_path_hint(str(value))}"


__all__ = ["decode_user_text", "path_not_found", "load_toml_text", "read_toml_file", "read_user_text", "toml_problem",
           "windows_path_hint"]
