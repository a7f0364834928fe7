"""The batched trajectory: everything N episodes stepped together did, as batched tensors.

A batched environment (:class:`~unigrpo_env.vector.InterleavedVectorEnv`) records its episodes
in one :class:`BatchTrajectory` (``envs.trajectory``). It is the one
record of a batch: the agent's rollouts, losses and evaluation read it, and the per-episode
:class:`~unigrpo_env.trajectory.Trajectory` is a view of one of its rows
(:meth:`BatchTrajectory.episode`). Per turn it holds

* the text phase (:class:`TextRecord`): ``tokens [N, max_tokens]`` padded after ``lengths [N]``,
  and the acting policy's ``log_probs [N, max_tokens]`` (NaN where an action carried none);
* the image phase (:class:`ImageRecord`): ``latents [N, S + 1, C, H, W]`` — the initial noise
  ``x_1`` then the ``x_next`` of every denoising step — on the time grid ``times [S + 1]``, with
  ``log_probs [N, S]`` (NaN where not given), ``stochastic [S]`` (SDE or ODE step) and the decoded
  ``images [N, H, W, 3]`` once the last step is done;

and, once the episodes have ended, the terminal ``rewards [N]`` (NaN where a sample could not be
scored) with their named components. ``group_ids [N]`` say which episodes share a prompt.

Within an episode the record only grows: each step writes positions that no earlier step wrote
(the buffers are allocated at the start of each phase), and ``reset`` starts a new record rather
than overwriting this one. That is what makes views cheap and safe to keep: a view taken at step
k reads only what steps ``1 … k`` wrote, so it stays what it was, and building it copies nothing
(see docs/design.md, section 5).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from unigrpo_env.task import Task
from unigrpo_env.trajectory import ImageSegment, TextSegment, Trajectory, Turn

__all__ = ["TextRecord", "ImageRecord", "BatchTurn", "BatchTrajectory"]


class _Record(BaseModel):
    """A mutable record of tensors: the engine writes into it as the episodes step."""

    model_config = ConfigDict(arbitrary_types_allowed=True)


class TextRecord(_Record):
    """The text phase of one turn of N episodes.

    Attributes:
        tokens: ``[N, max_tokens]`` int64, the token ids written so far, padded after ``lengths``.
        lengths: ``[N]`` int64, how many tokens each episode has written in this turn.
        log_probs: ``[N, max_tokens]`` float32, the acting policy's log-probability of each token
            (NaN where the action carried none, and after ``lengths``).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    log_probs: torch.Tensor

    @classmethod
    def empty(cls, num_episodes: int, max_tokens: int, pad_id: int, device: torch.device) -> TextRecord:
        shape = (num_episodes, max_tokens)
        return cls(
            tokens=torch.full(shape, pad_id, dtype=torch.long, device=device),
            lengths=torch.zeros(num_episodes, dtype=torch.long, device=device),
            log_probs=torch.full(shape, math.nan, dtype=torch.float32, device=device),
        )

    @property
    def max_tokens(self) -> int:
        """The token limit of the phase (the buffers' width; Dr. GRPO's normaliser)."""
        return int(self.tokens.shape[1])

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, log_probs)`` cut to the longest segment of the batch, ``[N, max(lengths)]``
        (views, not copies: while the text phase is open, later segments write into them)."""
        width = int(self.lengths.max()) if self.lengths.numel() else 0
        return self.tokens[:, :width], self.log_probs[:, :width]


class ImageRecord(_Record):
    """The image phase of one turn of N episodes: S denoising steps on one time grid.

    Attributes:
        latents: ``[N, S + 1, C, H, W]`` float32: ``latents[:, 0]`` is the initial noise ``x_1``,
            ``latents[:, s + 1]`` the ``x_next`` of step ``s`` (written when step ``s`` is taken).
        times: ``[S + 1]`` float32, from 1 (noise) to 0 (data); step ``s`` goes from
            ``times[s]`` to ``times[s + 1]``.
        log_probs: ``[N, S]`` float32, the log-density of each step's ``x_next`` under the acting
            policy (NaN where the action carried none).
        stochastic: ``[S]`` bool, whether each step was sampled (SDE) or deterministic (ODE).
        steps_taken: how many of the S steps are done.
        images: the decoded images ``[N, H, W, 3]`` uint8, once the last step is done.
    """

    latents: torch.Tensor
    times: torch.Tensor
    log_probs: torch.Tensor
    stochastic: torch.Tensor
    steps_taken: int = 0
    images: torch.Tensor | None = None

    @classmethod
    def start(cls, noise: torch.Tensor, times: torch.Tensor) -> ImageRecord:
        """A new image phase whose initial latents are ``noise`` ``[N, C, H, W]``."""
        n, steps = noise.shape[0], times.shape[0] - 1
        latents = noise.new_empty((n, steps + 1, *noise.shape[1:]))
        latents[:, 0] = noise
        return cls(
            latents=latents,
            times=times,
            log_probs=torch.full((n, steps), math.nan, dtype=torch.float32, device=noise.device),
            stochastic=torch.zeros(steps, dtype=torch.bool),
        )

    @property
    def num_steps(self) -> int:
        """S, the denoising steps of the phase."""
        return int(self.times.shape[0]) - 1

    @property
    def x_t(self) -> torch.Tensor:
        """The current latents ``[N, C, H, W]`` (a view): ``x_1`` before the first step."""
        return self.latents[:, self.steps_taken]

    @property
    def sde_steps(self) -> list[int]:
        """The indices of the steps taken so far that were sampled (SDE steps)."""
        return [s for s in range(self.steps_taken) if bool(self.stochastic[s])]

    def record_step(
        self, x_next: torch.Tensor, log_prob: torch.Tensor | None, stochastic: bool, rows: torch.Tensor | None = None
    ) -> None:
        """Write step ``steps_taken``'s outcome (the engine calls this after validation); with
        ``rows`` (``[N]`` bool), only theirs: the other episodes' latents stay where they were."""
        s = self.steps_taken
        if rows is None:
            self.latents[:, s + 1] = x_next
            if log_prob is not None:
                self.log_probs[:, s] = log_prob
        else:
            keep = rows.view(-1, *([1] * (x_next.dim() - 1)))
            self.latents[:, s + 1] = torch.where(keep, x_next, self.latents[:, s])
            if log_prob is not None:
                self.log_probs[:, s] = torch.where(rows, log_prob, torch.full_like(log_prob, math.nan))
        self.stochastic[s] = stochastic
        self.steps_taken = s + 1


