"""Riddle tasks of ShapesWorld, in GenEval's six categories, with train / held-out splits.

Each task has a prompt (a riddle), the reasoning that solves it, and the canonical target
scene. Categories (as in GenEval):

- ``single_object``: one object of a shape            "draw a shape like a wheel"
- ``two_objects``:   two objects of different shapes  "draw a circle and a shape with four corners"
- ``counting``:      N (2..4) objects of one shape    "draw one more than two triangles"
- ``colors``:        one object of a colour and shape "draw a circle in the colour of grass"
- ``position``:      object A in a relation to B      "draw a circle above a shape like a box"
- ``color_attr``:    two objects, each its own colour "draw a red circle and a blue square"

Canonical targets. Attributes a prompt leaves free get fixed values, so the description is a
function of the prompt: uncoloured objects are ``DEFAULT_COLOUR``; objects go into the cells of
``LAYOUTS[n]`` in order of mention (one: center; two: left, right; three: left, center, right;
four: the corners); "A left of B" puts A at left and B at right, "A above B" puts A at top and
B at bottom (:data:`RELATION_CELLS`).

Splits. A task's ``combo`` is the tuple of the phrase keys its prompt combines (plus the relation
for ``position``), leaving out the filler template ("draw", "a picture of", ...). Per category,
a fixed fraction of the combos, ranked by a SHA-256 hash, is held out: a held-out prompt's
combination of phrases never occurs in that category's training tasks, while each phrase and
word does occur in training (in other combinations or categories). Everything is deterministic.

The text the language model writes is ``answer_text(task)``: the reasoning facts, then the
marker ``"answer :"``, then the description.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from itertools import permutations
from typing import Any

from .constraints import RELATION_CELLS, RELATIONS, Constraints, ObjectSpec, RelationSpec
from .riddles import (
    NUMBER_WORDS,
    TEMPLATES,
    Phrase,
    colour_phrases,
    count_phrases,
    noun_phrase,
    shape_phrases,
)
from .scene import CELLS, COLOURS, SHAPES, Scene, SceneObject, cell_name, describe, description_words

__all__ = [
    "ANSWER_MARKER",
    "CATEGORIES",
    "DEFAULT_COLOUR",
    "LAYOUTS",
    "SPLITS",
    "ShapesTask",
    "answer_text",
    "extract_description",
    "task_split",
    "vocabulary",
]

CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
SPLITS: tuple[str, ...] = ("train", "heldout")
ANSWER_MARKER = "answer :"
DEFAULT_COLOUR = "blue"

LAYOUTS: dict[int, tuple[str, ...]] = {
    1: ("center",),
    2: ("left", "right"),
    3: ("left", "center", "right"),
    4: ("top-left", "top-right", "bottom-left", "bottom-right"),
}

#: Fraction of each category's combos that is held out.
HELDOUT_FRACTION: dict[str, float] = {
    "single_object": 0.2,
    "two_objects": 0.1,
    "counting": 0.1,
    "colors": 0.1,
    "position": 0.1,
    "color_attr": 0.1,
}
#: Categories whose full combination space is large are subsampled (by hash rank) to this many.
MAX_COMBOS = 480
#: color_attr draws this many phrase combinations for each (colour, shape, colour, shape).
COLOR_ATTR_VARIANTS = 3


@dataclass(frozen=True)
class ShapesTask:
    """One riddle task.

    Attributes:
        prompt: what the user asks.
        category: one of CATEGORIES.
        target: the canonical scene an oracle draws.
        reasoning: the facts that solve the riddle ("" when the prompt is plain).
        description: ``describe(target)``.
        constraints: what the verifier checks.
        combo: the phrase keys the prompt combines (defines the held-out split).
    """

    prompt: str
    category: str
    target: Scene
    reasoning: str
    description: str
    constraints: Constraints
    combo: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {self.category!r}")
        if self.description != describe(self.target):
            raise ValueError(f"description {self.description!r} is not describe(target)")
        object.__setattr__(self, "combo", tuple(self.combo))

    @property
    def answer(self) -> str:
        """The full text the language model should write (see :func:`answer_text`)."""
        return answer_text(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; ``ShapesTask.from_dict(task.to_dict()) == task``."""
        return {
            "prompt": self.prompt,
            "category": self.category,
            "target": [{"shape": o.shape, "colour": o.colour, "cell": list(o.cell)} for o in self.target.objects],
            "reasoning": self.reasoning,
            "description": self.description,
            "constraints": self.constraints.to_dict(),
            "combo": list(self.combo),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapesTask:
        target = Scene(tuple(SceneObject(o["shape"], o["colour"], tuple(o["cell"])) for o in data["target"]))
        return cls(
            prompt=data["prompt"],
            category=data["category"],
            target=target,
            reasoning=data["reasoning"],
            description=data["description"],
            constraints=Constraints.from_dict(data["constraints"]),
            combo=tuple(data.get("combo", ())),
        )


def answer_text(task: ShapesTask) -> str:
    """Reasoning, the marker, the description: "grass is green . answer : green circle at center"."""
    head = f"{task.reasoning} " if task.reasoning else ""
    return f"{head}{ANSWER_MARKER} {task.description}"


def extract_description(text: str) -> str | None:
    """The words after the last ``"answer :"`` marker, single-spaced; None without a marker."""
    tokens = text.split()
    marker = ANSWER_MARKER.split()
    for start in range(len(tokens) - len(marker), -1, -1):
        if tokens[start : start + len(marker)] == marker:
            return " ".join(tokens[start + len(marker) :])
    return None


def task_split(split: str) -> list[ShapesTask]:
    """All tasks of ``split`` ("train" or "heldout"), in category order; the same list every call."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(_splits()[split])


def vocabulary() -> list[str]:
    """Sorted list of every word of any prompt, reasoning, answer text or description."""
    words = set(description_words()) | set(ANSWER_MARKER.split()) | {"a", "an", "and", "puts", "at"}
    words |= set(NUMBER_WORDS.values())
    for template in TEMPLATES:
        words |= set(template.replace("{}", " ").split())
    phrases = [p for c in COLOURS for p in colour_phrases(c)] + [p for s in SHAPES for p in shape_phrases(s)]
    phrases += [p for n in (2, 3, 4) for p in count_phrases(n)]
    for phrase in phrases:
        words |= set(phrase.text.split()) | set(phrase.plural.split()) | set(phrase.reasoning.split())
    for relation in RELATIONS:
        words |= set(relation.split())
    for tasks in _splits().values():
        for task in tasks:
            words |= set(task.prompt.split()) | set(answer_text(task).split())
    return sorted(words)


# ----------------------------------------------------------------------------- construction


def _hash(*parts: object) -> int:
    """Deterministic (process- and version-independent) hash of some values."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16], 16)


def _pick(options: tuple[Any, ...], *key: object) -> Any:
    return options[_hash(*key) % len(options)]


def _facts(*phrases: Phrase | None) -> list[str]:
    return [p.reasoning for p in phrases if p is not None and p.reasoning]


def _layout(objects: list[tuple[str, str]]) -> Scene:
    cells = LAYOUTS[len(objects)]
    return Scene(tuple(SceneObject(shape, colour, CELLS[cell]) for (shape, colour), cell in zip(objects, cells)))


def _task(
    category: str,
    body: str,
    template: str,
    target: Scene,
    facts: list[str],
    constraints: Constraints,
    combo: tuple[str, ...],
) -> ShapesTask:
    return ShapesTask(
        prompt=template.format(body),
        category=category,
        target=target,
        reasoning=" ".join(facts),
        description=describe(target),
        constraints=constraints,
        combo=combo,
    )


def _single_object() -> Iterable[ShapesTask]:
    for shape in SHAPES:
        for sp in shape_phrases(shape):
            for template in TEMPLATES:
                yield _task(
                    "single_object",
                    noun_phrase(sp),
                    template,
                    _layout([(shape, DEFAULT_COLOUR)]),
                    _facts(sp),
                    Constraints((ObjectSpec(shape),)),
                    (sp.key,),
                )


def _two_objects() -> Iterable[ShapesTask]:
    for s1, s2 in permutations(SHAPES, 2):
        for p1 in shape_phrases(s1):
            for p2 in shape_phrases(s2):
                combo = (p1.key, p2.key)
                yield _task(
                    "two_objects",
                    f"{noun_phrase(p1)} and {noun_phrase(p2)}",
                    _pick(TEMPLATES, *combo),
                    _layout([(s1, DEFAULT_COLOUR), (s2, DEFAULT_COLOUR)]),
                    _facts(p1, p2),
                    Constraints((ObjectSpec(s1), ObjectSpec(s2))),
                    combo,
                )


def _counting() -> Iterable[ShapesTask]:
    for count in (2, 3, 4):
        for cp in count_phrases(count):
            for shape in SHAPES:
                for sp in shape_phrases(shape):
                    combo = (cp.key, sp.key)
                    yield _task(
                        "counting",
                        noun_phrase(sp, count=cp),
                        _pick(TEMPLATES, *combo),
                        _layout([(shape, DEFAULT_COLOUR)] * count),
                        _facts(cp, sp),
                        Constraints((ObjectSpec(shape, count=count),)),
                        combo,
                    )


def _colors() -> Iterable[ShapesTask]:
    for colour in COLOURS:
        for cp in colour_phrases(colour):
            for shape in SHAPES:
                for sp in shape_phrases(shape):
                    combo = (cp.key, sp.key)
                    yield _task(
                        "colors",
                        noun_phrase(sp, cp),
                        _pick(TEMPLATES, *combo),
                        _layout([(shape, colour)]),
                        _facts(sp, cp),
                        Constraints((ObjectSpec(shape, colour),)),
                        combo,
                    )


def _position() -> Iterable[ShapesTask]:
    for s1, s2 in permutations(SHAPES, 2):
        for relation in RELATIONS:
            cell1, cell2 = RELATION_CELLS[relation]
            target = Scene((SceneObject(s1, DEFAULT_COLOUR, cell1), SceneObject(s2, DEFAULT_COLOUR, cell2)))
            placement = f"{relation} puts {s1} at {cell_name(cell1)} ."
            for p1 in shape_phrases(s1):
                for p2 in shape_phrases(s2):
                    combo = (p1.key, f"relation:{relation}", p2.key)
                    yield _task(
                        "position",
                        f"{noun_phrase(p1)} {relation} {noun_phrase(p2)}",
                        _pick(TEMPLATES, *combo),
                        target,
                        [*_facts(p1, p2), placement],
                        Constraints((ObjectSpec(s1), ObjectSpec(s2)), RelationSpec(0, relation, 1)),
                        combo,
                    )


def _color_attr() -> Iterable[ShapesTask]:
    for c1, c2 in permutations(COLOURS, 2):
        for s1, s2 in permutations(SHAPES, 2):
            for variant in range(COLOR_ATTR_VARIANTS):
                key = (c1, s1, c2, s2, variant)
                cp1, sp1 = _pick(colour_phrases(c1), *key, "c1"), _pick(shape_phrases(s1), *key, "s1")
                cp2, sp2 = _pick(colour_phrases(c2), *key, "c2"), _pick(shape_phrases(s2), *key, "s2")
                combo = (cp1.key, sp1.key, cp2.key, sp2.key)
                yield _task(
                    "color_attr",
                    f"{noun_phrase(sp1, cp1)} and {noun_phrase(sp2, cp2)}",
                    _pick(TEMPLATES, *combo),
                    _layout([(s1, c1), (s2, c2)]),
                    _facts(sp1, cp1, sp2, cp2),
                    Constraints((ObjectSpec(s1, c1), ObjectSpec(s2, c2))),
                    combo,
                )


_BUILDERS = {
    "single_object": _single_object,
    "two_objects": _two_objects,
    "counting": _counting,
    "colors": _colors,
    "position": _position,
    "color_attr": _color_attr,
}


def _split_category(category: str) -> tuple[list[ShapesTask], list[ShapesTask]]:
    """(train, heldout) tasks of one category, split by combo."""
    tasks: dict[tuple[str, ...], list[ShapesTask]] = {}
    for task in _BUILDERS[category]():
        tasks.setdefault(task.combo, []).append(task)
    ranked = sorted(tasks, key=lambda combo: _hash(category, *combo))[:MAX_COMBOS]
    kept = set(ranked)
    heldout = set(ranked[: round(HELDOUT_FRACTION[category] * len(ranked))])
    in_order = [combo for combo in tasks if combo in kept]  # generation order, for readability
    train = [t for combo in in_order if combo not in heldout for t in tasks[combo]]
    held = [t for combo in in_order if combo in heldout for t in tasks[combo]]
    return train, held


@lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[ShapesTask, ...]]:
    train: list[ShapesTask] = []
    heldout: list[ShapesTask] = []
    for category in CATEGORIES:
        category_train, category_heldout = _split_category(category)
        train += category_train
        heldout += category_heldout
    return {"train": tuple(train), "heldout": tuple(heldout)}
