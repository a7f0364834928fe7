"""Weighted sums of registered rewards, named by a spec string.

Spec grammar (what ``--reward`` on the command line and ``get_reward`` take)::

    spec   := term ( "," term )*
    term   := NAME [ ":" WEIGHT ]          weight defaults to 1.0
    NAME   := a registered reward name     e.g. shapes_verifier, quality
            | "module:Attribute"           a reward factory in an importable module

    or, as a whole spec (not a term):

    spec   := "remote:" URL                a reward service, e.g. remote:http://judge-host:8000

e.g. ``"shapes_verifier:1.0,quality:0.2"``. A ``module:Attribute`` name is told apart from
``name:weight`` by its last part: a term whose text after the last ``:`` reads as a number is
``name:weight``, so ``"my_pkg.rewards:Judge:0.5"`` is the reference ``my_pkg.rewards:Judge``
with weight 0.5. Whitespace around names and weights is ignored. A spec of one name with no
weight is that reward itself, not a sum.

Remote rewards. ``"remote:http://HOST:PORT"`` is a
:class:`~unigrpo_env.rewards.remote.RemoteReward` scoring on a reward service (``unigrpo serve
reward NAME`` there); its options are the client's (``token_file``, ``timeout``, ``retries``,
``backoff``, ``max_batch``: the most episodes a request holds, by default the server's, read from
its ``/health``; a larger batch is split into requests), given as options (``get_reward(spec,
max_batch=16)``, ``reward_options`` in a config), not in the spec string. It is a whole reward,
never a term of a sum: a URL holds ``:`` and would read as ``name:weight``. To weight a remote reward, give it a name and use the name in the sum —
``register_reward("judge")(lambda **kw: RemoteReward("http://judge-host:8000", **kw))`` in code,
or an entry point of ``unigrpo.rewards`` — or serve the whole weighted sum from the service
(``unigrpo serve reward "judge:1.0,quality:0.2"``).

The sum, per episode i, with weights ``w_k`` and component rewards ``R_k``::

    R(i) = Σ_k w_k · R_k(i)          over the terms with w_k ≠ 0

Terms with weight 0 are scored and logged but do not enter the sum (``"shapes_verifier,
quality:0"`` trains on the verifier and watches image quality). NaN is contagious: if any term
with a non-zero weight is NaN for an episode (its scorer could not score it), the sum is NaN for
that episode, which the agent leaves out of its update and counts. Negative weights are
penalties.

Logging: the output's components are ``<name>`` (the term's own, unweighted score) and
``<name>/<component>`` for each component the term reports (``shapes_verifier/correct``, ...);
the agent logs each as ``reward/<key>``.

The terms are scored concurrently on a thread pool (see :mod:`.concurrency`), and their results
are combined in spec order, so the sum is deterministic. A term that raises makes the whole call
raise :class:`RewardComponentError` naming the term (the environment then reports the error and
gives the batch NaN rewards).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from unigrpo_env.registration import REWARDS, is_target
from unigrpo_env.reward import RewardFunction, RewardInputs, RewardOutput
from unigrpo_env.rewards.concurrency import ScorerPool

__all__ = [
    "REMOTE_PREFIX",
    "RewardTerm",
    "RewardSpecError",
    "RewardComponentError",
    "WeightedSum",
    "parse_reward_spec",
    "build_reward",
]

_NAME = re.compile(r"^[A-Za-z_][\w.\-]*$")

#: The prefix of a remote reward's spec, ``"remote:http://HOST:PORT"``.
REMOTE_PREFIX = "remote:"


class RewardSpecError(ValueError):
    """A reward spec string that cannot be read, or options that do not fit it."""


class RewardComponentError(RuntimeError):
    """A term of a weighted sum raised while scoring."""


class RewardTerm(BaseModel):
    """One term of a spec: a reward name (or ``module:Attribute``) and its weight."""

    model_config = ConfigDict(frozen=True)

    name: str
    weight: float = 1.0
    weighted: bool = False  # whether the spec wrote a weight


def parse_reward_spec(spec: str) -> list[RewardTerm]:
    """Read a spec string (grammar in the module docstring) into its terms, in order."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(
            f"a reward spec must be a non-empty string like 'shapes_verifier:1.0,quality:0.2', got {spec!r}"
        )
    if spec.strip().startswith(REMOTE_PREFIX):  # a whole reward: its URL holds ':' (and must hold no ',')
        return [RewardTerm(name=spec.strip(), weight=1.0, weighted=False)]
    terms: list[RewardTerm] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise RewardSpecError(f"empty term in reward spec {spec!r}")
        if item.startswith(REMOTE_PREFIX):
            raise RewardSpecError(
                f"bad term {item!r} in reward spec {spec!r}: a 'remote:URL' reward is a whole spec, not a term of a "
                f"weighted sum; register it under a name to weight it, or serve the whole sum"
            )
        head, sep, tail = item.rpartition(":")
        weight = _number(tail) if sep else None
        if weight is not None:
            name = head.strip()
            if not math.isfinite(weight):
                raise RewardSpecError(
                    f"the weight of {name!r} in reward spec {spec!r} must be finite, got {tail.strip()!r}"
                )
        else:
            name = item
        if not (_NAME.match(name) or is_target(name)):
            raise RewardSpecError(
                f"bad term {item!r} in reward spec {spec!r}: expected NAME or NAME:WEIGHT, where NAME is a registered "
                f"reward or a 'module:Attribute' reference and WEIGHT a number"
            )
        if any(t.name == name for t in terms):
            raise RewardSpecError(f"reward {name!r} appears twice in reward spec {spec!r}")
        terms.append(RewardTerm(name=name, weight=1.0 if weight is None else weight, weighted=weight is not None))
    return terms


