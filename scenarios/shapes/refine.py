"""``refine``: draw from a riddle, then fix what a critic sees wrong, in ShapesWorld.

Turn 1 is a ``t2i_reason`` riddle. After each image a critic answers (``Scenario.respond``):
ShapesWorld's verifier accepts the image, and the episode ends; or its detector's reading of the
image is compared with the task's target scene and the critic asks for one fix in the edit
language the shipped language model reads (:mod:`~unigrpo_env.scenarios.shapes.edits`) — "make
the circle red", "turn the square into a triangle", "move the triangle to left", "remove the red
square", "add a blue circle at top" — at most ``max_turns`` turns (default 3).

:func:`critique` picks the fix, in this order: an object in a target's cell with the wrong
shape (reshape) or colour (recolour); a drawn object that belongs elsewhere (move) or nowhere
(remove); a target object missing (add). It names objects as the edit dialogues do (the shortest
unique reference in the scene *as drawn*) and uses plain words, no riddle.

Rewards (why): the terminal reward is the ``t2i_reason`` reward of the episode's last image (the
exact verifier's score), so what counts is the image the user ends with; each fix the critic has
to ask for costs ``correction_cost`` (default 0.05) as that turn's reward, so among policies that
end with the same image, one that draws it right the first time is preferred. With
``advantage: trajectory`` (the default) an episode's return is ``R = score − 0.05 · fixes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from unigrpo_env.feedback import TurnFeedback, TurnInputs
from unigrpo_env.scenarios.shapes.edits import reference
from unigrpo_env.scenarios.shapes.rewards import shapes_task
from unigrpo_env.scenarios.shapes.riddles import colour_phrases, noun_phrase, shape_phrases
from unigrpo_env.scenarios.shapes.scene import Scene, SceneObject, cell_name
from unigrpo_env.scenarios.shapes.t2i_reason import T2IReasonScenario
from unigrpo_env.scenarios.shapes.verify import detect_objects, verify
from unigrpo_env.task import Task

__all__ = ["RefineScenario", "critique", "drawn_scene"]


def drawn_scene(image: np.ndarray) -> tuple[SceneObject, ...]:
    """The objects ShapesWorld's detector reads in ``image`` (any number, perhaps none; objects
    of unknown shape left out)."""
    return tuple(SceneObject(d.shape, d.colour, tuple(d.cell)) for d in detect_objects(image) if d.shape != "unknown")


def critique(drawn: Scene | Sequence[SceneObject], target: Scene) -> str | None:
    """One instruction that brings the ``drawn`` objects closer to ``target`` (None if they are the same)."""
    drawn = drawn.objects if isinstance(drawn, Scene) else tuple(drawn)
    want = {o.cell: o for o in target.objects}
    have = {o.cell: o for o in drawn}
    for cell, obj in have.items():  # the right cell, the wrong look
        goal = want.get(cell)
        if goal is not None and goal != obj:
            if goal.shape != obj.shape:
                return f"turn {reference(drawn, obj)} into {noun_phrase(shape_phrases(goal.shape)[0])}"
            return f"make {reference(drawn, obj)} {goal.colour}"
    missing = [o for cell, o in want.items() if cell not in have]
    for cell, obj in have.items():  # drawn where nothing belongs
        if cell in want:
            continue
        same = next((o for o in missing if (o.shape, o.colour) == (obj.shape, obj.colour)), None)
        if same is not None:
            return f"move {reference(drawn, obj)} to {cell_name(same.cell)}"
        return f"remove {reference(drawn, obj)}"
    if missing:
        obj = missing[0]
        words = noun_phrase(shape_phrases(obj.shape)[0], colour_phrases(obj.colour)[0])  # plain words
        return f"add {words} at {cell_name(obj.cell)}"
    return None


class RefineScenario(T2IReasonScenario):
    """ShapesWorld riddles, then a critic's fixes until the verifier accepts (see the module docstring).

    Args:
        max_turns: the most turns an episode plays (the riddle and up to ``max_turns − 1`` fixes).
        correction_cost: each fix's turn reward is ``−correction_cost``.
        **options: those of :class:`~unigrpo_env.scenarios.shapes.t2i_reason.T2IReasonScenario`.
    """

    name = "refine"
    default_evaluator = "shapes_refine"
    #: Task-specific, on top of the policy's recipe: an iteration plays up to three turns.
    training_defaults = {"iterations": 60, "warmup_iterations": 10}

    def __init__(self, max_turns: int = 3, correction_cost: float = 0.05, **options: Any):
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be an integer >= 1, got {max_turns!r}")
        if not 0.0 <= float(correction_cost) <= 1.0:
            raise ValueError(f"correction_cost must be in [0, 1], got {correction_cost!r}")
        self.max_turns = max_turns
        self.correction_cost = float(correction_cost)
        super().__init__(**options)

    def respond(self, inputs: TurnInputs) -> TurnFeedback:
        """The critic: None where the verifier accepts the image, else one fix (:func:`critique`)
        costing ``correction_cost``."""
        prompts: list[str | None] = []
        rewards: list[float] = []
        notes: list[dict[str, Any]] = []
        for image, task in zip(inputs.images.numpy(), inputs.tasks):
            target = shapes_task(task)
            if verify(image, target).correct:
                prompts.append(None)
                rewards.append(float("nan"))
                notes.append({"correct": True})
                continue
            fix = critique(drawn_scene(image), target.target)
            prompts.append(fix)  # None: the detector reads the target, though the verifier refuses it
            rewards.append(-self.correction_cost if fix is not None else float("nan"))
            notes.append({"correct": False})
        return TurnFeedback(next_prompts=prompts, rewards=rewards, info=notes)

    def oracle_answer(self, task: Task, turn: int = 0) -> str:
        """The correct description at any turn: every fix aims at the same target."""
        return super().oracle_answer(task, 0)

    def target_scene(self, task: Task, turn: int = 0) -> Scene:
        return super().target_scene(task, 0)
