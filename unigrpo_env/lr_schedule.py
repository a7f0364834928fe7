"""Learning-rate schedules as a factor of the peak rate: a linear warm-up, then a decay.

Shared by the ShapesWorld pretraining (cosine to 10 %) and the UniGRPO agent (``lr_schedule``).
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["warmup_decay"]


def warmup_decay(
    step: int,
    warmup: int,
    total: int,
    decay: Literal["constant", "linear", "cosine"] = "cosine",
    min_ratio: float = 0.0,
) -> float:
    """Factor of the peak learning rate at ``step`` (counted from 0): ``(step + 1) / warmup`` over
    the first ``warmup`` steps, then with ``progress`` going 0 → 1 at ``total`` steps
    ``min_ratio + (1 − min_ratio)·d`` where ``d`` is 1 (constant), ``1 − progress`` (linear) or
    ``(1 + cos(π·progress)) / 2`` (cosine)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    if decay == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"decay must be 'constant', 'linear' or 'cosine', got {decay!r}")
