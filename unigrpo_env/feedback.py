"""The environment's answer after each image: :meth:`Scenario.respond <unigrpo_env.Scenario.respond>`.

After the image of a turn is decoded, the environment shows the rows that drew it to the
scenario (:class:`TurnInputs`) and the scenario answers (:class:`TurnFeedback`): for each row the
next user prompt, or ``None`` to end that episode (goal met, user satisfied, budget spent), and
optionally this turn's reward. This is verifiers' ``env_response`` / OpenEnv's ``step`` for
interleaved generation: a critic, a judge or a simulated user that sees what was drawn.

The default answer is a fixed script: each task's next prompt, ``None`` after its last, no turn
reward. Answers are batched, as rewards are; :func:`check_feedback` validates one before the
environment uses it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from unigrpo_env.task import Task

__all__ = ["TurnInputs", "TurnFeedback", "FeedbackError", "check_feedback"]


class FeedbackError(ValueError):
    """A scenario's answer that does not fit the rows it was asked about."""


class TurnInputs(BaseModel):
    """The rows that just finished a turn's image, as a scenario's ``respond`` sees them.

    Attributes:
        rows: ``[n]`` the episodes' indices in the batch (the single env: ``[0]``).
        turn: the turn just finished, 0-based.
        images: ``[n, H, W, 3]`` uint8, the images just drawn.
        texts: each row's reasoning of this turn (decoded).
        tasks: each row's task.
        prompts: each row's user prompts so far, the first turn's to this one's.
        group_ids: ``[n]`` which rows share a prompt (GRPO's groups).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    rows: torch.Tensor
    turn: int
    images: torch.Tensor
    texts: list[str]
    tasks: list[Task]
    prompts: list[tuple[str, ...]]
    group_ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.tasks)


class TurnFeedback(BaseModel):
    """A scenario's answer for the rows of a :class:`TurnInputs`, in their order.

    Attributes:
        next_prompts: each row's next user prompt; ``None`` ends that row's episode.
        rewards: ``[n]`` this turn's reward of each row (NaN: none), or None (no turn rewards).
        info: per row, anything to show the caller (``info["feedback"]``), or None.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    next_prompts: list[str | None]
    rewards: Any = None
    info: list[dict[str, Any]] | None = Field(default=None)

    @field_validator("next_prompts", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(
                f"next_prompts must be a list with one prompt (or None) per row, got {type(value).__name__}"
            )
        for i, prompt in enumerate(value):
            if prompt is not None and not isinstance(prompt, str):
                raise ValueError(f"next_prompts[{i}] must be a string or None, got {type(prompt).__name__}")
        return list(value)


def check_feedback(feedback: Any, n: int) -> tuple[list[str | None], torch.Tensor, list[dict[str, Any]]]:
    """``(next_prompts, rewards [n] float32 with NaN for none, info)`` of a scenario's answer for
    ``n`` rows; :class:`FeedbackError` naming what was expected if it does not fit."""
    if not isinstance(feedback, TurnFeedback):
        raise FeedbackError(f"respond() must return a unigrpo_env.TurnFeedback, got {type(feedback).__name__}")
    prompts = list(feedback.next_prompts)
    if len(prompts) != n:
        raise FeedbackError(f"respond() gave {len(prompts)} next prompts for {n} rows: one per row (None ends a row)")
    for i, prompt in enumerate(prompts):
        if prompt is not None and not isinstance(prompt, str):
            raise FeedbackError(f"next_prompts[{i}] must be a string or None, got {type(prompt).__name__}")
    if feedback.rewards is None:
        rewards = torch.full((n,), math.nan)
    else:
        try:
            rewards = torch.as_tensor(feedback.rewards, dtype=torch.float32).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise FeedbackError(f"respond()'s rewards must be {n} numbers (NaN: none): {exc}") from None
        if tuple(rewards.shape) != (n,):
            raise FeedbackError(f"respond()'s rewards must have shape ({n},) (one per row), got {tuple(rewards.shape)}")
        if bool(torch.isinf(rewards).any()):
            raise FeedbackError("respond()'s rewards must be finite numbers or NaN (none)")
    info = [{} for _ in range(n)] if feedback.info is None else list(feedback.info)
    if len(info) != n or not all(isinstance(d, dict) for d in info):
        raise FeedbackError(f"respond()'s info must be {n} dicts (one per row) or None")
    return prompts, rewards, info
