"""Fuzz the environments' action validation with malformed actions.

Every case is malformed by construction (docs/reliability.md): a wrong Python type, a float where
an integer is required, a tensor of the wrong dtype, shape, device or layout, NaN or infinite
values, token ids outside the vocabulary, tokens after the end-of-thinking token, a segment over
the token budget, positive token log-probabilities, a list of per-episode actions of the wrong
length or kinds, an action for the wrong phase, mixed SDE/ODE flags, a step after the episode
ended, a misspelled field... Each is tried against ``gym.make("unigrpo/T2IReason-v0")`` (one
episode, through Gymnasium's wrappers) or ``unigrpo_env.make_vec("t2i_reason", 2, 2)`` (a batch
of N = 4), in one of a pool of states: the text phase after 0 to 47 tokens (in the batch, with
some episodes' text phases already closed), the image phase at denoising step 0, 4 or 9, and after
the end.

For each case the action is built (pydantic's ``ValidationError``: "rejected at construction"),
then stepped (an ``InvalidActionError`` subclass: "rejected by step"). Anything accepted is
"wrongly accepted"; any other exception is "unexpected". After every rejection by step the env's
state — its trajectory (deep-copied when the state was built), phase, observation (token counts,
``x_t``...), action space and random generators — must equal what it was, else a "state
divergence". An env whose state changed is rebuilt from its recipe. At the end every pooled env
finishes its episode with the same valid actions as a twin built from the same recipe that never
saw a malformed action: the two trajectories and rewards must be equal.

Run: ``python benchmarks/fuzz_actions.py [--cases 10000] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import platform
import random
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from pydantic import ValidationError

import unigrpo_env
from unigrpo_env import FlowAction, TextAction
from unigrpo_env.errors import InvalidActionError

V = 126  # vocabulary size, end-of-thinking id, token limit, latent shape, denoising steps of t2i_reason
EOT = 5
M = 48
LATENT = (3, 32, 32)
STEPS = 10
N = 4  # the batched env: 2 prompts x 2 rollouts


# -- the pool of states -----------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """Where an env stands: ``kind`` "single" or "vec"; ``phase`` "text" (after ``k`` tokens per
    episode, ``closed`` episodes of the batch having written end-of-thinking), "image" (after
    ``k`` denoising steps) or "done"."""

    kind: str
    phase: str
    k: int = 0
    closed: tuple[int, ...] = ()

    @property
    def n(self) -> int:
        return 1 if self.kind == "single" else N

    def left(self, row: int = 0) -> int:
        """Tokens left for episode ``row`` in a text state."""
        return M - self.k - (1 if row in self.closed else 0)

    @property
    def open_rows(self) -> list[int]:
        return [i for i in range(self.n) if i not in self.closed]

    def __str__(self) -> str:
        closed = f", closed {list(self.closed)}" if self.closed else ""
        what = {"text": f"text after {self.k} tokens{closed}", "image": f"image step {self.k}", "done": "done"}
        return f"{self.kind} {what[self.phase]}"


STATES = [
    *(State("single", "text", k) for k in (0, 7, 30, 47)),
    *(State("single", "image", k) for k in (0, 4, 9)),
    State("single", "done"),
    State("vec", "text", 0),
    State("vec", "text", 7),
    State("vec", "text", 7, (0, 2)),
    State("vec", "text", 30, (1,)),
    State("vec", "text", 0, (3,)),
    *(State("vec", "image", k) for k in (0, 4, 9)),
    State("vec", "done"),
]


def _filler(count: int, row: int = 0) -> list[int]:
    """``count`` valid token ids, none of them end-of-thinking (deterministic)."""
    return [6 + (7 * i + 11 * row) % (V - 6) for i in range(count)]


def _valid_flow(obs: Any) -> FlowAction:
    return FlowAction(x_next=obs.x_t * 0.9, log_prob=torch.full(obs.x_t.shape[:-3], -1.0).squeeze())


def build(state: State) -> Any:
    """An env in ``state``, always the same for the same state (seeded reset, fixed actions)."""
    if state.kind == "single":
        env = gym.make("unigrpo/T2IReason-v0")
        obs, _ = env.reset(seed=11)
        if state.phase == "text":
            if state.k:
                env.step(TextAction(tokens=_filler(state.k)))
            return env
        obs = env.step(TextAction(tokens=[7, EOT]))[0]
    else:
        env = unigrpo_env.make_vec("t2i_reason", 2, 2)
        obs, _ = env.reset(seed=11)
        if state.phase == "text":
            lengths = [state.k + (1 if i in state.closed else 0) for i in range(N)]
            if max(lengths):
                tokens = torch.zeros((N, max(lengths)), dtype=torch.long)
                for i in range(N):
                    row = _filler(state.k, i) + ([EOT] if i in state.closed else [])
                    tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                env.step(TextAction(tokens=tokens, lengths=lengths))
            return env
        obs = env.step(TextAction(tokens=torch.tensor([[7, EOT]] * N)))[0]
    for _ in range(STEPS if state.phase == "done" else state.k):
        obs = env.step(_valid_flow(obs))[0]
    return env


def finish(env: Any) -> Any:
    """Play the episode to its end with fixed valid actions; the last step's reward."""
    raw = env.unwrapped if isinstance(env, gym.Env) else env
    reward = None
    while raw.phase != "done":
        obs = raw._observation()
        if raw.phase == "text":
            if isinstance(raw, unigrpo_env.InterleavedVectorEnv):
                lengths = obs.text_open.long()
                action = TextAction(tokens=torch.full((N, 1), EOT), lengths=lengths)
            else:
                action = TextAction(tokens=[EOT])
        else:
            action = _valid_flow(obs)
        reward = env.step(action)[1]
    return reward


def snapshot(env: Any) -> dict[str, Any]:
    """Everything the env holds that an action could change (deep copies)."""
    raw = env.unwrapped if isinstance(env, gym.Env) else env
    engine = raw._engine
    vec = isinstance(raw, unigrpo_env.InterleavedVectorEnv)
    space = raw.single_action_space if vec else raw.action_space
    return {
        "trajectory": copy.deepcopy(raw.trajectories() if vec else raw.trajectory),
        "phase": raw.phase,
        "observation": raw._observation(),
        "text_open": engine.text_open.clone(),
        "action_space": repr(space),
        "torch_rng": engine.generator.get_state().clone(),
        "numpy_rng": copy.deepcopy(raw.np_random.bit_generator.state),
    }


def diverged(before: dict[str, Any], env: Any) -> list[str]:
    """The parts of the env's state that differ from ``before``."""
    now = snapshot(env)
    out = []
    for key, value in before.items():
        same = torch.equal(value, now[key]) if isinstance(value, torch.Tensor) else value == now[key]
        if not same:
            out.append(key)
    return out


class Pool:
    """One env per state, with its snapshot; rebuilt when a case changed it."""

    def __init__(self) -> None:
        self.envs: dict[State, Any] = {}
        self.snapshots: dict[State, dict[str, Any]] = {}
        self.rebuilt = 0

    def get(self, state: State) -> Any:
        if state not in self.envs:
            self.envs[state] = build(state)
            self.snapshots[state] = snapshot(self.envs[state])
        return self.envs[state]

    def drop(self, state: State) -> None:
        self.envs.pop(state, None)
        self.snapshots.pop(state, None)
        self.rebuilt += 1


