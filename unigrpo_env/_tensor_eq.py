"""Exact, NaN-aware equality of nested structures holding tensors, and the base class of the typed
observations and trajectory records that compare by it (so Gymnasium's checker and tests can
compare them)."""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict


def tensors_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and values; NaN equals NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        return bool(same.all())
    return bool(torch.equal(a, b))


def deep_equal(a: Any, b: Any) -> bool:
    """Recursive exact equality over dicts, lists, tuples, tensors and plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and tensors_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is type(b) and hasattr(type(a), "model_fields"):
        return all(deep_equal(getattr(a, k), getattr(b, k)) for k in type(a).model_fields)
    return bool(a == b)


class TensorRecord(BaseModel):
    """A frozen pydantic model holding tensors, compared exactly (NaN-aware) by value."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and deep_equal(self, other)

    __hash__ = None  # type: ignore[assignment]
