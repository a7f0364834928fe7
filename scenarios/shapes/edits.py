"""Multi-turn edit dialogues of ShapesWorld: a riddle, then edit instructions.

Turn 1 is a riddle task of :mod:`.tasks` ("draw a shape like a wheel in the colour of grass");
each following turn is an instruction that edits the scene drawn so far. Six kinds of edit, some
of which need the riddle book's reasoning to resolve (:mod:`.riddles`):

==========  ==================================================  ================================
kind        instruction                                         reasoning fact
==========  ==================================================  ================================
recolour    "make the circle red"                               (none)
            "make the circle in the colour of the sky"          "the sky is blue ."
reshape     "turn the blue circle into a shape like a box"      "a box is a square ."
move        "move the square at left to top-right"              (none)
add         "add a triangle in the colour of a leaf at bottom"  "a leaf is green ."
remove      "remove the triangle"                               (none)
swap        "swap the circle and the red square"                (none)
==========  ==================================================  ================================

An object is named by the shortest reference that is unique in the current scene: its shape
("the circle"), its colour and shape ("the red circle"), or its shape and cell ("the circle at
left"). The language model answers each turn as it answers a riddle — the facts, ``answer :``,
and the description of the *whole* edited scene — so the image model always draws from a full
description, conditioned on the previous image.

Splits. A dialogue belongs to the split of its first turn's riddle (held-out riddles combine
phrases never combined in training); its edits are drawn from a generator seeded by the split,
the riddle's index, the number of turns and a variant number, so every dialogue is a pure
function of those. Training the language model uses several variants per train riddle; the
scenario uses variant 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .riddles import colour_phrases, noun_phrase, shape_phrases
from .scene import CELL_NAMES, COLOURS, MAX_OBJECTS, SHAPES, Scene, SceneObject, cell_name, describe
from .tasks import ANSWER_MARKER, ShapesTask, answer_text, task_split

__all__ = [
    "EDIT_KINDS",
    "EditTurn",
    "EditDialogue",
    "SceneEdit",
    "edit_scene",
    "apply_random_edit",
    "edit_dialogue",
    "dialogue_split",
    "edit_vocabulary",
    "reference",
]

EDIT_KINDS: tuple[str, ...] = ("recolour", "reshape", "move", "add", "remove", "swap")

_ALL_CELLS: tuple[tuple[int, int], ...] = tuple(sorted(CELL_NAMES))


@dataclass(frozen=True)
class EditTurn:
    """One edit: the user's instruction, its kind, the facts that resolve it, and the scene after it."""

    instruction: str
    kind: str
    reasoning: str
    scene: Scene

    @property
    def answer(self) -> str:
        """What the language model should write: facts, ``answer :``, the edited scene's description."""
        head = f"{self.reasoning} " if self.reasoning else ""
        return f"{head}{ANSWER_MARKER} {describe(self.scene)}"