# -- malformed actions, by family -----------------------------------------------------------------
#
# A family is a function (rng, pick) -> (state, description, make) where ``make()`` builds the
# action (raising ValidationError if the construction refuses it) and ``pick(kinds, phases)``
# chooses one of the pool's states. Every case it gives is malformed in that state.


Make = Callable[[], Any]


def _latent(rng: random.Random, state: State, batched: bool | None = None) -> torch.Tensor:
    batched = state.kind == "vec" if batched is None else batched
    shape = (N, *LATENT) if batched else LATENT
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.randn(shape, generator=g)


def _segment(rng: random.Random, state: State, row: int = 0) -> list[int]:
    """A valid segment for an open episode of a text state (1 to 6 tokens, within budget)."""
    length = rng.randint(1, max(1, min(6, state.left(row))))
    ids = [rng.choice([i for i in range(V) if i != EOT]) for _ in range(length)]
    if rng.random() < 0.3:
        ids[-1] = EOT
    return ids


def _batch(rng: random.Random, state: State) -> tuple[torch.Tensor, list[int]]:
    """A valid batched segment ``[N, L]`` with lengths (length 0 for closed episodes)."""
    rows = [_segment(rng, state, i) if i in state.open_rows else [] for i in range(N)]
    width = max(len(r) for r in rows) + rng.randint(0, 2)
    tokens = torch.zeros((N, width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        tokens[i, len(r) :] = torch.randint(0, V, (width - len(r),))  # padding: anything goes
    return tokens, [len(r) for r in rows]


def _text_action(rng: random.Random, state: State) -> TextAction:
    """A valid-looking text action for ``state`` (used where the state makes it invalid)."""
    if state.kind == "single":
        return TextAction(tokens=_segment(rng, State("single", "text", 0)))
    tokens, lengths = _batch(rng, State("vec", "text", 0))
    return TextAction(tokens=tokens, lengths=lengths)


def _flow_action(rng: random.Random, state: State) -> FlowAction:
    return FlowAction(x_next=_latent(rng, state))


BAD_OBJECTS: list[tuple[str, Callable[[], Any]]] = [
    ("'abc'", lambda: "abc"),
    ("b'\\x03\\x05'", lambda: b"\x03\x05"),
    ("bytearray", lambda: bytearray(b"\x03\x05")),
    ("memoryview", lambda: memoryview(b"\x03\x05")),
    ("{'a': 1}", lambda: {"a": 1}),
    ("{3, 5}", lambda: {3, 5}),
    ("object()", lambda: object()),
    ("a lambda", lambda: lambda: 3),
    ("Ellipsis", lambda: ...),
    ("the int type", lambda: int),
    ("a generator", lambda: (i for i in (3, 5))),
    ("ragged [[3], [5, 6]]", lambda: [[3], [5, 6]]),
    ("ragged deep [[[3]], [4]]", lambda: [[[3]], [4]]),
    ("['3', '5']", lambda: ["3", "5"]),
    ("[None, 3]", lambda: [None, 3]),
    ("[[3], 'a']", lambda: [[3], "a"]),
    ("[1j, 2]", lambda: [1j, 2]),
    ("a numpy str array", lambda: np.array(["3", "5"])),
    ("a numpy object array", lambda: np.array([3, None], dtype=object)),
    ("a numpy datetime array", lambda: np.array(["2026-12-03"], dtype="datetime64[D]")),
    ("a structured numpy array", lambda: np.zeros(2, dtype=[("a", "i4")])),
    ("a nested list 3000 deep", lambda: _deep(3000)),
]
#: not numbers for a token id (a Decimal is a number, but not an integer)
BAD_INTEGERS = [
    *BAD_OBJECTS,
    ("[Decimal(3)]", lambda: [Decimal(3)]),
    ("[Fraction(3)]", lambda: [Fraction(3, 1)]),
    ("{} (empty dict)", lambda: {}),
]


def _deep(depth: int) -> list:
    value: Any = 3
    for _ in range(depth):
        value = [value]
    return value


def f_wrong_type_field(rng: random.Random, pick) -> tuple[State, str, Make]:
    """A field given something that is not numbers (or None for a required field)."""
    field = rng.choice(["tokens", "tokens", "log_probs", "lengths", "x_next", "x_next", "log_prob"])
    name, bad = rng.choice(BAD_INTEGERS if field in ("tokens", "lengths") else BAD_OBJECTS)
    if field in ("tokens", "x_next") and rng.random() < 0.15:
        name, bad = "None", lambda: None
    if field in ("tokens", "log_probs", "lengths"):
        state = pick(("single", "vec"), ("text",))
        if field == "tokens":
            return state, f"TextAction(tokens={name})", lambda: TextAction(tokens=bad())
        if field == "log_probs":
            return state, f"TextAction(tokens=[3], log_probs={name})", lambda: TextAction(tokens=[3], log_probs=bad())
        return state, f"TextAction(tokens=[[3]]*4, lengths={name})", lambda: TextAction(tokens=[[3]] * N, lengths=bad())
    state = pick(("single", "vec"), ("image",))
    if field == "x_next":
        return state, f"FlowAction(x_next={name})", lambda: FlowAction(x_next=bad())
    x = _latent(rng, state)
    return state, f"FlowAction(x_next=<latent>, log_prob={name})", lambda: FlowAction(x_next=x, log_prob=bad())


def f_wrong_type_action(rng: random.Random, pick) -> tuple[State, str, Make]:
    """The action itself is not a TextAction/FlowAction (nor, for the batch, a list of them)."""
    state = pick(("single", "vec"), ("text", "image"))
    choices: list[tuple[str, Callable[[], Any]]] = [
        ("None", lambda: None),
        ("'red'", lambda: "red"),
        ("3", lambda: 3),
        ("3.5", lambda: 3.5),
        ("{'tokens': [3]}", lambda: {"tokens": [3]}),
        ("a token tensor", lambda: torch.tensor([3, 5])),
        ("a latent tensor", lambda: _latent(rng, state)),
        ("a numpy latent", lambda: _latent(rng, state).numpy()),
        ("the TextAction class", lambda: TextAction),
        ("object()", lambda: object()),
        ("a generator of actions", lambda: (a for a in [_text_action(rng, state)])),
        ("a numpy object array of actions", lambda: np.array([None] * state.n, dtype=object)),
    ]
    if state.kind == "single":  # a list is the batch's form, not the single env's
        choices.append(("[TextAction]", lambda: [_text_action(rng, State("single", "text"))]))
        choices.append(("[3, 5]", lambda: [3, 5]))
    else:
        choices.append(("[3, 5, 6, 7]", lambda: [3, 5, 6, 7]))
        choices.append(("[['a']] * 4", lambda: [["a"]] * N))
    name, make = rng.choice(choices)
    return state, f"step({name})", make


def f_float_for_int(rng: random.Random, pick) -> tuple[State, str, Make]:
    """Floats where integers are required: token ids and lengths (never truncated)."""
    state = pick(("single", "vec"), ("text",))
    value = rng.choice([3.0, 3.5, 7.25, 0.0, -0.5, float("nan"), float("inf")])
    row = [value] if rng.random() < 0.5 else [3, value, 4]
    options: list[tuple[str, Make]] = [
        (f"TextAction(tokens={row})", lambda: TextAction(tokens=row)),
        (f"TextAction(tokens={value})", lambda: TextAction(tokens=value)),
        ("TextAction(tokens=np.float64 array)", lambda: TextAction(tokens=np.array(row, dtype=np.float64))),
        ("TextAction(tokens=np.float32 array)", lambda: TextAction(tokens=np.array(row, dtype=np.float32))),
        ("TextAction(tokens=np.float64(3.0))", lambda: TextAction(tokens=np.float64(3.0))),
    ]
    if state.kind == "single":
        dtype = rng.choice([torch.float32, torch.float64, torch.float16, torch.bfloat16])
        tokens = torch.tensor(_segment(rng, state), dtype=dtype)
        options.append((f"TextAction(tokens=<{dtype} tensor>)", lambda: TextAction(tokens=tokens)))
    else:
        tokens, lengths = _batch(rng, state)
        frac = list(map(float, lengths))
        frac[rng.randrange(N)] += rng.choice([0.5, 0.25, float("nan"), float("inf"), -0.5])
        integral = list(map(float, lengths))
        dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16])
        options += [
            (f"TextAction(tokens=[N, L], lengths={frac})", lambda: TextAction(tokens=tokens, lengths=frac)),
            (f"TextAction(tokens=[N, L], lengths={integral})", lambda: TextAction(tokens=tokens, lengths=integral)),
            (
                "TextAction(tokens=[N, L], lengths=<np float array>)",
                lambda: TextAction(tokens=tokens, lengths=np.array(frac)),
            ),
            (
                f"TextAction(tokens=[N, L], lengths=<{dtype} tensor>)",
                lambda: TextAction(tokens=tokens, lengths=torch.tensor(frac, dtype=dtype)),
            ),
            (
                f"TextAction(tokens=<{dtype} [N, L] tensor>)",
                lambda: TextAction(tokens=tokens.to(dtype), lengths=lengths),
            ),
            ("TextAction(tokens=<[N, L] list of floats>)", lambda: TextAction(tokens=tokens.double().tolist())),
            (
                "[TextAction(tokens=<float tensor>), ...]",
                lambda: _per_episode_text(rng, state, {"tokens": lambda t: t.to(dtype)}),
            ),
        ]
    description, make = rng.choice(options)
    return state, description, make


