"""Edit fidelity: does an edit leave alone what it should?

An edit instruction ("make the circle green") changes some objects of the scene it starts from
and must leave the others exactly as they were. This scorer measures the second half; whether
the change itself was made is the verifier's job (``shapes_verifier`` against the edit's
target scene), so the two are meant to be combined: ``"shapes_verifier,edit_fidelity:0.5"``.

What it reads. Each task carries, in ``task.meta["shapes_edit"]`` (JSON, built by
:func:`edit_meta`)::

    {
      "before":    [{"shape": "circle", "colour": "red", "cell": [1, 0]}, ...],
      "untouched": [0, 2]
    }

* ``before`` — the scene the last edit starts from, i.e. the scene of the earlier image (the
  previous turn's target), as ShapesWorld objects (shape, colour, ``[row, col]`` cell);
* ``untouched`` — indices into ``before`` of the objects the edit must leave as they are.

The score, per episode, with ``U`` the untouched objects and ``D`` the objects the ShapesWorld
detector (:func:`~unigrpo_env.scenarios.shapes.detect_objects`) finds in the *final* image::

    fidelity = |{u ∈ U : some d ∈ D has u's shape, colour and cell}| / |U|

in [0, 1]; 1 when ``U`` is empty (an edit that may change everything cannot be unfaithful).
Objects of ``U`` sit in distinct cells, so a detected object matches at most one of them.
Components: ``kept`` (how many of ``U`` were found) and ``untouched`` (``|U|``). A task without
``meta["shapes_edit"]`` is a configuration error and raises (the environment then reports it).
"""

from __future__ import annotations

from typing import Any

import torch

from unigrpo_env.reward import RewardInputs, RewardOutput
from unigrpo_env.scenarios.shapes.scene import Scene, SceneObject
from unigrpo_env.scenarios.shapes.verify import detect_objects

__all__ = ["EDIT_META_KEY", "EditFidelityReward", "edit_meta", "untouched_objects", "edit_fidelity"]

#: The key of ``Task.meta`` this scorer reads.
EDIT_META_KEY = "shapes_edit"


def edit_meta(before: Scene, after: Scene) -> dict[str, Any]:
    """``meta["shapes_edit"]`` for an edit from scene ``before`` to scene ``after``: the objects
    of ``before`` that appear in ``after`` with the same shape, colour and cell are untouched."""
    kept = {(o.shape, o.colour, o.cell) for o in after.objects}
    return {
        "before": [{"shape": o.shape, "colour": o.colour, "cell": list(o.cell)} for o in before.objects],
        "untouched": [i for i, o in enumerate(before.objects) if (o.shape, o.colour, o.cell) in kept],
    }


def untouched_objects(task) -> list[SceneObject]:
    """The objects a task's edit must leave alone (validated), from ``task.meta["shapes_edit"]``."""
    try:
        data = task.meta[EDIT_META_KEY]
    except KeyError:
        raise ValueError(
            f"edit_fidelity needs edit tasks: task.meta[{EDIT_META_KEY!r}] with 'before' and 'untouched' "
            f"(task {task.index} of split {task.split!r} has none)"
        ) from None
    try:
        before = [SceneObject(o["shape"], o["colour"], tuple(o["cell"])) for o in data["before"]]
        indices = [int(i) for i in data["untouched"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"task.meta[{EDIT_META_KEY!r}] of task {task.index} is malformed: {exc}") from exc
    if len(set(indices)) != len(indices) or any(not 0 <= i < len(before) for i in indices):
        raise ValueError(
            f"task.meta[{EDIT_META_KEY!r}]['untouched'] of task {task.index} must be distinct indices into 'before' (0..{len(before) - 1}), got {indices}"
        )
    cells = [before[i].cell for i in indices]
    if len(set(cells)) != len(cells):
        raise ValueError(f"the untouched objects of task {task.index} share a cell: {cells}")
    return [before[i] for i in indices]


def edit_fidelity(image, untouched: list[SceneObject]) -> tuple[float, int]:
    """(fidelity, number kept) of one ``[H, W, 3]`` uint8 image; see the module docstring."""
    if not untouched:
        return 1.0, 0
    found = {(d.shape, d.colour, d.cell) for d in detect_objects(image)}
    kept = sum((u.shape, u.colour, u.cell) in found for u in untouched)
    return kept / len(untouched), kept


class EditFidelityReward:
    """Fraction of the objects an edit must leave alone that are unchanged in the final image."""

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        images = inputs.images.cpu().numpy()
        scores, kept, counts = [], [], []
        for i, task in enumerate(inputs.tasks):
            untouched = untouched_objects(task)
            score, k = edit_fidelity(images[i], untouched)
            scores.append(score)
            kept.append(float(k))
            counts.append(float(len(untouched)))
        return RewardOutput(
            scores=torch.tensor(scores, dtype=torch.float32),
            components={"kept": torch.tensor(kept), "untouched": torch.tensor(counts)},
        )
