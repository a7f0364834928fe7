"""Scenes of ShapesWorld and their canonical description language.

A scene is 1 to 4 flat-coloured shapes, each in its own cell of a 3x3 grid.

Description grammar (whitespace-separated, lower-case; tokenised word-level)::

    description := object ( " , " object )*
    object      := COLOUR " " SHAPE " at " CELL
    COLOUR      := red | green | blue | yellow | purple | orange
    SHAPE       := square | circle | triangle
    CELL        := top-left | top | top-right | left | center | right
                 | bottom-left | bottom | bottom-right

e.g. ``"red circle at top-left , blue square at right"``. Objects are listed in reading order
of their cells (row by row, left to right), so every scene has exactly one description and
``parse_description(describe(s)) == s``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BACKGROUND",
    "CELLS",
    "CELL_NAMES",
    "COLOURS",
    "DescriptionError",
    "GRID",
    "MAX_OBJECTS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "canonical_order",
    "cell_name",
    "describe",
    "description_words",
    "parse_description",
]

#: The palette. Chosen far apart from each other (minimum pairwise Euclidean RGB distance
#: about 115, between yellow and orange) and from the white background (at least 200), so a
#: pixel with Gaussian noise of std 20 per channel still snaps to its own colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 0, 0),
    "green": (20, 160, 40),
    "blue": (20, 60, 220),
    "yellow": (250, 235, 0),
    "purple": (140, 20, 200),
    "orange": (240, 120, 0),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

SHAPES: tuple[str, ...] = ("square", "circle", "triangle")

GRID = 3  # the canvas is a GRID x GRID grid of cells
MAX_OBJECTS = 4

#: Cell name -> (row, col); row 0 is the top, col 0 the left.
CELLS: dict[str, tuple[int, int]] = {
    "top-left": (0, 0),
    "top": (0, 1),
    "top-right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom-left": (2, 0),
    "bottom": (2, 1),
    "bottom-right": (2, 2),
}
CELL_NAMES: dict[tuple[int, int], str] = {rc: name for name, rc in CELLS.items()}

_SEPARATOR = ","
_AT = "at"


class DescriptionError(ValueError):
    """A description does not follow the grammar of :func:`describe`."""


def cell_name(cell: tuple[int, int]) -> str:
    """Name of a (row, col) cell, e.g. ``(0, 2) -> "top-right"``."""
    try:
        return CELL_NAMES[tuple(cell)]  # type: ignore[index]
    except KeyError:
        raise ValueError(f"cell must be (row, col) with row, col in 0..{GRID - 1}, got {cell!r}") from None


@dataclass(frozen=True)
class SceneObject:
    """One flat-coloured shape in one cell."""

    shape: str
    colour: str
    cell: tuple[int, int]

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {tuple(COLOURS)}, got {self.colour!r}")
        try:
            cell = (int(self.cell[0]), int(self.cell[1]))
        except (TypeError, ValueError, IndexError):
            raise ValueError(f"cell must be a (row, col) pair, got {self.cell!r}") from None
        if len(self.cell) != 2 or cell not in CELL_NAMES:
            raise ValueError(f"cell must be (row, col) with row, col in 0..{GRID - 1}, got {self.cell!r}")
        object.__setattr__(self, "cell", cell)


def canonical_order(objects: tuple[SceneObject, ...] | list[SceneObject]) -> tuple[SceneObject, ...]:
    """Objects sorted into reading order of their cells (the order :func:`describe` uses)."""
    return tuple(sorted(objects, key=lambda o: o.cell))


@dataclass(frozen=True)
class Scene:
    """1 to ``MAX_OBJECTS`` objects, at most one per cell.

    The objects are stored in canonical order, so two scenes with the same objects compare
    equal whatever order they were given in.
    """

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        if not 1 <= len(objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(objects)}")
        for obj in objects:
            if not isinstance(obj, SceneObject):
                raise ValueError(f"scene objects must be SceneObject, got {type(obj).__name__}")
        cells = [o.cell for o in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share one cell: cells {cells}")
        object.__setattr__(self, "objects", canonical_order(objects))

    def replace_object(
        self,
        index: int,
        *,
        shape: str | None = None,
        colour: str | None = None,
        cell: tuple[int, int] | None = None,
    ) -> Scene:
        """A copy with object ``index`` (in canonical order) given a new shape, colour or cell."""
        old = self.objects[index]
        new = SceneObject(shape or old.shape, colour or old.colour, cell if cell is not None else old.cell)
        return Scene(self.objects[:index] + (new,) + self.objects[index + 1 :])


def describe(scene: Scene) -> str:
    """The canonical description, e.g. ``"red circle at top-left , blue square at right"``."""
    parts = [f"{o.colour} {o.shape} {_AT} {cell_name(o.cell)}" for o in scene.objects]
    return f" {_SEPARATOR} ".join(parts)


def parse_description(text: str, strict: bool = False) -> Scene:
    """Parse a description back into a :class:`Scene` (the inverse of :func:`describe`).

    Tokens are split on any whitespace. With ``strict=True`` the objects must also be listed in
    canonical order (so that ``describe(parse_description(t, strict=True)) == t`` up to
    whitespace). Raises :class:`DescriptionError` saying what was expected where.
    """
    if not isinstance(text, str):
        raise DescriptionError(f"a description must be a string, got {type(text).__name__}")
    tokens = text.split()
    if not tokens:
        raise DescriptionError("empty description: expected 'COLOUR SHAPE at CELL [, ...]'")
    groups: list[list[str]] = [[]]
    for token in tokens:
        if token == _SEPARATOR:
            groups.append([])
        else:
            groups[-1].append(token)
    objects = [_parse_object(group, i) for i, group in enumerate(groups)]
    if strict and tuple(objects) != canonical_order(objects):
        raise DescriptionError("objects must be listed in reading order of their cells (top-left first)")
    try:
        return Scene(tuple(objects))
    except ValueError as err:
        raise DescriptionError(str(err)) from None


def _parse_object(group: list[str], index: int) -> SceneObject:
    where = f"object {index + 1}"
    if len(group) != 4:
        raise DescriptionError(
            f"{where}: expected 4 words 'COLOUR SHAPE at CELL', got {len(group)}: {' '.join(group)!r}"
        )
    colour, shape, at, cell = group
    if colour not in COLOURS:
        raise DescriptionError(f"{where}: expected a colour {tuple(COLOURS)}, got {colour!r}")
    if shape not in SHAPES:
        raise DescriptionError(f"{where}: expected a shape {SHAPES}, got {shape!r}")
    if at != _AT:
        raise DescriptionError(f"{where}: expected {_AT!r} after the shape, got {at!r}")
    if cell not in CELLS:
        raise DescriptionError(f"{where}: expected a cell {tuple(CELLS)}, got {cell!r}")
    return SceneObject(shape=shape, colour=colour, cell=CELLS[cell])


def description_words() -> set[str]:
    """Every word that can appear in a description."""
    return set(COLOURS) | set(SHAPES) | set(CELLS) | {_AT, _SEPARATOR}
