"""Held-out evaluation of a unified policy, GenEval-style.

An :class:`Evaluator` plays every task of a split (or ``limit`` of them, spread over the
categories) with the deterministic ODE sampler and reports, per category of the tasks and
"overall" (the mean over categories, as GenEval reports it):

* **pipeline** — the policy reasons, then draws (what a user gets): ``reward``, the mean dense
  reward, and ``correct``, GenEval's binary verdict where the reward has a ``correct`` component;
* **probes** — the same scores for rollouts whose text is written by someone else (a
  :data:`~unigrpo_env.agents.rollout.TextWriter`), e.g. an oracle that writes the true
  description, to judge the image model alone;
* **metrics** — per-episode measurements of the pipeline's rollouts (:class:`EpisodeMetric`),
  e.g. how often the reasoning ends in the right description, or an image-quality measure.

The generic evaluator has no probes or metrics; a scenario package registers an evaluator with its
own (``unigrpo.evaluators`` entry points; ShapesWorld's is ``shapes``), and a scenario names it
in ``default_evaluator``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from unigrpo_env.agents.policy import UnifiedPolicy, check_policy_fits, world_of
from unigrpo_env.agents.rollout import Rollout, RolloutSettings, TextWriter, rollout
from unigrpo_env.agents.visuals import image_grid
from unigrpo_env.reward import RewardFunction
from unigrpo_env.scenario import Scenario
from unigrpo_env.vector import InterleavedVectorEnv

__all__ = ["CategoryScores", "EvalReport", "EpisodeMetric", "Evaluator", "scores_by_category"]


class CategoryScores(BaseModel):
    """Mean dense reward and GenEval-correct rate over ``count`` tasks (NaN where not measured).

    ``unscored`` counts the tasks whose reward could not be computed (NaN): the means are over the
    other ``count − unscored`` tasks, and a report says so rather than showing a clean number."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    reward: float
    correct: float
    count: int
    unscored: int = 0


class EvalReport(BaseModel):
    """The numbers of one evaluation (saved as ``eval.json``).

    Attributes:
        pipeline: per category, the scores of the policy's own rollouts.
        probes: per probe, per category, the scores of rollouts with a probe's text.
        metrics: per metric, per category, the mean of the metric over the pipeline's episodes.
        labels: display names of the probes and metrics (for tables).
    """

    model_config = ConfigDict(ser_json_inf_nan="constants")

    scenario: str
    split: str
    checkpoint: str | None
    seed: int
    cfg_scale: float
    temperature: float
    num_steps: int
    pipeline: dict[str, CategoryScores]
    probes: dict[str, dict[str, CategoryScores]] = Field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    seconds: float

    def overall(self, part: str = "pipeline", metric: str = "correct") -> float:
        """``metric`` ("reward" or "correct") over all categories of the pipeline or of a probe."""
        scores = self.pipeline if part == "pipeline" else self.probes[part]
        return getattr(scores["overall"], metric)


class EpisodeMetric(Protocol):
    """A measurement of each episode of a finished rollout: one value per episode (NaN where it
    does not apply). ``scenario`` is the one the rollout played."""

    def __call__(self, result: Rollout, scenario: Scenario) -> Sequence[float]: ...


