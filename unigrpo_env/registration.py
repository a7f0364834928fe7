"""Registries of scenarios and rewards, and the factories ``make`` / ``make_vec``.

Both registries map a name to a factory (a class or function) or to a ``"module:attr"`` string
imported on first use, as Gymnasium's ``entry_point`` does. Built-in scenarios and rewards are
registered as such strings, so the core imports nothing of the layers above it; users register
their own with the decorators ``@unigrpo_env.scenarios.register_scenario("name")`` and
``@unigrpo_env.rewards.register_reward("name")``.

Gymnasium ids (``gymnasium.make("unigrpo/T2IReason-v0")``) are registered when
``unigrpo_env`` is imported, and point at :func:`make`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import gymnasium as gym

from unigrpo_env.env import InterleavedEnv
from unigrpo_env.scenario import Scenario
from unigrpo_env.vector import InterleavedVectorEnv

__all__ = [
    "Registry",
    "RegistryError",
    "SCENARIOS",
    "REWARDS",
    "register_scenario",
    "register_reward",
    "make",
    "make_vec",
    "make_scenario",
    "GYM_IDS",
]

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name, a duplicate registration, or an entry point that failed to load."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Names -> factories, with lazy ``"module:attr"`` entries."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, factory: T | str, *, override: bool = False) -> None:
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries and not override and self._entries[name] is not factory:
            raise RegistryError(f"a {self.kind} named {name!r} is already registered; pass override=True to replace it")
        self._entries[name] = factory

    def decorator(self, name: str, *, override: bool = False) -> Callable[[T], T]:
        def wrap(factory: T) -> T:
            self.register(name, factory, override=override)
            return factory

        return wrap

    def get(self, name: str) -> T:
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}")
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = _load_entry_point(entry, f"{self.kind} {name!r}")
            self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


def _load_entry_point(target: str, what: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not attr:
        raise RegistryError(f"the entry point of {what} must look like 'module:attribute', got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # noqa: BLE001 - report any import failure with its cause
        raise RegistryError(f"could not load {what} from {target!r}: {type(exc).__name__}: {exc}") from exc
    return obj


SCENARIOS: Registry[Callable[..., Scenario]] = Registry("scenario")
REWARDS: Registry[Callable[..., Any]] = Registry("reward")


def register_scenario(name: str, *, override: bool = False):
    """Class decorator: register a :class:`~unigrpo_env.scenario.Scenario` subclass under ``name``."""
    return SCENARIOS.decorator(name, override=override)


def register_reward(name: str, *, override: bool = False):
    """Decorator: register a reward factory (a class or function returning a reward function)."""
    return REWARDS.decorator(name, override=override)


# Built-ins, imported on first use.
SCENARIOS.register("t2i_reason", "unigrpo_env.scenarios.t2i_reason:T2IReasonScenario")
REWARDS.register("shapes_verifier", "unigrpo_env.rewards.shapes:ShapesVerifierReward")
REWARDS.register("image_quality", "unigrpo_env.rewards.shapes:ImageQualityReward")

#: Gymnasium ids of the built-in scenarios.
GYM_IDS = {"unigrpo/T2IReason-v0": "t2i_reason"}

_ENV_OPTIONS = ("split", "device", "render_mode")


def make_scenario(name: str | Scenario, **options: Any) -> Scenario:
    """Build a registered scenario with its options (``num_steps``, ``max_tokens``, ...)."""
    if isinstance(name, Scenario):
        if options:
            raise ValueError(f"options {sorted(options)} given with a ready-made scenario instance")
        return name
    factory = SCENARIOS.get(name)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None and not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        unknown = sorted(set(options) - set(signature.parameters))
        if unknown:
            accepted = sorted(p for p in signature.parameters if p != "self")
            raise ValueError(
                f"unknown option(s) {unknown} for scenario {name!r}; it accepts {accepted} "
                f"and the environment options {list(_ENV_OPTIONS)}"
            )
    scenario = factory(**options)
    if not isinstance(scenario, Scenario):
        raise TypeError(f"the factory of scenario {name!r} returned {type(scenario).__name__}, not a Scenario")
    return scenario


def make(scenario: str | Scenario, **options: Any) -> InterleavedEnv:
    """One environment of a scenario: ``unigrpo_env.make("t2i_reason", num_steps=20, split="heldout")``.

    ``split``, ``device`` and ``render_mode`` go to the environment; every other option to the
    scenario.
    """
    env_options = {k: options.pop(k) for k in _ENV_OPTIONS if k in options}
    return InterleavedEnv(make_scenario(scenario, **options), **env_options)


def make_vec(scenario: str | Scenario, num_prompts: int = 4, group_size: int = 8, **options: Any) -> InterleavedVectorEnv:
    """A batched environment of ``num_prompts × group_size`` episodes; each group of ``group_size``
    shares a prompt. Options as for :func:`make`."""
    env_options = {k: options.pop(k) for k in _ENV_OPTIONS if k in options}
    return InterleavedVectorEnv(make_scenario(scenario, **options), num_prompts, group_size, **env_options)


def _make_gym(scenario: str, **options: Any) -> InterleavedEnv:
    """Entry point of the Gymnasium ids: ``gymnasium.make(id, **options)``."""
    return make(scenario, **options)


def register_gym_ids() -> None:
    for env_id, scenario in GYM_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=_make_gym, kwargs={"scenario": scenario})
