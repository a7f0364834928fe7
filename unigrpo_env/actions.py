"""Typed actions: what an agent sends to ``env.step``.

Two kinds, one per phase of the interleaved MDP (docs/design.md, section 1):

* :class:`TextAction` — the next token, or a whole segment of tokens, of the reasoning text.
  A 1-D ``tokens`` tensor is one episode's segment; a 2-D ``[N, L]`` tensor with ``lengths``
  is one segment per episode of a batched environment.
* :class:`FlowAction` — the next latent ``x_{t+Δt}`` of the denoising trajectory, ``[C, H, W]``
  for one episode or ``[N, C, H, W]`` for a batch.

Both optionally carry the log-probability the agent's policy assigned to the action, which the
environment records in the trajectory (the "old" log-probabilities of GRPO / Flow-GRPO).

The models convert their inputs without loss (lists and numpy arrays become tensors; token ids
and lengths must already be integers — floats are refused, never truncated) and refuse what is
not numbers (booleans included), sparse tensors, a ``stochastic`` that is not a bool and unknown
(misspelled) fields. Errors come in two kinds, one per moment:

* constructing a malformed action raises pydantic's ``ValidationError`` (a ``ValueError``), with a
  message naming the field and what was expected;
* a well-formed action that does not fit the environment's state (phase, shape, vocabulary,
  device, budget) raises an :class:`~unigrpo_env.errors.InvalidActionError` subclass (also a
  ``ValueError``) from ``step``, before the environment changes anything.

So ``except ValueError`` catches both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = ["TextAction", "FlowAction", "as_tensor"]


def as_tensor(value: Any, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Coerce lists, tuples, numbers and numpy arrays to a tensor; tensors pass through as they are
    (their dtype and device are validated later, not silently converted). Anything that is not
    numbers raises ``ValueError``."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise ValueError(f"expected a dense tensor, got layout {value.layout} (call .to_dense() first)")
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise ValueError(f"expected a numeric array, got dtype {value.dtype}")
        return torch.from_numpy(np.ascontiguousarray(value))
    if value is None or isinstance(value, (str, bytes, bytearray, memoryview, dict)):
        raise ValueError(f"expected numbers (a tensor, a numpy array or a nested list), got {type(value).__name__}")
    if _holds_bool(value):
        raise ValueError("expected numbers, got booleans (True and False are not converted to 1 and 0)")
    try:
        return torch.tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ValueError(
            f"expected numbers (a tensor, a numpy array or a nested list), got {type(value).__name__}: "
            f"{' '.join(str(exc).split())[:120]}"
        ) from None


def _holds_bool(value: Any) -> bool:
    """Whether ``value`` is a boolean or a (nested) list or tuple holding one (iteratively, so a
    deeply nested list cannot exhaust the stack)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (bool, np.bool_)):
            return True
        if isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


_SIGNED_INTEGERS = (torch.int8, torch.int16, torch.int32, torch.int64)


def _integers(value: Any, what: str) -> torch.Tensor:
    """``value`` as an int64 tensor, refusing floats and booleans (nothing is truncated). A tensor
    passes through as it is: the environment checks its dtype (``ActionDTypeError``)."""
    if isinstance(value, torch.Tensor):
        return as_tensor(value)
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what} must be integers, got a boolean")
    if isinstance(value, (int, np.integer)):
        return torch.tensor([int(value)], dtype=torch.long)
    if isinstance(value, (list, tuple)) and len(value) == 0:
        return torch.zeros(0, dtype=torch.long)
    tensor = as_tensor(value)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"{what} must be integers, got {tensor.dtype} values (floats are not truncated)")
    return tensor.to(torch.long)


