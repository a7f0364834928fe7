"""ShapesWorld's held-out evaluator: the generic one, plus what only an exact world can measure.

Registered as the evaluator ``shapes`` (entry point in the package's pyproject.toml), which the
ShapesWorld scenarios name in ``default_evaluator``. Besides the pipeline's reward and
GenEval-correct rate it reports:

* ``image_given_truth`` (a probe) — an oracle writes each turn's correct reasoning and
  description, the policy's image model draws: the image model alone;
* ``description_accuracy`` — how often the policy's reasoning of the last turn ends in exactly
  the target scene's description: the language model alone;
* ``image_quality`` — ShapesWorld's stray-pixel, off-palette and noise measure of the final
  images, in [0, 1], to see reward hacking that the verifier does not punish.
"""

from __future__ import annotations

import numpy as np
import torch

from unigrpo_env.agents.evaluation import Evaluator
from unigrpo_env.agents.policy import TextSample, TurnContext
from unigrpo_env.agents.rollout import Rollout
from unigrpo_env.scenarios.shapes.quality import image_quality
from unigrpo_env.scenarios.shapes.rewards import shapes_task
from unigrpo_env.scenarios.shapes.scene import describe
from unigrpo_env.scenarios.shapes.tasks import extract_description
from unigrpo_env.scenarios.shapes.verify import verify
from unigrpo_env.vector import InterleavedVectorEnv

__all__ = [
    "shapes_evaluator",
    "refine_evaluator",
    "oracle_text_writer",
    "description_accuracy",
    "final_image_quality",
    "correct_after_turn",
]


def oracle_text_writer(context: TurnContext, envs: InterleavedVectorEnv) -> TextSample:
    """Writes each episode's correct reasoning and description of the current turn
    (``scenario.oracle_tokens(task, turn)``)."""
    scenario = envs.scenario
    rows = [scenario.oracle_tokens(task, context.turn) for task in envs.tasks]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), envs.text_codec.pad_id, dtype=torch.long, device=envs.device)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows], device=envs.device)
    return TextSample(tokens=tokens, lengths=lengths, log_probs=torch.zeros(tokens.shape, device=envs.device))


def description_accuracy(result: Rollout, scenario) -> list[float]:
    """1 where the episode's last turn's reasoning ends in exactly that turn's target scene's
    description, else 0."""
    trajectory = result.trajectory
    played = trajectory.turns_played().tolist()
    hits = []
    for i, task in enumerate(result.tasks):
        last = played[i] - 1
        text = trajectory.turns[last].text
        written = scenario.text_codec.decode(text.tokens[i, : int(text.lengths[i])])
        truth = describe(scenario.target_scene(task, last))
        hits.append(float(extract_description(written) == truth))
    return hits


def final_image_quality(result: Rollout, scenario) -> list[float]:
    """The image-quality score of each episode's own final image."""
    images = result.trajectory.final_images().cpu().numpy()
    return [image_quality(np.asarray(image)).score for image in images]


def correct_after_turn(turn: int):
    """A metric: whether the verifier accepts each episode's image after ``turn`` turns (its last
    image where it ended earlier): how far feedback has brought it by then."""

    def metric(result: Rollout, scenario) -> list[float]:
        trajectory = result.trajectory
        played = trajectory.turns_played()
        images = trajectory.turn_images().cpu().numpy()
        out = []
        for i, task in enumerate(result.tasks):
            k = min(turn, int(played[i])) - 1
            out.append(float(verify(images[i, k], shapes_task(task)).correct))
        return out

    return metric


def refine_evaluator(max_turns: int = 3, **options) -> Evaluator:
    """The evaluator of ``refine``: the ShapesWorld one, plus the correct rate after each turn
    (``correct_after_turn_k``, k = 1 … ``max_turns``) and the mean number of turns played."""
    evaluator = shapes_evaluator(**options)
    for k in range(1, max_turns + 1):
        evaluator.metrics[f"correct_after_turn_{k}"] = correct_after_turn(k)
        evaluator.labels[f"correct_after_turn_{k}"] = f"correct after turn {k}"
    evaluator.metrics["turns"] = lambda result, scenario: result.trajectory.turns_played().float().tolist()
    evaluator.labels["turns"] = "turns played"
    return evaluator


def shapes_evaluator(**options) -> Evaluator:
    """The evaluator of the ShapesWorld scenarios; ``options`` go to :class:`Evaluator`."""
    return Evaluator(
        metrics={"description_accuracy": description_accuracy, "image_quality": final_image_quality},
        probes={"image_given_truth": oracle_text_writer},
        labels={
            "image_given_truth": "image | true desc.",
            "description_accuracy": "description accuracy",
            "image_quality": "image quality",
        },
        **options,
    )