@dataclass(frozen=True)
class EditDialogue:
    """A riddle followed by edits. ``scenes[k]`` is the target after turn k (``scenes[0]`` the
    riddle's target), ``prompts[k]`` and ``answers[k]`` the user's and the model's words."""

    first: ShapesTask
    edits: tuple[EditTurn, ...]

    @property
    def num_turns(self) -> int:
        return 1 + len(self.edits)

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.first.prompt, *(e.instruction for e in self.edits))

    @property
    def answers(self) -> tuple[str, ...]:
        return (answer_text(self.first), *(e.answer for e in self.edits))

    @property
    def scenes(self) -> tuple[Scene, ...]:
        return (self.first.target, *(e.scene for e in self.edits))

    @property
    def final(self) -> Scene:
        return self.scenes[-1]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(e.kind for e in self.edits)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; ``EditDialogue.from_dict(d.to_dict()) == d``."""
        return {
            "first": self.first.to_dict(),
            "edits": [
                {"instruction": e.instruction, "kind": e.kind, "reasoning": e.reasoning, "scene": _objects(e.scene)}
                for e in self.edits
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditDialogue:
        edits = tuple(EditTurn(e["instruction"], e["kind"], e["reasoning"], _scene(e["scene"])) for e in data["edits"])
        return cls(ShapesTask.from_dict(data["first"]), edits)


def _objects(scene: Scene) -> list[dict[str, Any]]:
    return [{"shape": o.shape, "colour": o.colour, "cell": list(o.cell)} for o in scene.objects]


def _scene(objects: list[dict[str, Any]]) -> Scene:
    return Scene(tuple(SceneObject(o["shape"], o["colour"], tuple(o["cell"])) for o in objects))


def reference(scene: Scene | Sequence[SceneObject], obj: SceneObject) -> str:
    """The shortest words naming ``obj`` uniquely in ``scene`` (or among a drawing's objects):
    "the circle", "the red circle" or "the circle at left"."""
    objects = scene.objects if isinstance(scene, Scene) else scene
    same_shape = [o for o in objects if o.shape == obj.shape]
    if len(same_shape) == 1:
        return f"the {obj.shape}"
    if sum(o.colour == obj.colour for o in same_shape) == 1:
        return f"the {obj.colour} {obj.shape}"
    return f"the {obj.shape} at {cell_name(obj.cell)}"


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _applicable(scene: Scene) -> list[str]:
    objects = scene.objects
    empty = len(objects) < len(_ALL_CELLS)
    swappable = len({(o.shape, o.colour) for o in objects}) > 1
    ok = {
        "recolour": True,
        "reshape": True,
        "move": empty,
        "add": len(objects) < MAX_OBJECTS and empty,
        "remove": len(objects) > 1,
        "swap": swappable,
    }
    return [kind for kind in EDIT_KINDS if ok[kind]]


@dataclass(frozen=True)
class SceneEdit:
    """One edit of a scene, before any wording: its ``kind``, the scenes ``before`` and ``after``,
    the object it touches (``index`` into ``before.objects``), that object as the edit leaves it
    (``result``: recoloured, reshaped, moved or added; None when removed or swapped) and, for a
    swap, the other object (``other``)."""

    kind: str
    before: Scene
    after: Scene
    index: int
    result: SceneObject | None = None
    other: int | None = None


def edit_scene(rng: np.random.Generator, scene: Scene, kind: str | None = None) -> SceneEdit:
    """ShapesWorld's one edit generator: ``scene`` with one random edit (of ``kind`` if given and
    applicable). The image model's pretraining draws its edit pairs with it, and
    :func:`apply_random_edit` words its edits as instructions.

    Kinds: ``recolour`` / ``reshape`` an object, ``move`` one to an empty cell, ``add`` a random
    object in an empty cell, ``remove`` one, ``swap`` the cells of two objects that differ."""
    applicable = _applicable(scene)
    if kind is None:
        kind = _choice(rng, applicable)
    elif kind not in applicable:
        raise ValueError(f"edit {kind!r} does not apply to {describe(scene)!r}; applicable: {applicable}")
    objects = list(scene.objects)
    used = {o.cell for o in objects}
    empty = [c for c in _ALL_CELLS if c not in used]
    i = int(rng.integers(len(objects)))
    obj = objects[i]
    other = None
    result = None
    if kind == "recolour":
        result = objects[i] = SceneObject(obj.shape, _choice(rng, [c for c in COLOURS if c != obj.colour]), obj.cell)
    elif kind == "reshape":
        result = objects[i] = SceneObject(_choice(rng, [s for s in SHAPES if s != obj.shape]), obj.colour, obj.cell)
    elif kind == "move":
        result = objects[i] = SceneObject(obj.shape, obj.colour, _choice(rng, empty))
    elif kind == "add":
        shape, colour, cell = _choice(rng, SHAPES), _choice(rng, tuple(COLOURS)), _choice(rng, empty)
        result = SceneObject(shape, colour, cell)
        objects.append(result)
    elif kind == "remove":
        objects.pop(i)
    else:  # swap: two objects that look different trade cells
        pairs = [
            (a, b)
            for a in range(len(objects))
            for b in range(a + 1, len(objects))
            if (objects[a].shape, objects[a].colour) != (objects[b].shape, objects[b].colour)
        ]
        i, other = _choice(rng, pairs)
        oa, ob = objects[i], objects[other]
        objects[i], objects[other] = (
            SceneObject(oa.shape, oa.colour, ob.cell),
            SceneObject(ob.shape, ob.colour, oa.cell),
        )
    return SceneEdit(kind, scene, Scene(tuple(objects)), i, result, other)


def apply_random_edit(rng: np.random.Generator, scene: Scene, kind: str | None = None) -> EditTurn:
    """One random edit of ``scene`` (of ``kind`` if given, :func:`edit_scene`), worded as an
    instruction: the words (a riddle-book phrase for a new colour or shape) are drawn after the edit."""
    edit = edit_scene(rng, scene, kind)
    before, result = edit.before.objects, edit.result
    ref = reference(scene, before[edit.index])
    facts = ""
    if edit.kind == "recolour":
        phrase = _choice(rng, colour_phrases(result.colour))
        instruction, facts = f"make {ref} {phrase.text}", phrase.reasoning
    elif edit.kind == "reshape":
        phrase = _choice(rng, shape_phrases(result.shape))
        instruction, facts = f"turn {ref} into {noun_phrase(phrase)}", phrase.reasoning
    elif edit.kind == "move":
        instruction = f"move {ref} to {cell_name(result.cell)}"
    elif edit.kind == "add":
        new = result
        sp, cp = _choice(rng, shape_phrases(new.shape)), _choice(rng, colour_phrases(new.colour))
        instruction = f"add {noun_phrase(sp, cp)} at {cell_name(new.cell)}"
        facts = " ".join(f for f in (sp.reasoning, cp.reasoning) if f)
    elif edit.kind == "remove":
        instruction = f"remove {ref}"
    else:
        instruction = f"swap {ref} and {reference(scene, before[edit.other])}"
    return EditTurn(instruction, edit.kind, facts, edit.after)


def _seed(*parts: object) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16], 16)


def edit_dialogue(first: ShapesTask, num_turns: int, seed: int) -> EditDialogue:
    """``first`` followed by ``num_turns − 1`` random edits drawn from ``seed``."""
    if num_turns < 1:
        raise ValueError(f"num_turns must be >= 1, got {num_turns}")
    rng = np.random.default_rng(seed)
    scene, edits = first.target, []
    for _ in range(num_turns - 1):
        edit = apply_random_edit(rng, scene)
        edits.append(edit)
        scene = edit.scene
    return EditDialogue(first, tuple(edits))


@lru_cache(maxsize=16)
def _dialogues(split: str, num_turns: int, variant: int) -> tuple[EditDialogue, ...]:
    return tuple(
        edit_dialogue(task, num_turns, _seed("edit", split, i, num_turns, variant))
        for i, task in enumerate(task_split(split))
    )


def dialogue_split(split: str, num_turns: int = 3, variant: int = 0) -> list[EditDialogue]:
    """One dialogue per riddle of ``split`` (same order), with ``num_turns`` turns; the same list
    every call."""
    return list(_dialogues(split, int(num_turns), int(variant)))


def edit_vocabulary() -> set[str]:
    """The words edit instructions add to the riddles' vocabulary."""
    return {"make", "turn", "into", "move", "to", "add", "at", "remove", "swap", "and", "the"}
