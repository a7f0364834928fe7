"""A task: what one episode asks for (the user's prompt of every turn, plus what the scenario's
reward needs to score the result, e.g. the target scene). JSON-serialisable."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Task"]


class Task(BaseModel):
    """One episode's task.

    Attributes:
        prompts: the user's prompt for each turn (one for single-round generation; the first
            prompt then the edit instructions for multi-turn editing).
        category: evaluation category (e.g. GenEval's ``"counting"``), used to report scores.
        split: ``"train"`` or ``"heldout"`` (or a scenario's own split name).
        index: position of the task in its split.
        meta: JSON-serialisable data the reward or an oracle needs (e.g. the target scene).
    """

    model_config = ConfigDict(frozen=True)

    prompts: tuple[str, ...]
    category: str = ""
    split: str = ""
    index: int = -1
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def num_turns(self) -> int:
        return len(self.prompts)