def _per_episode_text(rng: random.Random, state: State, spoil: dict[str, Callable[[torch.Tensor], Any]]) -> list:
    """N per-episode TextActions (None for closed episodes); one open episode's fields spoiled."""
    target = rng.choice(state.open_rows)
    out: list[Any] = []
    for i in range(N):
        if i not in state.open_rows:
            out.append(None)
            continue
        tokens = torch.tensor(_segment(rng, state, i))
        log_probs = -torch.rand(tokens.shape) * 3
        fields: dict[str, Any] = {"tokens": tokens, "log_probs": log_probs}
        if i == target:
            for key, change in spoil.items():
                fields[key] = change(fields[key])
        out.append(TextAction(**fields))
    return out


def _per_episode_flow(rng: random.Random, state: State, spoil: dict[str, Callable[[Any], Any]], **common) -> list:
    """N per-episode FlowActions; one episode's fields spoiled."""
    target = rng.randrange(N)
    out = []
    for i in range(N):
        fields: dict[str, Any] = {
            "x_next": _latent(rng, state, batched=False),
            "log_prob": -rng.random() * 50,
            **common,
        }
        if i == target:
            for key, change in spoil.items():
                fields[key] = change(fields[key])
        out.append(FlowAction(**fields))
    return out


FLOAT_DTYPES_BAD_LATENT = [torch.float64, torch.float16, torch.bfloat16]
NON_FLOAT = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]


def f_wrong_dtype(rng: random.Random, pick) -> tuple[State, str, Make]:
    """Tensors of the wrong dtype: float/bool/complex tokens, non-float32 latents, integer
    log-probabilities, bool/complex lengths, in batched actions and in lists of per-episode ones."""
    state = pick(("single", "vec"), ("text", "image"))
    if state.phase == "image":
        dtype = rng.choice(FLOAT_DTYPES_BAD_LATENT + NON_FLOAT)
        x = _latent(rng, state)
        lp_dtype = rng.choice(NON_FLOAT)
        options: list[tuple[str, Make]] = [
            (f"FlowAction(x_next=<{dtype} latent>)", lambda: FlowAction(x_next=x.to(dtype))),
            ("FlowAction(x_next=<np.float64 latent>)", lambda: FlowAction(x_next=x.double().numpy())),
            ("FlowAction(x_next=<np.float16 latent>)", lambda: FlowAction(x_next=x.half().numpy())),
            ("FlowAction(x_next=<np.int64 latent>)", lambda: FlowAction(x_next=x.long().numpy())),
            (
                f"FlowAction(log_prob=<{lp_dtype} tensor>)",
                lambda: FlowAction(x_next=x, log_prob=torch.zeros(x.shape[:-3], dtype=lp_dtype)),
            ),
        ]
        if state.kind == "vec":
            options += [
                (
                    f"[FlowAction(x_next=<{dtype} latent>), <float32>...]",
                    lambda: _per_episode_flow(rng, state, {"x_next": lambda v: v.to(dtype)}),
                ),
                (
                    "[FlowAction(log_prob=<int tensor>), <float>...]",
                    lambda: _per_episode_flow(rng, state, {"log_prob": lambda v: torch.tensor(-int(abs(v)) - 1)}),
                ),
            ]
        return state, *rng.choice(options)
    dtype = rng.choice([torch.float32, torch.float64, torch.bool, torch.complex64])
    if state.kind == "single":
        segment = _segment(rng, state)
        tokens = torch.tensor(segment)
        lp_dtype = rng.choice([torch.int64, torch.int32, torch.bool, torch.complex64])
        options = [
            (f"TextAction(tokens=<{dtype} tensor>)", lambda: TextAction(tokens=tokens.to(dtype))),
            (
                f"TextAction(log_probs=<{lp_dtype} tensor>)",
                lambda: TextAction(tokens=tokens, log_probs=torch.zeros(len(segment), dtype=lp_dtype)),
            ),
        ]
        return state, *rng.choice(options)
    tokens, lengths = _batch(rng, state)
    len_dtype = rng.choice([torch.bool, torch.complex64, torch.float16])
    lp_dtype = rng.choice([torch.int64, torch.bool, torch.complex64])
    options = [
        (f"TextAction(tokens=<{dtype} [N, L]>)", lambda: TextAction(tokens=tokens.to(dtype), lengths=lengths)),
        (
            f"TextAction(lengths=<{len_dtype} tensor>)",
            lambda: TextAction(tokens=tokens, lengths=torch.tensor(lengths).to(len_dtype)),
        ),
        (
            f"TextAction(log_probs=<{lp_dtype} [N, L]>)",
            lambda: TextAction(tokens=tokens, lengths=lengths, log_probs=torch.zeros(tokens.shape, dtype=lp_dtype)),
        ),
        (
            f"[TextAction(tokens=<{dtype}>), ...]",
            lambda: _per_episode_text(rng, state, {"tokens": lambda t: t.to(dtype)}),
        ),
        (
            f"[TextAction(log_probs=<{lp_dtype}>), ...]",
            lambda: _per_episode_text(rng, state, {"log_probs": lambda t: t.to(lp_dtype)}),
        ),
    ]
    return state, *rng.choice(options)


