"""Scenarios: what environments are made from (tasks, codecs, schedule, reward).

Built-in, from the ShapesWorld package (:mod:`unigrpo_env.scenarios.shapes`, registered through
this package's entry points as a plugin's would be): ``t2i_reason`` (reasoning then one image) and
``edit_multiturn`` (a riddle then edit instructions, one image per turn). Register your own with
``@register_scenario("name")`` on a :class:`~unigrpo_env.Scenario` subclass, or ship them in an
installed package through the entry-point group ``unigrpo.scenarios``
(``unigrpo init scenario NAME`` writes such a package); a ``"module:Name"`` reference works
wherever a scenario name does.
"""

from unigrpo_env.registration import SCENARIOS, register_scenario
from unigrpo_env.scenario import Scenario

__all__ = ["Scenario", "register_scenario", "SCENARIOS"]
