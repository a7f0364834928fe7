"""Registries of scenarios and rewards, and the factories ``make`` / ``make_vec``.

Both registries map a name to a factory (a class or function) or to a ``"module:attr"`` string
imported on first use, as Gymnasium's ``entry_point`` does. Built-in scenarios and rewards are
registered as such strings, so the core imports nothing of the layers above it; users register
their own with the decorators ``@unigrpo_env.scenarios.register_scenario("name")`` and
``@unigrpo_env.rewards.register_reward("name")``.

Plugins: an installed package that declares entry points in the groups ``unigrpo.scenarios``
and ``unigrpo.rewards`` adds its scenarios and rewards without being imported by anyone; they
are discovered on first use and imported only when built (``unigrpo init scenario NAME`` writes
such a package). Wherever a name is accepted, a ``"module:Name"`` reference works too, e.g.
``unigrpo_env.make("my_package.scenarios:MyScenario")``. A plugin that fails to import raises
:class:`RegistryError` with its cause when used, and leaves everything else working.

Gymnasium ids (``gymnasium.make("unigrpo/T2IReason-v0")``) are registered when
``unigrpo_env`` is imported, and point at :func:`make`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
import threading
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
    "SCENARIO_ENTRY_POINTS",
    "REWARD_ENTRY_POINTS",
    "is_target",
]

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name, a duplicate registration, or an entry point that failed to load."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


#: ``"package.module:Attribute"`` (the attribute may be dotted: ``"module:Class.factory"``).
_TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_target(name: str) -> bool:
    """Whether ``name`` is a ``"module:Attribute"`` reference rather than a registered name."""
    return isinstance(name, str) and _TARGET.match(name) is not None


class Registry(Generic[T]):
    """Names -> factories, with lazy ``"module:attr"`` entries and plugin discovery.

    Entries come from three places:

    * ``register(name, "module:attr")`` — a lazy entry, imported on first :meth:`get` (the
      built-ins are registered this way, so the core imports nothing of the layers above it);
    * ``register(name, factory)`` and the decorators — a ready object;
    * the entry points of installed packages in the group ``entry_point_group`` (for example
      ``[project.entry-points."unigrpo.scenarios"]`` in a plugin's pyproject.toml). They are read
      — not imported — the first time the registry is listed or asked for a name, and registered
      as lazy entries, so a plugin costs nothing until it is used.

    Besides registered names, :meth:`get` accepts a ``"module:Attribute"`` reference directly.

    Isolation: a lazy entry that fails to import (or does not hold a callable) raises a
    :class:`RegistryError` naming the entry and its cause when it is *used*; it stays
    registered, so listings show it with its error, and every other entry keeps working. An
    entry point whose name is already taken is not registered; the clash is kept in
    :meth:`problems`.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T | str] = {}
        self._origins: dict[str, str] = {}
        self._problems: list[str] = []
        self._discovered = entry_point_group is None
        self._lock = threading.RLock()

    def register(self, name: str, factory: T | str, *, override: bool = False, origin: str = "code") -> None:
        """Register ``factory`` (or a lazy ``"module:attr"`` string) under ``name``.

        A name that is taken raises :class:`RegistryError` unless ``override``; one exception:
        a lazy entry may be replaced by an object of the module it points at (a plugin module
        whose entry point is being imported registers itself with the decorator, too).
        """
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if isinstance(factory, str) and not is_target(factory):
            raise ValueError(f"a lazy {self.kind} entry must look like 'module:attribute', got {factory!r}")
        with self._lock:
            current = self._entries.get(name)
            if current is not None and not override and current is not factory:
                if isinstance(current, str) and not isinstance(factory, str) and _module_of(current) == getattr(factory, "__module__", None):
                    self._entries[name] = factory  # the lazy entry's own module, registering itself
                    return
                raise RegistryError(f"a {self.kind} named {name!r} is already registered; pass override=True to replace it")
            self._entries[name] = factory
            self._origins[name] = origin

    def decorator(self, name: str, *, override: bool = False) -> Callable[[T], T]:
        def wrap(factory: T) -> T:
            self.register(name, factory, override=override)
            return factory

        return wrap

    def discover(self, *, refresh: bool = False) -> None:
        """Read the installed entry points of ``entry_point_group`` into lazy entries (once,
        or again with ``refresh=True``, e.g. after installing a plugin in a running process)."""
        if self.entry_point_group is None:
            return
        with self._lock:
            if self._discovered and not refresh:
                return
            self._discovered = True
            try:
                found = importlib.metadata.entry_points(group=self.entry_point_group)
            except Exception as exc:  # noqa: BLE001 - broken metadata must not break the registry
                self._problems.append(f"could not read the entry points {self.entry_point_group!r}: {type(exc).__name__}: {exc}")
                return
            for point in sorted(found, key=lambda p: (p.name, p.value)):
                dist = getattr(point, "dist", None)
                origin = f"plugin {dist.name} {dist.version}" if dist is not None else "plugin"
                current = self._entries.get(point.name)
                if current is None:
                    if is_target(point.value):
                        self._entries[point.name] = point.value
                        self._origins[point.name] = origin
                    else:
                        self._problems.append(
                            f"{origin}: the entry point {point.name!r} = {point.value!r} must look like 'module:attribute'"
                        )
                elif current == point.value or _module_of(point.value) == getattr(current, "__module__", None):
                    self._origins[point.name] = origin  # the same entry, seen again or already imported
                else:
                    message = (
                        f"{origin} also registers a {self.kind} named {point.name!r} ({point.value}); "
                        f"kept the {self._origins.get(point.name, 'existing')} one"
                    )
                    if message not in self._problems:
                        self._problems.append(message)

    def get(self, name: str) -> T:
        """The factory of ``name`` (a registered name or a ``"module:Attribute"`` reference),
        imported now if it is lazy. Raises :class:`RegistryError` if unknown or unloadable."""
        self.discover()
        entry = self._entries.get(name)
        if entry is None:
            if is_target(name):
                return self._checked(_load_entry_point(name, f"a {self.kind}"), name)
            known = ", ".join(self.names()) or "none"
            raise RegistryError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: {known} (or give a 'module:Name' reference)"
            )
        if isinstance(entry, str):
            loaded = self._checked(_load_entry_point(entry, f"{self.kind} {name!r}"), name)
            with self._lock:
                if self._entries.get(name) == entry:
                    self._entries[name] = loaded
            return loaded
        return entry

    def _checked(self, obj: Any, name: str) -> Any:
        if not callable(obj):
            raise RegistryError(f"{self.kind} {name!r} must be a class or function, got {type(obj).__name__}")
        return obj

    def names(self) -> list[str]:
        """The registered names, plugins included (nothing is imported)."""
        self.discover()
        return sorted(self._entries)

    def origin(self, name: str) -> str:
        """Where ``name`` comes from: ``"built-in"``, ``"code"`` or ``"plugin <dist> <version>"``."""
        self.discover()
        if name not in self._entries:
            raise RegistryError(f"unknown {self.kind} {name!r}")
        return self._origins.get(name, "code")

    def problems(self) -> list[str]:
        """Messages about entry points that could not be registered (name clashes, bad values)."""
        self.discover()
        return list(self._problems)

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries


