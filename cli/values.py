"""What every number flag of the ``unigrpo`` command shares: finite floats and seeds in range.

Click's ``FLOAT`` reads ``inf`` and ``nan`` as numbers, and ``min=`` lets ``inf`` through; every
float option of the command passes :func:`finite` as its callback, so a non-finite value is a
usage error (one line, exit code 2) before anything runs. Seeds are integers in
``[0, MAX_SEED]`` (:data:`~unigrpo_env.agents.config.MAX_SEED`), as the config's ``seed`` field.
"""

from __future__ import annotations

import math

import typer

from unigrpo_env.agents.config import MAX_SEED

__all__ = ["MAX_SEED", "finite"]


def finite(value: float | None) -> float | None:
    """A float option's callback: the value itself, or a usage error if it is NaN or infinite."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"expected a finite number, got {value}")
    return value