def f_wrong_shape(rng: random.Random, pick) -> tuple[State, str, Make]:
    """Extra or missing dimensions, the wrong N, the wrong latent shape, empty tensors."""
    state = pick(("single", "vec"), ("text", "image"))
    if state.phase == "image":
        c, h, w = LATENT
        n = state.n
        one = [(c, h, w + 1), (c + 1, h, w), (c, h - 1, w), (h, w), (c * h * w,), (0,), (), (c, h, w, 1)]
        shapes = [s if state.kind == "single" else (n, *s) for s in one] + [(n + 1, c, h, w), (1, c, h, w)]
        if state.kind == "vec":
            shapes += [(c, h, w), (n - 1, c, h, w), (0, c, h, w), (n, n, c, h, w)]
        else:
            shapes += [(2, c, h, w)]
        shape = rng.choice(shapes)
        one_shape = rng.choice(one)
        lp_shape = rng.choice([(2,), (3,), (n + 1,), (n, 1), (0,)] + ([] if n == 1 else [(), (1,)]))
        x = _latent(rng, state)
        options: list[tuple[str, Make]] = [
            (f"FlowAction(x_next=<{shape}>)", lambda: FlowAction(x_next=torch.zeros(shape))),
            (f"FlowAction(log_prob=<{lp_shape}>)", lambda: FlowAction(x_next=x, log_prob=torch.zeros(lp_shape))),
        ]
        if state.kind == "vec":
            options.append(
                (
                    f"[FlowAction(x_next=<{one_shape}>), ...]",
                    lambda: _per_episode_flow(rng, state, {"x_next": lambda v: torch.zeros(one_shape)}),
                )
            )
        return state, *rng.choice(options)
    if state.kind == "single":
        segment = _segment(rng, state)
        options = [
            ("TextAction(tokens=<0-d>)", lambda: TextAction(tokens=torch.tensor(3))),
            ("TextAction(tokens=<[1, 1, L]>)", lambda: TextAction(tokens=[[segment]])),
            ("TextAction(tokens=<[1, L]>)", lambda: TextAction(tokens=[segment])),
            ("TextAction(tokens=<[2, L]>)", lambda: TextAction(tokens=[segment, segment])),
            ("TextAction(tokens=[])", lambda: TextAction(tokens=[])),
            ("TextAction(tokens=<empty int tensor>)", lambda: TextAction(tokens=torch.zeros(0, dtype=torch.long))),
            (
                "TextAction(log_probs=<L + 1>)",
                lambda: TextAction(tokens=segment, log_probs=[-0.1] * (len(segment) + 1)),
            ),
            ("TextAction(tokens=[L], lengths=[L])", lambda: TextAction(tokens=segment, lengths=[len(segment)])),
        ]
        return state, *rng.choice(options)
    tokens, lengths = _batch(rng, state)
    over = list(lengths)
    row = rng.choice(state.open_rows)
    over[row] = tokens.shape[1] + rng.randint(1, 3)
    options = [
        ("TextAction(tokens=<[N + 1, L]>)", lambda: TextAction(tokens=torch.cat([tokens, tokens[:1]]))),
        ("TextAction(tokens=<[N - 1, L]>)", lambda: TextAction(tokens=tokens[:-1])),
        ("TextAction(tokens=<[L]>)", lambda: TextAction(tokens=tokens[row, : max(1, lengths[row])])),
        ("TextAction(tokens=<[N, 1, L]>)", lambda: TextAction(tokens=tokens.unsqueeze(1))),
        ("TextAction(lengths=<[N + 1]>)", lambda: TextAction(tokens=tokens, lengths=[*lengths, 0])),
        ("TextAction(lengths=<[N, 1]>)", lambda: TextAction(tokens=tokens, lengths=[[v] for v in lengths])),
        (f"TextAction(lengths={over} > L={tokens.shape[1]})", lambda: TextAction(tokens=tokens, lengths=over)),
        (
            "TextAction(lengths=<uint64 > L>)",
            lambda: TextAction(tokens=tokens, lengths=torch.tensor(over, dtype=torch.uint64)),
        ),
        (
            "TextAction(log_probs=<[N, L + 1]>)",
            lambda: TextAction(tokens=tokens, lengths=lengths, log_probs=torch.zeros(N, tokens.shape[1] + 1)),
        ),
        (
            "[TextAction(tokens=<[1, L]>), ...]",
            lambda: _per_episode_text(rng, state, {"tokens": lambda t: t.unsqueeze(0), "log_probs": lambda t: None}),
        ),
    ]
    return state, *rng.choice(options)


def f_non_finite(rng: random.Random, pick) -> tuple[State, str, Make]:
    """NaN or infinite values in latents, flow log-probabilities and token log-probabilities."""
    state = pick(("single", "vec"), ("text", "image"))
    bad = rng.choice([float("nan"), float("inf"), float("-inf")])
    if state.phase == "image":
        x = _latent(rng, state)
        flat = x.view(-1)
        for _ in range(rng.randint(1, 3)):
            flat[rng.randrange(flat.numel())] = bad
        lp = torch.full(x.shape[:-3], -1.0)
        lp.view(-1)[rng.randrange(lp.numel())] = bad
        clean = _latent(rng, state)
        options: list[tuple[str, Make]] = [
            (f"FlowAction(x_next=<latent with {bad}>)", lambda: FlowAction(x_next=x)),
            (f"FlowAction(log_prob=<with {bad}>)", lambda: FlowAction(x_next=clean, log_prob=lp.squeeze())),
        ]
        if state.kind == "vec":
            options += [
                (
                    f"[FlowAction(x_next=<with {bad}>), ...]",
                    lambda: _per_episode_flow(
                        rng, state, {"x_next": lambda v: v.index_fill(0, torch.tensor([1]), bad)}
                    ),
                ),
                (
                    f"[FlowAction(log_prob={bad}), ...]",
                    lambda: _per_episode_flow(rng, state, {"log_prob": lambda v: bad}),
                ),
            ]
        return state, *rng.choice(options)
    if state.kind == "single":
        segment = _segment(rng, state)
        lp = [-0.5] * len(segment)
        lp[rng.randrange(len(segment))] = bad
        return state, f"TextAction(log_probs=<with {bad}>)", lambda: TextAction(tokens=segment, log_probs=lp)
    tokens, lengths = _batch(rng, state)
    lp = -torch.rand(tokens.shape)
    row = rng.choice(state.open_rows)
    lp[row, rng.randrange(lengths[row])] = bad
    options = [
        (
            f"TextAction(tokens=[N, L], log_probs=<with {bad} at a real token>)",
            lambda: TextAction(tokens=tokens, lengths=lengths, log_probs=lp),
        ),
        (
            f"[TextAction(log_probs=<with {bad}>), ...]",
            lambda: _per_episode_text(rng, state, {"log_probs": lambda t: t.index_fill(0, torch.tensor([0]), bad)}),
        ),
    ]
    return state, *rng.choice(options)


