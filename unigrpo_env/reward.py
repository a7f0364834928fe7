"""The reward protocol: how the environment asks a scorer for the terminal reward.

A reward function scores a *batch* of finished episodes at once (all episodes of a batched
environment end together), so scorers can batch their own model calls. It returns one score per
episode plus named components (logged separately, e.g. the verifier's per-check scores). A score
may be NaN where the scorer could not score that sample; the agent leaves such samples out of
its update and counts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field

from unigrpo_env.task import Task

__all__ = ["RewardInputs", "RewardOutput", "RewardFunction"]


class RewardInputs(BaseModel):
    """What a scorer sees of N finished episodes.

    Attributes:
        images: final images ``[N, H, W, 3]`` uint8.
        tasks: each episode's task (prompts, category, metadata such as the target scene).
        texts: each episode's reasoning text, one string per turn.
        earlier_images: images of the turns before the last, ``[N, K, H, W, 3]`` uint8 (K may be 0).
        group_ids: which prompt group each episode belongs to (for group-level scorers).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    images: torch.Tensor
    tasks: list[Task]
    texts: list[list[str]]
    earlier_images: torch.Tensor
    group_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def select(self, rows: Sequence[int]) -> RewardInputs:
        """The inputs of the episodes ``rows`` only, in that order (e.g. one prompt group)."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return RewardInputs(
            images=self.images[index.to(self.images.device)],
            tasks=[self.tasks[i] for i in rows],
            texts=[self.texts[i] for i in rows],
            earlier_images=self.earlier_images[index.to(self.earlier_images.device)],
            group_ids=None if self.group_ids is None else self.group_ids[index.to(self.group_ids.device)],
        )


class RewardOutput(BaseModel):
    """Scores ``[N]`` float32 (NaN where a sample could not be scored) and named components."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    scores: torch.Tensor
    components: dict[str, torch.Tensor] = Field(default_factory=dict)


@runtime_checkable
class RewardFunction(Protocol):
    """Anything callable as ``reward(inputs) -> RewardOutput``."""

    def __call__(self, inputs: RewardInputs) -> RewardOutput: ...
