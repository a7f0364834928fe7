"""Scenarios: what environments are made from (tasks, codecs, schedule, reward).

Built-in: ``t2i_reason`` (ShapesWorld, reasoning then one image). Register your own with
``@register_scenario("name")`` on a :class:`~unigrpo_env.Scenario` subclass.
"""

from unigrpo_env.registration import SCENARIOS, register_scenario
from unigrpo_env.scenario import Scenario

__all__ = ["Scenario", "register_scenario", "list_scenarios", "SCENARIOS"]


def list_scenarios() -> list[str]:
    """Names of the registered scenarios."""
    return SCENARIOS.names()
