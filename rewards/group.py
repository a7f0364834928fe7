"""Group-level rewards: scorers that see the G rollouts of one prompt together.

GRPO compares the rollouts of one prompt with each other, and some rewards need that view too:
a pairwise judge that ranks the group's images, a novelty bonus for images unlike the rest of
the group, a reward normalised within the group. TRL's reward functions get the whole batch
with its prompts, and the ``verifiers`` library lets a rubric score a whole group at once; here
a group-level scorer subclasses :class:`GroupReward` and implements :meth:`score_group`, which
receives the inputs of *one* group (same prompt, batch order kept).

Groups come from ``RewardInputs.group_ids`` (the batched environment sets them: episodes that
share a prompt share an id). Without ids — a single environment — the whole batch is one group.
The groups of a batch are scored concurrently on a thread pool
(:class:`~unigrpo_env.rewards.concurrency.ScorerPool`) and put back in batch order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from unigrpo_env.reward import RewardInputs, RewardOutput
from unigrpo_env.rewards.concurrency import ScorerPool, merge_outputs

__all__ = ["GroupReward", "group_rows"]


def group_rows(inputs: RewardInputs) -> list[list[int]]:
    """The rows of each group, groups in order of their first episode (all rows if no ids)."""
    n = len(inputs)
    if inputs.group_ids is None:
        return [list(range(n))]
    ids = inputs.group_ids.reshape(-1).tolist()
    if len(ids) != n:
        raise ValueError(f"group_ids has {len(ids)} entries for {n} episodes")
    groups: dict[object, list[int]] = {}
    for row, gid in enumerate(ids):
        groups.setdefault(gid, []).append(row)
    return list(groups.values())


class GroupReward(ABC):
    """Base class of rewards scored one prompt group at a time.

    Subclasses implement :meth:`score_group`; calling the reward on a batch splits it by group,
    scores the groups (concurrently, ``max_workers`` threads; ``None`` = one per group, at most
    32) and returns scores and components in batch order. A component that some groups do not
    return is NaN on their rows.
    """

    #: Threads for the groups of a batch (``None`` = one per group, at most 32; 1 = no threads).
    max_workers: int | None = None

    @abstractmethod
    def score_group(self, inputs: RewardInputs) -> RewardOutput:
        """Score the episodes of one group: one score per episode of ``inputs``."""

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        groups = group_rows(inputs)
        if len(groups) == 1:
            return merge_outputs(len(inputs), [(groups[0], self.score_group(inputs))])
        outputs = self._pool().map(lambda rows: self.score_group(inputs.select(rows)), groups)
        return merge_outputs(len(inputs), list(zip(groups, outputs)))

    def _pool(self) -> ScorerPool:
        pool = self.__dict__.get("_scorer_pool")
        if pool is None or pool.max_workers != self.max_workers:
            pool = ScorerPool(self.max_workers, name=f"{type(self).__name__}-group")
            self.__dict__["_scorer_pool"] = pool
        return pool