def _module_of(target: str) -> str:
    return target.partition(":")[0]


def _load_entry_point(target: str, what: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not attr:
        raise RegistryError(f"the entry point of {what} must look like 'module:attribute', got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - report any import failure (even sys.exit) with its cause
        raise RegistryError(f"could not load {what} from {target!r}: {type(exc).__name__}: {exc}") from exc
    return obj


#: Entry-point groups that installed packages use to add scenarios and rewards.
SCENARIO_ENTRY_POINTS = "unigrpo.scenarios"
REWARD_ENTRY_POINTS = "unigrpo.rewards"

SCENARIOS: Registry[Callable[..., Scenario]] = Registry("scenario", entry_point_group=SCENARIO_ENTRY_POINTS)
REWARDS: Registry[Callable[..., Any]] = Registry("reward", entry_point_group=REWARD_ENTRY_POINTS)


def register_scenario(name: str, *, override: bool = False):
    """Class decorator: register a :class:`~unigrpo_env.scenario.Scenario` subclass under ``name``."""
    return SCENARIOS.decorator(name, override=override)


def register_reward(name: str, *, override: bool = False):
    """Decorator: register a reward factory (a class or function returning a reward function)."""
    return REWARDS.decorator(name, override=override)


# Built-ins, imported on first use.
SCENARIOS.register("t2i_reason", "unigrpo_env.scenarios.t2i_reason:T2IReasonScenario", origin="built-in")
SCENARIOS.register("edit_multiturn", "unigrpo_env.scenarios.edit_multiturn:EditMultiTurnScenario", origin="built-in")
REWARDS.register("shapes_verifier", "unigrpo_env.rewards.shapes:ShapesVerifierReward", origin="built-in")
REWARDS.register("shapes_scene", "unigrpo_env.rewards.shapes:SceneMatchReward", origin="built-in")
REWARDS.register("image_quality", "unigrpo_env.rewards.shapes:ImageQualityReward", origin="built-in")
REWARDS.register("quality", "unigrpo_env.rewards.shapes:ImageQualityReward", origin="built-in")  # alias
REWARDS.register("edit_fidelity", "unigrpo_env.rewards.edit:EditFidelityReward", origin="built-in")
REWARDS.register("jpeg_compressibility", "unigrpo_env.rewards.jpeg:JpegCompressibilityReward", origin="built-in")

#: Gymnasium ids of the built-in scenarios.
GYM_IDS = {"unigrpo/T2IReason-v0": "t2i_reason", "unigrpo/EditMultiTurn-v0": "edit_multiturn"}

_ENV_OPTIONS = ("split", "device", "render_mode")


def make_scenario(name: str | Scenario, **options: Any) -> Scenario:
    """Build a registered scenario with its options (``num_steps``, ``max_tokens``, ...)."""
    if isinstance(name, Scenario):
        if options:
            raise ValueError(f"options {sorted(options)} given with a ready-made scenario instance")
        return name
    factory = SCENARIOS.get(name)
    accepted = _accepted_options(factory)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            accepted = sorted(accepted)
            raise ValueError(
                f"unknown option(s) {unknown} for scenario {name!r}; it accepts {accepted} "
                f"and the environment options {list(_ENV_OPTIONS)}"
            )
    scenario = factory(**options)
    if not isinstance(scenario, Scenario):
        raise TypeError(f"the factory of scenario {name!r} returned {type(scenario).__name__}, not a Scenario")
    return scenario


def _accepted_options(factory: Any) -> set[str] | None:
    """The keyword options a scenario factory accepts, or None if it cannot tell. A class whose
    ``__init__`` passes ``**options`` on to its base's gets its bases' options too."""
    classes = factory.__mro__ if isinstance(factory, type) else (factory,)
    names: set[str] = set()
    for owner in classes:
        init = owner.__dict__.get("__init__") if isinstance(factory, type) else owner
        if init is None:
            continue
        try:
            parameters = list(inspect.signature(init).parameters.values())
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
    return None


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
