"""What the update works on: the collected batch, and each minibatch's log-probabilities, per turn.

* :class:`Batch`: one iteration's rollout, its turns' contexts, the advantages (of the images and,
  separately, of the texts) and the frozen references' outputs cached for the PPO epochs;
* :class:`TurnLogProbs` / :class:`MinibatchLogProbs`: the log-probabilities of a minibatch's
  recorded actions under the current policy, keyed by turn, with what the regularisers and
  RatioNorm need beside them;
* :class:`OldLogProbs`: the same under the rollout policy for the whole batch, keyed by turn.

Texts and images are two sets of rows of one batch. With one image per text (the paper's
setting) they are the same rows and the texts' advantages are the images'; with
``images_per_text`` M > 1 the transform :meth:`Batch.share_texts` makes the first episode of each
block of M the one whose text trains, with the text's own advantage. Nothing downstream branches
on M.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from unigrpo_env import BatchTrajectory
from unigrpo_env.agents.policy import TurnContext
from unigrpo_env.agents.rollout import Rollout, RolloutSettings

__all__ = ["Batch", "TurnLogProbs", "MinibatchLogProbs", "OldLogProbs"]


@dataclass
class Batch:
    """A collected batch as the update needs it.

    Attributes:
        rollout: the environment's batched trajectory and the policy's conditions.
        contexts: each turn's context.
        settings: how the rollout sampled.
        advantages: ``[N]`` each image's advantage; ``valid`` ``[N]``: its reward is a number.
            With per-turn advantages (``turn_advantages``), each turn has its own.
        text_advantages / text_valid: ``[N]`` each text's advantage and validity (the images' unless
            :meth:`share_texts` made them the texts' own).
        text_rows: ``[N]`` bool, the episodes whose text trains (all, unless texts are shared).
        reference_cache: the frozen reference models' outputs, per key: (values ``[N, ...]``,
            which episodes are filled).
    """

    rollout: Rollout
    contexts: list[TurnContext]
    settings: RolloutSettings
    advantages: torch.Tensor
    valid: torch.Tensor
    text_advantages: torch.Tensor
    text_valid: torch.Tensor
    text_rows: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    reference_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: ``[N, K]`` per (episode, turn) advantages (``advantage`` 'turn' or 'batch'); None: ``advantages``
    #: (and ``text_advantages``) for every turn.
    turn_advantages: torch.Tensor | None = None

    def advantages_at(self, turn: int, index: torch.Tensor, *, text: bool = False) -> torch.Tensor:
        """The advantages of episodes ``index`` at ``turn`` (of their texts with ``text``)."""
        if self.turn_advantages is not None:
            return self.turn_advantages[index, turn]
        return (self.text_advantages if text else self.advantages)[index]

    @classmethod
    def of(cls, rollout: Rollout, settings: RolloutSettings, advantages: torch.Tensor, valid: torch.Tensor) -> Batch:
        """A batch in which every episode trains its own text and image with the same advantage."""
        return cls(
            rollout=rollout,
            contexts=[rollout.context(k) for k in range(len(rollout.trajectory.turns))],
            settings=settings,
            advantages=advantages,
            valid=valid,
            text_advantages=advantages,
            text_valid=valid,
            text_rows=torch.ones(len(valid), dtype=torch.bool),
        )

    def share_texts(
        self, m: int, text_advantages: torch.Tensor, text_valid: torch.Tensor, image_advantages: torch.Tensor
    ) -> None:
        """Each reasoning drawn by the M consecutive episodes of its block: the first of each block
        trains the text with ``text_advantages``; every episode trains its image with
        ``image_advantages`` (see ``UniGRPOAgent.texts_shared_advantages``)."""
        self.text_advantages = text_advantages
        self.text_valid = text_valid
        self.text_rows = torch.arange(len(self)) % m == 0
        self.advantages = image_advantages

    @property
    def trajectory(self) -> BatchTrajectory:
        return self.rollout.trajectory

    @property
    def rewards(self) -> torch.Tensor:
        return self.rollout.trajectory.rewards

    @property
    def categories(self) -> list[str]:
        return [task.category for task in self.rollout.trajectory.tasks]

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    def text_index(self, index: torch.Tensor) -> torch.Tensor:
        """Of the episodes ``index``, those whose text trains."""
        return index[self.text_rows[index.cpu()].to(index.device)]

    def reference(self, key: tuple, index: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A frozen reference model's output for episodes ``index``, computed once per batch: the
        reference never changes, so later PPO epochs reuse what the first epoch computed."""
        cached = self.reference_cache.get(key)
        if cached is not None and bool(cached[1][index.cpu()].all()):
            return cached[0][index]
        with torch.no_grad():
            value = compute()
        if cached is None:
            cached = (value.new_zeros((len(self),) + tuple(value.shape[1:])), torch.zeros(len(self), dtype=torch.bool))
            self.reference_cache[key] = cached
        cached[0][index] = value
        cached[1][index.cpu()] = True
        return value