def f_out_of_vocab(rng: random.Random, pick) -> tuple[State, str, Make]:
    """Token ids outside [0, vocab_size), negative ones included."""
    state = pick(("single", "vec"), ("text",))
    bad = rng.choice([V, V + 1, V + rng.randrange(10_000), 2**31, 2**62, -1, -2, -rng.randrange(1, 2**40)])
    if state.kind == "single":
        segment = _segment(rng, state)
        segment[rng.randrange(len(segment))] = bad
        options: list[tuple[str, Make]] = [
            (f"TextAction(tokens=<with {bad}>)", lambda: TextAction(tokens=segment)),
            (f"TextAction(tokens=<np.int64 array with {bad}>)", lambda: TextAction(tokens=np.array(segment))),
        ]
        return state, *rng.choice(options)
    tokens, lengths = _batch(rng, state)
    row = rng.choice(state.open_rows)
    tokens[row, rng.randrange(lengths[row])] = bad
    options = [
        (f"TextAction(tokens=[N, L] with {bad} at a real token)", lambda: TextAction(tokens=tokens, lengths=lengths)),
        (
            f"[TextAction(tokens=<with {bad}>), ...]",
            lambda: _per_episode_text(rng, state, {"tokens": lambda t: t.index_fill(0, torch.tensor([0]), bad)}),
        ),
        (
            "TextAction(tokens=<uint64 2**64 - 1>)",
            lambda: TextAction(
                tokens=np.full((N, 1), 2**64 - 1, dtype=np.uint64), lengths=[1 if i == row else 0 for i in range(N)]
            ),
        ),
    ]
    return state, *rng.choice(options)


def f_after_eot(rng: random.Random, pick) -> tuple[State, str, Make]:
    """The end-of-thinking token before the last token of a segment."""
    state = pick(("single", "vec"), ("text",))
    row = rng.choice(state.open_rows)
    length = rng.randint(2, max(2, min(8, state.left(row))))
    if state.left(row) < 2:  # one token left: a 2-token segment is over budget as well, still malformed
        length = 2
    segment = [rng.choice(range(6, V)) for _ in range(length)]
    segment[rng.randrange(length - 1)] = EOT
    if state.kind == "single":
        return state, f"TextAction(tokens={segment})", lambda: TextAction(tokens=segment)
    tokens, lengths = _batch(rng, state)
    width = max(tokens.shape[1], length)
    padded = torch.zeros((N, width), dtype=torch.long)
    padded[:, : tokens.shape[1]] = tokens
    padded[row, :length] = torch.tensor(segment)
    lengths[row] = length
    options: list[tuple[str, Make]] = [
        (f"TextAction(tokens=[N, L], row {row} = {segment})", lambda: TextAction(tokens=padded, lengths=lengths)),
        (
            f"[..., TextAction(tokens={segment}), ...]",
            lambda: [TextAction(tokens=padded[i, : lengths[i]]) if i in state.open_rows else None for i in range(N)],
        ),
    ]
    return state, *rng.choice(options)


def f_over_budget(rng: random.Random, pick) -> tuple[State, str, Make]:
    """A segment longer than the tokens left, or text for an episode whose text phase closed."""
    state = pick(("single", "vec"), ("text",))
    if state.kind == "vec" and state.closed and rng.random() < 0.5:
        tokens, lengths = _batch(rng, state)
        row = rng.choice(state.closed)
        lengths[row] = rng.randint(1, tokens.shape[1])
        options: list[tuple[str, Make]] = [
            (
                f"TextAction(lengths={lengths}) for closed episode {row}",
                lambda: TextAction(tokens=tokens, lengths=lengths),
            ),
            (
                f"[..., TextAction for closed episode {row}, ...]",
                lambda: [TextAction(tokens=tokens[i, : lengths[i]]) if lengths[i] else None for i in range(N)],
            ),
        ]
        return state, *rng.choice(options)
    row = rng.choice(state.open_rows)
    length = state.left(row) + rng.choice([1, 2, 5, 50])
    segment = [rng.choice(range(6, V)) for _ in range(length)]
    if state.kind == "single":
        return state, f"TextAction(tokens=<{length} tokens, {state.left()} left>)", lambda: TextAction(tokens=segment)
    tokens = torch.zeros((N, length), dtype=torch.long)
    tokens[row] = torch.tensor(segment)
    lengths = [length if i == row else 0 for i in range(N)]
    return (
        state,
        f"TextAction(lengths={lengths}, {state.left(row)} left for episode {row})",
        lambda: TextAction(tokens=tokens, lengths=lengths),
    )


def f_positive_log_probs(rng: random.Random, pick) -> tuple[State, str, Make]:
    """Token log-probabilities above 0 (log-probabilities of a categorical are <= 0)."""
    state = pick(("single", "vec"), ("text",))
    bad = rng.choice([0.01, 0.5, 1.0, 3.0, 1e6])
    if state.kind == "single":
        segment = _segment(rng, state)
        lp = [-0.2] * len(segment)
        lp[rng.randrange(len(segment))] = bad
        return state, f"TextAction(log_probs=<with {bad}>)", lambda: TextAction(tokens=segment, log_probs=lp)
    tokens, lengths = _batch(rng, state)
    lp = -torch.rand(tokens.shape)
    row = rng.choice(state.open_rows)
    lp[row, rng.randrange(lengths[row])] = bad
    options: list[tuple[str, Make]] = [
        (
            f"TextAction(tokens=[N, L], log_probs=<with {bad}>)",
            lambda: TextAction(tokens=tokens, lengths=lengths, log_probs=lp),
        ),
        (
            f"[TextAction(log_probs=<with {bad}>), ...]",
            lambda: _per_episode_text(rng, state, {"log_probs": lambda t: t.index_fill(0, torch.tensor([0]), bad)}),
        ),
    ]
    return state, *rng.choice(options)


def f_vector_log_prob_in_list(rng: random.Random, pick) -> tuple[State, str, Make]:
    """A list of per-episode FlowActions whose log_prob is not one number."""
    state = pick(("vec",), ("image",))
    size = rng.choice([0, 2, 3, N])
    every = rng.random() < 0.5
    spoil = {"log_prob": lambda v: -torch.rand(size)}
    if every:
        return (
            state,
            f"[FlowAction(log_prob=<{size} values>)] * N",
            lambda: [
                FlowAction(x_next=_latent(rng, state, batched=False), log_prob=-torch.rand(size)) for _ in range(N)
            ],
        )
    return (
        state,
        f"[FlowAction(log_prob=<{size} values>), <one number>...]",
        lambda: _per_episode_flow(rng, state, spoil),
    )


def f_list_length_or_kinds(rng: random.Random, pick) -> tuple[State, str, Make]:
    """Lists of per-episode actions of the wrong length, mixing kinds or holding non-actions,
    or giving log-probabilities for some episodes only."""
    state = pick(("vec",), ("text", "image"))

    def own() -> list:
        return _per_episode_flow(rng, state, {}) if state.phase == "image" else _per_episode_text(rng, state, {})

    options: list[tuple[str, Make]] = []
    for length in (0, 1, N - 1, N + 1, 2 * N):
        options.append((f"a list of {length} actions", lambda length=length: (own() * 3)[:length]))
    options += [
        (
            "[TextAction, FlowAction, ...] (mixed kinds)",
            lambda: _replace(
                rng,
                _fill(own()),
                TextAction(tokens=[3]) if state.phase == "image" else _flow_action(rng, State("single", "image")),
            ),
        ),
        ("[..., 'red', ...]", lambda: _replace(rng, own(), "red")),
        ("[..., 3, ...]", lambda: _replace(rng, own(), 3)),
        ("[..., {'tokens': [3]}, ...]", lambda: _replace(rng, own(), {"tokens": [3]})),
        ("[..., <a tensor>, ...]", lambda: _replace(rng, own(), torch.zeros(LATENT))),
        ("[[a, a], [a, a]] (nested)", lambda: [own()[:2], own()[2:]]),
        ("a tuple of N lists", lambda: tuple([a] for a in own())),
    ]
    if state.phase == "image":
        options += [
            ("[..., None, ...] in the image phase", lambda: _replace(rng, own(), None)),
            ("log_prob for some episodes only", lambda: _replace(rng, own(), FlowAction(x_next=torch.zeros(LATENT)))),
        ]
    else:
        options.append(("log_probs for some episodes only", lambda: _drop_log_probs(rng, state, own())))
    return state, *rng.choice(options)


