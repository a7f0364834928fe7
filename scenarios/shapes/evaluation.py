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
from unigrpo_env.scenarios.shapes.scene import describe
from unigrpo_env.scenarios.shapes.tasks import extract_description
from unigrpo_env.vector import InterleavedVectorEnv

__all__ = ["shapes_evaluator", "oracle_text_writer", "description_accuracy", "final_image_quality"]


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
    """1 where the last turn's reasoning ends in exactly the target scene's description, else 0."""
    text = result.trajectory.turns[-1].text
    hits = []
    for i, task in enumerate(result.tasks):
        written = scenario.text_codec.decode(text.tokens[i, : int(text.lengths[i])])
        truth = describe(scenario.target_scene(task, task.num_turns - 1))
        hits.append(float(extract_description(written) == truth))
    return hits


def final_image_quality(result: Rollout, scenario) -> list[float]:
    """The image-quality score of each final image."""
    images = result.trajectory.images.cpu().numpy()
    return [image_quality(np.asarray(image)).score for image in images]


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
