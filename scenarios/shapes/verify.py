"""Scoring an image against a task, GenEval-style, with a dense score for RL.

The verifier detects objects (:func:`detect_objects`) and runs binary check *items*, grouped by
kind. Let ``D`` be the detected objects and ``R`` the required objects (the task's specs, whose
shapes are all different):

- ``object``: one item per required shape, "some object in D has this shape", plus one item
  "no object in D has a shape outside R" (a wrong or unrecognised shape fails it);
- ``count``: one item, ``|D| == Σ spec.count`` (an extra or a missing object fails it);
- ``colour``: one item per spec with a colour, "some object in D has this colour";
- ``binding``: one item per spec with a colour, "the object matched to this spec has the spec's
  colour";
- ``position``: one item, "the objects matched to the relation's subject and reference satisfy
  it" (:func:`relation_holds`, on centroids).

Matching (for binding and position) assigns distinct detected objects to the specs, choosing
the assignment that maximises, in this order, the number of shape matches, the number of colour
matches, and whether the relation holds. So a recoloured or reshaped object is still matched to
its spec, and each check kind reacts to one attribute only:

=============  ========================================  =================================
category       kinds                                     an error in ... lowers only
=============  ========================================  =================================
single_object  object, count                             shape -> object; extra -> count
two_objects    object, count                             shape -> object; extra -> count
counting       object, count                             shape -> object; extra/missing -> count
colors         object, count, colour                     colour -> colour
position       object, count, position                   swapped places -> position
color_attr     object, count, colour, binding            recolour -> colour, binding;
                                                         swapped colours -> binding
=============  ========================================  =================================

(Removing an object that is the only one of its shape also removes that shape, so it lowers
both ``object`` and ``count``.) ``score`` is the fraction of items that pass, ``correct`` is
whether all pass, and ``checks[kind]`` is the fraction of that kind's items that pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import permutations
from typing import Protocol

import numpy as np

from .constraints import Constraints, relation_holds
from .detect import DetectedObject, check_image, detect_objects
from .scene import GRID

__all__ = ["DetectedObject", "VerifierResult", "detect_objects", "verify", "verify_batch"]

#: Only the largest objects take part in matching (bounds the search on very noisy images).
MAX_MATCH_CANDIDATES = 8


class _HasConstraints(Protocol):
    constraints: Constraints


@dataclass(frozen=True)
class VerifierResult:
    """Outcome of :func:`verify`.

    Attributes:
        score: fraction of check items that pass, in [0, 1].
        correct: all items pass (GenEval's binary criterion).
        checks: per check kind, the fraction of its items that pass.
        objects: what the detector found.
    """

    score: float
    correct: bool
    checks: dict[str, float]
    objects: tuple[DetectedObject, ...] = field(default=())


def verify(image: np.ndarray, task: _HasConstraints | Constraints) -> VerifierResult:
    """Score ``image`` (uint8 ``(H, W, 3)``) against a task (or its :class:`Constraints`)."""
    constraints = task if isinstance(task, Constraints) else task.constraints
    detected = detect_objects(image)
    cell_size = check_image(image).shape[1] / GRID
    items = _check_items(detected, constraints, cell_size)
    passed = [ok for kind_items in items.values() for ok in kind_items]
    return VerifierResult(
        score=sum(passed) / len(passed),
        correct=all(passed),
        checks={kind: sum(ok) / len(ok) for kind, ok in items.items()},
        objects=tuple(detected),
    )


def verify_batch(images: np.ndarray, tasks: Sequence[_HasConstraints | Constraints]) -> list[VerifierResult]:
    """:func:`verify` for each image of an ``(N, H, W, 3)`` uint8 batch and its task."""
    if not isinstance(images, np.ndarray) or images.ndim != 4:
        got = getattr(images, "shape", type(images).__name__)
        raise ValueError(f"images must be a numpy array of shape (N, H, W, 3), got {got!r}")
    if len(images) != len(tasks):
        raise ValueError(f"got {len(images)} images but {len(tasks)} tasks")
    return [verify(image, task) for image, task in zip(images, tasks)]


def _check_items(detected: list[DetectedObject], constraints: Constraints, cell_size: float) -> dict[str, list[bool]]:
    specs = constraints.objects
    shapes_found = {d.shape for d in detected}
    colours_found = {d.colour for d in detected}
    required_shapes = {spec.shape for spec in specs}
    items: dict[str, list[bool]] = {
        "object": [spec.shape in shapes_found for spec in specs] + [shapes_found <= required_shapes],
        "count": [len(detected) == constraints.total_count],
    }
    kinds = constraints.check_kinds()
    if "colour" in kinds:
        items["colour"] = [spec.colour in colours_found for spec in specs if spec.colour is not None]
    if "binding" in kinds or "position" in kinds:
        match = _match(detected, constraints, cell_size)
        if "binding" in kinds:
            items["binding"] = [
                match[i] is not None and match[i].colour == spec.colour
                for i, spec in enumerate(specs)
                if spec.colour is not None
            ]
        if "position" in kinds:
            items["position"] = [_relation_ok(match, constraints, cell_size)]
    return {kind: items[kind] for kind in kinds}


def _relation_ok(match: Sequence[DetectedObject | None], constraints: Constraints, cell_size: float) -> bool:
    relation = constraints.relation
    if relation is None:
        return True
    subject, reference = match[relation.subject], match[relation.reference]
    if subject is None or reference is None:
        return False
    return relation_holds(relation.relation, subject.centroid, reference.centroid, cell_size)


def _match(
    detected: list[DetectedObject], constraints: Constraints, cell_size: float
) -> tuple[DetectedObject | None, ...]:
    """Distinct detected objects (or None) for each spec; see the module docstring for the rule."""
    specs = constraints.objects
    candidates: list[DetectedObject | None] = sorted(detected, key=lambda d: -d.area)[:MAX_MATCH_CANDIDATES]
    candidates += [None] * len(specs)
    best: tuple[DetectedObject | None, ...] = (None,) * len(specs)
    best_key = (-1, -1, False)
    for choice in permutations(range(len(candidates)), len(specs)):
        match = tuple(candidates[i] for i in choice)
        key = (
            sum(d is not None and d.shape == s.shape for d, s in zip(match, specs)),
            sum(d is not None and d.colour == s.colour for d, s in zip(match, specs)),
            _relation_ok(match, constraints, cell_size),
        )
        if key > best_key:
            best, best_key = match, key
    return best