def _fill(actions: list) -> list:
    """Closed episodes' None replaced by an empty segment (so the list holds actions only)."""
    return [TextAction(tokens=torch.zeros(0, dtype=torch.long)) if a is None else a for a in actions]


def _replace(rng: random.Random, actions: list, value: Any) -> list:
    actions = list(actions)
    actions[rng.randrange(len(actions))] = value
    return actions


def _drop_log_probs(rng: random.Random, state: State, actions: list) -> list:
    rows = [i for i in state.open_rows if actions[i] is not None]
    if len(rows) < 2:  # one episode writing: give it no log-probs and another a segment with them
        raise _Skip
    i = rng.choice(rows)
    actions[i] = TextAction(tokens=actions[i].tokens)
    return actions


class _Skip(Exception):
    """The family cannot make a malformed case in the state it drew (draw again)."""


def f_wrong_phase(rng: random.Random, pick) -> tuple[State, str, Make]:
    """A text action during an image phase, or a flow action during a text phase."""
    state = pick(("single", "vec"), ("text", "image"))
    if state.phase == "image":
        options: list[tuple[str, Make]] = [("a TextAction in an image phase", lambda: _text_action(rng, state))]
        if state.kind == "vec":
            options.append(("[TextAction] * N in an image phase", lambda: [TextAction(tokens=[3, EOT])] * N))
            options.append(("[None] * N in an image phase", lambda: [None] * N))
        return state, *rng.choice(options)
    options = [("a FlowAction in a text phase", lambda: _flow_action(rng, state))]
    if state.kind == "vec":
        options.append(
            (
                "[FlowAction] * N in a text phase",
                lambda: [FlowAction(x_next=_latent(rng, state, False)) for _ in range(N)],
            )
        )
    return state, *rng.choice(options)


def f_mixed_stochastic(rng: random.Random, pick) -> tuple[State, str, Make]:
    """A list of FlowActions that disagree on SDE vs ODE (a step is one or the other for all)."""
    state = pick(("vec",), ("image",))
    with_lp = rng.random() < 0.5
    flags = [rng.random() < 0.5 for _ in range(N)]
    if len(set(flags)) == 1:  # make them disagree
        flags[rng.randrange(N)] = not flags[0]

    def make() -> list:
        return [
            FlowAction(x_next=_latent(rng, state, False), log_prob=-1.0 if with_lp else None, stochastic=f)
            for f in flags
        ]

    return state, f"[FlowAction(stochastic={flags}, log_prob={'-1' if with_lp else 'None'})]", make


def f_stochastic_type(rng: random.Random, pick) -> tuple[State, str, Make]:
    """``stochastic`` given something that is not a bool ('yes', 1, 0.5...): never coerced."""
    state = pick(("single", "vec"), ("image",))
    value = rng.choice(["yes", "no", "true", "False", "1", 1, 0, 0.0, 0.5, 2, [True], "sde", torch.tensor(True)])
    x = _latent(rng, state)
    return state, f"FlowAction(stochastic={value!r})", lambda: FlowAction(x_next=x, stochastic=value)


def f_after_end(rng: random.Random, pick) -> tuple[State, str, Make]:
    """Any action after the episode ended (reset first)."""
    state = pick(("single", "vec"), ("done",))
    options: list[tuple[str, Make]] = [
        ("a TextAction after the end", lambda: _text_action(rng, state)),
        ("a FlowAction after the end", lambda: _flow_action(rng, state)),
    ]
    if state.kind == "vec":
        options.append(("[TextAction] * N after the end", lambda: [TextAction(tokens=[EOT])] * N))
        options.append(("[FlowAction] * N after the end", lambda: [FlowAction(x_next=_latent(rng, state, False))] * N))
    return state, *rng.choice(options)


def f_unknown_field(rng: random.Random, pick) -> tuple[State, str, Make]:
    """A misspelled or unknown field (never ignored), or a missing required one."""
    state = pick(("single", "vec"), ("text", "image"))
    if state.phase == "text":
        segment = _segment(rng, State("single", "text"))
        options: list[tuple[str, Make]] = [
            (
                "TextAction(tokens=..., log_prob=-0.5)",
                lambda: TextAction(tokens=segment, log_prob=[-0.5] * len(segment)),
            ),
            ("TextAction(token=...)", lambda: TextAction(token=segment)),
            ("TextAction(tokens=..., length=...)", lambda: TextAction(tokens=[segment] * N, length=[1] * N)),
            ("TextAction(tokens=..., stochastic=True)", lambda: TextAction(tokens=segment, stochastic=True)),
            ("TextAction()", lambda: TextAction()),
            ("TextAction(lengths=[1])", lambda: TextAction(lengths=[1])),
        ]
        return state, *rng.choice(options)
    x = _latent(rng, state)
    options = [
        ("FlowAction(x_next=..., log_probs=-1.0)", lambda: FlowAction(x_next=x, log_probs=-1.0)),
        ("FlowAction(x_next=..., logprob=-1.0)", lambda: FlowAction(x_next=x, logprob=-1.0)),
        ("FlowAction(x=...)", lambda: FlowAction(x=x)),
        ("FlowAction(x_next=..., tokens=[3])", lambda: FlowAction(x_next=x, tokens=[3])),
        ("FlowAction()", lambda: FlowAction()),
        ("FlowAction(log_prob=-1.0)", lambda: FlowAction(log_prob=-1.0)),
    ]
    return state, *rng.choice(options)


