"""Typed observations: what ``reset`` and ``step`` return.

:class:`Observation` is one episode's state of the interleaved MDP (docs/design.md, section 1):

* text phase — state ``(c, y_<k)``: the prompts so far and the reasoning tokens of this turn;
* image phase — state ``(c, y, x_t, t)``: additionally the current latent, its time ``t`` and
  the time ``t_next`` the next action must reach;
* ``"done"`` — the observation returned with the terminal step.

Conditioning images of earlier turns (for edits) come as ``cond_images``.
:class:`BatchObservation` is the same for the N episodes of a batched environment, whose
episodes move through phases in lockstep, with one tensor for all latents.
"""

from __future__ import annotations

from typing import Literal

import torch

from unigrpo_env._tensor_eq import TensorRecord

__all__ = ["Phase", "Observation", "BatchObservation"]

Phase = Literal["text", "image", "done"]


class Observation(TensorRecord):
    """One episode's observation.

    Attributes:
        phase: ``"text"``, ``"image"`` or ``"done"``.
        turn: index of the current turn (0-based); ``num_turns`` in all.
        prompt: the user's prompt of the current turn; ``prompts``: every turn's prompt so far.
        tokens: reasoning token ids written in the current turn so far, ``[L]`` int64.
        tokens_left: how many more tokens the text phase accepts (0 outside the text phase).
        x_t: the current latent ``[C, H, W]`` (image phase only).
        t, t_next: the current time and the time the next :class:`FlowAction` reaches.
        step: index of the denoising step within the turn; ``num_steps`` per turn.
        cond_images: finished images of earlier turns, ``[K, H, W, 3]`` uint8 (K may be 0).
    """

    phase: Phase
    turn: int
    num_turns: int
    prompt: str
    prompts: tuple[str, ...]
    tokens: torch.Tensor
    tokens_left: int
    x_t: torch.Tensor | None = None
    t: float | None = None
    t_next: float | None = None
    step: int = 0
    num_steps: int
    cond_images: torch.Tensor


class BatchObservation(TensorRecord):
    """The observation of N episodes stepped together (see :class:`Observation`).

    Attributes:
        tokens: ``[N, max_tokens]`` int64, padded with the pad id after ``token_counts``.
        token_counts: ``[N]`` tokens written per episode in this turn.
        text_open: ``[N]`` bool, which episodes still accept text in this turn; a batched
            :class:`~unigrpo_env.TextAction` must give length 0 to the others.
        x_t: ``[N, C, H, W]``, one tensor for all latents (image phase only).
        cond_images: ``[N, K, H, W, 3]`` uint8.
        group_ids: ``[N]`` which prompt group each episode belongs to.
        alive: ``[N]`` bool, which episodes still play (the others ended at the scenario's answer:
            their actions are ignored).
    """

    phase: Phase
    turn: int
    num_turns: int
    prompts: tuple[tuple[str, ...], ...]
    tokens: torch.Tensor
    token_counts: torch.Tensor
    text_open: torch.Tensor
    x_t: torch.Tensor | None = None
    t: float | None = None
    t_next: float | None = None
    step: int = 0
    num_steps: int
    cond_images: torch.Tensor
    group_ids: torch.Tensor
    alive: torch.Tensor | None = None
