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

``info`` follows Gymnasium's vector convention: every value is an array over the N episodes
(``group_id``, ``category``; at the end ``reward_components``, a dict of such arrays, and
``reward_error`` where the scorer failed), each beside its mask ``_key``, so Gymnasium's
``DictInfoToList`` wrapper turns it into N per-episode dicts. The batch's record is
``envs.trajectory``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv

from unigrpo_env.actions import FlowAction, TextAction
from unigrpo_env.batch_trajectory import BatchTrajectory
from unigrpo_env.codecs import TextCodec
from unigrpo_env.episodes import EpisodeBatch, pick_tasks, seeded_generator
from unigrpo_env.errors import ActionDTypeError, ActionShapeError, InvalidActionError, WrongPhaseError
from unigrpo_env.observation import BatchObservation
from unigrpo_env.reward import RewardFunction
from unigrpo_env.scenario import Scenario
from unigrpo_env.spaces import FlowActionSpace, InterleavedActionSpace, ObservationSpace, TextActionSpace
from unigrpo_env.task import Task
from unigrpo_env.trajectory import Trajectory
from unigrpo_env.world import World

__all__ = ["InterleavedVectorEnv", "BatchActionSpace", "BatchObservationSpace"]


class BatchActionSpace(spaces.Space[Any]):
    """Batched actions of N episodes: a ``TextAction`` with ``[N, L]`` tokens or a ``FlowAction``
    with ``[N, C, H, W]`` latents. A static description, as Gymnasium's spaces are: it does not
    follow the batch's phase. Which action is valid at a step depends on the state, so — like
    Gymnasium's action masks — :meth:`sample` takes the current observation as its ``mask``:
    ``envs.action_space.sample(mask=obs)`` gives a random segment for each episode still writing
    (length 0 for the others) in a text phase, and N standard-normal latents in an image phase."""

    def __init__(self, single: InterleavedActionSpace, num_envs: int, seed: int | None = None):
        self.single = single
        self.num_envs = int(num_envs)
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def seed(self, seed: int | None = None) -> tuple[int, ...]:
        own = int(super().seed(seed))
        return (own, *self.single.seed(int(self.np_random.integers(0, 2**31 - 1))))

    def sample(self, mask: BatchObservation | None = None, probability: Any = None) -> TextAction | FlowAction:
        if not isinstance(mask, BatchObservation) or probability is not None:
            raise ValueError(
                "the valid batched action depends on the phase: pass the current observation as the mask, "
                "envs.action_space.sample(mask=obs)"
            )
        if mask.phase == "image":
            x = self.np_random.standard_normal((self.num_envs, *self.single.image.latent_shape)).astype(np.float32)
            return FlowAction(x_next=torch.from_numpy(x))
        if mask.phase != "text":
            raise ValueError("the episodes have ended: reset() before sampling another action")
        text = self.single.text
        max_tokens = mask.tokens.shape[1]
        open_ = mask.text_open.cpu().numpy()
        left = (max_tokens - mask.token_counts).cpu().numpy()
        segments: list[torch.Tensor] = []
        for i in range(self.num_envs):
            if open_[i] and left[i] > 0:
                segments.append(text.sample_segment(int(left[i])))
            else:
                segments.append(torch.zeros(0, dtype=torch.long))
        return _stack_segments(segments, None)

    def contains(self, x: Any) -> bool:
        if isinstance(x, FlowAction):
            return tuple(x.x_next.shape) == (self.num_envs, *self.single.image.latent_shape)
        return isinstance(x, TextAction) and x.batched and x.tokens.shape[0] == self.num_envs

    def __repr__(self) -> str:
        return f"BatchActionSpace(num_envs={self.num_envs}, single={self.single!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BatchActionSpace) and other.num_envs == self.num_envs and other.single == self.single


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
        return x.phase != "image" or (
            x.x_t is not None and tuple(x.x_t.shape) == (self.num_envs, *self.single.latent_shape)
        )


