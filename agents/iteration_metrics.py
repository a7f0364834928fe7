"""An iteration's metrics over the whole batch, whichever number of processes rolled it out.

Each process rolls out its share of every group, so its own rewards and loss statistics describe
only that share. The metrics a run logs (``metrics.jsonl``, the progress bar) are the global ones:

* the reward statistics — ``reward_mean``, ``reward_std``, ``reward_failed``, each component's
  ``reward/<name>`` and each category's ``reward_category/<name>`` — are computed over every
  process's rewards gathered together, so two processes log what one process with the whole batch
  logs (:func:`reward_metrics`, the same function in both cases);
* the training statistics (losses, ratios, KL, gradient norm) are the mean over processes (each
  process's is already a mean over its equal share of the episodes);
* times are the slowest process's (``time_*``: the others wait for it at the next collective), and
  the deviation checks (``*_max_dev``, ``*_drift``) the largest of any process.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

__all__ = ["reward_metrics", "across_processes"]


def reward_metrics(
    rewards: torch.Tensor, components: dict[str, torch.Tensor], categories: list[str]
) -> dict[str, float]:
    """Reward statistics of a batch: NaN rewards (a failed scorer) are counted in ``reward_failed``
    and left out of every mean; a statistic with no scored sample is NaN."""
    values = rewards.numpy()
    valid = ~np.isnan(values)
    any_valid = bool(valid.any())
    stats = {
        "reward_mean": float(np.nanmean(values)) if any_valid else math.nan,
        "reward_std": float(np.nanstd(values)) if any_valid else math.nan,
        "reward_failed": float((~valid).sum()),
    }
    for name, component in components.items():
        scored = component.numpy()
        stats[f"reward/{name}"] = float(np.nanmean(scored)) if bool((~np.isnan(scored)).any()) else math.nan
    for category in sorted(set(categories)):
        rows = [i for i, c in enumerate(categories) if c == category and valid[i]]
        if rows:
            stats[f"reward_category/{category}"] = float(rewards[rows].mean())
    return stats


def _combine(key: str, values: list[float]) -> float:
    if key.startswith("time_") or key.endswith("_max_dev") or key.endswith("_drift"):
        return float(max(values))
    return float(np.mean(values))


def across_processes(
    accelerator: Accelerator,
    stats: dict[str, Any],
    rewards: torch.Tensor,
    components: dict[str, torch.Tensor],
    categories: list[str],
) -> dict[str, Any]:
    """This process's iteration ``stats`` made global (see the module docstring); every process
    must call it, and every process gets the same result. ``stats`` holds the reward statistics of
    this process's share (:func:`reward_metrics`, as ``UniGRPOAgent.collect`` computes them), so
    with one process it is already the whole batch's and comes back as it is."""
    if accelerator.num_processes == 1:
        return stats
    share = {
        "stats": stats,
        "rewards": rewards.tolist(),
        "components": {name: values.tolist() for name, values in components.items()},
        "categories": list(categories),
    }
    shares = gather_object([share])  # one small object per process, in process order
    every_reward = torch.tensor([r for s in shares for r in s["rewards"]], dtype=rewards.dtype)
    names = dict.fromkeys(name for s in shares for name in s["components"])
    every_component = {
        name: torch.tensor(
            [v for s in shares for v in s["components"].get(name, [math.nan] * len(s["rewards"]))], dtype=torch.float32
        )
        for name in names
    }
    every_category = [c for s in shares for c in s["categories"]]
    combined: dict[str, Any] = {}
    for key in dict.fromkeys(k for s in shares for k in s["stats"]):
        values = [s["stats"][key] for s in shares if key in s["stats"]]
        numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) == len(values):
            combined[key] = _combine(key, numbers)
        else:  # a message (reward_error): the first process's that has one
            combined[key] = next(v for v in values if v)
    combined.update(reward_metrics(every_reward, every_component, every_category))  # replaces the shares' own
    return combined
