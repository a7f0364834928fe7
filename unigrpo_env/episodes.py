"""The episode engine: N episodes of one scenario, stepped together as one batch.

Both environments are views of this engine — :class:`~unigrpo_env.env.InterleavedEnv` with
N = 1, :class:`~unigrpo_env.vector.InterleavedVectorEnv` with N = P×G — so the rules of the
interleaved MDP (docs/design.md, sections 1 and 4) live here once:

* Phases move in lockstep. Each turn is a text phase (every episode writes reasoning tokens until
  it writes the end-of-thinking token or reaches the token limit; episodes that closed early
  wait) followed by an image phase (every episode takes the same ``num_steps`` denoising steps on
  the same time grid). All latents are one ``[N, C, H, W]`` tensor, so one network call per step
  serves the whole batch.
* The initial latent ``x_1 ~ N(0, I)`` of every image is drawn here, from the generator seeded by
  ``reset(seed=...)``.
* After each image the scenario answers (``Scenario.respond``, :mod:`unigrpo_env.feedback`): each
  row's next prompt or the end of its episode, and optionally a turn reward. Rows that ended
  wait, as rows that closed their text phase wait: their actions are ignored and their records
  not stepped (``alive``). A row's terminal reward scores its own last image when it ends (the
  rows ending at the same turn in one call); with the default answer every row ends after the
  last prompt, so the whole batch is scored once, at the end.
* Every action is validated completely before anything changes (:meth:`check_text`,
  :meth:`check_flow`); :meth:`apply_text` / :meth:`apply_flow` then cannot fail.

The engine records the episodes in one :class:`~unigrpo_env.batch_trajectory.BatchTrajectory`
(batched tensors, written in place as the episodes step); a per-episode
:class:`~unigrpo_env.trajectory.Trajectory` is a view of one of its rows.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from unigrpo_env.batch_trajectory import BatchTrajectory, BatchTurn, ImageRecord, TextRecord
from unigrpo_env.bounded_json import shorten
from unigrpo_env.errors import (
    ActionDeviceError,
    ActionDTypeError,
    ActionShapeError,
    EpisodeEndedError,
    InvalidActionError,
    NonFiniteActionError,
    TaskSplitError,
    TokenBudgetError,
    TokenOutOfVocabularyError,
    WrongPhaseError,
)
from unigrpo_env.feedback import TurnInputs, check_feedback
from unigrpo_env.observation import Phase
from unigrpo_env.reward import RewardFunction, RewardInputs
from unigrpo_env.scenario import Scenario
from unigrpo_env.task import Task
from unigrpo_env.trajectory import Trajectory
from unigrpo_env.world import World

__all__ = ["EpisodeBatch", "CheckedText", "CheckedFlow", "seeded_generator", "pick_tasks"]


@dataclass(frozen=True)
class CheckedText:
    """A validated batched text action: ``tokens``/``log_probs`` ``[N, L]``, ``lengths`` ``[N]``."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    log_probs: torch.Tensor | None


@dataclass(frozen=True)
class CheckedFlow:
    """A validated batched flow action: ``x_next`` ``[N, C, H, W]``, ``log_prob`` ``[N]`` or None."""

    x_next: torch.Tensor
    log_prob: torch.Tensor | None
    stochastic: bool


