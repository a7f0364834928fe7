"""When a decoding loop may stop: once every episode has finished — in every process, when the
processes share a sharded model.

Under FSDP (or DeepSpeed ZeRO-3) each forward call of a block gathers that block's parameters
from all processes, a collective every process must join. Each process samples its own episodes,
so their reasoning ends after different numbers of tokens; a process that stopped decoding early
would leave the others waiting in a gather it never joins. This is what ``synced_gpus=True`` is
for in ``transformers``' ``generate``. A text policy's decoding loop therefore stops with
:func:`all_finished` instead of ``finished.all()``: it is the same test in one process, and inside
:func:`synchronized_decoding` (the agent enters it for a rollout under a sharding engine) it
continues until every process's episodes are done (the finished rows just emit padding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.distributed as dist

__all__ = ["all_finished", "synchronized_decoding"]

_SYNCHRONIZED: ContextVar[bool] = ContextVar("unigrpo_synchronized_decoding", default=False)


@contextmanager
def synchronized_decoding() -> Iterator[None]:
    """Within the block, :func:`all_finished` waits for every process of the default group."""
    token = _SYNCHRONIZED.set(True)
    try:
        yield
    finally:
        _SYNCHRONIZED.reset(token)


def all_finished(finished: torch.Tensor) -> bool:
    """Whether decoding may stop: every row of ``finished`` (a bool tensor) is True, here and,
    inside :func:`synchronized_decoding`, in every other process too (one all-reduce of a flag)."""
    done = bool(finished.all())
    if not (_SYNCHRONIZED.get() and dist.is_available() and dist.is_initialized()):
        return done
    unfinished = torch.tensor([0 if done else 1], dtype=torch.int32, device=finished.device)
    dist.all_reduce(unfinished)
    return int(unfinished.item()) == 0
