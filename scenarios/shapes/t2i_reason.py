"""``t2i_reason``: single-round reasoning, then one image, in ShapesWorld.

The user gives a riddle ("draw one shape like a wheel in the colour of grass"); the policy
reasons in text and writes the explicit scene description, closes its thinking with ``</think>``,
then draws the scene by flow denoising in pixel space. The reward is the exact verifier's score
(GenEval-style checks) of the finished image. Gymnasium id: ``unigrpo/T2IReason-v0``.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch

from unigrpo_env import flow
from unigrpo_env.codecs import PixelCodec, TextCodec
from unigrpo_env.reward import RewardFunction
from unigrpo_env.rewards import get_reward
from unigrpo_env.scenario import Scenario
from unigrpo_env.scenarios.shapes.render import render
from unigrpo_env.scenarios.shapes.scene import Scene
from unigrpo_env.scenarios.shapes.tasks import ShapesTask, answer_text, task_split
from unigrpo_env.scenarios.shapes.tokenizer import END_OF_THINKING, build_tokenizer
from unigrpo_env.task import Task
from unigrpo_env.world import World

__all__ = ["T2IReasonScenario"]


class T2IReasonScenario(Scenario):
    """ShapesWorld, one turn: riddle -> reasoning and description -> image.

    Args:
        image_size: canvas size in pixels (the latent is the ``3 × size × size`` image).
        num_steps: denoising steps per image (Flow-GRPO trains with 10, evaluates with 40).
        shift: timestep shift of the schedule (1 = uniform; SD3 and Bagel use 3 at 1024 px, but a
            32-px canvas has little low-frequency structure to spend extra high-noise steps on).
        max_tokens: the text phase's token limit; the longest oracle answer is well under it.
        reward: a registered reward name, a ``"module:Name"`` reference, a weighted-sum spec such
            as ``"shapes_verifier:1.0,quality:0.2"`` (see :mod:`unigrpo_env.rewards.composite`),
            or a ready reward function; None (the default) takes the class's ``default_reward``.
            ``reward_options`` are passed to its factory (for a weighted sum: keyed by term name).

    Subclassing (how plugin scenarios reuse ShapesWorld and the shipped policy): set ``name``,
    override :meth:`shapes_tasks` to choose the tasks of each split, and set ``default_reward``
    to another reward name or spec; everything else (codecs, schedule, oracle) is inherited.
    """

    name = "t2i_reason"
    #: The reward used when none is given (a name, ``module:Name`` or weighted-sum spec).
    default_reward: str = "shapes_verifier"
    default_policy = "shapes"
    default_evaluator = "shapes"

    def __init__(
        self,
        image_size: int = 32,
        num_steps: int = 10,
        shift: float = 1.0,
        max_tokens: int = 48,
        reward: str | RewardFunction | None = None,
        reward_options: dict[str, Any] | None = None,
    ):
        reward = self.default_reward if reward is None else reward
        self.text_codec = TextCodec(build_tokenizer(), end_of_thinking=END_OF_THINKING, max_tokens=max_tokens)
        self.image_codec = PixelCodec(image_size)
        self.num_steps = int(num_steps)
        self.shift = float(shift)
        if isinstance(reward, str):
            self.reward = get_reward(reward, **(reward_options or {}))
        elif callable(reward) and not reward_options:
            self.reward = reward
        else:
            raise ValueError(
                f"reward must be a reward name or spec, or a reward function without reward_options; got {reward!r}"
            )
        self.timesteps()  # validate num_steps and shift now, with the schedule's own error

    def default_world(self) -> World:
        """ShapesWorld's world: its tokenizer, its pixel canvas and a uniform grid of ``num_steps``
        under ``shift`` (the world is the toy task family's own, so the scenario offers it)."""
        return World.shifted(self.text_codec, self.image_codec, self.num_steps, self.shift)

    def timesteps(self) -> torch.Tensor:
        """The default world's ``num_steps + 1`` times from 1 (noise) to 0 (data)."""
        return flow.timestep_schedule(self.num_steps, self.shift)

    @cached_property
    def _tasks(self) -> dict[str, list[Task]]:
        return {
            split: [
                Task(
                    prompts=(shapes.prompt,),
                    category=shapes.category,
                    split=split,
                    index=i,
                    meta={"shapes_task": shapes.to_dict()},
                )
                for i, shapes in enumerate(self.shapes_tasks(split))
            ]
            for split in self.splits
        }

    def shapes_tasks(self, split: str) -> list[ShapesTask]:
        """The ShapesWorld tasks of ``split``, in a fixed order: by default all of the world's
        riddles (:func:`~unigrpo_env.scenarios.shapes.task_split`). Subclasses override this
        to train and evaluate on a subset or on tasks of their own."""
        return task_split(split)

    def tasks(self, split: str) -> list[Task]:
        return self._tasks[split]

    # -- the oracle's two halves (used by examples/oracle_agent.py and the tests) -------------

    def oracle_answer(self, task: Task, turn: int = 0) -> str:
        """The correct reasoning and description of ``turn`` (the only turn here)."""
        self._check_turn(task, turn)
        return answer_text(ShapesTask.from_dict(task.meta["shapes_task"]))

    def target_scene(self, task: Task, turn: int = 0) -> Scene:
        """The scene ``turn``'s image should show."""
        self._check_turn(task, turn)
        return ShapesTask.from_dict(task.meta["shapes_task"]).target

    def oracle_tokens(self, task: Task, turn: int = 0) -> list[int]:
        """The correct reasoning and description of ``turn``, ending with the end-of-thinking token."""
        return self.text_codec.encode(self.oracle_answer(task, turn), end_of_thinking=True)

    def target_image(self, task: Task, turn: int = 0) -> torch.Tensor:
        """The rendered target scene of ``turn``, ``[H, W, 3]`` uint8."""
        return torch.from_numpy(render(self.target_scene(task, turn), size=self.image_codec.image_size))

    def target_latent(self, task: Task, turn: int = 0) -> torch.Tensor:
        """The target image of ``turn`` as a latent ``x_0`` ``[3, H, W]``."""
        return self.image_codec.encode(self.target_image(task, turn).unsqueeze(0))[0]

    @staticmethod
    def _check_turn(task: Task, turn: int) -> None:
        if not 0 <= turn < task.num_turns:
            raise ValueError(f"turn must be in 0..{task.num_turns - 1} for this task, got {turn}")
