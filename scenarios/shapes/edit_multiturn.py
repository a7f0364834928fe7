"""``edit_multiturn``: draw a scene from a riddle, then edit it turn by turn, in ShapesWorld.

Turn 1 is a ``t2i_reason`` riddle; each later turn is an edit instruction — recolour, reshape,
move, add, remove or swap, some needing the riddle book's reasoning ("make the circle in the
colour of the sky") — see :mod:`unigrpo_env.scenarios.shapes.edits`. At every turn the policy
reasons, writes the description of the whole scene as it should now be, and draws it by flow
denoising conditioned on its own previous image. One episode is one trajectory across all turns
(text, image, text, image, ...) with one terminal reward, so the UniGRPO agent trains on it
unchanged: one advantage per trajectory, shared by every token and denoising step of every turn.

The terminal reward scores the *final* image, by default as the weighted sum
``"shapes_scene:0.7,edit_fidelity:0.3"``:

* ``shapes_scene`` — does the image show exactly the final target scene (Jaccard index of the
  detected and target objects; ``task.meta["shapes_scene"]``);
* ``edit_fidelity`` — are the objects of the first scene that no edit touched still there, with
  the same shape, colour and cell (``task.meta["shapes_edit"]``, before = the first turn's target).

Gymnasium id: ``unigrpo/EditMultiTurn-v0``. The number of turns is the option ``num_turns``
(default 3: a riddle and two edits). A task's category is the kind of its last edit.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from unigrpo_env.scenarios.shapes.edit_fidelity import edit_meta
from unigrpo_env.scenarios.shapes.edits import EditDialogue, dialogue_split
from unigrpo_env.scenarios.shapes.rewards import scene_meta
from unigrpo_env.scenarios.shapes.scene import Scene
from unigrpo_env.scenarios.shapes.t2i_reason import T2IReasonScenario
from unigrpo_env.task import Task

__all__ = ["EditMultiTurnScenario", "DIALOGUE_META_KEY"]

#: The key of ``Task.meta`` holding the whole dialogue (its prompts, answers and scenes).
DIALOGUE_META_KEY = "shapes_dialogue"


class EditMultiTurnScenario(T2IReasonScenario):
    """ShapesWorld, ``num_turns`` turns: riddle -> image, then edit -> edited image, ...

    Args:
        num_turns: turns per episode, the first a riddle and the others edits (default 3).
        **options: those of :class:`~unigrpo_env.scenarios.t2i_reason.T2IReasonScenario`
            (``image_size``, ``num_steps``, ``shift``, ``max_tokens`` per turn, ``reward``,
            ``reward_options``).
    """

    name = "edit_multiturn"
    default_reward = "shapes_scene:0.7,edit_fidelity:0.3"
    #: Task-specific, on top of the policy's recipe: fewer iterations and a shorter warm-up, as an
    #: iteration plays three turns (docs/experiments/edit-multiturn.md).
    training_defaults = {"iterations": 72, "warmup_iterations": 15}

    def __init__(self, num_turns: int = 3, **options: Any):
        if isinstance(num_turns, bool) or int(num_turns) != num_turns or num_turns < 1:
            raise ValueError(f"num_turns must be a positive integer, got {num_turns!r}")
        self.num_turns = int(num_turns)
        super().__init__(**options)

    @cached_property
    def _tasks(self) -> dict[str, list[Task]]:
        return {
            split: [self._task(d, split, i) for i, d in enumerate(dialogue_split(split, self.num_turns))]
            for split in self.splits
        }

    @staticmethod
    def _task(dialogue: EditDialogue, split: str, index: int) -> Task:
        return Task(
            prompts=dialogue.prompts,
            category=dialogue.kinds[-1] if dialogue.edits else dialogue.first.category,
            split=split,
            index=index,
            meta={
                DIALOGUE_META_KEY: dialogue.to_dict(),
                "shapes_scene": scene_meta(dialogue.final),
                "shapes_edit": edit_meta(dialogue.scenes[0], dialogue.final),
            },
        )

    @staticmethod
    def dialogue(task: Task) -> EditDialogue:
        """The edit dialogue behind a task."""
        return EditDialogue.from_dict(task.meta[DIALOGUE_META_KEY])

    def oracle_answer(self, task: Task, turn: int = 0) -> str:
        self._check_turn(task, turn)
        return self.dialogue(task).answers[turn]

    def target_scene(self, task: Task, turn: int = 0) -> Scene:
        self._check_turn(task, turn)
        return self.dialogue(task).scenes[turn]
