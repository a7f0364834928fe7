"""The interleaved environment: one episode of reasoning-then-drawing as a Gymnasium ``Env``.

One episode is one trajectory of the MDP of DESIGN.md section 2: for each turn, text-token steps
(:class:`~unigrpo_env.TextAction`) until the end-of-thinking token or the token limit, then
``num_steps`` flow-denoising steps (:class:`~unigrpo_env.FlowAction`); the reward arrives with
the last step of the last turn. ``info["trajectory"]`` always holds the trajectory so far.

Example::

    env = unigrpo_env.make("t2i_reason")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(unigrpo_env.TextAction(tokens=[5, 9, 2]))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import gymnasium as gym

from unigrpo_env.actions import FlowAction, TextAction
from unigrpo_env.episodes import EpisodeBatch, pick_tasks, seeded_generator
from unigrpo_env.errors import ActionShapeError, InvalidActionError
from unigrpo_env.observation import Observation
from unigrpo_env.scenario import Scenario
from unigrpo_env.spaces import FlowActionSpace, InterleavedActionSpace, ObservationSpace, TextActionSpace

__all__ = ["InterleavedEnv"]


class InterleavedEnv(gym.Env[Observation, "TextAction | FlowAction"]):
    """A Gymnasium environment over one scenario; see the module docstring.

    Args:
        scenario: the scenario that supplies tasks, codecs, schedule and reward.
        split: the task split episodes draw from (``"train"`` or ``"heldout"``).
        device: where latents live; actions' tensors must be on it.
        render_mode: ``"rgb_array"`` or None.

    ``reset(seed=..., options=...)`` options: ``split`` (this episode's split), ``task_index``
    (an index into the split) or ``tasks`` (a one-element list of :class:`~unigrpo_env.Task`).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        scenario: Scenario,
        split: str = "train",
        device: str | torch.device = "cpu",
        render_mode: str | None = None,
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        scenario.check_split(split)
        self.scenario = scenario
        self.split = split
        self.render_mode = render_mode
        self.episodes = EpisodeBatch(scenario, 1, device)
        codec = scenario.text_codec
        self.text_codec = codec
        self.image_codec = scenario.image_codec
        self.action_space = InterleavedActionSpace(
            TextActionSpace(codec.vocab_size, codec.eot_id, codec.max_tokens),
            FlowActionSpace(scenario.image_codec.latent_shape),
        )
        self.observation_space = ObservationSpace(
            codec.vocab_size, codec.max_tokens, scenario.image_codec.latent_shape, scenario.image_codec.image_size
        )

    @property
    def device(self) -> torch.device:
        return self.episodes.device

    # -- Gymnasium API --------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Observation, dict[str, Any]]:
        super().reset(seed=seed)
        (task,) = pick_tasks(self.scenario, self.split, 1, self.np_random, options or {})
        self.episodes.start([task], seeded_generator(self.np_random, self.device), seed=seed)
        self._sync_action_space()
        return self._observation(), self._info()

    def step(self, action: TextAction | FlowAction) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        """Validate ``action`` completely, then apply it. An invalid action raises a subclass of
        :class:`~unigrpo_env.errors.InvalidActionError` and leaves the environment unchanged."""
        episodes = self.episodes
        if isinstance(action, TextAction):
            episodes.check_phase("text")
            if action.batched or action.tokens.numel() == 0:
                raise ActionShapeError(
                    f"expected a non-empty 1-D segment of token ids [L], got shape {tuple(action.tokens.shape)}"
                )
            lengths = torch.tensor([action.tokens.shape[0]], device=action.tokens.device)
            log_probs = None if action.log_probs is None else action.log_probs.unsqueeze(0)
            checked = episodes.check_text(action.tokens.unsqueeze(0), lengths, log_probs)
            episodes.apply_text(checked)
            terminated = False
        elif isinstance(action, FlowAction):
            episodes.check_phase("image")
            if tuple(action.x_next.shape) != episodes.latent_shape:
                raise ActionShapeError(f"expected x_next of shape {episodes.latent_shape}, got {tuple(action.x_next.shape)}")
            log_prob = action.log_prob
            if log_prob is not None and log_prob.numel() == 1:
                log_prob = log_prob.reshape(1)
            checked = episodes.check_flow(action.x_next.unsqueeze(0), log_prob, action.is_stochastic)
            terminated = episodes.apply_flow(checked)
        else:
            raise InvalidActionError(
                f"expected a unigrpo_env.TextAction or unigrpo_env.FlowAction, got {type(action).__name__}"
            )
        self._sync_action_space()
        reward = float(episodes.reward.scores[0]) if terminated else 0.0
        return self._observation(), reward, terminated, False, self._info()

    def render(self) -> np.ndarray | None:
        """The latest image as an RGB array ``[H, W, 3]`` uint8: the current latent decoded during
        the image phase, else the last finished image, else a blank (white) canvas."""
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='rgb_array'")
            return None
        episodes = self.episodes
        if episodes.phase == "image" and episodes.x_t is not None:
            return self.image_codec.decode(episodes.x_t)[0].cpu().numpy()
        finished = [r.images for r in episodes.records if r.images is not None]
        if finished:
            return finished[-1][0].cpu().numpy()
        size = self.image_codec.image_size
        return np.full((size, size, 3), 255, dtype=np.uint8)

    # -- helpers ------------------------------------------------------------------------------

    @property
    def trajectory(self):
        """The current episode's :class:`~unigrpo_env.Trajectory` (also in ``info``)."""
        return self.episodes.trajectory(0)

    def _sync_action_space(self) -> None:
        episodes = self.episodes
        self.action_space.phase = episodes.phase
        self.action_space.text.max_length = int(episodes.tokens_left()[0]) if episodes.phase == "text" else 0

    def _observation(self) -> Observation:
        episodes = self.episodes
        record = episodes.record
        count = int(record.counts[0])
        image = episodes.phase == "image"
        task = episodes.tasks[0]
        return Observation(
            phase=episodes.phase,
            turn=episodes.turn,
            num_turns=episodes.num_turns,
            prompt=task.prompts[episodes.turn],
            prompts=tuple(task.prompts[: episodes.turn + 1]),
            tokens=record.tokens[0, :count].clone(),
            tokens_left=int(episodes.tokens_left()[0]) if episodes.phase == "text" else 0,
            x_t=episodes.x_t[0].clone() if image else None,
            t=episodes.t if image else None,
            t_next=episodes.t_next if image else None,
            step=episodes.step_index,
            num_steps=episodes.num_steps,
            cond_images=episodes.cond_images()[0, : episodes.turn].clone(),
        )

    def _info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"trajectory": self.episodes.trajectory(0), "category": self.episodes.tasks[0].category}
        reward = self.episodes.reward
        if reward is not None:
            info["reward_components"] = {k: float(v[0]) for k, v in reward.components.items()}
            if reward.error is not None:
                info["reward_error"] = reward.error
        return info
