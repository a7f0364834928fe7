"""The interleaved environment: one episode of reasoning-then-drawing as a Gymnasium ``Env``.

One episode is one trajectory of the MDP of docs/design.md, section 1: for each turn, text-token steps
(:class:`~unigrpo_env.TextAction`) until the end-of-thinking token or the token limit, then
``num_steps`` flow-denoising steps (:class:`~unigrpo_env.FlowAction`); the reward arrives with
the last step of the last turn, and the step that finishes a turn's image carries that turn's
reward where the scenario's answer gives one (``Scenario.respond``; the answer itself is
``info["feedback"]``: the next prompt, or None when the episode ends). ``info["trajectory"]``
always holds the trajectory so far.

Example::

    env = unigrpo_env.make("t2i_reason")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(unigrpo_env.TextAction(tokens=[5, 9, 2]))
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from unigrpo_env.actions import FlowAction, TextAction
from unigrpo_env.episodes import EpisodeBatch, pick_tasks, seeded_generator
from unigrpo_env.errors import ActionShapeError, InvalidActionError
from unigrpo_env.observation import Observation
from unigrpo_env.reward import RewardFunction
from unigrpo_env.scenario import Scenario
from unigrpo_env.spaces import FlowActionSpace, InterleavedActionSpace, ObservationSpace, TextActionSpace
from unigrpo_env.task import Task
from unigrpo_env.trajectory import Trajectory
from unigrpo_env.world import World

__all__ = ["InterleavedEnv"]


class InterleavedEnv(gym.Env[Observation, "TextAction | FlowAction"]):
    """A Gymnasium environment over one scenario; see the module docstring.

    Args:
        scenario: the scenario: its tasks, splits and reward.
        world: the model's side, :class:`~unigrpo_env.world.World`: text codec, image codec and
            time grid (None: the scenario's ``default_world()``; ``env.world`` is the one used).
        split: the task split episodes draw from (``"train"`` or ``"heldout"``).
        device: where latents live; actions' tensors must be on it.
        render_mode: ``"rgb_array"`` or None.
        reward: scores the finished episode instead of the scenario's own reward (None: the scenario's).
        reward_timeout: seconds the reward may take for a finished batch; after that its scores are
            NaN, with a warning and ``info["reward_error"]`` (None: no limit).

    ``reset(seed=..., options=...)`` options: ``split`` (this episode's split), ``task_index``
    (an index into the split) or ``tasks`` (a one-element list of :class:`~unigrpo_env.Task`).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        scenario: Scenario,
        world: World | None = None,
        split: str = "train",
        device: str | torch.device = "cpu",
        render_mode: str | None = None,
        reward: RewardFunction | None = None,
        reward_timeout: float | None = None,
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        scenario.check_split(split)
        self.scenario = scenario
        self.split = split
        self.render_mode = render_mode
        self._engine = EpisodeBatch(scenario, 1, device, reward=reward, reward_timeout=reward_timeout, world=world)
        self.world = self._engine.world
        codec = self.text_codec = self.world.text_codec
        self.image_codec = self.world.image_codec
        self.action_space = InterleavedActionSpace(
            TextActionSpace(codec.vocab_size, codec.eot_id, codec.max_tokens),
            FlowActionSpace(self.world.latent_shape),
        )
        self.observation_space = ObservationSpace(
            codec.vocab_size, codec.max_tokens, self.world.latent_shape, self.world.image_size
        )

    @property
    def device(self) -> torch.device:
        return self._engine.device

    # -- Gymnasium API --------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Observation, dict[str, Any]]:
        super().reset(seed=seed)
        (task,) = pick_tasks(self.scenario, self.split, 1, self.np_random, options or {})
        self._engine.start([task], seeded_generator(self.np_random, self.device), seed=seed)
        return self._observation(), self._info()

    def step(self, action: TextAction | FlowAction) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        """Validate ``action`` completely, then apply it. An invalid action raises a subclass of
        :class:`~unigrpo_env.errors.InvalidActionError` and leaves the environment unchanged."""
        engine = self._engine
        turn_reward = None
        if isinstance(action, TextAction):
            engine.check_phase("text")
            if action.batched or action.tokens.numel() == 0:
                raise ActionShapeError(
                    f"expected a non-empty 1-D segment of token ids [L], got shape {tuple(action.tokens.shape)}"
                )
            lengths = torch.tensor([action.tokens.shape[0]], device=action.tokens.device)
            log_probs = None if action.log_probs is None else action.log_probs.unsqueeze(0)
            checked = engine.check_text(action.tokens.unsqueeze(0), lengths, log_probs)
            engine.apply_text(checked)
            terminated = False
        elif isinstance(action, FlowAction):
            engine.check_phase("image")
            if tuple(action.x_next.shape) != engine.latent_shape:
                raise ActionShapeError(
                    f"expected x_next of shape {engine.latent_shape}, got {tuple(action.x_next.shape)}"
                )
            # log_prob: a number (0-d) or [1]; check_flow refuses other shapes, [1, 1] included
            checked = engine.check_flow(action.x_next.unsqueeze(0), action.log_prob, action.is_stochastic)
            terminated = engine.apply_flow(checked)
            feedback = engine.last_feedback
            if feedback is not None and not math.isnan(float(feedback["rewards"][0])):
                turn_reward = float(feedback["rewards"][0])  # the turn's own reward, from the scenario's answer
        else:
            raise InvalidActionError(
                f"expected a unigrpo_env.TextAction or unigrpo_env.FlowAction, got {type(action).__name__}"
            )
        reward = float(engine.trajectory.rewards[0]) if terminated else 0.0
        if turn_reward is not None:
            reward = turn_reward + reward
        return self._observation(), reward, terminated, False, self._info()

    def render(self) -> np.ndarray | None:
        """The latest image as an RGB array ``[H, W, 3]`` uint8: the current latent decoded during
        the image phase, else the last finished image, else a blank (white) canvas."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='rgb_array'")
            return None
        engine = self._engine
        if engine.phase == "image" and engine.x_t is not None:
            return self.image_codec.decode(engine.x_t)[0].cpu().numpy()
        finished = engine.trajectory.images if engine.started else None
        if finished is not None:
            return finished[0].cpu().numpy()
        size = self.image_codec.image_size
        return np.full((size, size, 3), 255, dtype=np.uint8)

    # -- helpers ------------------------------------------------------------------------------

    @property
    def task(self) -> Task:
        """The current episode's task (set by ``reset``)."""
        if not self._engine.started:
            raise RuntimeError("the environment has not been reset; call reset() first")
        return self._engine.tasks[0]

    @property
    def phase(self) -> str:
        """``"text"``, ``"image"`` or ``"done"`` (also ``done`` before the first reset)."""
        return self._engine.phase

    @property
    def trajectory(self) -> Trajectory:
        """The current episode's :class:`~unigrpo_env.Trajectory` so far (also ``info["trajectory"]``):
        a view of the environment's record, built without copying, so it costs the same at every step."""
        if not self._engine.started:
            raise RuntimeError("the environment has not been reset; call reset() first")
        return self._engine.episode_trajectory(0)

    def _observation(self) -> Observation:
        engine = self._engine
        text = engine.current.text
        count = int(text.lengths[0])
        image = engine.phase == "image"
        prompts = engine.trajectory.prompts_of(0)
        return Observation(
            phase=engine.phase,
            turn=engine.turn,
            num_turns=engine.num_turns,
            prompt=prompts[-1],
            prompts=prompts,
            tokens=text.tokens[0, :count].clone(),
            tokens_left=int(engine.tokens_left()[0]) if engine.phase == "text" else 0,
            x_t=engine.x_t[0].clone() if image else None,
            t=engine.t if image else None,
            t_next=engine.t_next if image else None,
            step=engine.step_index,
            num_steps=engine.num_steps,
            cond_images=engine.cond_images()[0, : engine.turn].clone(),
        )

    def _info(self) -> dict[str, Any]:
        engine = self._engine
        info: dict[str, Any] = {"trajectory": engine.episode_trajectory(0), "category": engine.tasks[0].category}
        trajectory = engine.trajectory
        feedback = engine.last_feedback
        if feedback is not None:  # this step finished a turn's image: the scenario's answer
            info["feedback"] = {"next_prompt": feedback["next_prompts"][0], **feedback["info"][0]}
            if feedback["error"] is not None:
                info["feedback_error"] = feedback["error"]
        if trajectory.terminated:
            info["reward_components"] = {k: float(v[0]) for k, v in trajectory.reward_components.items()}
            if trajectory.reward_error is not None:
                info["reward_error"] = trajectory.reward_error
        return info
