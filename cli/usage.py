"""What every command of ``unigrpo`` shares (``main`` and ``serve`` import it; neither imports
the other's internals): the console, :class:`UserError`, and the rules of number flags.

:class:`UserError` is an error in what the user asked for: ``main`` prints it in one line and
exits with code 2. Click's ``FLOAT`` reads ``inf`` and ``nan`` as numbers, and ``min=`` lets
``inf`` through; every float option passes :func:`finite` as its callback, so a non-finite value
is a usage error before anything runs. Seeds are integers in ``[0, MAX_SEED]``
(:data:`~unigrpo_env.agents.config.MAX_SEED`), as the config's ``seed`` field.
"""

from __future__ import annotations

import math

import typer
from rich.console import Console

from unigrpo_env.agents.config import MAX_SEED

__all__ = ["MAX_SEED", "UserError", "console", "finite"]

#: Where the commands print (tables, progress).
console = Console()


class UserError(Exception):
    """An error in what the user asked for: reported in one line, exit code 2."""


def finite(value: float | None) -> float | None:
    """A float option's callback: the value itself, or a usage error if it is NaN or infinite."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"expected a finite number, got {value}")
    return value
