"""The batched environment: P prompts × G rollouts each, stepped as one batch.

``unigrpo_env.make_vec(scenario, num_prompts=P, group_size=G)`` returns an
:class:`InterleavedVectorEnv`, a Gymnasium ``VectorEnv`` over N = P·G episodes. Episodes
``g·G … g·G + G − 1`` share prompt ``g`` (``info["group_id"]``), as GRPO's groups need. It is a
real batch, not a loop over copies: all latents are one ``[N, C, H, W]`` tensor and a step moves
them in one operation; text is written into one ``[N, max_tokens]`` buffer.

Phases move in lockstep (see :mod:`unigrpo_env.episodes`): during the text phase each step takes
one segment per episode (episodes that already closed their text phase take none); during the
image phase each step takes the next latent of every episode. All episodes end together, with the
reward of the whole batch. Autoreset is disabled: call ``reset()`` to start the next batch.

Actions: one batched action (``TextAction(tokens=[N, L], lengths=[N])`` or
``FlowAction(x_next=[N, C, H, W])``) or a sequence of N per-episode actions (``None`` or an empty
segment for an episode whose text phase is closed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium import spaces

from unigrpo_env.actions import FlowAction, TextAction
from unigrpo_env.episodes import EpisodeBatch, pick_tasks, seeded_generator
from unigrpo_env.errors import ActionShapeError, InvalidActionError, WrongPhaseError
from unigrpo_env.observation import BatchObservation, Phase
from unigrpo_env.scenario import Scenario
from unigrpo_env.spaces import FlowActionSpace, InterleavedActionSpace, ObservationSpace, TextActionSpace
from unigrpo_env.trajectory import Trajectory

__all__ = ["InterleavedVectorEnv", "BatchActionSpace", "BatchObservationSpace"]


class BatchActionSpace(spaces.Space[Any]):
    """Batched actions of N episodes in the current phase. ``sample()`` gives a valid batched
    action: a random segment for each episode still writing (length 0 for the others), or N
    standard-normal latents. The environment keeps ``phase``, ``text_open`` and ``tokens_left``
    current."""

    def __init__(self, single: InterleavedActionSpace, num_envs: int, seed: int | None = None):
        self.single = single
        self.num_envs = int(num_envs)
        self.phase: Phase = "text"
        self.text_open = np.ones(self.num_envs, dtype=bool)
        self.tokens_left = np.full(self.num_envs, single.text.max_length, dtype=np.int64)
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def seed(self, seed: int | None = None) -> tuple[int, ...]:
        own = int(super().seed(seed))
        return (own, *self.single.seed(int(self.np_random.integers(0, 2**31 - 1))))

    def sample(self, mask: Any = None, probability: Any = None) -> TextAction | FlowAction:
        if mask is not None or probability is not None:
            raise NotImplementedError("BatchActionSpace.sample does not take a mask or probability")
        if self.phase == "image":
            x = self.np_random.standard_normal((self.num_envs, *self.single.image.latent_shape)).astype(np.float32)
            return FlowAction(x_next=torch.from_numpy(x))
        text = self.single.text
        segments: list[torch.Tensor] = []
        for i in range(self.num_envs):
            if self.text_open[i] and self.tokens_left[i] > 0:
                text.max_length = int(self.tokens_left[i])
                segments.append(text.sample().tokens)
            else:
                segments.append(torch.zeros(0, dtype=torch.long))
        return _stack_segments(segments, None)

    def contains(self, x: Any) -> bool:
        if self.phase == "image":
            return isinstance(x, FlowAction) and tuple(x.x_next.shape) == (self.num_envs, *self.single.image.latent_shape)
        return isinstance(x, TextAction) and x.batched and x.tokens.shape[0] == self.num_envs

    def __repr__(self) -> str:
        return f"BatchActionSpace(num_envs={self.num_envs}, phase={self.phase!r})"


class BatchObservationSpace(spaces.Space[BatchObservation]):
    """Observations of N episodes (membership checks the batch size and latent shape)."""

    def __init__(self, single: ObservationSpace, num_envs: int):
        super().__init__(shape=None, dtype=None)
        self.single = single
        self.num_envs = int(num_envs)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> BatchObservation:
        raise NotImplementedError("BatchObservationSpace does not sample")

    def contains(self, x: Any) -> bool:
        if not isinstance(x, BatchObservation) or tuple(x.tokens.shape) != (self.num_envs, self.single.max_tokens):
            return False
        return x.phase != "image" or (x.x_t is not None and tuple(x.x_t.shape) == (self.num_envs, *self.single.latent_shape))


def _stack_segments(segments: Sequence[torch.Tensor], log_probs: Sequence[torch.Tensor] | None) -> TextAction:
    """Pad per-episode 1-D segments into one batched ``[N, L]`` action with ``lengths``."""
    lengths = torch.tensor([s.shape[0] for s in segments], dtype=torch.long)
    width = int(lengths.max()) if len(segments) else 0
    tokens = torch.zeros((len(segments), width), dtype=torch.long)
    lp = None if log_probs is None else torch.zeros((len(segments), width), dtype=torch.float32)
    for i, seg in enumerate(segments):
        tokens[i, : seg.shape[0]] = seg
        if lp is not None:
            lp[i, : seg.shape[0]] = log_probs[i]
    return TextAction(tokens=tokens, lengths=lengths, log_probs=lp)


class InterleavedVectorEnv(VectorEnv):
    """N = P·G episodes of a scenario in one batch; see the module docstring.

    ``reset(seed=..., options=...)`` options: ``split``, ``task_index`` (a list of P indices
    into the split) or ``tasks`` (a list of P :class:`~unigrpo_env.Task`), one per group.
    """

    metadata = {"autoreset_mode": AutoresetMode.DISABLED, "render_modes": ["rgb_array"]}

    def __init__(
        self,
        scenario: Scenario,
        num_prompts: int,
        group_size: int,
        split: str = "train",
        device: str | torch.device = "cpu",
        render_mode: str | None = None,
    ):
        if num_prompts < 1 or group_size < 1:
            raise ValueError(f"num_prompts and group_size must be >= 1, got {num_prompts} and {group_size}")
        scenario.check_split(split)
        self.scenario = scenario
        self.split = split
        self.num_prompts = int(num_prompts)
        self.group_size = int(group_size)
        self.num_envs = self.num_prompts * self.group_size
        self.render_mode = render_mode
        self.episodes = EpisodeBatch(scenario, self.num_envs, device)
        self.group_ids = torch.arange(self.num_prompts).repeat_interleave(self.group_size)
        codec = scenario.text_codec
        self.single_action_space = InterleavedActionSpace(
            TextActionSpace(codec.vocab_size, codec.eot_id, codec.max_tokens),
            FlowActionSpace(scenario.image_codec.latent_shape),
        )
        self.single_observation_space = ObservationSpace(
            codec.vocab_size, codec.max_tokens, scenario.image_codec.latent_shape, scenario.image_codec.image_size
        )
        self.action_space = BatchActionSpace(self.single_action_space, self.num_envs)
        self.observation_space = BatchObservationSpace(self.single_observation_space, self.num_envs)
        self._np_random, self._np_random_seed = seeding.np_random()

    @property
    def device(self) -> torch.device:
        return self.episodes.device

    @property
    def text_codec(self):
        return self.scenario.text_codec

    # -- Gymnasium VectorEnv API ----------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[BatchObservation, dict[str, Any]]:
        if seed is not None:
            if not isinstance(seed, int):
                raise TypeError(f"seed must be one int for the whole batch, got {type(seed).__name__}")
            self._np_random, self._np_random_seed = seeding.np_random(seed)
        prompts = pick_tasks(self.scenario, self.split, self.num_prompts, self.np_random, options or {})
        tasks = [task for task in prompts for _ in range(self.group_size)]
        self.episodes.start(tasks, seeded_generator(self.np_random, self.device), seed=seed, group_ids=self.group_ids)
        self._sync_action_space()
        return self._observation(), self._info()

    def step(self, actions: Any) -> tuple[BatchObservation, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Validate the batch's action completely, then apply it to all episodes at once."""
        episodes = self.episodes
        if isinstance(actions, (list, tuple)):
            actions = self._collate(actions)
        if isinstance(actions, TextAction):
            episodes.check_phase("text")
            tokens = actions.tokens if actions.batched else actions.tokens.unsqueeze(0)
            if tokens.shape[0] != self.num_envs:
                raise ActionShapeError(f"expected tokens of shape [N={self.num_envs}, L], got {tuple(actions.tokens.shape)}")
            lengths = actions.row_lengths().to(tokens.device) if actions.batched else torch.tensor([tokens.shape[1]])
            checked = episodes.check_text(tokens, lengths, actions.log_probs)
            episodes.apply_text(checked)
            terminated = False
        elif isinstance(actions, FlowAction):
            checked = episodes.check_flow(actions.x_next, actions.log_prob, actions.is_stochastic)
            terminated = episodes.apply_flow(checked)
        else:
            raise InvalidActionError(
                f"expected a batched TextAction/FlowAction or a list of {self.num_envs} actions, got {type(actions).__name__}"
            )
        self._sync_action_space()
        rewards = episodes.reward.scores.numpy().copy() if terminated else np.zeros(self.num_envs, dtype=np.float32)
        dones = np.full(self.num_envs, terminated, dtype=np.bool_)
        return self._observation(), rewards, dones, np.zeros(self.num_envs, dtype=np.bool_), self._info()

    def render(self) -> np.ndarray | None:
        """The latest images of all episodes, ``[N, H, W, 3]`` uint8 (see InterleavedEnv.render)."""
        if self.render_mode is None:
            return None
        episodes = self.episodes
        if episodes.phase == "image" and episodes.x_t is not None:
            return episodes.image_codec.decode(episodes.x_t).cpu().numpy()
        finished = [r.images for r in episodes.records if r.images is not None]
        if finished:
            return finished[-1].cpu().numpy()
        size = episodes.image_codec.image_size
        return np.full((self.num_envs, size, size, 3), 255, dtype=np.uint8)

    # -- trajectories -----------------------------------------------------------------------------

    def trajectory(self, i: int) -> Trajectory:
        """Episode ``i``'s trajectory so far."""
        if not 0 <= i < self.num_envs:
            raise IndexError(f"episode index {i} outside [0, {self.num_envs})")
        return self.episodes.trajectory(i)

    def trajectories(self) -> list[Trajectory]:
        """Every episode's trajectory so far (built on request; the batch itself stores tensors)."""
        return [self.episodes.trajectory(i) for i in range(self.num_envs)]

    # -- helpers ---------------------------------------------------------------------------------

    def _collate(self, actions: Sequence[Any]) -> TextAction | FlowAction:
        """Turn N per-episode actions into one batched action (validation of values follows)."""
        if len(actions) != self.num_envs:
            raise ActionShapeError(f"expected {self.num_envs} actions, one per episode, got {len(actions)}")
        expected = self.episodes.phase
        if expected == "image":
            if not all(isinstance(a, FlowAction) for a in actions):
                raise WrongPhaseError(f"expected {self.num_envs} FlowActions in the image phase")
            shapes = {tuple(a.x_next.shape) for a in actions}
            if shapes != {self.episodes.latent_shape}:
                raise ActionShapeError(f"expected every x_next of shape {self.episodes.latent_shape}, got {sorted(shapes)}")
            given = [a.log_prob is not None for a in actions]
            if any(given) and not all(given):
                raise InvalidActionError("give log_prob for every episode's FlowAction or for none")
            log_prob = torch.stack([a.log_prob.reshape(()) for a in actions]) if all(given) else None
            return FlowAction(
                x_next=torch.stack([a.x_next for a in actions]),
                log_prob=log_prob,
                stochastic=actions[0].is_stochastic,
            )
        if not all(a is None or isinstance(a, TextAction) for a in actions):
            raise WrongPhaseError(f"expected TextActions (or None for closed episodes) in the {expected} phase")
        segments = []
        for i, a in enumerate(actions):
            if a is not None and a.batched:
                raise ActionShapeError(f"action {i} is batched; give 1-D segments in a list")
            segments.append(torch.zeros(0, dtype=torch.long) if a is None else a.tokens)
        given = [a is not None and a.log_probs is not None for a in actions if a is not None and a.tokens.numel()]
        if any(given) and not all(given):
            raise InvalidActionError("give log_probs for every episode's TextAction or for none")
        log_probs = None
        if given and all(given):
            log_probs = [torch.zeros(0) if a is None else a.log_probs for a in actions]
        return _stack_segments(segments, log_probs)

    def _sync_action_space(self) -> None:
        episodes = self.episodes
        self.action_space.phase = episodes.phase
        self.action_space.text_open = episodes.text_open.cpu().numpy().copy()
        self.action_space.tokens_left = episodes.tokens_left().cpu().numpy().copy()

    def _observation(self) -> BatchObservation:
        episodes = self.episodes
        record = episodes.record
        image = episodes.phase == "image"
        return BatchObservation(
            phase=episodes.phase,
            turn=episodes.turn,
            num_turns=episodes.num_turns,
            prompts=tuple(tuple(task.prompts[: episodes.turn + 1]) for task in episodes.tasks),
            tokens=record.tokens.clone(),
            token_counts=record.counts.clone(),
            text_open=episodes.text_open.clone(),
            x_t=episodes.x_t.clone() if image else None,
            t=episodes.t if image else None,
            t_next=episodes.t_next if image else None,
            step=episodes.step_index,
            num_steps=episodes.num_steps,
            cond_images=episodes.cond_images()[:, : episodes.turn].clone(),
            group_ids=self.group_ids.clone(),
        )

    def _info(self) -> dict[str, Any]:
        episodes = self.episodes
        info: dict[str, Any] = {
            "group_id": self.group_ids.numpy().copy(),
            "category": np.array([task.category for task in episodes.tasks], dtype=object),
        }
        reward = episodes.reward
        if reward is not None:
            info["reward_components"] = {k: v.numpy().copy() for k, v in reward.components.items()}
            if reward.error is not None:
                info["reward_error"] = reward.error
        return info
