"""Rewards: scorers of finished episodes, in a registry.

A reward is any callable ``reward(inputs: RewardInputs) -> RewardOutput`` scoring a batch.
Register a factory for one with ``@register_reward("name")``; ``get_reward("name", **kwargs)``
builds it. Built-in: ``shapes_verifier`` (ShapesWorld's exact verifier, GenEval-style checks) and
``image_quality`` (stray pixels, off-palette colour, noise).
"""

from typing import Any

from unigrpo_env.registration import REWARDS, register_reward
from unigrpo_env.reward import RewardFunction, RewardInputs, RewardOutput

__all__ = ["RewardFunction", "RewardInputs", "RewardOutput", "register_reward", "get_reward", "list_rewards", "REWARDS"]


def get_reward(name: str, **kwargs: Any) -> RewardFunction:
    """Build the registered reward ``name`` with ``kwargs``."""
    return REWARDS.get(name)(**kwargs)


def list_rewards() -> list[str]:
    """Names of the registered rewards."""
    return REWARDS.names()
