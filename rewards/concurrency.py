"""Running scorers concurrently: a thread pool with ordered results, and chunked scoring.

Scorers are often slow for reasons that release the GIL — a reward model on another device, an
HTTP call to a judge, numpy or PIL work in C — so running them on threads overlaps their waits.
Three things use :class:`ScorerPool`:

* :class:`~unigrpo_env.rewards.composite.WeightedSum` runs its components concurrently, so a
  slow component costs its own time, not the sum of all components' times;
* :class:`~unigrpo_env.rewards.group.GroupReward` scores the prompt groups of a batch
  concurrently;
* :class:`ChunkedReward` splits a batch into chunks scored concurrently, for a per-sample scorer
  that is slow per call (e.g. one request per image).

Determinism: results are always put together in submission order, never completion order, so
the scores (and every float sum over them) do not depend on thread timing. A call that raises
is re-raised after every other call of the same batch has finished, so no work is left running.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

import torch

from unigrpo_env.reward import RewardFunction, RewardInputs, RewardOutput

__all__ = ["ScorerPool", "ChunkedReward", "merge_outputs"]

A = TypeVar("A")
B = TypeVar("B")


class ScorerPool:
    """A lazily started thread pool whose :meth:`map` returns results in input order.

    Args:
        max_workers: threads; ``None`` = as many as there are items to run (at most 32), 1 = run
            in the calling thread. Each user of a pool owns its own, so nested concurrency (a
            composite whose component is a group reward) cannot deadlock on a shared pool.
    """

    def __init__(self, max_workers: int | None = None, *, name: str = "unigrpo-scorer"):
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers must be >= 1 or None, got {max_workers}")
        self.max_workers = max_workers
        self.name = name
        self._executor: ThreadPoolExecutor | None = None
        self._size = 0
        self._lock = threading.Lock()

    def map(self, fn: Callable[[A], B], items: Sequence[A]) -> list[B]:
        """``[fn(x) for x in items]``, run concurrently; the first failure (in input order) is
        raised once all calls have finished."""
        items = list(items)
        if len(items) <= 1 or self.max_workers == 1:
            return [fn(x) for x in items]
        executor = self._pool(len(items))
        futures = [executor.submit(fn, x) for x in items]
        wait(futures)
        return [f.result() for f in futures]

    def _pool(self, wanted: int) -> ThreadPoolExecutor:
        size = self.max_workers or min(32, wanted)
        with self._lock:
            if self._executor is None or self._size < size:
                if self._executor is not None:  # too small: let its threads finish and go
                    self._executor.shutdown(wait=False)
                self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix=self.name)
                self._size = size
            return self._executor

    def close(self) -> None:
        """Stop the threads (a later :meth:`map` starts new ones)."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
                self._size = 0

    def __getstate__(self) -> dict[str, Any]:  # threads cannot be copied or pickled; restart lazily
        state = self.__dict__.copy()
        state["_executor"] = None
        state["_size"] = 0
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> ScorerPool:
        return ScorerPool(self.max_workers, name=self.name)


def merge_outputs(n: int, parts: Sequence[tuple[Sequence[int], RewardOutput]]) -> RewardOutput:
    """Put the outputs of disjoint row subsets back into one batch of ``n``.

    ``parts`` holds ``(rows, output)`` pairs; each output has one score per row. A component
    that some parts lack is NaN on their rows; rows no part covers are NaN.
    """
    scores = torch.full((n,), math.nan)
    components: dict[str, torch.Tensor] = {}
    for rows, out in parts:
        index = torch.as_tensor(list(rows), dtype=torch.long)
        part = _scores(out.scores, len(index), "scores")
        scores[index] = part
        for name, values in out.components.items():
            if name not in components:
                components[name] = torch.full((n,), math.nan)
            components[name][index] = _scores(values, len(index), f"component {name!r}")
    return RewardOutput(scores=scores, components=components)


def _scores(values: Any, n: int, what: str) -> torch.Tensor:
    out = torch.as_tensor(values, dtype=torch.float32).reshape(-1).cpu()
    if out.shape[0] != n:
        raise ValueError(f"the reward returned {out.shape[0]} values of {what} for {n} episodes")
    return out


class ChunkedReward:
    """Scores a batch in chunks of ``chunk_size`` episodes on a thread pool.

    For a per-sample scorer that is slow per call: ``ChunkedReward(judge, chunk_size=8)`` sends
    the chunks of a 64-episode batch concurrently instead of one after the other. The scores are
    those of ``reward`` on the whole batch, for any scorer whose scores do not depend on the
    other episodes of the batch (group-level scorers: use
    :class:`~unigrpo_env.rewards.group.GroupReward`).

    Args:
        reward: the scorer of each chunk.
        chunk_size: episodes per call.
        max_workers: threads (``None`` = one per chunk, at most 32).
    """

    def __init__(self, reward: RewardFunction, chunk_size: int, max_workers: int | None = None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.reward = reward
        self.chunk_size = int(chunk_size)
        self.pool = ScorerPool(max_workers)

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        n = len(inputs)
        chunks = [list(range(start, min(n, start + self.chunk_size))) for start in range(0, n, self.chunk_size)]
        outputs = self.pool.map(lambda rows: self.reward(inputs.select(rows)), chunks)
        return merge_outputs(n, list(zip(chunks, outputs)))
