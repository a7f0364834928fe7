"""How this diffusers spells a dtype for ``from_pretrained``.

diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns, and goes in 1.0); older
versions know only ``torch_dtype``. :func:`dtype_option` gives the keyword the installed version
reads, so every loader here passes a dtype one way without a warning.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

__all__ = ["dtype_option"]


@cache
def _takes_dtype() -> bool:
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present where dtype is read)
    except ImportError:
        return False
    return True


def dtype_option(dtype: torch.dtype) -> dict[str, Any]:
    """``{"dtype": dtype}`` where diffusers reads ``dtype``, else ``{"torch_dtype": dtype}``."""
    return {"dtype": dtype} if _takes_dtype() else {"torch_dtype": dtype}
