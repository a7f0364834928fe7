"""The parts of a run — a policy, a scenario, a reward and an evaluator — built from a config.

The :class:`~unigrpo_env.agents.trainer.Trainer` takes its parts as arguments (TRL's pattern); this
module is how the CLI, or a script, makes them from a :class:`~unigrpo_env.agents.config.UniGRPOConfig`
through small registries:

* ``policies`` — name -> a loader ``loader(checkpoint=None) -> UnifiedPolicy`` (``checkpoint``: a
  folder or hub id; None: the loader's default). Entry-point group ``unigrpo.policies``;
  ShapesWorld's shipped checkpoint is the built-in ``shapes``.
* ``evaluators`` — name -> a factory ``factory(**options) -> Evaluator``. Entry-point group
  ``unigrpo.evaluators``; built-in: ``default`` (the generic evaluator) and ``shapes``.
* ``pretrainers`` — name -> a class whose instances make a base checkpoint from scratch,
  ``pretrainer(out_dir, *, seed, num_threads, progress) -> summary``, with the class attributes
  ``policy`` (the policy kind that loads it) and ``evaluate_on`` (a scenario to evaluate it on).
  Entry-point group ``unigrpo.pretrainers``; built-in: ``shapes`` (``unigrpo pretrain shapes``).

Scenarios and rewards have their registries in the core (:mod:`unigrpo_env.registration`). A
config that names no policy or evaluator takes the scenario's ``default_policy`` and
``default_evaluator``. Register your own with ``@register_policy("name")`` and
``@register_evaluator("name")``, or from an installed package through the entry points.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unigrpo_env.agents.evaluation import Evaluator
from unigrpo_env.agents.policy import UnifiedPolicy
from unigrpo_env.registration import SCENARIOS, Registry, RegistryError, make_scenario
from unigrpo_env.scenario import Scenario

if TYPE_CHECKING:  # the config reads the policy kinds' recipes from here (UniGRPOConfig.for_scenario)
    from unigrpo_env.agents.config import UniGRPOConfig

__all__ = [
    "POLICIES",
    "EVALUATORS",
    "PRETRAINERS",
    "POLICY_ENTRY_POINTS",
    "EVALUATOR_ENTRY_POINTS",
    "PRETRAINER_ENTRY_POINTS",
    "register_policy",
    "register_evaluator",
    "load_policy",
    "policy_training_defaults",
    "build_evaluator",
    "RunParts",
    "build_parts",
]

#: Entry-point groups that installed packages use to add policies and evaluators.
POLICY_ENTRY_POINTS = "unigrpo.policies"
EVALUATOR_ENTRY_POINTS = "unigrpo.evaluators"
PRETRAINER_ENTRY_POINTS = "unigrpo.pretrainers"

POLICIES: Registry[Callable[..., UnifiedPolicy]] = Registry("policy", entry_point_group=POLICY_ENTRY_POINTS)
EVALUATORS: Registry[Callable[..., Evaluator]] = Registry("evaluator", entry_point_group=EVALUATOR_ENTRY_POINTS)
PRETRAINERS: Registry[Callable[..., Any]] = Registry("pretrainer", entry_point_group=PRETRAINER_ENTRY_POINTS)


def register_policy(name: str, *, override: bool = False):
    """Decorator: register a policy loader ``loader(checkpoint=None) -> UnifiedPolicy``."""
    return POLICIES.decorator(name, override=override)


def register_evaluator(name: str, *, override: bool = False):
    """Decorator: register an evaluator factory ``factory(**options) -> Evaluator``."""
    return EVALUATORS.decorator(name, override=override)


def _default(scenario: str, attribute: str) -> Any:
    return getattr(SCENARIOS.get(scenario), attribute, None)


def load_policy(
    kind: str | None, checkpoint: str | None = None, *, scenario: str | None = None, **options: Any
) -> UnifiedPolicy:
    """Load a policy of the registered ``kind`` (None: ``scenario``'s ``default_policy``) with its
    loader's ``options``."""
    if kind is None:
        kind = _default(scenario, "default_policy") if scenario is not None else None
        if kind is None:
            raise RegistryError(
                f"scenario {scenario!r} names no default policy: choose one with the config's 'policy' "
                f"(registered policies: {', '.join(POLICIES.names()) or 'none'})"
            )
    policy = POLICIES.get(kind)(checkpoint=checkpoint, **options)
    if not isinstance(policy, UnifiedPolicy):
        raise TypeError(f"the loader of policy {kind!r} returned {type(policy).__name__}, not a UnifiedPolicy")
    return policy


def policy_training_defaults(kind: str | None, *, scenario: str | None = None) -> dict[str, Any]:
    """The recipe of the policy kind ``kind`` (None: ``scenario``'s ``default_policy``): the
    ``UniGRPOConfig`` values its loader recommends (the loader's ``training_defaults`` attribute),
    or ``{}``. A recipe belongs to the model: learning rates, clip ranges and regulariser weights
    that suit its size and adapters, whatever the task."""
    if kind is None:
        kind = _default(scenario, "default_policy") if scenario is not None else None
        if kind is None:
            return {}
    return dict(getattr(POLICIES.get(kind), "training_defaults", None) or {})


def build_evaluator(name: str | None, *, scenario: str | None = None, **options: Any) -> Evaluator:
    """Build the registered evaluator ``name`` (None: ``scenario``'s ``default_evaluator``)."""
    if name is None:
        name = (_default(scenario, "default_evaluator") if scenario is not None else None) or "default"
    evaluator = EVALUATORS.get(name)(**options)
    if not isinstance(evaluator, Evaluator):
        raise TypeError(f"the factory of evaluator {name!r} returned {type(evaluator).__name__}, not an Evaluator")
    return evaluator


@dataclass
class RunParts:
    """What a :class:`~unigrpo_env.agents.trainer.Trainer` is made of."""

    policy: UnifiedPolicy
    scenario: Scenario
    evaluator: Evaluator


def build_parts(config: UniGRPOConfig) -> RunParts:
    """The parts a config names: the scenario with its options (its reward among them), the policy
    of ``config.policy`` loaded from ``config.checkpoint``, and the evaluator."""
    scenario = make_scenario(config.scenario, **config.scenario_options)
    evaluator = build_evaluator(config.evaluator, scenario=config.scenario)
    policy = load_policy(config.policy, config.checkpoint, scenario=config.scenario, **config.policy_options)
    return RunParts(policy=policy, scenario=scenario, evaluator=evaluator)