def _number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:
        return None


def build_reward(spec: str, **options: Any) -> RewardFunction:
    """Build the reward a spec names.

    One name without a weight: that registered reward, built with ``options``. Otherwise a
    :class:`WeightedSum`; its ``options`` are keyed by term name, each a dict for that term's
    factory: ``build_reward("shapes_verifier,quality:0.2", shapes_verifier={"score": "correct"})``.
    """
    terms = parse_reward_spec(spec)
    if len(terms) == 1 and not terms[0].weighted:
        return _instantiate(terms[0].name, options)
    names = {t.name for t in terms}
    unknown = sorted(set(options) - names)
    if unknown:
        raise RewardSpecError(
            f"options {unknown} match no term of reward spec {spec!r}; a weighted sum takes options per term, "
            f"e.g. {{{next(iter(sorted(names)))!r}: {{...}}}}"
        )
    for name, value in options.items():
        if not isinstance(value, Mapping):
            raise RewardSpecError(
                f"the options of reward term {name!r} must be a mapping of keyword arguments, got {value!r}"
            )
    return WeightedSum([(t.name, _instantiate(t.name, dict(options.get(t.name, {}))), t.weight) for t in terms])


def _instantiate(name: str, options: Mapping[str, Any]) -> RewardFunction:
    if name.startswith(REMOTE_PREFIX):
        return _remote(name[len(REMOTE_PREFIX) :], options)
    factory = REWARDS.get(name)
    try:
        reward = factory(**options)
    except TypeError as exc:
        raise RewardSpecError(f"could not build reward {name!r} with options {dict(options)}: {exc}") from exc
    if not callable(reward):
        raise RewardSpecError(f"the factory of reward {name!r} returned {type(reward).__name__}, which is not callable")
    return reward


def _remote(url: str, options: Mapping[str, Any]) -> RewardFunction:
    from unigrpo_env.rewards.extras import MissingExtraError

    try:
        from unigrpo_env.rewards.remote import RemoteReward

        return RemoteReward(url, **options)
    except MissingExtraError as exc:
        raise RewardSpecError(str(exc)) from exc
    except TypeError as exc:
        raise RewardSpecError(f"could not build reward 'remote:{url}' with options {dict(options)}: {exc}") from exc


class WeightedSum:
    """``R = Σ_k w_k · R_k`` over named rewards; see the module docstring for NaN and logging.

    Args:
        terms: ``(name, reward, weight)`` triples; names must be distinct.
        max_workers: threads for the terms (``None`` = one per term; 1 = score in turn).
    """

    def __init__(self, terms: Sequence[tuple[str, RewardFunction, float]], max_workers: int | None = None):
        if not terms:
            raise ValueError("a weighted sum needs at least one term")
        names = [name for name, _, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"the terms of a weighted sum must have distinct names, got {names}")
        for name, reward, weight in terms:
            if not callable(reward):
                raise TypeError(f"the reward of term {name!r} is not callable")
            if not math.isfinite(float(weight)):
                raise ValueError(f"the weight of term {name!r} must be finite, got {weight}")
        self.terms = [(name, reward, float(weight)) for name, reward, weight in terms]
        self.pool = ScorerPool(max_workers, name="unigrpo-weighted-sum")

    @classmethod
    def from_spec(cls, spec: str, **options: Any) -> WeightedSum:
        """A weighted sum from a spec string, even of one term (options as in :func:`build_reward`)."""
        reward = build_reward(spec, **options)
        if isinstance(reward, WeightedSum):
            return reward
        return cls([(parse_reward_spec(spec)[0].name, reward, 1.0)])

    @property
    def weights(self) -> dict[str, float]:
        return {name: weight for name, _, weight in self.terms}

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        n = len(inputs)
        outputs = self.pool.map(lambda term: _score_term(term, inputs), self.terms)
        total = torch.zeros(n, dtype=torch.float32)
        components: dict[str, torch.Tensor] = {}
        for (name, _, weight), out in zip(self.terms, outputs):
            scores = _column(out.scores, n, name, "scores")
            components[name] = scores
            for key, values in out.components.items():
                components[f"{name}/{key}"] = _column(values, n, name, f"component {key!r}")
            if weight != 0.0:
                total = total + weight * scores
        return RewardOutput(scores=total, components=components)

    def __repr__(self) -> str:
        return f"WeightedSum({', '.join(f'{name}:{weight:g}' for name, _, weight in self.terms)})"


def _score_term(term: tuple[str, RewardFunction, float], inputs: RewardInputs) -> RewardOutput:
    name, reward, _ = term
    try:
        return reward(inputs)
    except Exception as exc:  # noqa: BLE001 - name the failing term
        raise RewardComponentError(f"reward term {name!r} failed: {type(exc).__name__}: {exc}") from exc


def _column(values: Any, n: int, name: str, what: str) -> torch.Tensor:
    out = torch.as_tensor(values, dtype=torch.float32).reshape(-1).cpu()
    if out.shape[0] != n:
        raise RewardComponentError(f"reward term {name!r} returned {out.shape[0]} {what} for {n} episodes")
    return out