def f_bools(rng: random.Random, pick) -> tuple[State, str, Make]:
    """Python or numpy booleans where numbers are expected (True is not token 1)."""
    state = pick(("single", "vec"), ("text", "image"))
    if state.phase == "text":
        segment: list[Any] = _segment(rng, State("single", "text"))
        segment[rng.randrange(len(segment))] = rng.choice([True, False, np.True_])
        lp: list[Any] = [-0.5] * len(segment)
        lp[rng.randrange(len(lp))] = rng.choice([True, False])
        lengths: list[Any] = [1] * N
        lengths[rng.randrange(N)] = rng.choice([True, False])
        options: list[tuple[str, Make]] = [
            (f"TextAction(tokens={segment})", lambda: TextAction(tokens=segment)),
            ("TextAction(tokens=True)", lambda: TextAction(tokens=True)),
            ("TextAction(tokens=<np bool array>)", lambda: TextAction(tokens=np.array([True, False]))),
            (f"TextAction(log_probs={lp})", lambda: TextAction(tokens=[3] * len(lp), log_probs=lp)),
            ("TextAction(log_probs=False)", lambda: TextAction(tokens=[3], log_probs=False)),
            (f"TextAction(tokens=[[3]] * N, lengths={lengths})", lambda: TextAction(tokens=[[3]] * N, lengths=lengths)),
        ]
        return state, *rng.choice(options)
    x = _latent(rng, state)
    nested = x.tolist()
    leaf = nested
    while isinstance(leaf[0], list):
        leaf = leaf[rng.randrange(len(leaf))]
    leaf[rng.randrange(len(leaf))] = rng.choice([True, False])
    options = [
        ("FlowAction(x_next=<nested list holding a bool>)", lambda: FlowAction(x_next=nested)),
        ("FlowAction(x_next=True)", lambda: FlowAction(x_next=True)),
        ("FlowAction(log_prob=True)", lambda: FlowAction(x_next=x, log_prob=True)),
        ("FlowAction(log_prob=np.False_)", lambda: FlowAction(x_next=x, log_prob=np.False_)),
        ("FlowAction(log_prob=[False] * N)", lambda: FlowAction(x_next=x, log_prob=[False] * state.n)),
        ("FlowAction(x_next=<bool tensor>)", lambda: FlowAction(x_next=x > 0)),
        ("FlowAction(x_next=<np bool array>)", lambda: FlowAction(x_next=(x > 0).numpy())),
    ]
    return state, *rng.choice(options)


def f_wrong_device(rng: random.Random, pick) -> tuple[State, str, Make]:
    """Tensors on another device than the env's (``meta`` stands for one here)."""
    state = pick(("single", "vec"), ("text", "image"))
    meta = torch.device("meta")
    if state.phase == "image":
        x = _latent(rng, state)
        options: list[tuple[str, Make]] = [
            ("FlowAction(x_next=<on meta>)", lambda: FlowAction(x_next=x.to(meta))),
            (
                "FlowAction(log_prob=<on meta>)",
                lambda: FlowAction(x_next=x, log_prob=torch.zeros(x.shape[:-3], device=meta).squeeze()),
            ),
        ]
        if state.kind == "vec":
            options += [
                (
                    "[FlowAction(x_next=<on meta>), ...]",
                    lambda: _per_episode_flow(rng, state, {"x_next": lambda v: v.to(meta)}),
                ),
                (
                    "[FlowAction(log_prob=<on meta>), ...]",
                    lambda: _per_episode_flow(rng, state, {"log_prob": lambda v: torch.tensor(v, device=meta)}),
                ),
            ]
        return state, *rng.choice(options)
    if state.kind == "single":
        segment = torch.tensor(_segment(rng, state))
        options = [
            ("TextAction(tokens=<on meta>)", lambda: TextAction(tokens=segment.to(meta))),
            (
                "TextAction(log_probs=<on meta>)",
                lambda: TextAction(tokens=segment, log_probs=torch.zeros(segment.shape, device=meta)),
            ),
        ]
        return state, *rng.choice(options)
    tokens, lengths = _batch(rng, state)
    options = [
        ("TextAction(tokens=<[N, L] on meta>)", lambda: TextAction(tokens=tokens.to(meta), lengths=lengths)),
        (
            "TextAction(lengths=<on meta>)",
            lambda: TextAction(tokens=tokens, lengths=torch.tensor(lengths, device=meta)),
        ),
        (
            "TextAction(log_probs=<on meta>)",
            lambda: TextAction(tokens=tokens, lengths=lengths, log_probs=torch.zeros(tokens.shape, device=meta)),
        ),
        (
            "[TextAction(tokens=<on meta>), ...]",
            lambda: _per_episode_text(rng, state, {"tokens": lambda t: t.to(meta)}),
        ),
        (
            "[TextAction(log_probs=<on meta>), ...]",
            lambda: _per_episode_text(rng, state, {"log_probs": lambda t: t.to(meta)}),
        ),
    ]
    return state, *rng.choice(options)


def f_sparse(rng: random.Random, pick) -> tuple[State, str, Make]:
    """Sparse tensors where dense ones are expected."""
    state = pick(("single", "vec"), ("text", "image"))
    if state.phase == "image":
        x = _latent(rng, state)
        options: list[tuple[str, Make]] = [
            ("FlowAction(x_next=<sparse>)", lambda: FlowAction(x_next=x.to_sparse())),
            (
                "FlowAction(log_prob=<sparse>)",
                lambda: FlowAction(x_next=x, log_prob=torch.full((state.n,), -1.0).to_sparse()),
            ),
        ]
        return state, *rng.choice(options)
    if state.kind == "single":
        segment = torch.tensor(_segment(rng, state))
        return state, "TextAction(tokens=<sparse>)", lambda: TextAction(tokens=segment.to_sparse())
    tokens, lengths = _batch(rng, state)
    options = [
        ("TextAction(tokens=<sparse [N, L]>)", lambda: TextAction(tokens=tokens.to_sparse(), lengths=lengths)),
        ("TextAction(lengths=<sparse>)", lambda: TextAction(tokens=tokens, lengths=torch.tensor(lengths).to_sparse())),
        (
            "TextAction(log_probs=<sparse>)",
            lambda: TextAction(tokens=tokens, lengths=lengths, log_probs=-torch.rand(tokens.shape).to_sparse()),
        ),
    ]
    return state, *rng.choice(options)


FAMILIES: dict[str, Callable] = {
    "wrong Python type (a field)": f_wrong_type_field,
    "wrong Python type (the action)": f_wrong_type_action,
    "float where an int is required": f_float_for_int,
    "wrong tensor dtype": f_wrong_dtype,
    "wrong shape": f_wrong_shape,
    "NaN / inf": f_non_finite,
    "token id out of vocabulary": f_out_of_vocab,
    "tokens after end-of-thinking": f_after_eot,
    "over the token budget / closed episode": f_over_budget,
    "positive token log-prob": f_positive_log_probs,
    "vector log_prob in a list": f_vector_log_prob_in_list,
    "list: wrong length / kinds / partial log-probs": f_list_length_or_kinds,
    "wrong phase": f_wrong_phase,
    "mixed SDE/ODE flags in a list": f_mixed_stochastic,
    "stochastic flag not a bool": f_stochastic_type,
    "step after the end": f_after_end,
    "unknown / missing field": f_unknown_field,
    "booleans as numbers": f_bools,
    "wrong device": f_wrong_device,
    "sparse tensor": f_sparse,
}


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Tally:
    tried: int = 0
    construction: int = 0
    step: int = 0
    accepted: int = 0
    unexpected: int = 0
    divergences: int = 0


def _check_constants() -> None:
    """The constants above are t2i_reason's; stop if the scenario changed them."""
    raw = gym.make("unigrpo/T2IReason-v0").unwrapped
    codec = raw.text_codec
    found = (
        codec.vocab_size,
        codec.eot_id,
        codec.max_tokens,
        tuple(raw.image_codec.latent_shape),
        raw.scenario.num_steps,
    )
    if found != (V, EOT, M, LATENT, STEPS):
        raise SystemExit(f"t2i_reason changed: (vocab, eot, max_tokens, latent, steps) = {found}; update the constants")