class EpisodeBatch:
    """N episodes of ``scenario`` in lockstep, in ``world`` (None: the scenario's default world);
    see the module docstring."""

    def __init__(
        self,
        scenario: Scenario,
        num_episodes: int,
        device: str | torch.device = "cpu",
        reward: RewardFunction | None = None,
        reward_timeout: float | None = None,
        world: World | None = None,
    ):
        if num_episodes < 1:
            raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
        if reward_timeout is not None and not reward_timeout > 0:
            raise ValueError(f"reward_timeout must be > 0 seconds or None, got {reward_timeout}")
        self.scenario = scenario
        self.reward_function: RewardFunction = scenario.reward if reward is None else reward
        self.reward_timeout = reward_timeout
        self.n = int(num_episodes)
        self.device = _normalise(torch.device(device))
        self.world = scenario.default_world() if world is None else world
        self.text_codec = self.world.text_codec
        self.image_codec = self.world.image_codec.to(self.device)  # a VAE decodes where the latents are
        self.latent_shape = self.world.latent_shape
        grid = self.world.timesteps()
        self.time_grid = grid.cpu()
        self.times: list[float] = [float(v) for v in grid]
        self.num_steps = len(self.times) - 1
        self._rows = torch.arange(self.n, device=self.device)
        self.trajectory: BatchTrajectory | None = None
        self.phase: Phase = "done"
        self.turn = 0
        self.text_open = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        self.alive = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        self.max_turns = scenario.check_max_turns()
        self.generator: torch.Generator | None = None
        #: What the scenario answered at the end of the last step's turn (None: that step ended no turn).
        self.last_feedback: dict[str, Any] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self.trajectory is not None

    @property
    def tasks(self) -> list[Task]:
        return [] if self.trajectory is None else self.trajectory.tasks

    @property
    def num_turns(self) -> int:
        """The turns this batch may play: ``max_turns``, else its tasks' most prompts (an answer
        that goes on beyond them raises it to the turn being played)."""
        if not self.tasks:
            return 0
        planned = self.max_turns if self.max_turns is not None else max(task.num_turns for task in self.tasks)
        return max(planned, self.turn + 1)

    @property
    def max_tokens(self) -> int:
        return self.text_codec.max_tokens

    def start(
        self,
        tasks: list[Task],
        generator: torch.Generator,
        seed: int | None = None,
        group_ids: torch.Tensor | None = None,
    ) -> None:
        """Begin N new episodes on ``tasks`` (one per episode), drawing noise from ``generator``.
        ``group_ids`` says which episodes share a prompt (passed on to group-level scorers). The
        new episodes get a new :class:`BatchTrajectory`; the previous one is left as it was."""
        if len(tasks) != self.n:
            raise ValueError(f"expected {self.n} tasks, got {len(tasks)}")
        if any(task.num_turns == 0 for task in tasks):
            raise ValueError("every task needs at least one prompt (its first turn's)")
        self.trajectory = BatchTrajectory(
            scenario=self.scenario.name,
            tasks=list(tasks),
            image_size=self.image_codec.image_size,
            group_ids=torch.zeros(self.n, dtype=torch.long) if group_ids is None else group_ids,
            seed=seed,
        )
        self.trajectory.ended = torch.zeros(self.n, dtype=torch.bool)
        self.generator = generator
        self.turn = 0
        self.alive = torch.ones(self.n, dtype=torch.bool, device=self.device)
        self.last_feedback = None
        self._begin_text(tuple(task.prompts[0] for task in tasks))

    def _begin_text(self, prompts: tuple[str | None, ...]) -> None:
        """A new turn for the rows still alive, with their ``prompts`` (None for the others)."""
        self.phase = "text"
        text = TextRecord.empty(self.n, self.max_tokens, self.text_codec.pad_id, self.device)
        rows = self.alive.to("cpu", copy=True)  # a copy: alive changes as rows end
        self.trajectory.turns.append(BatchTurn(prompts=prompts, rows=rows, text=text))
        self.text_open = self.alive.clone()
        self._all_alive = bool(rows.all())

    def _begin_image(self) -> None:
        """Close the text phase and draw the initial latent x_1 ~ N(0, I) for every episode."""
        self.phase = "image"
        noise = torch.randn(
            (self.n, *self.latent_shape), generator=self.generator, device=self.generator.device, dtype=torch.float32
        )
        self.current.image = ImageRecord.start(noise.to(self.device), self.time_grid)

    @property
    def current(self) -> BatchTurn:
        """The turn being played."""
        return self.trajectory.turns[-1]

    @property
    def x_t(self) -> torch.Tensor | None:
        """The current latents ``[N, C, H, W]`` during the image phase (a view of the record)."""
        image = self.current.image if self.trajectory is not None and self.trajectory.turns else None
        return None if image is None or self.phase != "image" else image.x_t

    @property
    def step_index(self) -> int:
        """How many denoising steps the current image has taken (0 in a text phase; all of them once
        the episodes are done)."""
        if self.phase == "text" or not self.started:
            return 0
        return self.current.image.steps_taken

    @property
    def t(self) -> float:
        return self.times[self.step_index]

    @property
    def t_next(self) -> float:
        return self.times[self.step_index + 1]

    def tokens_left(self) -> torch.Tensor:
        return self.max_tokens - self.current.text.lengths

    # -- validation: raise before anything changes ----------------------------------------------

    def check_phase(self, expected: str) -> None:
        """Raise unless the batch is running and in the ``expected`` phase."""
        if not self.started:
            raise EpisodeEndedError("the environment has not been reset; call reset() before step()")
        if self.phase == "done":
            raise EpisodeEndedError("the episode has ended; call reset() to start a new one")
        if self.phase != expected:
            if self.phase == "text":
                raise WrongPhaseError(
                    f"expected a TextAction: turn {self.turn} is in its text phase "
                    f"({int(self.text_open.sum())} of {self.n} episode(s) still writing); got a FlowAction"
                )
            raise WrongPhaseError(
                f"expected a FlowAction: turn {self.turn} is in its image phase "
                f"(step {self.step_index} of {self.num_steps}, t={self.t:.4f} -> {self.t_next:.4f}); got a TextAction"
            )

    def check_device(self, tensor: torch.Tensor, what: str) -> None:
        """Raise ``ActionDeviceError`` unless ``tensor`` lies on the environment's device."""
        if _normalise(tensor.device) != self.device and not (
            tensor.device.type == self.device.type and self.device.index is None
        ):
            raise ActionDeviceError(f"{what} must be on the environment's device {self.device}, got {tensor.device}")

    def check_text(self, tokens: torch.Tensor, lengths: torch.Tensor, log_probs: torch.Tensor | None) -> CheckedText:
        """Validate a batched text action (``tokens`` ``[N, L]``, ``lengths`` ``[N]``)."""
        self.check_phase("text")
        if tokens.dim() != 2 or tokens.shape[0] != self.n:
            raise ActionShapeError(f"expected tokens of shape [N={self.n}, L], got {tuple(tokens.shape)}")
        if tokens.dtype in (torch.bool,) or tokens.is_floating_point() or tokens.is_complex():
            raise ActionDTypeError(f"token ids must be an integer tensor (int64), got dtype {tokens.dtype}")
        if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
            raise ActionDTypeError(f"lengths must be an integer tensor (int64), got dtype {lengths.dtype}")
        self.check_device(tokens, "tokens")
        self.check_device(lengths, "lengths")
        width = tokens.shape[1]
        given = lengths
        if lengths.dtype in (torch.uint16, torch.uint32, torch.uint64):  # no comparisons for these dtypes
            lengths = lengths.to(torch.long)  # values from 2**63 wrap to negative ones, refused just below
        if not self._all_alive:  # episodes that ended: whatever they were given is ignored
            lengths = torch.where(self.alive, lengths, torch.zeros_like(lengths))
        if bool(((lengths < 0) | (lengths > width)).any()):
            raise ActionShapeError(f"lengths must lie in [0, {width}], got {given.tolist()}")
        positions = torch.arange(width, device=self.device)
        real = positions.unsqueeze(0) < lengths.unsqueeze(1)
        tokens = tokens.to(torch.long)
        bad = real & ((tokens < 0) | (tokens >= self.text_codec.vocab_size))
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise TokenOutOfVocabularyError(
                f"token id {int(tokens[row, col])} (episode {row}, position {col}) is outside the vocabulary "
                f"[0, {self.text_codec.vocab_size})"
            )
        closed_but_given = (~self.text_open) & (lengths > 0)
        if bool(closed_but_given.any()):
            rows = closed_but_given.nonzero().flatten().tolist()
            raise TokenBudgetError(
                f"episode(s) {shorten(str(rows), 120)} already closed their text phase in this turn; give them "
                "length 0 (see BatchObservation.text_open)"
            )
        if not bool((lengths > 0).any()):  # a step that writes nothing would not advance: as the single env's
            rows = self.text_open.nonzero().flatten().tolist()
            raise ActionShapeError(
                f"every segment is empty, but episode(s) {shorten(str(rows), 120)} are still writing; a text step "
                "must give at least one of them a token (see BatchObservation.text_open)"
            )
        left = self.tokens_left()
        too_long = lengths > left
        if bool(too_long.any()):
            row = int(too_long.nonzero()[0])
            raise TokenBudgetError(
                f"a segment of {int(lengths[row])} tokens for episode {row} exceeds the {int(left[row])} token(s) "
                f"left of the limit {self.max_tokens}"
            )
        before_last = positions.unsqueeze(0) < (lengths - 1).unsqueeze(1)
        early_eot = before_last & (tokens == self.text_codec.eot_id)
        if bool(early_eot.any()):
            row, col = (int(i) for i in early_eot.nonzero()[0])
            raise TokenBudgetError(
                f"the end-of-thinking token {self.text_codec.end_of_thinking!r} may only be the last token of a "
                f"segment; episode {row} has it at position {col} of {int(lengths[row])}"
            )
        if log_probs is not None:
            if log_probs.shape != tokens.shape:
                raise ActionShapeError(
                    f"log_probs must have the tokens' shape {tuple(tokens.shape)}, got {tuple(log_probs.shape)}"
                )
            if not log_probs.is_floating_point():
                raise ActionDTypeError(f"log_probs must be floating point, got {log_probs.dtype}")
            self.check_device(log_probs, "log_probs")
            given = log_probs.to(torch.float32)[real]
            if not bool(torch.isfinite(given).all()):
                raise NonFiniteActionError("log_probs contain NaN or infinite values")
            if bool((given > 1e-4).any()):
                raise InvalidActionError(
                    "log_probs of tokens must be <= 0 (they are log-probabilities of a categorical)"
                )
            log_probs = log_probs.to(torch.float32)
        return CheckedText(tokens=tokens, lengths=lengths.to(torch.long), log_probs=log_probs)

    def check_flow(self, x_next: torch.Tensor, log_prob: torch.Tensor | None, stochastic: bool) -> CheckedFlow:
        """Validate a batched flow action (``x_next`` ``[N, C, H, W]``, ``log_prob`` ``[N]``)."""
        self.check_phase("image")
        expected = (self.n, *self.latent_shape)
        if tuple(x_next.shape) != expected:
            raise ActionShapeError(f"expected x_next of shape {expected}, got {tuple(x_next.shape)}")
        if x_next.dtype != torch.float32:
            raise ActionDTypeError(f"x_next must be float32 (the flow math runs in float32), got {x_next.dtype}")
        self.check_device(x_next, "x_next")
        playing = x_next if self._all_alive else x_next[self.alive]  # episodes that ended: ignored
        if not bool(torch.isfinite(playing).all()):
            raise NonFiniteActionError("x_next contains NaN or infinite values")
        if log_prob is not None:
            if log_prob.dim() == 0 and self.n == 1:
                log_prob = log_prob.reshape(1)
            if tuple(log_prob.shape) != (self.n,):
                raise ActionShapeError(f"expected log_prob of shape ({self.n},), got {tuple(log_prob.shape)}")
            if not log_prob.is_floating_point():
                raise ActionDTypeError(f"log_prob must be floating point, got {log_prob.dtype}")
            self.check_device(log_prob, "log_prob")
            if not bool(torch.isfinite(log_prob if self._all_alive else log_prob[self.alive]).all()):
                raise NonFiniteActionError("log_prob contains NaN or infinite values")
            log_prob = log_prob.detach().to(torch.float32).clone()
        return CheckedFlow(x_next=x_next, log_prob=log_prob, stochastic=stochastic)

    # -- transitions: cannot fail once checked ------------------------------------------------

    def apply_text(self, action: CheckedText) -> None:
        """Append each episode's segment; close episodes that wrote end-of-thinking or hit the limit;
        when all are closed, the image phase begins."""
        self.last_feedback = None
        text = self.current.text
        tokens, lengths = action.tokens, action.lengths
        width = tokens.shape[1]
        if width:
            real = torch.arange(width, device=self.device).unsqueeze(0) < lengths.unsqueeze(1)
            rows = self._rows.unsqueeze(1).expand(-1, width)[real]
            cols = (text.lengths.unsqueeze(1) + torch.arange(width, device=self.device).unsqueeze(0))[real]
            text.tokens[rows, cols] = tokens[real]
            if action.log_probs is not None:
                text.log_probs[rows, cols] = action.log_probs[real]
            last = (lengths - 1).clamp(min=0)
            wrote_eot = (lengths > 0) & (tokens[self._rows, last] == self.text_codec.eot_id)
            text.lengths += lengths
            self.text_open &= ~(wrote_eot | (text.lengths >= self.max_tokens))
        if not bool(self.text_open.any()):
            self._begin_image()

    def apply_flow(self, action: CheckedFlow) -> bool:
        """Record the step and move every playing latent to ``x_next`` (an ended episode's stays).
        After the last step of an image, the scenario answers (:meth:`_end_turn`). Returns True
        when every episode has ended."""
        self.last_feedback = None
        image = self.current.image
        rows = None if self._all_alive else self.alive
        image.record_step(action.x_next.detach(), action.log_prob, action.stochastic, rows=rows)  # copied in
        if image.steps_taken < self.num_steps:
            return False
        if rows is None:
            image.images = self.image_codec.decode(image.x_t)
        else:  # only the rows that drew this turn are decoded; the others' images stay blank
            size = self.image_codec.image_size
            image.images = torch.zeros((self.n, size, size, 3), dtype=torch.uint8, device=self.device)
            image.images[rows] = self.image_codec.decode(image.x_t[rows]).to(self.device)
        return self._end_turn()

    # -- the scenario's answer and the reward ---------------------------------------------------

    def _end_turn(self) -> bool:
        """Ask the scenario how each playing row goes on, end the rows it ends (and those at
        ``max_turns``), score the rows that ended, and begin the next turn for the others."""
        turn = self.current
        rows = self.alive.nonzero().flatten().cpu()
        n = len(rows)
        prompts: list[str | None] = [None] * n
        rewards, info, error = torch.full((n,), math.nan), [{} for _ in range(n)], None
        try:
            answer = _call_with_timeout(self.scenario.respond, self.turn_inputs(rows), self.reward_timeout, "respond")
            prompts, rewards, info = check_feedback(answer, n)
        except Exception as exc:  # noqa: BLE001 - a broken critic ends its rows, never the environment
            error = shorten(f"{type(exc).__name__}: {exc}", 1000)
        turn.rewards = torch.full((self.n,), math.nan)
        turn.rewards[rows] = rewards
        turn.feedback = [{} for _ in range(self.n)]
        for row, entry in zip(rows.tolist(), info):
            turn.feedback[row] = dict(entry)
        last = self.max_turns is not None and self.turn + 1 >= self.max_turns
        ending = torch.tensor([error is not None or last or p is None for p in prompts], dtype=torch.bool)
        going_on = [None if stop else prompt for prompt, stop in zip(prompts, ending.tolist())]  # max_turns ends too
        self.last_feedback = {"rows": rows, "next_prompts": going_on, "rewards": rewards, "info": info, "error": error}
        ended = rows[ending]
        if len(ended):
            if error is not None:  # the answer failed: those rows end unscored, with the reason
                self._fail(ended, f"respond: {error}")
            else:
                self._score(ended)
            self.trajectory.ended[ended] = True
            self.alive[ended.to(self.device)] = False
        if bool(self.alive.any()):
            self.turn += 1
            next_prompts: list[str | None] = [None] * self.n
            for row, prompt, stop in zip(rows.tolist(), prompts, ending.tolist()):
                if not stop:
                    next_prompts[row] = prompt
            self._begin_text(tuple(next_prompts))
            return False
        self.phase = "done"
        self.trajectory.terminated = True
        return True

    def turn_inputs(self, rows: torch.Tensor) -> TurnInputs:
        """What the scenario's ``respond`` sees of ``rows`` at the end of the current turn."""
        trajectory, turn, index = self.trajectory, self.current, rows.tolist()
        text = turn.text
        return TurnInputs(
            rows=rows,
            turn=self.turn,
            images=turn.image.images[rows.to(turn.image.images.device)].cpu(),
            texts=[self.text_codec.decode(text.tokens[i, : int(text.lengths[i])]) for i in index],
            tasks=[trajectory.tasks[i] for i in index],
            prompts=[trajectory.prompts_of(i) for i in index],
            group_ids=trajectory.group_ids[rows],
        )

    def reward_inputs(self, rows: torch.Tensor | None = None) -> RewardInputs:
        """What the reward sees of ``rows`` (None: every episode), which all ended at the current
        turn: each one's own last image, its earlier images and its reasoning of every turn."""
        trajectory = self.trajectory
        turn_images = trajectory.turn_images()
        index = list(range(self.n)) if rows is None else rows.tolist()
        texts = [
            [self.text_codec.decode(turn.text.tokens[i, : int(turn.text.lengths[i])]) for turn in trajectory.turns]
            for i in index
        ]
        if rows is not None:
            turn_images = turn_images[rows.to(turn_images.device)]
        return RewardInputs(
            images=turn_images[:, -1],
            tasks=[trajectory.tasks[i] for i in index] if rows is not None else trajectory.tasks,
            texts=texts,
            earlier_images=turn_images[:, :-1],
            group_ids=trajectory.group_ids if rows is None else trajectory.group_ids[rows],
        )

    def _score(self, rows: torch.Tensor) -> None:
        """Score the episodes ``rows`` (which ended at this turn) into the trajectory. A scorer that
        raises, or that has not answered within ``reward_timeout`` seconds, gives NaN rewards and an
        error message (reported in ``info``; a timeout also warns) instead of breaking the
        environment; NaN scores pass through."""
        trajectory = self.trajectory
        everyone = len(rows) == self.n
        started = time.perf_counter()
        try:
            inputs = self.reward_inputs(None if everyone else rows)
            out = _call_with_timeout(self.reward_function, inputs, self.reward_timeout)
            scores = torch.as_tensor(out.scores, dtype=torch.float32).reshape(-1).cpu()
            if scores.shape[0] != len(rows):
                raise ValueError(f"the reward returned {scores.shape[0]} scores for {len(rows)} episodes")
            components = {
                k: torch.as_tensor(v, dtype=torch.float32).reshape(-1).cpu() for k, v in out.components.items()
            }
            if everyone:  # the whole batch at once (every episode ended at this turn): as it is
                trajectory.rewards, trajectory.reward_components = scores, components
            else:
                self._rewards()[rows] = scores
                for name, values in components.items():
                    trajectory.reward_components.setdefault(name, torch.full((self.n,), math.nan))[rows] = values
        except Exception as exc:  # noqa: BLE001 - a broken scorer must not corrupt the episode
            self._fail(rows, f"{type(exc).__name__}: {exc}")
        trajectory.reward_seconds += time.perf_counter() - started

    def _rewards(self) -> torch.Tensor:
        trajectory = self.trajectory
        if trajectory.rewards is None:
            trajectory.rewards = torch.full((self.n,), math.nan)
        return trajectory.rewards

    def _fail(self, rows: torch.Tensor, message: str) -> None:
        """The episodes ``rows`` end with NaN rewards and ``message`` (a scorer or critic chose it)."""
        trajectory = self.trajectory
        if len(rows) == self.n:
            trajectory.rewards, trajectory.reward_components = torch.full((self.n,), math.nan), {}
        else:
            self._rewards()[rows] = math.nan
            for values in trajectory.reward_components.values():
                values[rows] = math.nan
        trajectory.reward_error = shorten(message, 1000)

    # -- views ------------------------------------------------------------------------------

    def episode_trajectory(self, i: int) -> Trajectory:
        """Episode ``i``'s trajectory so far (a view of the batch's record; see BatchTrajectory.episode)."""
        return self.trajectory.episode(i)

    def cond_images(self) -> torch.Tensor:
        """Finished images of earlier turns, ``[N, K, H, W, 3]`` uint8."""
        if self.trajectory is None:
            size = self.image_codec.image_size
            return torch.zeros((self.n, 0, size, size, 3), dtype=torch.uint8)
        return self.trajectory.turn_images().cpu()


