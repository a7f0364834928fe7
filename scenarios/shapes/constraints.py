"""What a task requires of an image, in a form the verifier can check.

A task asks for objects (:class:`ObjectSpec`: a shape, optionally a colour, and a count) and
optionally a spatial relation between two of them (:class:`RelationSpec`). Within one task the
required shapes are all different (as in GenEval, whose prompts name different object classes),
so a shape identifies which requirement an object is meant to satisfy.

Which check kinds a task uses follows from its constraints (:meth:`Constraints.check_kinds`):
``object`` and ``count`` always; ``colour`` when some object has a required colour; ``binding``
when two or more objects have required colours (attribute binding); ``position`` when there is a
relation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .scene import CELLS, COLOURS, MAX_OBJECTS, SHAPES

__all__ = [
    "CHECK_KINDS",
    "Constraints",
    "ObjectSpec",
    "RELATIONS",
    "RELATION_CELLS",
    "RelationSpec",
    "relation_holds",
]

CHECK_KINDS: tuple[str, ...] = ("object", "count", "colour", "position", "binding")

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

#: Canonical cells of (subject, reference) when a task asks "subject RELATION reference".
RELATION_CELLS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "left of": (CELLS["left"], CELLS["right"]),
    "right of": (CELLS["right"], CELLS["left"]),
    "above": (CELLS["top"], CELLS["bottom"]),
    "below": (CELLS["bottom"], CELLS["top"]),
}

#: The subject's centroid must be at least this many cell widths away along the relation's axis.
RELATION_MARGIN = 0.5


def relation_holds(
    relation: str,
    subject: tuple[float, float],
    reference: tuple[float, float],
    cell_size: float,
) -> bool:
    """Whether centroid ``subject`` (y, x) is ``relation`` of centroid ``reference``.

    "left of" means ``reference.x - subject.x > RELATION_MARGIN·cell_size``; the other relations
    are the same test along their own axis and direction (image y grows downwards).
    """
    (sy, sx), (ry, rx) = subject, reference
    gap = {
        "left of": rx - sx,
        "right of": sx - rx,
        "above": ry - sy,
        "below": sy - ry,
    }[relation]
    return gap > RELATION_MARGIN * cell_size


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of ``shape``, each of ``colour`` if given."""

    shape: str
    colour: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"colour must be None or one of {tuple(COLOURS)}, got {self.colour!r}")
        if not 1 <= self.count <= MAX_OBJECTS:
            raise ValueError(f"count must be in 1..{MAX_OBJECTS}, got {self.count!r}")


@dataclass(frozen=True)
class RelationSpec:
    """Object ``subject`` is ``relation`` of object ``reference`` (indices into the specs)."""

    subject: int
    relation: str
    reference: int

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
        if self.subject == self.reference:
            raise ValueError("a relation needs two different objects")


@dataclass(frozen=True)
class Constraints:
    """Everything the verifier checks for one task."""

    objects: tuple[ObjectSpec, ...]
    relation: RelationSpec | None = None

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if not objects:
            raise ValueError("constraints need at least one object")
        shapes = [spec.shape for spec in objects]
        if len(set(shapes)) != len(shapes):
            raise ValueError(f"required shapes must be different, got {shapes}")
        if self.total_count > MAX_OBJECTS:
            raise ValueError(f"at most {MAX_OBJECTS} objects in all, got {self.total_count}")
        if self.relation is not None:
            for index in (self.relation.subject, self.relation.reference):
                if not 0 <= index < len(objects) or objects[index].count != 1:
                    raise ValueError(f"relation index {index} must name a single required object")

    @property
    def total_count(self) -> int:
        return sum(spec.count for spec in self.objects)

    def check_kinds(self) -> tuple[str, ...]:
        """The check kinds this task uses, in CHECK_KINDS order."""
        coloured = sum(spec.colour is not None for spec in self.objects)
        used = {"object", "count"}
        if coloured:
            used.add("colour")
        if coloured >= 2:
            used.add("binding")
        if self.relation is not None:
            used.add("position")
        return tuple(kind for kind in CHECK_KINDS if kind in used)

    def to_dict(self) -> dict[str, Any]:
        return {
            "objects": [{"shape": s.shape, "colour": s.colour, "count": s.count} for s in self.objects],
            "relation": None
            if self.relation is None
            else {
                "subject": self.relation.subject,
                "relation": self.relation.relation,
                "reference": self.relation.reference,
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Constraints:
        relation = data.get("relation")
        return cls(
            objects=tuple(ObjectSpec(**spec) for spec in data["objects"]),
            relation=None if relation is None else RelationSpec(**relation),
        )