def run(cases: int, seed: int) -> dict[str, Any]:
    _check_constants()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pool = Pool()
    total = Tally()
    families: dict[str, Tally] = collections.defaultdict(Tally)
    unexpected: dict[str, list[str]] = collections.defaultdict(list)
    accepted: list[str] = []
    divergences: list[str] = []
    where: collections.Counter = collections.Counter()
    started = time.perf_counter()
    names = list(FAMILIES)
    while total.tried < cases:
        family = names[total.tried % len(names)] if total.tried < len(names) else rng.choice(names)

        def pick(kinds: tuple[str, ...], phases: tuple[str, ...]) -> State:
            return rng.choice([s for s in STATES if s.kind in kinds and s.phase in phases])

        try:
            state, description, make = FAMILIES[family](rng, pick)
        except _Skip:
            continue
        label = f"[{state}] {description}"
        counts = families[family]
        total.tried += 1
        counts.tried += 1
        where[(state.kind, state.phase)] += 1
        try:
            action = make()
        except ValidationError:
            total.construction += 1
            counts.construction += 1
            continue
        except _Skip:  # the state drawn cannot hold this case: not counted
            total.tried -= 1
            counts.tried -= 1
            where[(state.kind, state.phase)] -= 1
            continue
        except Exception as exc:  # noqa: BLE001 - counted and reported
            total.unexpected += 1
            counts.unexpected += 1
            unexpected[f"construction: {type(exc).__name__}"].append(f"{label}: {_short(exc)}")
            continue
        env = pool.get(state)
        before = pool.snapshots[state]
        changed = False
        try:
            env.step(action)
        except InvalidActionError:
            total.step += 1
            counts.step += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported
            total.unexpected += 1
            counts.unexpected += 1
            unexpected[f"step: {type(exc).__name__}"].append(f"{label}: {_short(exc)}")
        else:
            total.accepted += 1
            counts.accepted += 1
            accepted.append(label)
            changed = True
        parts = diverged(before, env)
        if parts and not changed:
            total.divergences += 1
            counts.divergences += 1
            divergences.append(f"{label}: {', '.join(parts)} changed")
        if parts or changed:
            pool.drop(state)
    seconds = time.perf_counter() - started
    twins = _twin_check(pool)
    controls = _controls(random.Random(seed + 1))
    return {
        "total": total,
        "families": dict(families),
        "unexpected": dict(unexpected),
        "accepted": accepted,
        "divergences": divergences,
        "seconds": seconds,
        "rebuilt": pool.rebuilt,
        "twins": twins,
        "controls": controls,
        "where": where,
    }


def _control_makes(rng: random.Random, state: State) -> list[Make]:
    """Valid actions for ``state``, made by the same helpers the families spoil."""
    if state.phase == "text" and state.kind == "single":
        segment = _segment(rng, state)
        return [
            lambda: TextAction(tokens=segment),
            lambda: TextAction(tokens=segment, log_probs=[-0.5] * len(segment)),
        ]
    if state.phase == "text":
        tokens, lengths = _batch(rng, state)
        return [
            lambda: TextAction(tokens=tokens, lengths=lengths, log_probs=-torch.rand(tokens.shape)),
            lambda: _per_episode_text(rng, state, {}),
        ]
    makes: list[Make] = [
        lambda: FlowAction(x_next=_latent(rng, state), log_prob=-torch.rand(state.n).squeeze() * 9),
        lambda: FlowAction(x_next=_latent(rng, state), stochastic=False),
    ]
    if state.kind == "vec":
        makes.append(lambda: _per_episode_flow(rng, state, {}))
    return makes


def _controls(rng: random.Random) -> tuple[int, int, list[str]]:
    """Each valid control action on a fresh env of each state: all must be accepted (so a family's
    case differs from a valid one by its defect only)."""
    accepted, tried, refused = 0, 0, []
    for state in STATES:
        if state.phase == "done":
            continue
        for make in _control_makes(rng, state):
            tried += 1
            try:
                build(state).step(make())
                accepted += 1
            except Exception as exc:  # noqa: BLE001 - reported
                refused.append(f"[{state}] {type(exc).__name__}: {_short(exc)}")
    return accepted, tried, refused


def _twin_check(pool: Pool) -> tuple[int, int]:
    """Finish every pooled env and a twin that never saw a malformed action; count equal pairs."""
    same = 0
    for state, env in pool.envs.items():
        twin = build(state)
        r_env, r_twin = finish(env), finish(twin)
        raw, raw_twin = (e.unwrapped if isinstance(e, gym.Env) else e for e in (env, twin))
        equal_reward = (r_env is None and r_twin is None) or np.array_equal(
            np.asarray(r_env, dtype=np.float64), np.asarray(r_twin, dtype=np.float64), equal_nan=True
        )
        same += int(_same_end(raw, raw_twin, equal_reward))
    return same, len(pool.envs)


def _same_end(a: Any, b: Any, equal_reward: bool) -> bool:
    vec = isinstance(a, unigrpo_env.InterleavedVectorEnv)
    ta, tb = (e.trajectories() if vec else e.trajectory for e in (a, b))
    return equal_reward and ta == tb


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="malformed actions to try (default 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the cases (default 0)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="gymnasium")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = run(args.cases, args.seed)
    t: Tally = out["total"]
    print(f"unigrpo-env action fuzzer: seed {args.seed}, torch {torch.__version__}, {platform.machine()} "
          f"{os.cpu_count()} cores, {torch.get_num_threads()} thread(s)")  # fmt: skip
    print(f"  tried                   {t.tried:>7,}")
    print(f"  rejected at construction {t.construction:>6,}  (pydantic ValidationError)")
    print(f"  rejected by step        {t.step:>7,}  (an InvalidActionError subclass)")
    print(f"  wrongly accepted        {t.accepted:>7,}")
    print(f"  unexpected exceptions   {t.unexpected:>7,}  in {len(out['unexpected'])} type(s)")
    print(f"  state divergences       {t.divergences:>7,}")
    same, pooled = out["twins"]
    print(
        f"  twin check              {same} of {pooled} pooled envs finished equal to a twin that saw no malformed action"
    )
    where = out["where"]
    print("  by env and phase        " + ", ".join(
        f"{'gym.make' if kind == 'single' else 'make_vec'} {phase} {where[(kind, phase)]:,}"
        for kind in ("single", "vec") for phase in ("text", "image", "done")
    ))  # fmt: skip
    ok, tried, refused = out["controls"]
    print(f"  valid controls          {ok} of {tried} accepted (valid actions from the same generators)")
    for line in refused:
        print(f"  a valid control was refused: {line}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"  peak resident memory    {peak:.0f} MiB (the fuzzer's process)")
    print(f"  wall time               {out['seconds']:.1f} s ({1e3 * out['seconds'] / max(t.tried, 1):.2f} ms a case)")
    for kind, examples in out["unexpected"].items():
        print(f"  unexpected {kind}: {len(examples)}, e.g. {examples[0]}")
    for label in out["accepted"][:10]:
        print(f"  wrongly accepted: {label}")
    for label in out["divergences"][:10]:
        print(f"  divergence: {label}")
    print()
    print(f"  {'family':<48} {'tried':>6} {'constr.':>7} {'step':>6} {'accepted':>8} {'unexp.':>6} {'diverg.':>7}")
    for name in FAMILIES:
        f = out["families"].get(name, Tally())
        print(
            f"  {name:<48} {f.tried:>6} {f.construction:>7} {f.step:>6} {f.accepted:>8} {f.unexpected:>6} {f.divergences:>7}"
        )
    bad = t.accepted + t.unexpected + t.divergences + (pooled - same) + (tried - ok)
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
