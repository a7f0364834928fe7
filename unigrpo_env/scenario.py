"""The scenario protocol: what an environment is made from.

A scenario supplies its tasks (prompts per turn, split into train and held-out), its text codec
(tokenizer, end-of-thinking token, token limit), its image codec (latent shape, decoding), its
timestep schedule, and its reward. :class:`~unigrpo_env.env.InterleavedEnv` and the batched
environment turn any scenario into Gymnasium environments; scenarios register themselves with
``@unigrpo_env.scenarios.register_scenario("name")``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch

from unigrpo_env import flow
from unigrpo_env.codecs import ImageCodec, TextCodec
from unigrpo_env.errors import TaskSplitError
from unigrpo_env.reward import RewardFunction
from unigrpo_env.task import Task

__all__ = ["Scenario"]


class Scenario(ABC):
    """Base class of scenarios.

    Subclasses set ``name``, build ``text_codec``, ``image_codec`` and ``reward`` in their
    ``__init__`` (whose keyword arguments are the scenario's options, overridable through
    ``unigrpo_env.make(name, **options)``), and implement :meth:`tasks`.

    Attributes:
        num_steps: denoising steps per image.
        shift: timestep shift of the schedule (SD3's ``t' = s·t / (1 + (s − 1)·t)``).
        splits: the task splits the scenario offers.
    """

    name: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("train", "heldout")

    text_codec: TextCodec
    image_codec: ImageCodec
    reward: RewardFunction
    num_steps: int
    shift: float

    @abstractmethod
    def tasks(self, split: str) -> Sequence[Task]:
        """The tasks of a split, in a fixed order."""

    def timesteps(self) -> torch.Tensor:
        """The ``num_steps + 1`` times from 1 (noise) to 0 (data)."""
        return flow.timestep_schedule(self.num_steps, self.shift)

    def check_split(self, split: str) -> Sequence[Task]:
        if split not in self.splits:
            raise TaskSplitError(f"unknown split {split!r} for scenario {self.name!r}; expected one of {self.splits}")
        tasks = self.tasks(split)
        if not tasks:
            raise TaskSplitError(f"split {split!r} of scenario {self.name!r} has no tasks")
        return tasks
