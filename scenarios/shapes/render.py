"""Deterministic renderer: a :class:`Scene` to a ``(size, size, 3)`` uint8 RGB image.

Geometry. The canvas is split into a 3x3 grid of cells of side ``c = size / 3`` (a float, so any
size works). An object in cell ``(row, col)`` is centred at
``(cy, cx) = (round((row + 0.5)·c), round((col + 0.5)·c))`` (rounded to a pixel corner, so every
shape is mirror-symmetric on the pixel grid) and has half-extent ``h = SHAPE_EXTENT·c``.
A pixel ``(y, x)`` is sampled at its centre ``(y + 0.5, x + 0.5)``; with
``dy = y + 0.5 - cy``, ``dx = x + 0.5 - cx`` it belongs to

- a square   if ``|dy| <= h`` and ``|dx| <= h``;
- a circle   if ``dy² + dx² <= h²``;
- a triangle (isosceles, apex up, base ``2h``, height ``2h``) if ``-h <= dy <= h`` and
  ``|dx| <= (dy + h) / 2``.

With ``SHAPE_EXTENT = 0.38`` neighbouring shapes are about ``0.24·c`` apart (3 pixels at size 32),
so they never touch. Pixels are either the background or exactly a palette colour (no
anti-aliasing).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .scene import BACKGROUND, COLOURS, GRID, Scene

__all__ = ["SHAPE_EXTENT", "render", "shape_mask"]

SHAPE_EXTENT = 0.38
MIN_SIZE = 12


@lru_cache(maxsize=512)
def _cached_mask(shape: str, row: int, col: int, size: int) -> np.ndarray:
    cell = size / GRID
    cy, cx = round((row + 0.5) * cell), round((col + 0.5) * cell)
    h = SHAPE_EXTENT * cell
    centres = np.arange(size, dtype=np.float64) + 0.5
    dy = (centres - cy)[:, None]
    dx = (centres - cx)[None, :]
    if shape == "square":
        mask = (np.abs(dy) <= h) & (np.abs(dx) <= h)
    elif shape == "circle":
        mask = dy**2 + dx**2 <= h**2
    elif shape == "triangle":
        mask = (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.setflags(write=False)
    return mask


def shape_mask(shape: str, cell: tuple[int, int], size: int = 32) -> np.ndarray:
    """Boolean ``(size, size)`` mask of one shape drawn in one cell (read-only)."""
    return _cached_mask(shape, int(cell[0]), int(cell[1]), int(size))


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Draw ``scene`` on a white ``size`` x ``size`` canvas; returns a new uint8 ``(size, size, 3)``."""
    if not isinstance(scene, Scene):
        raise TypeError(f"render expects a Scene, got {type(scene).__name__}")
    if int(size) != size or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in scene.objects:
        image[shape_mask(obj.shape, obj.cell, size)] = COLOURS[obj.colour]
    return image
