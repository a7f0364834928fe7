"""The episode engine: N episodes of one scenario, stepped together as one batch.

Both environments are views of this engine — :class:`~unigrpo_env.env.InterleavedEnv` with
N = 1, :class:`~unigrpo_env.vector.InterleavedVectorEnv` with N = P×G — so the rules of the
interleaved MDP (DESIGN.md section 2) live here once:

* Phases move in lockstep. Each turn is a text phase (every episode writes reasoning tokens until
  it writes the end-of-thinking token or reaches the token limit; episodes that closed early
  wait) followed by an image phase (every episode takes the same ``num_steps`` denoising steps on
  the same time grid). All latents are one ``[N, C, H, W]`` tensor, so one network call per step
  serves the whole batch.
* The initial latent ``x_1 ~ N(0, I)`` of every image is drawn here, from the generator seeded by
  ``reset(seed=...)``.
* The reward arrives once, when the last turn's image is finished, scored for the whole batch.
* Every action is validated completely before anything changes (:meth:`check_text`,
  :meth:`check_flow`); :meth:`apply_text` / :meth:`apply_flow` then cannot fail.

The engine records the trajectory as batched tensors (one tensor per step for all episodes) and
builds a per-episode :class:`~unigrpo_env.trajectory.Trajectory` only when asked.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from unigrpo_env.errors import (
    TaskSplitError,
    ActionDeviceError,
    ActionDTypeError,
    ActionShapeError,
    EpisodeEndedError,
    InvalidActionError,
    NonFiniteActionError,
    TokenBudgetError,
    TokenOutOfVocabularyError,
    WrongPhaseError,
)
from unigrpo_env.observation import Phase
from unigrpo_env.reward import RewardInputs
from unigrpo_env.scenario import Scenario
from unigrpo_env.task import Task
from unigrpo_env.trajectory import ImageSegment, TextSegment, Trajectory, Turn

__all__ = ["EpisodeBatch", "CheckedText", "CheckedFlow", "TerminalReward", "seeded_generator", "pick_tasks"]


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


@dataclass(frozen=True)
class TerminalReward:
    """The reward of the finished batch: scores ``[N]`` (NaN where unscored) and components."""

    scores: torch.Tensor
    components: dict[str, torch.Tensor]
    error: str | None = None
    seconds: float = 0.0


@dataclass
class _TurnRecord:
    """Batched record of one turn: text buffers, the latents of every step, the final images."""

    tokens: torch.Tensor  # [N, max_tokens], pad after counts
    log_probs: torch.Tensor  # [N, max_tokens], NaN where not given
    counts: torch.Tensor  # [N]
    latents: list[torch.Tensor] = field(default_factory=list)  # x_1, then x_next of each step
    step_log_probs: list[torch.Tensor | None] = field(default_factory=list)
    stochastic: list[bool] = field(default_factory=list)
    images: torch.Tensor | None = None  # [N, H, W, 3] uint8


class EpisodeBatch:
    """N episodes of ``scenario`` in lockstep; see the module docstring."""

    def __init__(self, scenario: Scenario, num_episodes: int, device: str | torch.device = "cpu"):
        if num_episodes < 1:
            raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
        self.scenario = scenario
        self.n = int(num_episodes)
        self.device = _normalise(torch.device(device))
        self.text_codec = scenario.text_codec
        self.image_codec = scenario.image_codec
        self.latent_shape = tuple(scenario.image_codec.latent_shape)
        grid = scenario.timesteps().to(torch.float32)
        self.times: list[float] = [float(v) for v in grid]
        self.num_steps = len(self.times) - 1
        self._rows = torch.arange(self.n, device=self.device)
        self.tasks: list[Task] = []
        self.seed: int | None = None
        self.phase: Phase = "done"
        self.turn = 0
        self.step_index = 0
        self.records: list[_TurnRecord] = []
        self.text_open = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        self.x_t: torch.Tensor | None = None
        self.reward: TerminalReward | None = None
        self.group_ids: torch.Tensor | None = None
        self.generator: torch.Generator | None = None
        self.version = 0  # bumped at every change, for caches of derived views

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return bool(self.tasks)

    @property
    def num_turns(self) -> int:
        return self.tasks[0].num_turns if self.tasks else 0

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
        ``group_ids`` says which episodes share a prompt (passed on to group-level scorers)."""
        if len(tasks) != self.n:
            raise ValueError(f"expected {self.n} tasks, got {len(tasks)}")
        turns = {task.num_turns for task in tasks}
        if len(turns) != 1 or 0 in turns:
            raise ValueError(f"all tasks of a batch must have the same, positive number of turns; got {sorted(turns)}")
        self.tasks = list(tasks)
        self.seed = seed
        self.group_ids = group_ids
        self.generator = generator
        self.turn = 0
        self.records = []
        self.reward = None
        self._begin_text()

    def _begin_text(self) -> None:
        self.phase = "text"
        self.step_index = 0
        self.x_t = None
        shape = (self.n, self.max_tokens)
        self.records.append(
            _TurnRecord(
                tokens=torch.full(shape, self.text_codec.pad_id, dtype=torch.long, device=self.device),
                log_probs=torch.full(shape, math.nan, dtype=torch.float32, device=self.device),
                counts=torch.zeros(self.n, dtype=torch.long, device=self.device),
            )
        )
        self.text_open = torch.ones(self.n, dtype=torch.bool, device=self.device)
        self.version += 1

    def _begin_image(self) -> None:
        """Close the text phase and draw the initial latent x_1 ~ N(0, I) for every episode."""
        self.phase = "image"
        self.step_index = 0
        noise = torch.randn(
            (self.n, *self.latent_shape), generator=self.generator, device=self.generator.device, dtype=torch.float32
        )
        self.x_t = noise.to(self.device)
        self.records[-1].latents.append(self.x_t)

    @property
    def record(self) -> _TurnRecord:
        return self.records[-1]

    @property
    def t(self) -> float:
        return self.times[self.step_index]

    @property
    def t_next(self) -> float:
        return self.times[self.step_index + 1]

    def tokens_left(self) -> torch.Tensor:
        return self.max_tokens - self.record.counts

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

    def _check_device(self, tensor: torch.Tensor, what: str) -> None:
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
        self._check_device(tokens, "tokens")
        self._check_device(lengths, "lengths")
        width = tokens.shape[1]
        if bool(((lengths < 0) | (lengths > width)).any()):
            raise ActionShapeError(f"lengths must lie in [0, {width}], got {lengths.tolist()}")
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
                f"episode(s) {rows} already closed their text phase in this turn; give them length 0 "
                "(see BatchObservation.text_open)"
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
                raise ActionShapeError(f"log_probs must have the tokens' shape {tuple(tokens.shape)}, got {tuple(log_probs.shape)}")
            if not log_probs.is_floating_point():
                raise ActionDTypeError(f"log_probs must be floating point, got {log_probs.dtype}")
            self._check_device(log_probs, "log_probs")
            given = log_probs.to(torch.float32)[real]
            if not bool(torch.isfinite(given).all()):
                raise NonFiniteActionError("log_probs contain NaN or infinite values")
            if bool((given > 1e-4).any()):
                raise InvalidActionError("log_probs of tokens must be <= 0 (they are log-probabilities of a categorical)")
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
        self._check_device(x_next, "x_next")
        if not bool(torch.isfinite(x_next).all()):
            raise NonFiniteActionError("x_next contains NaN or infinite values")
        if log_prob is not None:
            if log_prob.dim() == 0 and self.n == 1:
                log_prob = log_prob.reshape(1)
            if tuple(log_prob.shape) != (self.n,):
                raise ActionShapeError(f"expected log_prob of shape ({self.n},), got {tuple(log_prob.shape)}")
            if not log_prob.is_floating_point():
                raise ActionDTypeError(f"log_prob must be floating point, got {log_prob.dtype}")
            self._check_device(log_prob, "log_prob")
            if not bool(torch.isfinite(log_prob).all()):
                raise NonFiniteActionError("log_prob contains NaN or infinite values")
            log_prob = log_prob.detach().to(torch.float32).clone()
        return CheckedFlow(x_next=x_next, log_prob=log_prob, stochastic=stochastic)

    # -- transitions: cannot fail once checked ------------------------------------------------

    def apply_text(self, action: CheckedText) -> None:
        """Append each episode's segment; close episodes that wrote end-of-thinking or hit the limit;
        when all are closed, the image phase begins."""
        record = self.record
        tokens, lengths = action.tokens, action.lengths
        width = tokens.shape[1]
        if width:
            real = torch.arange(width, device=self.device).unsqueeze(0) < lengths.unsqueeze(1)
            rows = self._rows.unsqueeze(1).expand(-1, width)[real]
            cols = (record.counts.unsqueeze(1) + torch.arange(width, device=self.device).unsqueeze(0))[real]
            record.tokens[rows, cols] = tokens[real]
            if action.log_probs is not None:
                record.log_probs[rows, cols] = action.log_probs[real]
            last = (lengths - 1).clamp(min=0)
            wrote_eot = (lengths > 0) & (tokens[self._rows, last] == self.text_codec.eot_id)
            record.counts += lengths
            self.text_open &= ~(wrote_eot | (record.counts >= self.max_tokens))
        self.version += 1
        if not bool(self.text_open.any()):
            self._begin_image()

    def apply_flow(self, action: CheckedFlow) -> bool:
        """Record the step and move every latent to ``x_next``. Returns True when the episode ended."""
        record = self.record
        x_next = action.x_next.detach().clone()  # the caller keeps its tensor; ours must not change
        record.latents.append(x_next)
        record.step_log_probs.append(action.log_prob)
        record.stochastic.append(action.stochastic)
        self.x_t = x_next
        self.step_index += 1
        self.version += 1
        if self.step_index < self.num_steps:
            return False
        record.images = self.image_codec.decode(x_next)
        if self.turn + 1 < self.num_turns:
            self.turn += 1
            self._begin_text()
            return False
        self.phase = "done"
        self.reward = self._score()
        return True

    # -- reward ------------------------------------------------------------------------------

    def reward_inputs(self, group_ids: torch.Tensor | None = None) -> RewardInputs:
        images = self.records[-1].images
        earlier = [r.images for r in self.records[:-1] if r.images is not None]
        if earlier:
            earlier_images = torch.stack(earlier, dim=1)
        else:
            earlier_images = images.new_zeros((self.n, 0, *images.shape[1:]))
        return RewardInputs(
            images=images,
            tasks=self.tasks,
            texts=[[self.text_codec.decode(r.tokens[i, : int(r.counts[i])]) for r in self.records] for i in range(self.n)],
            earlier_images=earlier_images,
            group_ids=group_ids,
        )

    def _score(self) -> TerminalReward:
        """Score the finished batch. A scorer that raises gives NaN scores and an error message
        (reported in ``info``) instead of breaking the environment; NaN scores pass through."""
        started = time.perf_counter()
        try:
            out = self.scenario.reward(self.reward_inputs(self.group_ids))
            scores = torch.as_tensor(out.scores, dtype=torch.float32).reshape(-1).cpu()
            if scores.shape[0] != self.n:
                raise ValueError(f"the reward returned {scores.shape[0]} scores for {self.n} episodes")
            components = {k: torch.as_tensor(v, dtype=torch.float32).reshape(-1).cpu() for k, v in out.components.items()}
            return TerminalReward(scores=scores, components=components, seconds=time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - a broken scorer must not corrupt the episode
            nan = torch.full((self.n,), math.nan)
            return TerminalReward(scores=nan, components={}, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - started)

    # -- views ------------------------------------------------------------------------------

    def trajectory(self, i: int) -> Trajectory:
        """Episode ``i``'s trajectory so far (copies, safe to keep)."""
        turns = []
        for k, record in enumerate(self.records):
            count = int(record.counts[i])
            segments: list[TextSegment | ImageSegment] = [
                TextSegment(tokens=record.tokens[i, :count].cpu().clone(), log_probs=record.log_probs[i, :count].cpu().clone())
            ]
            steps = len(record.latents) - 1
            if record.latents:
                latents = torch.stack([x[i] for x in record.latents]).cpu()
                nan = torch.tensor(math.nan)
                segments.append(
                    ImageSegment(
                        x_t=latents[:-1].clone(),
                        x_next=latents[1:].clone(),
                        t=torch.tensor(self.times[:steps], dtype=torch.float32),
                        t_next=torch.tensor(self.times[1 : steps + 1], dtype=torch.float32),
                        log_prob=torch.stack([nan if lp is None else lp[i].cpu() for lp in record.step_log_probs])
                        if steps
                        else torch.zeros(0),
                        stochastic=torch.tensor(record.stochastic, dtype=torch.bool),
                        image=None if record.images is None else record.images[i].cpu().clone(),
                    )
                )
            turns.append(Turn(prompt=self.tasks[i].prompts[k], segments=segments))
        reward = self.reward
        return Trajectory(
            scenario=self.scenario.name,
            task=self.tasks[i],
            seed=self.seed,
            turns=turns,
            reward=None if reward is None else float(reward.scores[i]),
            reward_components={} if reward is None else {k: float(v[i]) for k, v in reward.components.items()},
            terminated=self.phase == "done",
        )

    def cond_images(self) -> torch.Tensor:
        """Finished images of earlier turns, ``[N, K, H, W, 3]`` uint8."""
        done = [r.images for r in self.records if r.images is not None]
        size = self.image_codec.image_size
        if not done:
            return torch.zeros((self.n, 0, size, size, 3), dtype=torch.uint8)
        return torch.stack([img.cpu() for img in done], dim=1)


# -- helpers shared by the single and the batched environment ----------------------------------


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
