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

import gc
import json
import math
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from unigrpo_env import bounded_json
from unigrpo_env._tensor_eq import TensorRecord
from unigrpo_env.bounded_json import shorten
from unigrpo_env.task import Task

__all__ = [
    "TextSegment",
    "ImageSegment",
    "DenoisingStep",
    "Turn",
    "Trajectory",
    "TRAJECTORY_FORMAT",
    "READABLE_FORMATS",
    "TrajectoryFileError",
]

TRAJECTORY_FORMAT = "unigrpo-trajectory/2"
#: The formats :meth:`Trajectory.load` reads: version 1 (before turn rewards) and this one.
READABLE_FORMATS = ("unigrpo-trajectory/1", TRAJECTORY_FORMAT)


#: The largest JSON header a trajectory file may carry (a long episode's is a few kB).
MAX_HEADER_BYTES = 16 * 2**20
#: The most turns a trajectory file may hold, checked before any per-turn work (a 100,000-turn
#: file loads in seconds: loading is linear in the number of tensors).
MAX_TURNS = 100_000
#: The most segments one turn may hold (a turn is a text segment, then an image segment).
MAX_SEGMENTS_PER_TURN = 16


class TrajectoryFileError(ValueError):
    """A file that is not a well-formed trajectory file: nothing of it is returned."""


class _SegmentHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["text", "image"]
    has_image: StrictBool


class _TurnHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr
    segments: list[_SegmentHeader]
    reward: StrictFloat | StrictInt | StrictStr | None = None  # version 2: the turn's reward


class _Header(BaseModel):
    """The JSON header of a trajectory file, checked field by field (strict types: ``"yes"`` is
    not a bool, ``1.0`` not a seed)."""

    model_config = ConfigDict(extra="forbid")
    scenario: StrictStr
    task: dict[str, Any]
    seed: StrictInt | None
    turns: list[_TurnHeader]
    reward: StrictFloat | StrictInt | StrictStr | None
    reward_components: dict[str, StrictFloat | StrictInt | StrictStr]
    terminated: StrictBool