class _TensorModel(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")  # a misspelled field raises

    if not TYPE_CHECKING:  # type checkers keep pydantic's signature of the fields

        def __init__(self, /, *args: Any, **fields: Any) -> None:
            if args:  # pydantic's own refusal is a bare TypeError: say it as the one documented error
                name, first = type(self).__name__, next(iter(type(self).model_fields))
                error = PydanticCustomError(
                    "keyword_arguments",
                    "{name} takes its fields by name, e.g. {name}({first}=...); got {count} positional argument(s)",
                    {"name": name, "first": first, "count": len(args)},
                )
                raise ValidationError.from_exception_data(name, [InitErrorDetails(type=error, loc=(), input=args)])
            super().__init__(**fields)


class TextAction(_TensorModel):
    """One token or a whole segment of reasoning tokens.

    Attributes:
        tokens: token ids, ``[L]`` for one episode or ``[N, L]`` for a batch of N episodes.
        log_probs: optional log-probabilities of the tokens under the acting policy, same shape.
        lengths: for a batched ``[N, L]`` action, how many leading tokens of each row are real
            (the rest is padding). ``0`` means "no text for this episode" — required for the
            episodes whose text phase has already closed. Defaults to ``L`` for every row.
    """

    tokens: torch.Tensor
    log_probs: torch.Tensor | None = None
    lengths: torch.Tensor | None = None

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, value: Any) -> torch.Tensor:
        tensor = _integers(value, "token ids")
        if tensor.dim() not in (1, 2):
            raise ValueError(f"tokens must be 1-D [L] or 2-D [N, L], got shape {tuple(tensor.shape)}")
        return tensor

    @field_validator("log_probs", mode="before")
    @classmethod
    def _log_probs(cls, value: Any) -> torch.Tensor | None:
        if value is None:
            return None
        if isinstance(value, (float, int)) and not isinstance(value, bool):
            value = [float(value)]
        return as_tensor(value, dtype=torch.float32)

    @field_validator("lengths", mode="before")
    @classmethod
    def _lengths(cls, value: Any) -> torch.Tensor | None:
        if value is None:
            return None
        tensor = _integers(value, "lengths")
        # signed integers only: the dtype of other tensors is the environment's to refuse (ActionDTypeError),
        # and a tensor on the meta device has no values to compare
        if tensor.dtype in _SIGNED_INTEGERS and not tensor.is_meta and bool((tensor < 0).any()):
            raise ValueError(f"lengths must be >= 0, got {tensor.tolist()}")
        return tensor

    @model_validator(mode="after")
    def _consistent(self) -> TextAction:
        if self.log_probs is not None and self.log_probs.shape != self.tokens.shape:
            raise ValueError(
                f"log_probs must have the shape of tokens {tuple(self.tokens.shape)}, got {tuple(self.log_probs.shape)}"
            )
        if self.lengths is not None:
            if self.tokens.dim() != 2:
                raise ValueError("lengths only applies to batched [N, L] tokens")
            if self.lengths.shape != (self.tokens.shape[0],):
                raise ValueError(
                    f"lengths must have shape [N]=({self.tokens.shape[0]},), got {tuple(self.lengths.shape)}"
                )
        return self

    @property
    def batched(self) -> bool:
        return self.tokens.dim() == 2

    def row_lengths(self) -> torch.Tensor:
        """Number of real tokens per row of a batched action (``lengths`` or ``L``)."""
        if not self.batched:
            raise ValueError("row_lengths is only defined for batched [N, L] actions")
        if self.lengths is not None:
            return self.lengths
        return torch.full((self.tokens.shape[0],), self.tokens.shape[1], dtype=torch.long)


class FlowAction(_TensorModel):
    """One denoising step: the next latent ``x_{t+Δt}``.

    Attributes:
        x_next: ``[C, H, W]`` for one episode or ``[N, C, H, W]`` for a batch; float32.
        log_prob: optional log-density of ``x_next`` under the acting policy's Gaussian
            transition (``unigrpo_env.flow.sde_step``), a scalar or ``[N]``.
        stochastic: whether the step was sampled (SDE) rather than deterministic (ODE).
            Defaults to ``log_prob is not None``.
    """

    x_next: torch.Tensor
    log_prob: torch.Tensor | None = None
    stochastic: bool | None = None

    @field_validator("x_next", mode="before")
    @classmethod
    def _x_next(cls, value: Any) -> torch.Tensor:
        return as_tensor(value, dtype=torch.float32)

    @field_validator("log_prob", mode="before")
    @classmethod
    def _log_prob(cls, value: Any) -> torch.Tensor | None:
        return None if value is None else as_tensor(value, dtype=torch.float32)

    @field_validator("stochastic", mode="before")
    @classmethod
    def _stochastic(cls, value: Any) -> bool | None:
        if value is None or isinstance(value, (bool, np.bool_)):
            return None if value is None else bool(value)
        raise ValueError(f"stochastic must be True, False or None, got {value!r} (never converted)")

    @property
    def is_stochastic(self) -> bool:
        return self.log_prob is not None if self.stochastic is None else bool(self.stochastic)
