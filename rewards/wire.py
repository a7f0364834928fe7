"""The reward service's wire format, ``unigrpo-reward/1``: a batch of finished episodes as one
safetensors blob, the scores back as JSON. Never pickle: a server decodes only tensors and JSON.

Request (``POST /score``, ``Content-Type: application/octet-stream``): the bytes of
``safetensors.torch.save(tensors, metadata)`` with the tensors

==================  =========  =====================  ==========================================
``images``          uint8      ``[N, H, W, 3]``       the final images
``earlier_images``  uint8      ``[N, K, H, W, 3]``    the images of the turns before the last (K ≥ 0)
``group_ids``       int64      ``[N]``                optional: which prompt group each episode is in
==================  =========  =====================  ==========================================

and the metadata ``{"unigrpo-reward": JSON}`` (safetensors metadata is a string → string map;
everything else rides in one JSON string under that key)::

    {"schema": "unigrpo-reward/1",
     "tasks": [Task.model_dump(mode="json"), ...],     N tasks: every turn's prompt, category, meta
     "texts": [["turn 1 text", "turn 2 text"], ...]}   N lists of strings, one per turn

Response (``200``, JSON)::

    {"schema": "unigrpo-reward/1",
     "scores": [s_1, ..., s_N],
     "components": {"name": [c_1, ..., c_N], ...},
     "error": null | "ExceptionType: message"}

Scores and components are float32 values written as JSON numbers (a float32 is exact as a
float64, and JSON numbers round-trip float64 exactly). JSON has no NaN or infinity: NaN is
written ``null`` and ±infinity ``"inf"`` / ``"-inf"``, and read back as such. ``error`` is set
when the scorer raised on the batch; the scores are then all NaN (``null``), so the agent's NaN
handling applies. Errors that are not the scorer's (bad request, auth, size) are HTTP statuses
with a JSON body ``{"detail": "one line"}``; see :mod:`.server`.

Decoding checks everything (:class:`WireFormatError`, a ``ValueError``, with a one-line message):
the blob's header, the tensor names, dtypes and shapes (before any tensor is loaded), the schema
version, and the tasks (validated as :class:`~unigrpo_env.task.Task`). Both JSON texts are read
by :func:`unigrpo_env.bounded_json.loads` (at most 100 levels deep, finite numbers, integers
within Python's digit limit), and the metadata may hold at most :data:`MAX_METADATA_CHARS`
characters.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from unigrpo_env import bounded_json
from unigrpo_env.reward import RewardInputs, RewardOutput
from unigrpo_env.task import Task

__all__ = [
    "SCHEMA",
    "METADATA_KEY",
    "MAX_METADATA_CHARS",
    "WireFormatError",
    "RequestHeader",
    "encode_request",
    "read_request_header",
    "decode_request",
    "encode_response",
    "decode_response",
]

SCHEMA = "unigrpo-reward/1"
METADATA_KEY = "unigrpo-reward"

_DTYPES = {"images": "U8", "earlier_images": "U8", "group_ids": "I64"}
_RANKS = {"images": 4, "earlier_images": 5, "group_ids": 1}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
#: The longest metadata JSON a request may carry: every task and reasoning text of a batch (a
#: batch of 256 three-turn episodes with 8,000-character reasoning holds about 6 M characters).
#: Far below the body limit, because JSON is parsed holding Python's GIL: the largest metadata of
#: the worst shape (millions of tiny values) holds up the server's other threads for about 0.7 s
#: on a 2-core CPU; text-heavy metadata of this size parses in about 0.1 s.
MAX_METADATA_CHARS = 8 * 2**20


class WireFormatError(ValueError):
    """A request or response that does not follow ``unigrpo-reward/1``."""


# --- request ---------------------------------------------------------------------------------------------------


def encode_request(inputs: RewardInputs) -> bytes:
    """The ``unigrpo-reward/1`` request body of ``inputs``."""
    tensors = {
        "images": _cpu(inputs.images, torch.uint8, "images"),
        "earlier_images": _cpu(inputs.earlier_images, torch.uint8, "earlier_images"),
    }
    if inputs.group_ids is not None:
        tensors["group_ids"] = _cpu(inputs.group_ids, torch.int64, "group_ids")
    meta = {
        "schema": SCHEMA,
        "tasks": [task.model_dump(mode="json") for task in inputs.tasks],
        "texts": [list(turns) for turns in inputs.texts],
    }
    return save_safetensors(tensors, metadata={METADATA_KEY: json.dumps(meta, allow_nan=False)})


def _cpu(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    integer_ids = dtype == torch.int64 and not (tensor.dtype.is_floating_point or tensor.dtype.is_complex)
    if tensor.dtype != dtype and not integer_ids:
        raise WireFormatError(f"{name} must be {dtype}, got {tensor.dtype}")
    return tensor.detach().to("cpu", dtype).contiguous()


class RequestHeader:
    """What a request's safetensors header says, read before any tensor is loaded.

    Attributes:
        size: episodes in the batch (N).
        meta: the decoded JSON metadata (not yet validated beyond its schema version).
    """

    def __init__(self, size: int, meta: dict[str, Any]):
        self.size = size
        self.meta = meta


def read_request_header(body: bytes) -> RequestHeader:
    """Check a request's header (tensor names, dtypes, shapes, schema) without loading tensors.
    Its JSON is read within :mod:`unigrpo_env.bounded_json`'s bounds, and the metadata's JSON
    may hold at most :data:`MAX_METADATA_CHARS` characters."""
    if len(body) < 8:
        raise WireFormatError("the body is not a safetensors blob (shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", body[:8])
    if length > min(_MAX_HEADER, len(body) - 8):
        raise WireFormatError("the body is not a safetensors blob (its header length exceeds the body)")
    try:
        header = bounded_json.loads(body[8 : 8 + length], what="the safetensors header")
    except bounded_json.BoundedJSONError as exc:
        raise WireFormatError(f"the body is not a safetensors blob ({exc})") from None
    if not isinstance(header, dict):
        raise WireFormatError("the body is not a safetensors blob (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    shapes = {}
    for name, info in header.items():
        if name not in _DTYPES:
            raise WireFormatError(f"unexpected tensor {name!r}; {SCHEMA} takes {', '.join(_DTYPES)}")
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise WireFormatError(f"tensor {name!r} has no shape in the safetensors header")
        if info.get("dtype") != _DTYPES[name]:
            raise WireFormatError(f"tensor {name!r} must be {_DTYPES[name]}, got {info.get('dtype')}")
        shape = info["shape"]
        if len(shape) != _RANKS[name] or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise WireFormatError(f"tensor {name!r} must have {_RANKS[name]} dimensions, got shape {shape}")
        shapes[name] = shape
    for name in ("images", "earlier_images"):
        if name not in shapes:
            raise WireFormatError(f"missing tensor {name!r}")
    images, earlier = shapes["images"], shapes["earlier_images"]
    if images[3] != 3:
        raise WireFormatError(f"images must be [N, H, W, 3], got {images}")
    if earlier[0] != images[0] or earlier[2:] != images[1:]:
        raise WireFormatError(
            f"earlier_images must be [N, K, H, W, 3] with images' N, H, W, got {earlier} for {images}"
        )
    if "group_ids" in shapes and shapes["group_ids"] != [images[0]]:
        raise WireFormatError(f"group_ids must be [N] = [{images[0]}], got {shapes['group_ids']}")
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise WireFormatError(f"missing the metadata key {METADATA_KEY!r}")
    text = metadata[METADATA_KEY]
    if not isinstance(text, str):
        raise WireFormatError(f"the metadata {METADATA_KEY!r} must be a JSON string")
    if len(text) > MAX_METADATA_CHARS:
        raise WireFormatError(
            f"the metadata {METADATA_KEY!r} has {len(text)} characters, more than the {MAX_METADATA_CHARS} accepted"
        )
    try:
        meta = bounded_json.loads(text, what=f"the metadata {METADATA_KEY!r}")
    except bounded_json.BoundedJSONError as exc:
        raise WireFormatError(str(exc)) from None
    if not isinstance(meta, dict):
        raise WireFormatError(f"the metadata {METADATA_KEY!r} must be a JSON object")
    if meta.get("schema") != SCHEMA:
        raise WireFormatError(f"unsupported schema {meta.get('schema')!r}; this server speaks {SCHEMA!r}")
    return RequestHeader(int(images[0]), meta)


def decode_request(body: bytes, header: RequestHeader | None = None) -> RewardInputs:
    """The :class:`RewardInputs` of a request body (its header checked first, if not given)."""
    header = header or read_request_header(body)
    n, meta = header.size, header.meta
    tasks, texts = meta.get("tasks"), meta.get("texts")
    if not isinstance(tasks, list) or len(tasks) != n:
        raise WireFormatError(f"'tasks' must be a list of {n} tasks, one per image")
    if (
        not isinstance(texts, list)
        or len(texts) != n
        or not all(isinstance(turns, list) and all(isinstance(t, str) for t in turns) for turns in texts)
    ):
        raise WireFormatError(f"'texts' must be a list of {n} lists of strings, one string per turn")
    try:
        parsed = [Task.model_validate(task) for task in tasks]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise WireFormatError(f"invalid task: {where}: {first['msg']}") from exc
    try:
        tensors = load_safetensors(body)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise WireFormatError(f"the body is not a valid safetensors blob: {' '.join(str(exc).split())}") from exc
    return RewardInputs(
        images=tensors["images"],
        tasks=parsed,
        texts=texts,
        earlier_images=tensors["earlier_images"],
        group_ids=tensors.get("group_ids"),
    )


# --- response --------------------------------------------------------------------------------------------------


def encode_response(output: RewardOutput | None, n: int, error: str | None = None) -> dict[str, Any]:
    """The JSON object of a response: ``output``'s scores and components, or (``output`` None)
    N NaN scores and ``error``. Raises :class:`WireFormatError` if ``output`` has not N values."""
    if output is None:
        return {"schema": SCHEMA, "scores": [None] * n, "components": {}, "error": error}
    return {
        "schema": SCHEMA,
        "scores": _floats(output.scores, n, "scores"),
        "components": {str(k): _floats(v, n, f"component {k!r}") for k, v in output.components.items()},
        "error": error,
    }


def _floats(values: Any, n: int, what: str) -> list[float | str | None]:
    column = torch.as_tensor(values, dtype=torch.float32).detach().reshape(-1).cpu()
    if column.shape[0] != n:
        raise WireFormatError(f"the reward returned {column.shape[0]} {what} for {n} episodes")
    return [_encode_float(x) for x in column.tolist()]


def _encode_float(x: float) -> float | str | None:
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def decode_response(payload: Any, n: int) -> tuple[RewardOutput, str | None]:
    """A response's :class:`RewardOutput` (N float32 scores, NaN where ``null``) and its error."""
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA:
        raise WireFormatError(f"the response is not a {SCHEMA} JSON object")
    error = payload.get("error")
    components = payload.get("components", {})
    if not isinstance(components, dict):
        raise WireFormatError("the response's 'components' must be a JSON object")
    output = RewardOutput(
        scores=_column(payload.get("scores"), n, "scores"),
        components={str(k): _column(v, n, f"component {k!r}") for k, v in components.items()},
    )
    return output, None if error is None else str(error)


def _column(values: Any, n: int, what: str) -> torch.Tensor:
    if not isinstance(values, list) or len(values) != n:
        raise WireFormatError(f"the response's {what} must be a list of {n} values")
    out = []
    for x in values:
        if x is None:
            out.append(math.nan)
        elif x in ("inf", "-inf"):
            out.append(math.inf if x == "inf" else -math.inf)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            out.append(float(x))
        else:
            raise WireFormatError(f"the response's {what} holds {x!r}, not a number")
    return torch.tensor(out, dtype=torch.float32)