@dataclass
class TurnLogProbs:
    """One turn of a minibatch under the current policy (each part None where that side does not
    train at this turn).

    Attributes:
        text: ``[n_text, L]`` log-probabilities of the recorded reasoning tokens (rows: the
            minibatch's ``text_index``).
        text_reference: ``[n_text, L]`` the same under the starting language model (``kl_text``).
        image: ``[n, S]`` log-probabilities of the recorded SDE steps.
        regularizer: ``[n, S]`` per SDE step, the velocity MSE (or latent KL) to the reference.
        ratio_norm: per SDE step, ``(mean, the rollout's mean, std)`` of the step's Gaussian (RatioNorm).
    """

    text: torch.Tensor | None = None
    text_reference: torch.Tensor | None = None
    image: torch.Tensor | None = None
    regularizer: torch.Tensor | None = None
    ratio_norm: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class MinibatchLogProbs:
    """The log-probabilities of a minibatch's episodes ``index`` (texts: ``text_index``), by turn."""

    index: torch.Tensor
    text_index: torch.Tensor
    turns: dict[int, TurnLogProbs]

    def texts(self) -> list[tuple[int, torch.Tensor]]:
        """``(turn, log-probabilities)`` of every turn whose text trains, in turn order."""
        return [(k, t.text) for k, t in sorted(self.turns.items()) if t.text is not None]

    def images(self) -> list[tuple[int, TurnLogProbs]]:
        """``(turn, its log-probabilities)`` of every turn whose image trains, in turn order."""
        return [(k, t) for k, t in sorted(self.turns.items()) if t.image is not None]


@dataclass
class OldLogProbs:
    """The rollout policy's log-probabilities of the whole batch, by turn: ``text[k]`` ``[N, L]``
    and ``image[k]`` ``[N, S]`` (NaN where not computed: texts that do not train)."""

    text: dict[int, torch.Tensor] = field(default_factory=dict)
    image: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def empty(cls, batch: Batch, *, text: bool, image: bool, device: torch.device) -> OldLogProbs:
        """NaN-filled slots for the turns whose text (``text``) or SDE steps (``image``) train."""
        old = cls()
        for k, turn in enumerate(batch.trajectory.turns):
            if text:
                old.text[k] = torch.full(turn.text.padded()[0].shape, math.nan, device=device)
            if image and turn.image.sde_steps:
                old.image[k] = torch.full((len(batch), len(turn.image.sde_steps)), math.nan, device=device)
        return old

    def store(self, minibatch: MinibatchLogProbs) -> None:
        """Put a minibatch's log-probabilities (detached, float32) into their rows."""
        for k, lp in minibatch.texts():
            self.text[k][minibatch.text_index] = lp.detach().float()
        for k, turn in minibatch.images():
            self.image[k][minibatch.index] = turn.image.detach().float()
