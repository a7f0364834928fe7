"""Held-out evaluation of a unified policy, GenEval-style.

Three numbers per category of the scenario's tasks:

* **pipeline** — the policy reasons, then draws (what a user gets);
* **image given the true descriptions** — an oracle writes the correct reasoning and description,
  the policy's image model draws (the image model alone);
* **description accuracy** — how often the policy's reasoning ends in exactly the right scene
  description (the language model alone);
* **image quality** of the pipeline's images (ShapesWorld's stray-pixel, off-palette and noise
  measure, in [0, 1]) — to see reward hacking that the verifier does not punish.

Scores: ``correct`` is GenEval's binary verdict (all checks pass), ``reward`` the dense verifier
score the RL reward uses. "overall" is the mean over categories, as GenEval reports it.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from unigrpo_env.agents.policy import TextSample, TurnContext, UnifiedPolicy
from unigrpo_env.agents.rollout import Rollout, RolloutSettings, rollout
from unigrpo_env.agents.visuals import image_grid
from unigrpo_env.registration import make_scenario, make_vec
from unigrpo_env.scenarios.shapes import describe, extract_description
from unigrpo_env.scenarios.shapes.quality import image_quality

__all__ = ["CategoryScores", "EvalReport", "evaluate", "oracle_text_writer"]


class CategoryScores(BaseModel):
    """Mean dense reward and GenEval-correct rate over ``count`` tasks (NaN where not measured)."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    reward: float
    correct: float
    count: int


class EvalReport(BaseModel):
    """The numbers of one evaluation (saved as JSON)."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    scenario: str
    split: str
    checkpoint: str | None
    seed: int
    cfg_scale: float
    temperature: float
    num_steps: int
    pipeline: dict[str, CategoryScores]
    image_given_truth: dict[str, CategoryScores]
    description_accuracy: dict[str, float]
    image_quality: dict[str, float] = {}
    seconds: float

    def overall(self, part: str = "pipeline", metric: str = "correct") -> float:
        return getattr(getattr(self, part)["overall"], metric)


def oracle_text_writer(context: TurnContext, envs) -> TextSample:
    """Writes each episode's correct reasoning and description of the current turn
    (``scenario.oracle_tokens(task, turn)``)."""
    scenario = envs.scenario
    rows = [scenario.oracle_tokens(task, context.turn) for task in envs.episodes.tasks]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), scenario.text_codec.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    return TextSample(tokens=tokens, lengths=lengths, log_probs=torch.zeros(tokens.shape))


def _by_category(categories: Sequence[str], rewards: Sequence[float], correct: Sequence[float]) -> dict[str, CategoryScores]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(categories):
        groups[c].append(i)
    out = {
        c: CategoryScores(
            reward=_nanmean([rewards[i] for i in idx]),
            correct=_nanmean([correct[i] for i in idx]),
            count=len(idx),
        )
        for c, idx in sorted(groups.items())
    }
    out["overall"] = CategoryScores(
        reward=_nanmean([s.reward for s in out.values()]),
        correct=_nanmean([s.correct for s in out.values()]),
        count=len(categories),
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


def _batches(total: int, size: int):
    for start in range(0, total, size):
        yield list(range(start, min(total, start + size)))


def evaluate(
    policy: UnifiedPolicy,
    scenario: str = "t2i_reason",
    *,
    split: str = "heldout",
    cfg_scale: float = 1.0,
    seed: int = 0,
    temperature: float = 1.0,
    num_steps: int | None = None,
    batch_size: int = 140,
    limit: int | None = None,
    checkpoint: str | None = None,
    out_dir: str | Path | None = None,
    image_given_truth: bool = True,
    scenario_options: dict | None = None,
) -> EvalReport:
    """Evaluate ``policy`` on every task of ``split`` (or ``limit`` of them, spread over the
    categories); images are drawn
    with the deterministic ODE sampler, text sampled at ``temperature`` with a seeded generator.
    With ``out_dir``, saves ``eval.json`` and ``grid.png`` (a few tasks per category).
    ``image_given_truth=False`` skips the second rollout (the image model alone);
    ``scenario_options`` build the scenario as a training run does (e.g. its reward)."""
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}")
    start = time.perf_counter()
    options = dict(scenario_options or {})
    if num_steps is not None:
        options["num_steps"] = num_steps
    world = make_scenario(scenario, **options)
    tasks = _spread(list(world.tasks(split)), limit)
    settings = RolloutSettings(temperature=temperature, noise_level=0.0, cfg_scale=cfg_scale)
    generator = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = defaultdict(list)
    for chunk in _batches(len(tasks), batch_size):
        envs = make_vec(world, num_prompts=len(chunk), group_size=1, split=split)
        indices = [tasks[i].index for i in chunk]
        piped = rollout(policy, envs, settings, seed=seed, options={"task_index": indices}, generator=generator)
        rows["pipeline"] += _scores(piped)
        rows["images"] += list(envs.episodes.records[-1].images.numpy())
        rows["turn_images"] += list(torch.stack([r.images for r in envs.episodes.records], dim=1).numpy())
        rows["described"] += _description_hits(piped)
        if image_given_truth:
            truth = rollout(policy, envs, settings, seed=seed, options={"task_index": indices}, write_text=oracle_text_writer)
            rows["truth"] += _scores(truth)
        else:
            rows["truth"] += [(math.nan, math.nan)] * len(chunk)
    categories = [t.category for t in tasks]
    described = _by_category(categories, rows["described"], rows["described"])
    quality = _image_quality(world, rows["images"])
    quality_by_category = _by_category(categories, quality, quality)
    report = EvalReport(
        scenario=scenario,
        split=split,
        checkpoint=checkpoint,
        seed=seed,
        cfg_scale=cfg_scale,
        temperature=temperature,
        num_steps=world.num_steps,
        pipeline=_by_category(categories, [r for r, _ in rows["pipeline"]], [c for _, c in rows["pipeline"]]),
        image_given_truth=_by_category(categories, [r for r, _ in rows["truth"]], [c for _, c in rows["truth"]]),
        description_accuracy={c: s.correct for c, s in described.items()},
        image_quality={c: s.correct for c, s in quality_by_category.items()},
        seconds=time.perf_counter() - start,
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(report.model_dump_json(indent=2))
        shown = _grid_indices(categories, per_category=4)
        image_grid(
            [rows["images"][i] for i in shown],
            [f"[{categories[i]}] {tasks[i].prompts[0]} -> reward {rows['pipeline'][i][0]:.2f}" for i in shown],
            out / "grid.png",
        )
        if tasks[0].num_turns > 1:
            _turn_strips(tasks, categories, rows, _grid_indices(categories, per_category=2), out / "turns.png")
    return report


def _turn_strips(tasks: list, categories: Sequence[str], rows: dict, shown: list[int], path: Path) -> None:
    """One row per shown task: the image of every turn, captioned with that turn's prompt."""
    num_turns = tasks[0].num_turns
    images, captions = [], []
    for i in shown:
        for k in range(num_turns):
            images.append(rows["turn_images"][i][k])
            tail = f" -> reward {rows['pipeline'][i][0]:.2f}" if k == num_turns - 1 else ""
            head = f"[{categories[i]}] " if k == 0 else ""
            captions.append(f"{head}{k + 1}: {tasks[i].prompts[k]}{tail}")
    image_grid(images, captions, path, columns=num_turns, width_chars=32, caption_lines=6)


