"""ShapesWorld's scorers: the exact verifier, the scene match, and the image-quality measure.

The verifier reads each episode's target from ``task.meta["shapes_task"]`` (a
:class:`~unigrpo_env.scenarios.shapes.ShapesTask` as a dict) and checks GenEval's constraints;
the scene match reads a whole target scene from ``task.meta["shapes_scene"]`` (a list of
``{"shape", "colour", "cell"}``) and compares every object, as an edit's result must be judged.
Both score any scenario built on ShapesWorld. Registered as ``shapes_verifier``, ``shapes_scene`` and
``image_quality`` (alias ``quality``) through the package's entry points, as a plugin's rewards are.
"""

from __future__ import annotations

import math

import torch

from unigrpo_env.reward import RewardInputs, RewardOutput
from unigrpo_env.scenarios.shapes.constraints import CHECK_KINDS
from unigrpo_env.scenarios.shapes.quality import image_quality
from unigrpo_env.scenarios.shapes.scene import Scene, SceneObject
from unigrpo_env.scenarios.shapes.tasks import ShapesTask
from unigrpo_env.scenarios.shapes.verify import detect_objects, verify

__all__ = [
    "SCENE_META_KEY",
    "ShapesVerifierReward",
    "SceneMatchReward",
    "ImageQualityReward",
    "scene_meta",
    "shapes_task",
]

#: The key of ``Task.meta`` the scene match reads.
SCENE_META_KEY = "shapes_scene"


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


def scene_meta(scene: Scene) -> list[dict]:
    """``meta["shapes_scene"]`` for a target scene."""
    return [{"shape": o.shape, "colour": o.colour, "cell": list(o.cell)} for o in scene.objects]


def _target_objects(task) -> set[tuple[str, str, tuple[int, int]]]:
    try:
        objects = task.meta[SCENE_META_KEY]
    except KeyError:
        raise ValueError(
            f"shapes_scene needs task.meta[{SCENE_META_KEY!r}], the target scene's objects (task {task.index} "
            f"of split {task.split!r} has none)"
        ) from None
    try:
        scene = Scene(tuple(SceneObject(o["shape"], o["colour"], tuple(o["cell"])) for o in objects))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"task.meta[{SCENE_META_KEY!r}] of task {task.index} is malformed: {exc}") from exc
    return {(o.shape, o.colour, o.cell) for o in scene.objects}


class SceneMatchReward:
    """How exactly the image shows the target scene, object by object.

    With ``T`` the target's objects and ``D`` the detected ones, each an exact (shape, colour,
    cell) triple, the score is the Jaccard index ``|T ∩ D| / |T ∪ D|``: 1 exactly when the image
    shows the scene, lowered by every missing, wrong or extra object. Components: ``correct``
    (0/1, D = T), ``found`` (|T ∩ D|), ``extra`` (|D − T|) and ``objects`` (|T|).
    """

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        images = inputs.images.cpu().numpy()
        scores, correct, found, extra, objects = [], [], [], [], []
        for i, task in enumerate(inputs.tasks):
            target = _target_objects(task)
            detected = {(d.shape, d.colour, d.cell) for d in detect_objects(images[i])}
            hits = len(target & detected)
            scores.append(hits / len(target | detected))
            correct.append(float(detected == target))
            found.append(float(hits))
            extra.append(float(len(detected - target)))
            objects.append(float(len(target)))
        return RewardOutput(
            scores=_floats(scores),
            components={
                "correct": _floats(correct),
                "found": _floats(found),
                "extra": _floats(extra),
                "objects": _floats(objects),
            },
        )


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


def _floats(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)
