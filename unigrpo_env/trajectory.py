"""The shared trajectory: everything an episode did, in order.

A :class:`Trajectory` holds one :class:`Turn` per user turn; a turn holds its ordered segments —
a :class:`TextSegment` (the reasoning tokens and their log-probabilities) then an
:class:`ImageSegment` (every denoising step ``x_t → x_next`` with its times, log-probability and
whether it was sampled) with the decoded image — and the trajectory holds the terminal reward.

Trajectories save to and load from one ``.safetensors`` file: tensors as safetensors, every
other field as JSON in the file's metadata header. No pickle anywhere, so loading a trajectory
file from a stranger cannot run code.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import save_file

from unigrpo_env._tensor_eq import TensorRecord
from unigrpo_env.task import Task

__all__ = ["TextSegment", "ImageSegment", "DenoisingStep", "Turn", "Trajectory", "TRAJECTORY_FORMAT"]

TRAJECTORY_FORMAT = "unigrpo-trajectory/1"


class TextSegment(TensorRecord):
    """Reasoning tokens of one turn.

    ``log_probs`` has one entry per token: the acting policy's log-probability where the
    action carried one, NaN where it did not.
    """

    kind: Literal["text"] = "text"
    tokens: torch.Tensor  # [L] int64
    log_probs: torch.Tensor  # [L] float32, NaN where not given

    @property
    def has_log_probs(self) -> bool:
        return bool(self.tokens.numel()) and not bool(torch.isnan(self.log_probs).any())

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens, "log_probs": self.log_probs}


class DenoisingStep(TensorRecord):
    """One image-phase transition ``x_t → x_next`` (a view of one row of an ImageSegment)."""

    x_t: torch.Tensor
    x_next: torch.Tensor
    t: float
    t_next: float
    log_prob: float  # NaN where the action carried none
    stochastic: bool


class ImageSegment(TensorRecord):
    """The denoising steps of one image, stacked along the first dimension (S steps).

    Attributes:
        x_t, x_next: ``[S, C, H, W]`` latents before and after each step (``x_next[s] == x_t[s+1]``).
        t, t_next: ``[S]`` times of each step (``t`` from 1 towards 0).
        log_prob: ``[S]`` log-density of each ``x_next`` under the acting policy (NaN if not given).
        stochastic: ``[S]`` bool, whether each step was sampled (SDE) or deterministic (ODE).
        image: the decoded RGB image ``[H, W, 3]`` uint8, once the last step is done.
    """

    kind: Literal["image"] = "image"
    x_t: torch.Tensor
    x_next: torch.Tensor
    t: torch.Tensor
    t_next: torch.Tensor
    log_prob: torch.Tensor
    stochastic: torch.Tensor
    image: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0])

    @property
    def steps(self) -> list[DenoisingStep]:
        return [
            DenoisingStep(
                x_t=self.x_t[s],
                x_next=self.x_next[s],
                t=float(self.t[s]),
                t_next=float(self.t_next[s]),
                log_prob=float(self.log_prob[s]),
                stochastic=bool(self.stochastic[s]),
            )
            for s in range(self.num_steps)
        ]

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k) for k in ("x_t", "x_next", "t", "t_next", "log_prob", "stochastic")}
        if self.image is not None:
            out["image"] = self.image
        return out


Segment = Annotated[TextSegment | ImageSegment, Field(discriminator="kind")]


class Turn(TensorRecord):
    """One user turn: its prompt and the ordered segments the policy produced for it."""

    prompt: str
    segments: list[Segment] = Field(default_factory=list)

    @property
    def text(self) -> TextSegment | None:
        return next((s for s in self.segments if isinstance(s, TextSegment)), None)

    @property
    def image(self) -> ImageSegment | None:
        return next((s for s in self.segments if isinstance(s, ImageSegment)), None)


class Trajectory(TensorRecord):
    """Everything one episode did: its task, its turns, and the terminal reward.

    ``reward`` is ``None`` until the episode has ended; ``reward_components`` holds the named
    parts of the reward (e.g. per-check scores of a verifier).
    """

    scenario: str
    task: Task
    seed: int | None = None
    turns: list[Turn] = Field(default_factory=list)
    reward: float | None = None
    reward_components: dict[str, float] = Field(default_factory=dict)
    terminated: bool = False

    @property
    def final_image(self) -> torch.Tensor | None:
        for turn in reversed(self.turns):
            if turn.image is not None and turn.image.image is not None:
                return turn.image.image
        return None

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the trajectory to one ``.safetensors`` file (tensors) with a JSON header (the rest)."""
        tensors: dict[str, torch.Tensor] = {}
        turns_json: list[dict[str, Any]] = []
        for i, turn in enumerate(self.turns):
            segs = []
            for j, seg in enumerate(turn.segments):
                for name, tensor in seg._tensors().items():
                    tensors[f"turn{i}.seg{j}.{name}"] = (
                        tensor.detach().to("cpu", copy=True).contiguous()
                    )  # views share storage
                segs.append({"kind": seg.kind, "has_image": isinstance(seg, ImageSegment) and seg.image is not None})
            turns_json.append({"prompt": turn.prompt, "segments": segs})
        header = {
            "scenario": self.scenario,
            "task": self.task.model_dump(mode="json"),
            "seed": self.seed,
            "turns": turns_json,
            "reward": _json_float(self.reward),
            "reward_components": {k: _json_float(v) for k, v in self.reward_components.items()},
            "terminated": self.terminated,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": TRAJECTORY_FORMAT, "trajectory": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Trajectory:
        """Read a file written by :meth:`save`. Only tensors and JSON are read; no code runs."""
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != TRAJECTORY_FORMAT:
                raise ValueError(
                    f"{path} is not a trajectory file (expected metadata format {TRAJECTORY_FORMAT!r}, "
                    f"got {metadata.get('format')!r})"
                )
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        header = json.loads(metadata["trajectory"])
        turns = []
        for i, turn in enumerate(header["turns"]):
            segments: list[TextSegment | ImageSegment] = []
            for j, seg in enumerate(turn["segments"]):
                prefix = f"turn{i}.seg{j}."
                fields = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                segments.append(TextSegment(**fields) if seg["kind"] == "text" else ImageSegment(**fields))
            turns.append(Turn(prompt=turn["prompt"], segments=segments))
        return cls(
            scenario=header["scenario"],
            task=Task.model_validate(header["task"]),
            seed=header["seed"],
            turns=turns,
            reward=_from_json_float(header["reward"]),
            reward_components={k: _from_json_float(v) for k, v in header["reward_components"].items()},
            terminated=header["terminated"],
        )


def _json_float(value: float | None) -> float | str | None:
    """JSON has no NaN/inf: store them as strings so a failed reward round-trips exactly."""
    if value is None or math.isfinite(value):
        return value
    return repr(float(value))


def _from_json_float(value: float | str | None) -> float | None:
    return float(value) if isinstance(value, str) else value