def _scores(result: Rollout) -> list[tuple[float, float]]:
    rewards = result.rewards.tolist()
    components = result.reward_components
    # GenEval's verdict: the verifier's own component, or the verifier term's inside a weighted sum
    key = "correct" if "correct" in components else next((k for k in sorted(components) if k.endswith("/correct")), None)
    correct = (components[key] if key else torch.full((len(rewards),), math.nan)).tolist()
    return list(zip(rewards, correct))


def _is_shapes_world(scenario) -> bool:
    """Whether ``scenario`` is built on ShapesWorld (it names each turn's target scene), so its
    images use ShapesWorld's palette and its texts its description language."""
    return getattr(scenario, "target_scene", None) is not None


def _image_quality(world, images: list[np.ndarray]) -> list[float]:
    """ShapesWorld's image-quality score of each final image (NaN for scenarios not built on
    ShapesWorld, whose palette the measure assumes)."""
    if not _is_shapes_world(world):
        return [math.nan] * len(images)
    return [image_quality(np.asarray(image)).score for image in images]


def _description_hits(result: Rollout) -> list[float]:
    """Whether the last turn's description is the target scene's (NaN for scenarios without
    ``target_scene``, i.e. not built on ShapesWorld)."""
    scenario = result.envs.scenario
    if not _is_shapes_world(scenario):
        return [math.nan] * len(result.tasks)
    sample = result.texts[-1]
    hits = []
    for i, task in enumerate(result.tasks):
        text = scenario.text_codec.decode(sample.tokens[i, : int(sample.lengths[i])])
        truth = describe(scenario.target_scene(task, task.num_turns - 1))
        hits.append(float(extract_description(text) == truth))
    return hits


def _grid_indices(categories: Sequence[str], per_category: int) -> list[int]:
    seen: dict[str, int] = defaultdict(int)
    chosen = []
    for i, c in enumerate(categories):
        if seen[c] < per_category:
            seen[c] += 1
            chosen.append(i)
    return chosen
