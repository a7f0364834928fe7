"""Rollouts: a unified policy plays a batched environment from reset to the terminal reward.

For each turn: the text policy samples every episode's reasoning in one batched call (with
per-token log-probabilities) and the segments go to the environment as one batched action; then
the flow policy's condition is built once and every denoising step is one network call for the
whole batch (CFG-free by default), an SDE step (``flow.sde_step``, recording its log-probability)
inside the SDE window and an ODE step outside it, as Flow-GRPO's "Fast" variant does.
The environment records everything in its :class:`~unigrpo_env.BatchTrajectory`; :class:`Rollout`
holds that record and the little the policy computed beside it (the flow conditions, the SDE means).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, Field, model_validator

from unigrpo_env import BatchTrajectory, FlowAction, Task, TextAction, flow
from unigrpo_env.agents.policy import TextSample, TurnContext, UnifiedPolicy
from unigrpo_env.vector import InterleavedVectorEnv

__all__ = ["RolloutSettings", "Rollout", "TextWriter", "rollout", "turn_context"]


class RolloutSettings(BaseModel):
    """How a rollout samples.

    Attributes:
        temperature: text sampling temperature (0 = greedy).
        noise_level: the SDE noise level ``a`` of the stochastic steps (0 makes every step an ODE step).
        sde_window: ``(start, size)``: steps ``start … start + size − 1`` of each image are SDE
            steps, the others ODE steps; None makes every step an SDE step.
        cfg_scale: classifier-free guidance scale of the velocity (1 = CFG-free, one call per step).
        images_per_text: M: each reasoning is sampled once and drawn M times, by the M consecutive
            episodes that share it (single-turn scenarios; M = 1, one image per text, is the paper's).
    """

    temperature: float = Field(default=1.0, ge=0.0)
    noise_level: float = Field(default=0.7, ge=0.0)
    sde_window: tuple[int, int] | None = None
    cfg_scale: float = Field(default=1.0, ge=1.0)
    images_per_text: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _window(self) -> RolloutSettings:
        if self.sde_window is not None and (self.sde_window[0] < 0 or self.sde_window[1] < 1):
            raise ValueError(f"sde_window must be (start >= 0, size >= 1), got {self.sde_window}")
        return self

    def is_sde_step(self, step: int) -> bool:
        if self.noise_level == 0.0:
            return False
        if self.sde_window is None:
            return True
        start, size = self.sde_window
        return start <= step < start + size


@dataclass
class Rollout:
    """One finished batch: the environment's record of it, and what the policy computed beside it.

    Attributes:
        trajectory: the batched environment's :class:`~unigrpo_env.BatchTrajectory` — every
            turn's tokens, latents, log-probabilities and SDE flags, the rewards and group ids.
        conditions: per turn, the flow policy's condition (built once per image).
        sde_means: per turn, ``step -> mean`` of each SDE step (RatioNorm's ``μ_old``).
        network_calls: velocity-model calls of the image phases (2 per step with CFG).
    """

    trajectory: BatchTrajectory
    conditions: list[Any] = field(default_factory=list)
    sde_means: list[dict[int, torch.Tensor]] = field(default_factory=list)
    network_calls: int = 0

    def __len__(self) -> int:
        return len(self.trajectory)

    @property
    def tasks(self) -> list[Task]:
        return self.trajectory.tasks

    @property
    def rewards(self) -> torch.Tensor:
        return self.trajectory.rewards

    def context(self, turn: int) -> TurnContext:
        """The context of ``turn`` with its reasoning written (what its image was drawn from)."""
        return turn_context(self.trajectory, turn)


def turn_context(trajectory: BatchTrajectory, turn: int) -> TurnContext:
    """What N episodes condition on at ``turn``: the prompts up to it, the reasoning and images of
    the turns before it, and its own reasoning so far (empty before its text phase has run)."""
    turns = trajectory.turns
    history = [
        [turns[j].text.tokens[i, : int(turns[j].text.lengths[i])].cpu() for j in range(turn)]
        for i in range(len(trajectory))
    ]
    tokens, _ = turns[turn].text.padded()
    return TurnContext(  # copies: the record's buffers keep changing while the turn is played
        # the recorded prompts (an episode that no longer plays has "" for the turns it did not play)
        prompts=[tuple(t.prompts[i] or "" for t in turns[: turn + 1]) for i in range(len(trajectory))],
        history=history,
        images=trajectory.turn_images(turn).cpu(),
        reasoning=tokens.clone(),
        reasoning_lengths=turns[turn].text.lengths.clone(),
    )


TextWriter = Callable[[TurnContext, InterleavedVectorEnv], TextSample]


@torch.no_grad()
def rollout(
    policy: UnifiedPolicy,
    envs: InterleavedVectorEnv,
    settings: RolloutSettings | None = None,
    *,
    seed: int | None = None,
    options: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    write_text: TextWriter | None = None,
) -> Rollout:
    """Play one batch of ``envs`` with ``policy``. ``write_text`` replaces the text policy (e.g.
    an oracle that writes the true descriptions, to evaluate the image model alone)."""
    settings = settings or RolloutSettings()
    obs, _ = envs.reset(seed=seed, options=options)
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    result = Rollout(trajectory=envs.trajectory)
    while True:
        # -- text phase: one batched segment per episode ------------------------------------
        context = turn_context(result.trajectory, obs.turn)
        m = settings.images_per_text
        if m > 1 and (obs.num_turns > 1 or len(context) % m):
            raise ValueError(
                f"images_per_text={m} needs single-turn episodes in blocks of {m}; got {obs.num_turns} turns "
                f"and {len(context)} episodes"
            )
        writing = context if m == 1 else context.select(torch.arange(0, len(context), m))  # one per block
        if write_text is not None:
            sample = write_text(writing, envs)
        else:
            budget = int((obs.tokens.shape[1] - obs.token_counts).max())
            sample = policy.text.sample(
                writing, max_new_tokens=budget, temperature=settings.temperature, generator=generator
            )
        if m > 1:  # each reasoning to the M episodes of its block
            sample = TextSample(
                tokens=sample.tokens.repeat_interleave(m, dim=0),
                lengths=sample.lengths.repeat_interleave(m, dim=0),
                log_probs=sample.log_probs.repeat_interleave(m, dim=0),
            )
        obs, *_ = envs.step(TextAction(tokens=sample.tokens, lengths=sample.lengths, log_probs=sample.log_probs))
        # -- image phase: one network call per denoising step -----------------------------
        condition = policy.image.condition(context.with_reasoning(sample.tokens, sample.lengths))
        result.conditions.append(condition)
        result.sde_means.append({})
        step = 0
        while obs.phase == "image":
            velocity = policy.image.velocity(obs.x_t, obs.t, condition, cfg_scale=settings.cfg_scale)
            result.network_calls += 1 if settings.cfg_scale == 1.0 else 2
            if settings.is_sde_step(step):
                x_next, log_prob, mean, _ = flow.sde_step(
                    velocity, obs.x_t, obs.t, obs.t_next, settings.noise_level, generator=generator
                )
                result.sde_means[-1][step] = mean
                action = FlowAction(x_next=x_next, log_prob=log_prob, stochastic=True)
            else:
                action = FlowAction(x_next=flow.ode_step(velocity, obs.x_t, obs.t, obs.t_next), stochastic=False)
            obs, *_ = envs.step(action)
            step += 1
        if obs.phase == "done":
            return result