#: What each tensor of a segment must be: its dtype and number of dimensions.
_TENSOR_SCHEMA = {
    "text": {"tokens": (torch.int64, 1), "log_probs": (torch.float32, 1)},
    "image": {
        "x_t": (torch.float32, 4),
        "x_next": (torch.float32, 4),
        "t": (torch.float32, 1),
        "t_next": (torch.float32, 1),
        "log_prob": (torch.float32, 1),
        "stochastic": (torch.bool, 1),
    },
}
#: The decoded image of an image segment, when it has one.
_IMAGE_SCHEMA = (torch.uint8, 3)


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
    """One user turn: its prompt, the ordered segments the policy produced for it, and the turn's
    own reward where the environment gave one (``Scenario.respond``; None: none)."""

    prompt: str
    segments: list[Segment] = Field(default_factory=list)
    reward: float | None = None

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
            turns_json.append({"prompt": turn.prompt, "segments": segs, "reward": _json_float(turn.reward)})
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
        """Read a file written by :meth:`save`. Only tensors and JSON are read; no code runs. The
        file is checked against the format before anything is built: the header's fields and
        types, exactly the tensors the header announces with their dtypes and shapes, agreeing
        lengths and step counts, finite rewards (NaN and infinities only as the strings
        :meth:`save` writes). Anything else raises :class:`TrajectoryFileError` naming the problem."""
        try:
            with _cyclic_gc_paused():
                return cls._load(path)
        except TrajectoryFileError:
            raise
        except (ValidationError, KeyError, TypeError, AttributeError, RecursionError, ValueError, OSError) as exc:
            detail = " ".join(str(exc).split())[:240]
            raise TrajectoryFileError(
                f"{path} is not a well-formed trajectory file: {type(exc).__name__}: {detail}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - safetensors' own errors for corrupt files
            detail = " ".join(str(exc).split())[:240]
            raise TrajectoryFileError(f"{path} is not a readable safetensors file: {detail}") from None

    @classmethod
    def _load(cls, path: str | os.PathLike[str]) -> Trajectory:
        kind = stat.S_IFMT(os.stat(path).st_mode)
        if kind != stat.S_IFREG:  # a FIFO or a device would block or never end; a folder is no file
            raise TrajectoryFileError(f"{path} is not a regular file (it is a {_FILE_KINDS.get(kind, 'special file')})")
        # numpy's reader, then torch.from_numpy (no copy): a third of the time of the torch reader a tensor,
        # which matters for a file of many small tensors (the schema's dtypes all exist in numpy)
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") not in READABLE_FORMATS:
                raise TrajectoryFileError(
                    f"{path} is not a trajectory file (expected metadata format {TRAJECTORY_FORMAT!r}, "
                    f"got {shorten(repr(metadata.get('format')), 80)})"
                )
            text = metadata["trajectory"]
            if len(text) > MAX_HEADER_BYTES:
                raise TrajectoryFileError(
                    f"{path}: a header of {len(text)} characters, more than the {MAX_HEADER_BYTES} a trajectory file may have"
                )
            header = _Header.model_validate(_bounded_header(bounded_json.loads(text, what="the trajectory header")))
            expected = _expected_tensors(header)
            names = set(f.keys())
            if names != expected.keys():  # compared by name before any tensor is read
                missing, extra = sorted(expected.keys() - names), sorted(names - expected.keys())
                if missing:
                    raise TrajectoryFileError(f"{path}: the tensor {missing[0]!r} is missing")
                raise TrajectoryFileError(f"{path}: tensors the header does not announce: {extra[:3]}")
            tensors = {key: torch.from_numpy(f.get_tensor(key)) for key in expected}
        problem = _check_tensors(header, tensors, expected)
        if problem:
            raise TrajectoryFileError(f"{path}: {problem}")
        turns = []
        for i, turn in enumerate(header.turns):
            segments: list[TextSegment | ImageSegment] = []
            for j, seg in enumerate(turn.segments):
                fields = {name: tensors[key] for name, key in _segment_keys(i, j, seg).items()}
                segments.append(TextSegment(**fields) if seg.kind == "text" else ImageSegment(**fields))
            turns.append(Turn(prompt=turn.prompt, segments=segments, reward=_from_json_float(turn.reward)))
        return cls(
            scenario=header.scenario,
            task=Task.model_validate(header.task),
            seed=header.seed,
            turns=turns,
            reward=_from_json_float(header.reward),
            reward_components={k: _from_json_float(v) for k, v in header.reward_components.items()},
            terminated=header.terminated,
        )


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a file's records are built: loading makes
    tens of objects a turn and no reference cycles, and the collections they trigger traverse
    every object alive, so a 16,000-turn file took 1.4x the time a turn of a 1,000-turn one.
    Reference counting still frees everything at once; the collector resumes as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_FILE_KINDS = {
    stat.S_IFDIR: "folder",
    stat.S_IFIFO: "FIFO",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
}


def _bounded_header(header: Any) -> Any:
    """The parsed header, its turn and segment counts checked before any per-turn work."""
    turns = header.get("turns") if isinstance(header, dict) else None
    if isinstance(turns, list):
        if len(turns) > MAX_TURNS:
            raise TrajectoryFileError(f"a trajectory of {len(turns)} turns; a file may hold at most {MAX_TURNS}")
        for i, turn in enumerate(turns):
            segments = turn.get("segments") if isinstance(turn, dict) else None
            if isinstance(segments, list) and len(segments) > MAX_SEGMENTS_PER_TURN:
                raise TrajectoryFileError(
                    f"turn {i} has {len(segments)} segments; a turn may hold at most {MAX_SEGMENTS_PER_TURN}"
                )
    return header


def _segment_keys(turn: int, segment: int, header: _SegmentHeader) -> dict[str, str]:
    """The tensor names of one segment: field name -> key in the file."""
    names = list(_TENSOR_SCHEMA[header.kind])
    if header.kind == "image" and header.has_image:
        names.append("image")
    return {name: f"turn{turn}.seg{segment}.{name}" for name in names}


def _expected_tensors(header: _Header) -> dict[str, tuple[torch.dtype, int]]:
    """Every tensor the header announces, key -> (dtype, number of dimensions)."""
    expected: dict[str, tuple[torch.dtype, int]] = {}
    for i, turn in enumerate(header.turns):
        for j, seg in enumerate(turn.segments):
            for name, key in _segment_keys(i, j, seg).items():
                expected[key] = _IMAGE_SCHEMA if name == "image" else _TENSOR_SCHEMA[seg.kind][name]
    return expected


def _check_tensors(
    header: _Header, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[torch.dtype, int]]
) -> str | None:
    """What is wrong with a file's tensors against its header (None: nothing); ``tensors`` holds
    exactly the ``expected`` names."""
    for key, (dtype, dims) in expected.items():
        tensor = tensors[key]
        if tensor.dtype != dtype or tensor.dim() != dims:
            return f"{key!r} must be a {dims}-D {dtype} tensor, got {tensor.dim()}-D {tensor.dtype}"
    for i, turn in enumerate(header.turns):
        for j, seg in enumerate(turn.segments):
            prefix = f"turn{i}.seg{j}."
            if seg.kind == "text":
                tokens, log_probs = tensors[prefix + "tokens"], tensors[prefix + "log_probs"]
                if tokens.shape != log_probs.shape:
                    return f"{prefix}tokens {tuple(tokens.shape)} and log_probs {tuple(log_probs.shape)} disagree"
                if bool((tokens < 0).any()):
                    return f"{prefix}tokens holds negative token ids"
            else:
                steps = {tensors[prefix + n].shape[0] for n in _TENSOR_SCHEMA["image"]}
                if len(steps) != 1 or tensors[prefix + "x_t"].shape != tensors[prefix + "x_next"].shape:
                    return f"the tensors of {prefix[:-1]} disagree on the number of steps or the latent shape"
                if seg.has_image and tensors[prefix + "image"].shape[-1] != 3:
                    return f"{prefix}image must be [H, W, 3]"
    for value in (header.reward, *header.reward_components.values(), *(turn.reward for turn in header.turns)):
        if isinstance(value, float) and not math.isfinite(value):
            return f"a reward of {value} (finite numbers only; NaN and infinities are written as strings)"
        if isinstance(value, str) and value not in ("nan", "inf", "-inf"):
            return f"a reward of {shorten(repr(value), 80)} (expected a number, or 'nan', 'inf', '-inf')"
    return None


def _json_float(value: float | None) -> float | str | None:
    """JSON has no NaN/inf: store them as strings so a failed reward round-trips exactly."""
    if value is None or math.isfinite(value):
        return value
    return repr(float(value))


def _from_json_float(value: float | int | str | None) -> float | None:
    return None if value is None else float(value)