class Evaluator:
    """Plays a split with a policy and scores it; see the module docstring.

    Args:
        metrics: per-episode metrics of the pipeline's rollouts, by name.
        probes: text writers whose rollouts are scored as well, by name.
        labels: display names of the metrics and probes (default: the names).
        batch_size: episodes per batched environment.
        grid_per_category: how many images of each category ``grid.png`` shows.
    """

    def __init__(
        self,
        metrics: Mapping[str, EpisodeMetric] | None = None,
        probes: Mapping[str, TextWriter] | None = None,
        labels: Mapping[str, str] | None = None,
        batch_size: int = 140,
        grid_per_category: int = 4,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.metrics = dict(metrics or {})
        self.probes = dict(probes or {})
        self.labels = {name: name.replace("_", " ") for name in (*self.metrics, *self.probes)} | dict(labels or {})
        self.batch_size = int(batch_size)
        self.grid_per_category = int(grid_per_category)

    def evaluate(
        self,
        policy: UnifiedPolicy,
        scenario: Scenario,
        *,
        split: str = "heldout",
        cfg_scale: float = 1.0,
        seed: int = 0,
        temperature: float = 1.0,
        limit: int | None = None,
        reward: RewardFunction | None = None,
        reward_timeout: float | None = None,
        run_probes: bool = True,
        checkpoint: str | None = None,
        out_dir: str | Path | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> EvalReport:
        """Evaluate ``policy`` on ``scenario``'s ``split``: images drawn with the deterministic ODE
        sampler (CFG scale ``cfg_scale``), text sampled at ``temperature`` with a generator seeded
        by ``seed``. ``reward`` scores instead of the scenario's own (``reward_timeout``: seconds per
        batch before its scores are NaN); ``run_probes=False`` skips the
        probes' rollouts. With ``out_dir``, saves ``eval.json`` and ``grid.png`` (and ``turns.png``,
        an image strip of each turn, for multi-turn tasks). ``progress(done, total)`` is called
        after each batch of tasks (a progress bar's hook)."""
        if cfg_scale < 1.0:
            raise ValueError(f"cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}")
        start = time.perf_counter()
        tasks = _spread(list(scenario.check_split(split)), limit)
        world = world_of(policy, scenario)
        check_policy_fits(policy, scenario, world)
        settings = RolloutSettings(temperature=temperature, noise_level=0.0, cfg_scale=cfg_scale)
        generator = torch.Generator().manual_seed(seed)
        probes = self.probes if run_probes else {}
        rows: dict[str, list] = defaultdict(list)
        for start_index in range(0, len(tasks), self.batch_size):
            chunk = tasks[start_index : start_index + self.batch_size]
            envs = InterleavedVectorEnv(
                scenario, len(chunk), 1, split=split, reward=reward, reward_timeout=reward_timeout, world=world
            )
            options = {"task_index": [task.index for task in chunk]}
            piped = rollout(policy, envs, settings, seed=seed, options=options, generator=generator)
            rows["pipeline"] += _scores(piped)
            played = piped.trajectory.turns_played().tolist()  # each episode's own turns
            images = piped.trajectory.turn_images().cpu().numpy()
            rows["turn_images"] += [images[i, : played[i]] for i in range(len(played))]
            rows["turn_prompts"] += [piped.trajectory.prompts_of(i) for i in range(len(played))]
            for name, metric in self.metrics.items():
                rows[name] += [float(v) for v in metric(piped, scenario)]
            for name, writer in probes.items():
                rows[name] += _scores(rollout(policy, envs, settings, seed=seed, options=options, write_text=writer))
            if progress is not None:
                progress(start_index + len(chunk), len(tasks))
        categories = [task.category for task in tasks]
        pipeline = rows["pipeline"]
        report = EvalReport(
            scenario=scenario.name,
            split=split,
            checkpoint=checkpoint,
            seed=seed,
            cfg_scale=cfg_scale,
            temperature=temperature,
            num_steps=world.num_steps,
            pipeline=scores_by_category(categories, [r for r, _ in pipeline], [c for _, c in pipeline]),
            probes={
                name: scores_by_category(categories, [r for r, _ in rows[name]], [c for _, c in rows[name]])
                for name in probes
            },
            metrics={
                name: {c: s.correct for c, s in scores_by_category(categories, rows[name], rows[name]).items()}
                for name in self.metrics
            },
            labels={name: self.labels[name] for name in (*self.metrics, *probes)},
            seconds=time.perf_counter() - start,
        )
        if out_dir is not None:
            self._save(report, tasks, rows, Path(out_dir))
        return report

    def _save(self, report: EvalReport, tasks: list, rows: dict, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(report.model_dump_json(indent=2))
        categories = [task.category for task in tasks]
        shown = _grid_indices(categories, per_category=self.grid_per_category)
        image_grid(
            [rows["turn_images"][i][-1] for i in shown],
            [f"[{categories[i]}] {tasks[i].prompts[0]} -> reward {rows['pipeline'][i][0]:.2f}" for i in shown],
            out / "grid.png",
        )
        if max(len(images) for images in rows["turn_images"]) > 1:
            _turn_strips(tasks, categories, rows, _grid_indices(categories, per_category=2), out / "turns.png")


def scores_by_category(
    categories: Sequence[str], rewards: Sequence[float], correct: Sequence[float]
) -> dict[str, CategoryScores]:
    """Per category the mean reward and correct rate of its episodes (NaN rewards left out and
    counted as ``unscored``), and ``"overall"``: the mean over the categories (each category
    weighs the same, as GenEval averages), over every episode's count."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(categories):
        groups[c].append(i)
    out = {
        c: CategoryScores(
            reward=_nanmean([rewards[i] for i in idx]),
            correct=_nanmean([correct[i] for i in idx]),
            count=len(idx),
            unscored=sum(math.isnan(rewards[i]) for i in idx),
        )
        for c, idx in sorted(groups.items())
    }
    out["overall"] = CategoryScores(
        reward=_nanmean([s.reward for s in out.values()]),
        correct=_nanmean([s.correct for s in out.values()]),
        count=len(categories),
        unscored=sum(s.unscored for s in out.values()),
    )
    return out


def _spread(tasks: list, limit: int | None) -> list:
    """The first ``limit`` tasks taken round-robin over categories (all tasks if None), so a
    small evaluation still covers every category."""
    if limit is None or limit >= len(tasks):
        return tasks
    by_category: dict[str, list] = defaultdict(list)
    for task in tasks:
        by_category[task.category].append(task)
    queues = [iter(v) for _, v in sorted(by_category.items())]
    chosen: list = []
    while len(chosen) < limit:
        for queue in queues:
            task = next(queue, None)
            if task is not None and len(chosen) < limit:
                chosen.append(task)
    return sorted(chosen, key=lambda t: t.index)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _turn_strips(tasks: list, categories: Sequence[str], rows: dict, shown: list[int], path: Path) -> None:
    """One row per shown task: the image of every turn, captioned with that turn's prompt."""
    num_turns = max(len(rows["turn_images"][i]) for i in shown)
    images, captions = [], []
    for i in shown:
        played = rows["turn_images"][i]
        prompts = rows["turn_prompts"][i] if "turn_prompts" in rows else tasks[i].prompts
        for k in range(num_turns):
            if k >= len(played):  # an episode that ended earlier: a blank cell
                images.append(np.full_like(played[0], 255))
                captions.append("")
                continue
            images.append(played[k])
            tail = f" -> reward {rows['pipeline'][i][0]:.2f}" if k == len(played) - 1 else ""
            head = f"[{categories[i]}] " if k == 0 else ""
            captions.append(f"{head}{k + 1}: {prompts[k]}{tail}")
    image_grid(images, captions, path, columns=num_turns, width_chars=32, max_caption_lines=6)


def _scores(result: Rollout) -> list[tuple[float, float]]:
    rewards = result.rewards.tolist()
    components = result.trajectory.reward_components
    # GenEval's verdict: the verifier's own component, or the verifier term's inside a weighted sum
    key = (
        "correct" if "correct" in components else next((k for k in sorted(components) if k.endswith("/correct")), None)
    )
    correct = (components[key] if key else torch.full((len(rewards),), math.nan)).tolist()
    return list(zip(rewards, correct))


def _grid_indices(categories: Sequence[str], per_category: int) -> list[int]:
    seen: dict[str, int] = defaultdict(int)
    chosen = []
    for i, c in enumerate(categories):
        if seen[c] < per_category:
            seen[c] += 1
            chosen.append(i)
    return chosen
