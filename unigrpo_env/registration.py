"""Registries of scenarios and rewards, and the factories ``make`` / ``make_vec``.

Both registries map a name to a factory (a class or function) or to a ``"module:attr"`` string
imported on first use, as Gymnasium's ``entry_point`` does. Users register their own with the
decorators ``@unigrpo_env.scenarios.register_scenario("name")`` and
``@unigrpo_env.rewards.register_reward("name")``.

Plugins: an installed package that declares entry points in the groups ``unigrpo.scenarios``
and ``unigrpo.rewards`` adds its scenarios and rewards without being imported by anyone; they
are discovered on first use and imported only when built (``unigrpo init scenario NAME`` writes
such a package). The built-in ones arrive the same way, from this package's own entry points
(pyproject.toml), so the core names nothing of the layers above it. Wherever a name is accepted,
a ``"module:Name"`` reference works too, e.g. ``unigrpo_env.make("my_package.scenarios:MyScenario")``.
A plugin that fails to import raises :class:`RegistryError` with its cause when used, and leaves
everything else working.

Gymnasium ids: every registered scenario gets one, ``unigrpo/<Name>-v0``, where ``<Name>`` is its
factory's name without a trailing ``Scenario`` (``T2IReasonScenario`` -> ``unigrpo/T2IReason-v0``);
read from the entry point's text, so nothing is imported. They are registered when ``unigrpo_env``
is imported (and when a scenario is registered in code), and point at :func:`make`.
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

from unigrpo_env.bounded_json import check_tree
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
    "gym_id",
    "gym_ids",
    "register_gym_ids",
    "SCENARIO_ENTRY_POINTS",
    "REWARD_ENTRY_POINTS",
    "BUILT_IN_DISTRIBUTION",
    "is_target",
]

#: The distribution whose own entry points are the built-ins (listed with origin "built-in").
BUILT_IN_DISTRIBUTION = "unigrpo-env"

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
      entry points of installed packages arrive this way, this package's own built-ins included);
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
                if (
                    isinstance(current, str)
                    and not isinstance(factory, str)
                    and _module_of(current) == getattr(factory, "__module__", None)
                ):
                    self._entries[name] = factory  # the lazy entry's own module, registering itself
                    return
                raise RegistryError(
                    f"a {self.kind} named {name!r} is already registered; pass override=True to replace it"
                )
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
                self._problems.append(
                    f"could not read the entry points {self.entry_point_group!r}: {type(exc).__name__}: {exc}"
                )
                return
            for point in sorted(found, key=lambda p: (not _built_in(p), p.name, p.value)):  # built-ins win clashes
                dist = getattr(point, "dist", None)
                if _built_in(point):
                    origin = "built-in"
                else:
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

    def entry(self, name: str) -> T | str:
        """What ``name`` is registered as: the factory, or its ``"module:attr"`` text if not
        imported yet (nothing is imported)."""
        self.discover()
        if name not in self._entries:
            raise RegistryError(f"unknown {self.kind} {name!r}")
        return self._entries[name]

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


def _built_in(point: importlib.metadata.EntryPoint) -> bool:
    """Whether an entry point is this package's own (a built-in)."""
    dist = getattr(point, "dist", None)
    return dist is not None and re.sub(r"[-_.]+", "-", dist.name).lower() == BUILT_IN_DISTRIBUTION


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
    """Class decorator: register a :class:`~unigrpo_env.scenario.Scenario` subclass under ``name``
    (and its Gymnasium id, see :func:`gym_id`)."""
    register = SCENARIOS.decorator(name, override=override)

    def wrap(factory):
        register(factory)
        register_gym_ids()
        return factory

    return wrap


def register_reward(name: str, *, override: bool = False):
    """Decorator: register a reward factory (a class or function returning a reward function)."""
    return REWARDS.decorator(name, override=override)


_ENV_OPTIONS = ("world", "split", "device", "render_mode", "reward_timeout")


def make_scenario(name: str | Scenario, **options: Any) -> Scenario:
    """Build a registered scenario with its options (``num_steps``, ``max_tokens``, ...). Options
    holding a non-finite number (NaN, ±inf), at any depth, raise ``ValueError``."""
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
    check_tree(options, what=f"scenario {name!r}'s options", max_nodes=None)  # NaN or inf: refused here
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
        names |= {
            p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        }
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
    return None


def make(scenario: str | Scenario, **options: Any) -> InterleavedEnv:
    """One environment of a scenario: ``unigrpo_env.make("t2i_reason", num_steps=20, split="heldout")``.

    ``world`` (the model's side, :class:`~unigrpo_env.world.World`; default: the scenario's),
    ``split``, ``device``, ``render_mode`` and ``reward_timeout`` go to the environment; every other
    option to the scenario. (To score with another reward than the scenario's, build the environment itself:
    ``InterleavedEnv(scenario, reward=...)``.)
    """
    env_options = {k: options.pop(k) for k in _ENV_OPTIONS if k in options}
    return InterleavedEnv(make_scenario(scenario, **options), **env_options)


def make_vec(
    scenario: str | Scenario, num_prompts: int = 4, group_size: int = 8, **options: Any
) -> InterleavedVectorEnv:
    """A batched environment of ``num_prompts × group_size`` episodes; each group of ``group_size``
    shares a prompt. Options as for :func:`make`."""
    env_options = {k: options.pop(k) for k in _ENV_OPTIONS if k in options}
    return InterleavedVectorEnv(make_scenario(scenario, **options), num_prompts, group_size, **env_options)


def _make_gym(scenario: str, **options: Any) -> InterleavedEnv:
    """Entry point of the Gymnasium ids: ``gymnasium.make(id, **options)``."""
    return make(scenario, **options)


def gym_id(name: str) -> str:
    """The Gymnasium id of the registered scenario ``name``: ``unigrpo/<Factory>-v0``, from its
    factory's name without a trailing ``Scenario`` (read from the entry point; nothing is imported)."""
    entry = SCENARIOS.entry(name)
    factory = (
        entry.rpartition(":")[2].rpartition(".")[2] if isinstance(entry, str) else getattr(entry, "__name__", name)
    )
    stem = factory[: -len("Scenario")] if factory.endswith("Scenario") and factory != "Scenario" else factory
    return f"unigrpo/{stem}-v0"


def gym_ids() -> dict[str, str]:
    """Gymnasium id -> scenario name, for every registered scenario."""
    return {gym_id(name): name for name in SCENARIOS.names()}


def register_gym_ids() -> None:
    """Register a Gymnasium id for every registered scenario that has none yet."""
    for env_id, scenario in gym_ids().items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=_make_gym, kwargs={"scenario": scenario})