# -- helpers shared by the single and the batched environment ----------------------------------


def _call_with_timeout(reward: Callable[[Any], Any], inputs: Any, timeout: float | None, what: str = "reward") -> Any:
    """``reward(inputs)`` (a scorer, or a scenario's ``respond``), or ``TimeoutError`` (and a
    warning) if it has not returned after ``timeout`` seconds. The call runs in a daemon thread,
    which a hung scorer keeps (Python cannot stop a thread), so the process can still exit; the
    episode goes on with NaN rewards."""
    if timeout is None:
        return reward(inputs)
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["value"] = reward(inputs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=call, name=what, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        message = f"the {what} did not answer within {timeout:g} s (reward_timeout); its scores are NaN"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        raise TimeoutError(message)
    if "error" in result:
        raise result["error"]
    return result["value"]


def _normalise(device: torch.device) -> torch.device:
    """``cpu:0`` and ``cpu`` are one device (Accelerate reports the former)."""
    return torch.device("cpu") if device.type == "cpu" else device


def seeded_generator(np_random, device: torch.device) -> torch.Generator:
    """A torch generator for the initial noise, seeded from the environment's numpy generator, so
    ``reset(seed=s)`` fixes the noise as well as the tasks."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np_random.integers(0, 2**63 - 1)))
    return generator


def pick_tasks(scenario: Scenario, split: str, count: int, np_random, options: dict) -> list[Task]:
    """Choose ``count`` tasks: ``options["tasks"]`` (Task objects), ``options["task_index"]`` (an
    index or a list of indices into the split), or distinct random tasks drawn with ``np_random``."""
    tasks = scenario.check_split(options.get("split", split))
    if "tasks" in options:
        chosen = list(options["tasks"])
        if not all(isinstance(task, Task) for task in chosen):
            raise TypeError("options['tasks'] must be a list of unigrpo_env.Task")
    elif "task_index" in options:
        index = options["task_index"]
        indices = [index] if isinstance(index, int) else list(index)
        for i in indices:
            if not isinstance(i, int) or not 0 <= i < len(tasks):
                raise TaskSplitError(f"task_index {i!r} is outside the split's {len(tasks)} tasks")
        chosen = [tasks[i] for i in indices]
    else:
        picks = np_random.choice(len(tasks), size=count, replace=count > len(tasks))
        chosen = [tasks[int(i)] for i in picks]
    if len(chosen) != count:
        raise ValueError(f"expected {count} task(s), got {len(chosen)}")
    return chosen