class BatchTurn(_Record):
    """One user turn of N episodes: which of them played it, each one's prompt, then the text and
    image phases, and the turn's rewards.

    Attributes:
        prompts: each episode's user prompt of this turn (None for one that did not play it): the
            source of truth of what was asked, which every reader uses (not ``task.prompts``).
        rows: ``[N]`` bool, the episodes that played this turn (all of them at the first turn;
            later, those the environment's answer kept going). Rows that did not play it have
            empty text and latents that were never stepped.
        text: the text phase.
        image: the image phase (None until it begins).
        rewards: ``[N]`` float32, this turn's reward from the scenario's answer (NaN: none).
        feedback: per episode, what the scenario's answer said beside the next prompt (``info``).
    """

    prompts: tuple[str | None, ...]
    rows: torch.Tensor
    text: TextRecord
    image: ImageRecord | None = None
    rewards: torch.Tensor | None = None
    feedback: list[dict] | None = None

    @property
    def all_rows(self) -> bool:
        """Whether every episode of the batch played this turn."""
        return bool(self.rows.all())


class BatchTrajectory(_Record):
    """Everything N episodes stepped together did; see the module docstring.

    Attributes:
        scenario: the scenario's name.
        tasks: each episode's task.
        image_size: the side of the finished images, in pixels.
        group_ids: ``[N]`` which prompt group each episode belongs to.
        seed: the seed of the ``reset`` that started the batch, if one was given.
        turns: the turns so far, in order.
        rewards: ``[N]`` float32 terminal rewards once the episodes ended (NaN where unscored), each
            of the episode's own last image.
        reward_components: the reward's named parts, ``[N]`` each.
        reward_error: the scorer's error message where it raised (every reward is then NaN).
        reward_seconds: how long scoring took.
        terminated: whether every episode has ended.
        ended: ``[N]`` bool, which episodes have ended (each at the turn its scenario's answer
            ended it; all of them once ``terminated``).
    """

    scenario: str
    tasks: list[Task]
    image_size: int
    group_ids: torch.Tensor
    seed: int | None = None
    turns: list[BatchTurn] = Field(default_factory=list)
    rewards: torch.Tensor | None = None
    reward_components: dict[str, torch.Tensor] = Field(default_factory=dict)
    reward_error: str | None = None
    reward_seconds: float = 0.0
    terminated: bool = False
    ended: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def num_episodes(self) -> int:
        return len(self.tasks)

    @property
    def images(self) -> torch.Tensor | None:
        """The last finished images ``[N, H, W, 3]`` uint8 (None before the first is done)."""
        for turn in reversed(self.turns):
            if turn.image is not None and turn.image.images is not None:
                return turn.image.images
        return None

    def turn_images(self, turns: int | None = None) -> torch.Tensor:
        """The finished images of the first ``turns`` turns (default: every finished one),
        ``[N, K, H, W, 3]`` uint8 (K may be 0). A row that did not play a turn has a blank (zero)
        image there: see :meth:`turns_played`."""
        done = [turn.image.images for turn in self.turns if turn.image is not None and turn.image.images is not None]
        done = done[:turns] if turns is not None else done
        if not done:
            size = self.image_size
            return torch.zeros((self.num_episodes, 0, size, size, 3), dtype=torch.uint8)
        return torch.stack(done, dim=1)

    def turns_played(self) -> torch.Tensor:
        """``[N]`` how many turns each episode played (its turns are the first ones: an episode
        that stops plays no later turn)."""
        if not self.turns:
            return torch.zeros(self.num_episodes, dtype=torch.long)
        return torch.stack([turn.rows.cpu() for turn in self.turns], dim=1).sum(dim=1)

    def final_images(self) -> torch.Tensor | None:
        """Each episode's own last image ``[N, H, W, 3]`` uint8 (the last turn it played; None
        before the first image is done). With equal episodes, :attr:`images`."""
        images = self.images
        if images is None or all(turn.all_rows for turn in self.turns):
            return images
        done = self.turn_images()
        last = (self.turns_played() - 1).clamp(min=0, max=done.shape[1] - 1)
        return done[torch.arange(self.num_episodes), last.to(done.device)]

    def prompts_of(self, i: int, turns: int | None = None) -> tuple[str, ...]:
        """Episode ``i``'s user prompts of the first ``turns`` turns it played (default: all)."""
        played = [turn.prompts[i] for turn in self.turns[:turns] if turn.prompts[i] is not None]
        return tuple(played)

    def episode(self, i: int) -> Trajectory:
        """Episode ``i``'s :class:`~unigrpo_env.Trajectory` as it stands now: the turns it played.

        A view: its tensors are slices of this record's, so building it copies no tensor and
        costs the same at every step; it keeps showing this moment (later steps write elsewhere).
        Clone a tensor before changing it in place."""
        if not 0 <= i < self.num_episodes:
            raise IndexError(f"episode index {i} outside [0, {self.num_episodes})")
        turns = []
        for turn in self.turns:
            if turn.prompts[i] is None:  # a turn this episode did not play
                continue
            text = turn.text
            count = int(text.lengths[i])
            segments: list[TextSegment | ImageSegment] = [
                TextSegment(tokens=text.tokens[i, :count], log_probs=text.log_probs[i, :count])
            ]
            image = turn.image
            if image is not None:
                s = image.steps_taken
                segments.append(
                    ImageSegment(
                        x_t=image.latents[i, :s],
                        x_next=image.latents[i, 1 : s + 1],
                        t=image.times[:s],
                        t_next=image.times[1 : s + 1],
                        log_prob=image.log_probs[i, :s],
                        stochastic=image.stochastic[:s],
                        image=None if image.images is None else image.images[i],
                    )
                )
            reward = None if turn.rewards is None or math.isnan(float(turn.rewards[i])) else float(turn.rewards[i])
            turns.append(Turn(prompt=turn.prompts[i], segments=segments, reward=reward))
        ended = self.terminated or (self.ended is not None and bool(self.ended[i]))
        return Trajectory(
            scenario=self.scenario,
            task=self.tasks[i],
            seed=self.seed,
            turns=turns,
            reward=None if self.rewards is None or not ended else float(self.rewards[i]),
            reward_components={name: float(values[i]) for name, values in self.reward_components.items()}
            if ended
            else {},
            terminated=ended,
        )