def _stack_segments(
    segments: Sequence[torch.Tensor], log_probs: Sequence[torch.Tensor] | None, device: torch.device | None = None
) -> TextAction:
    """Pad per-episode 1-D segments into one batched ``[N, L]`` action with ``lengths`` (on ``device``)."""
    lengths = torch.tensor([s.shape[0] for s in segments], dtype=torch.long, device=device)
    width = int(lengths.max()) if len(segments) else 0
    tokens = torch.zeros((len(segments), width), dtype=torch.long, device=device)
    lp = None if log_probs is None else torch.zeros((len(segments), width), dtype=torch.float32, device=device)
    for i, seg in enumerate(segments):
        tokens[i, : seg.shape[0]] = seg
        if lp is not None:
            lp[i, : seg.shape[0]] = log_probs[i]
    return TextAction(tokens=tokens, lengths=lengths, log_probs=lp)


class InterleavedVectorEnv(VectorEnv):
    """N = P·G episodes of a scenario in one batch, in ``world`` (the model's codecs and time grid,
    :class:`~unigrpo_env.world.World`; None: the scenario's ``default_world()``); see the module
    docstring.

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
        reward: RewardFunction | None = None,
        reward_timeout: float | None = None,
        world: World | None = None,
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
        self._engine = EpisodeBatch(
            scenario, self.num_envs, device, reward=reward, reward_timeout=reward_timeout, world=world
        )
        self.world = self._engine.world
        self.group_ids = torch.arange(self.num_prompts).repeat_interleave(self.group_size)
        codec = self.world.text_codec
        self.single_action_space = InterleavedActionSpace(
            TextActionSpace(codec.vocab_size, codec.eot_id, codec.max_tokens),
            FlowActionSpace(self.world.latent_shape),
        )
        self.single_observation_space = ObservationSpace(
            codec.vocab_size, codec.max_tokens, self.world.latent_shape, self.world.image_size
        )
        self.action_space = BatchActionSpace(self.single_action_space, self.num_envs)
        self.observation_space = BatchObservationSpace(self.single_observation_space, self.num_envs)
        self._np_random, self._np_random_seed = seeding.np_random()

    @property
    def device(self) -> torch.device:
        return self._engine.device

    @property
    def text_codec(self) -> TextCodec:
        return self.world.text_codec

    @property
    def tasks(self) -> list[Task]:
        """Each episode's task (set by ``reset``; episodes ``g·G … g·G + G − 1`` share one)."""
        return self._engine.tasks

    @property
    def phase(self) -> str:
        """``"text"``, ``"image"`` or ``"done"`` (also ``done`` before the first reset)."""
        return self._engine.phase

    @property
    def trajectory(self) -> BatchTrajectory:
        """The batch's record so far: one object from ``reset`` to the
        next, written in place as the batch steps; ``reset`` starts a new one."""
        if not self._engine.started:
            raise RuntimeError("the environment has not been reset; call reset() first")
        return self._engine.trajectory

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
        self._engine.start(tasks, seeded_generator(self.np_random, self.device), seed=seed, group_ids=self.group_ids)
        return self._observation(), self._info()

    def step(self, actions: Any) -> tuple[BatchObservation, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Validate the batch's action completely, then apply it to all episodes at once."""
        engine = self._engine
        ended_before = None
        if isinstance(actions, (list, tuple)):
            actions = self._collate(actions)
        if isinstance(actions, TextAction):
            engine.check_phase("text")
            tokens = actions.tokens if actions.batched else actions.tokens.unsqueeze(0)
            if tokens.shape[0] != self.num_envs:
                raise ActionShapeError(
                    f"expected tokens of shape [N={self.num_envs}, L], got {tuple(actions.tokens.shape)}"
                )
            lengths = actions.row_lengths() if actions.batched else torch.tensor([tokens.shape[1]])
            if lengths.device.type == "cpu":  # lengths given as a list; on another device: refused below
                lengths = lengths.to(tokens.device)
            checked = engine.check_text(tokens, lengths, actions.log_probs)
            engine.apply_text(checked)
        elif isinstance(actions, FlowAction):
            ended_before = engine.trajectory.ended.clone()
            checked = engine.check_flow(actions.x_next, actions.log_prob, actions.is_stochastic)
            engine.apply_flow(checked)  # the episodes that end report it through trajectory.ended
        else:
            raise InvalidActionError(
                f"expected a batched TextAction/FlowAction or a list of {self.num_envs} actions, got {type(actions).__name__}"
            )
        trajectory = engine.trajectory
        feedback = engine.last_feedback
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        if feedback is not None:  # this step finished a turn's image
            now = (trajectory.ended & ~ended_before).numpy()
            if now.any():  # the episodes that ended here: their terminal rewards
                rewards[now] = trajectory.rewards.numpy()[now]
            turn = feedback["rewards"].numpy()
            given = ~np.isnan(turn)
            rewards[feedback["rows"].numpy()[given]] += turn[given]  # and the turn's own rewards
        dones = trajectory.ended.numpy().copy()  # each episode from its own last step on
        return self._observation(), rewards, dones, np.zeros(self.num_envs, dtype=np.bool_), self._info()

    def render(self) -> np.ndarray | None:
        """The latest images of all episodes, ``[N, H, W, 3]`` uint8 (see InterleavedEnv.render)."""
        if self.render_mode is None:
            return None
        engine = self._engine
        if engine.phase == "image" and engine.x_t is not None:
            return engine.image_codec.decode(engine.x_t).cpu().numpy()
        finished = engine.trajectory.images if engine.started else None
        if finished is not None:
            return finished.cpu().numpy()
        size = engine.image_codec.image_size
        return np.full((self.num_envs, size, size, 3), 255, dtype=np.uint8)

    # -- trajectories -----------------------------------------------------------------------------

    def trajectories(self) -> list[Trajectory]:
        """Every episode's trajectory so far (views of :attr:`trajectory`; see BatchTrajectory.episode)."""
        return [self.trajectory.episode(i) for i in range(self.num_envs)]

    # -- helpers ---------------------------------------------------------------------------------

    def _collate(self, actions: Sequence[Any]) -> TextAction | FlowAction:
        """Turn N per-episode actions into one batched action (validation of values follows)."""
        if len(actions) != self.num_envs:
            raise ActionShapeError(f"expected {self.num_envs} actions, one per episode, got {len(actions)}")
        expected = self._engine.phase
        if expected == "image":
            if not all(isinstance(a, FlowAction) for a in actions):
                raise WrongPhaseError(f"expected {self.num_envs} FlowActions in the image phase")
            shapes = {tuple(a.x_next.shape) for a in actions}
            if shapes != {self._engine.latent_shape}:
                raise ActionShapeError(
                    f"expected every x_next of shape {self._engine.latent_shape}, got {sorted(shapes)}"
                )
            given = [a.log_prob is not None for a in actions]
            if any(given) and not all(given):
                raise InvalidActionError("give log_prob for every episode's FlowAction or for none")
            sizes = sorted({a.log_prob.numel() for a in actions if a.log_prob is not None} - {1})
            if sizes:
                raise ActionShapeError(f"each episode's log_prob must be one number, got {sizes[0]} values")
            if len({a.is_stochastic for a in actions}) > 1:
                raise InvalidActionError(
                    "the episodes' FlowActions disagree on stochastic: a step is SDE or ODE for all"
                )
            self._check_parts(actions, "x_next", "float32")
            self._check_parts(actions, "log_prob", "float")
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
        self._check_parts(actions, "tokens", "int")
        self._check_parts(actions, "log_probs", "float")
        log_probs = None
        if given and all(given):
            log_probs = [torch.zeros(0) if a is None else a.log_probs for a in actions]
        return _stack_segments(segments, log_probs, self._engine.device)

    def _check_parts(self, actions: Sequence[Any], field: str, kind: str) -> None:
        """Each per-episode action's ``field`` has a dtype of ``kind`` and lies on the env's device:
        checked before they are stacked or copied into one batch, which would convert dtypes
        (floats truncated into token ids, bf16 promoted to float32) or fail across devices."""
        for i, action in enumerate(actions):
            tensor = None if action is None else getattr(action, field)
            if tensor is None:
                continue
            what = f"episode {i}'s {field}"
            if kind == "float32" and tensor.dtype != torch.float32:
                raise ActionDTypeError(f"{what} must be float32 (the flow math runs in float32), got {tensor.dtype}")
            if kind == "float" and not tensor.is_floating_point():
                raise ActionDTypeError(f"{what} must be floating point, got {tensor.dtype}")
            if kind == "int" and (tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex()):
                raise ActionDTypeError(f"{what} must be integer token ids (int64), got dtype {tensor.dtype}")
            self._engine.check_device(tensor, what)

    def _observation(self) -> BatchObservation:
        engine = self._engine
        text = engine.current.text
        image = engine.phase == "image"
        return BatchObservation(
            phase=engine.phase,
            turn=engine.turn,
            num_turns=engine.num_turns,
            prompts=tuple(engine.trajectory.prompts_of(i) for i in range(self.num_envs)),
            alive=engine.alive.clone(),
            tokens=text.tokens.clone(),
            token_counts=text.lengths.clone(),
            text_open=engine.text_open.clone(),
            x_t=engine.x_t.clone() if image else None,
            t=engine.t if image else None,
            t_next=engine.t_next if image else None,
            step=engine.step_index,
            num_steps=engine.num_steps,
            cond_images=engine.cond_images()[:, : engine.turn].clone(),
            group_ids=self.group_ids.clone(),
        )

    def _info(self) -> dict[str, Any]:
        """Gymnasium's vector ``info``: every value an array over the N episodes, beside its mask
        ``_key`` (which episodes have it; a dict's entries are masked inside it the same way)."""
        engine = self._engine
        trajectory = engine.trajectory
        info: dict[str, Any] = {
            "group_id": self.group_ids.numpy().copy(),
            "category": np.array([task.category for task in engine.tasks], dtype=object),
        }
        masks: dict[str, np.ndarray] = {}
        feedback = engine.last_feedback
        if feedback is not None:  # this step finished a turn's image: the scenario's answer, for its rows
            rows = feedback["rows"].numpy()
            answered = np.zeros(self.num_envs, dtype=np.bool_)
            answered[rows] = True
            next_prompt = np.full(self.num_envs, None, dtype=object)
            next_prompt[rows] = np.array(feedback["next_prompts"] + [None], dtype=object)[:-1]
            info["next_prompt"], masks["next_prompt"] = next_prompt, answered
            if feedback["error"] is not None:
                info["feedback_error"] = np.full(self.num_envs, feedback["error"], dtype=object)
                masks["feedback_error"] = answered
        if trajectory.terminated:
            info["reward_components"] = {k: v.numpy().copy() for k, v in trajectory.reward_components.items()}
            if trajectory.reward_error is not None:  # a scorer raised: those episodes' rewards are NaN
                info["reward_error"] = np.full(self.num_envs, trajectory.reward_error, dtype=object)
        return _masked(info, self.num_envs, masks)


def _masked(info: dict[str, Any], n: int, masks: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """``info`` with Gymnasium's mask ``_key`` beside each key: ``masks[key]`` where given (which
    episodes have the value), else every episode."""
    out: dict[str, Any] = {}
    for key, value in info.items():
        out[key] = _masked(value, n) if isinstance(value, dict) else value
        out[f"_{key}"] = (masks or {}).get(key, np.ones(n, dtype=np.bool_))
    return out
