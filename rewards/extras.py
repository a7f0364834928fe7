"""The reward service's optional dependencies (the ``serve`` extra: FastAPI, uvicorn, httpx),
imported on use, so the rest of the package works without them."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["SERVE_EXTRA", "MissingExtraError", "import_serve_dependency"]

SERVE_EXTRA = "pip install 'unigrpo-env[serve]'"


class MissingExtraError(ImportError):
    """A dependency of the ``serve`` extra is not installed."""


def import_serve_dependency(module: str) -> ModuleType:
    """``import module``, or :class:`MissingExtraError` with a one-line hint to install the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"the reward service needs {module.split('.')[0]}, which is not installed ({exc}); run: {SERVE_EXTRA}"
        ) from exc
