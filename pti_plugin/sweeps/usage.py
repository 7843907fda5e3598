"""A bad input of a sweep command (a preset the trainer refuses, a flag that does not fit the preset or the runs
already in ``--out``): one ``error: <message>`` line on stderr and exit status 2, as every other script's usage
error (``parser.error``) and the trainer's refused preset. A run that failed is not one (exit 1)."""

from __future__ import annotations

import sys


class UsageExit(SystemExit):
    """Exit status 2; ``str()`` is the message (what was printed, without ``error:``)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def usage_exit(message: str) -> UsageExit:
    """Print ``error: <message>`` on stderr and return the :class:`UsageExit` to raise."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return UsageExit(message)
