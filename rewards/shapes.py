"""Built-in ShapesWorld scorers: the exact verifier and the image-quality measure.

Both read each episode's target from ``task.meta["shapes_task"]`` (a
:class:`~unigrpo_env.scenarios.shapes.ShapesTask` as a dict), so they score any scenario built on
ShapesWorld.
"""

from __future__ import annotations

import math

import torch

from unigrpo_env.reward import RewardInputs, RewardOutput
from unigrpo_env.scenarios.shapes import CHECK_KINDS, ShapesTask, image_quality, verify

__all__ = ["ShapesVerifierReward", "ImageQualityReward", "shapes_task"]


def shapes_task(task) -> ShapesTask:
    """The ShapesWorld task behind a :class:`~unigrpo_env.Task`."""
    try:
        return ShapesTask.from_dict(task.meta["shapes_task"])
    except KeyError as exc:
        raise ValueError("this reward needs ShapesWorld tasks (task.meta['shapes_task'])") from exc


class ShapesVerifierReward:
    """The verifier's verdict on each image.

    Args:
        score: ``"fraction"`` — the fraction of the task's checks the image passes (dense, in
            [0, 1]; 1 exactly when the image is GenEval-correct); ``"correct"`` — GenEval's binary
            verdict (1 when every check passes, else 0).

    Components: ``correct`` (0/1), ``fraction``, and one per check kind (``object``, ``count``,
    ``colour``, ``position``, ``binding``), NaN where the task has no check of that kind.
    """

    def __init__(self, score: str = "fraction"):
        if score not in ("fraction", "correct"):
            raise ValueError(f"score must be 'fraction' or 'correct', got {score!r}")
        self.score = score

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        images = inputs.images.cpu().numpy()
        results = [verify(images[i], shapes_task(task)) for i, task in enumerate(inputs.tasks)]
        correct = torch.tensor([float(r.correct) for r in results])
        fraction = torch.tensor([r.score for r in results], dtype=torch.float32)
        components = {"correct": correct, "fraction": fraction}
        for kind in CHECK_KINDS:
            components[kind] = torch.tensor([r.checks.get(kind, math.nan) for r in results], dtype=torch.float32)
        return RewardOutput(scores=fraction if self.score == "fraction" else correct, components=components)


class ImageQualityReward:
    """Image quality in [0, 1] (1 = a clean, flat-palette image); components are its parts."""

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        images = inputs.images.cpu().numpy()
        results = [image_quality(images[i]) for i in range(images.shape[0])]
        components = {
            "stray_pixel_fraction": torch.tensor([r.stray_pixel_fraction for r in results], dtype=torch.float32),
            "off_palette_fraction": torch.tensor([r.off_palette_fraction for r in results], dtype=torch.float32),
            "noise": torch.tensor([r.noise for r in results], dtype=torch.float32),
        }
        return RewardOutput(scores=torch.tensor([r.score for r in results], dtype=torch.float32), components=components)
