"""A property-based fuzzer (hypothesis, seeded and bounded): random valid and invalid actions at
random points of random episodes, single and batched, one to three turns. Every invalid action is
refused with a documented error type (pydantic's ValidationError when built, an
InvalidActionError from ``step``) and leaves the environment as a twin that never saw it: the
same trajectory after each refusal, and, at the end, the same trajectory and reward (so no
randomness was consumed either). ``benchmarks/fuzz_actions.py`` runs 10,000 hand-made cases."""

from __future__ import annotations

import copy

import torch
from conftest import ToyScenario
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import unigrpo_env
from unigrpo_env import FlowAction, TextAction
from unigrpo_env.errors import InvalidActionError

WORD = 3  # a token of the toy vocabulary that is not the end-of-thinking token


def _malformed(kind: int, obs, batched: bool, n: int, codec):
    """A malformed action of family ``kind`` for the current observation (built lazily, since
    building may itself be what is refused)."""
    rows = (lambda row: [row] * n) if batched else (lambda row: row)
    latent = obs.x_t if obs.x_t is not None else torch.zeros((n, 3, 4, 4) if batched else (3, 4, 4))
    families = [
        lambda: TextAction(tokens=rows([3.0])),  # floats as token ids
        lambda: TextAction(tokens=rows([codec.vocab_size + 5])),  # out of the vocabulary
        lambda: TextAction(tokens=rows([-1])),
        lambda: TextAction(tokens=rows([codec.eot_id, WORD])),  # a token after the end of thinking
        lambda: TextAction(tokens=rows([WORD] * (codec.max_tokens + 1))),  # over the budget
        lambda: TextAction(tokens=rows([WORD]), log_probs=rows([0.5])),  # a positive log-probability
        lambda: TextAction(tokens=None),
        lambda: FlowAction(x_next=latent * float("nan")),
        lambda: FlowAction(x_next=latent[..., :2]),  # the wrong latent shape
        lambda: FlowAction(x_next=latent.to(torch.float64)),
        lambda: FlowAction(x_next=latent.to(torch.int64)),
        lambda: FlowAction(x_next=latent, log_prob=torch.full((n + 1,), -1.0) if batched else [[-1.0, -2.0]]),
        lambda: "draw it",
        lambda: FlowAction(x_next=latent, stochastic="yes"),
    ]
    return families[kind % len(families)]


def _valid(obs, batched: bool, n: int, close: bool):
    if obs.phase == "text":
        token = WORD if not close else None
        if batched:
            open_rows = obs.text_open.tolist()
            if close:
                return TextAction(tokens=[[2] if o else [0] for o in open_rows], lengths=[int(o) for o in open_rows])
            fits = obs.token_counts < obs.tokens.shape[1] - 1
            return TextAction(tokens=[[token]] * n, lengths=[int(o and f) for o, f in zip(open_rows, fits.tolist())])
        return TextAction(tokens=[2] if close or obs.tokens_left <= 1 else [token])
    return FlowAction(x_next=obs.x_t * 0.9)


def _step(env, action):
    return env.step(action)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    turns=st.integers(1, 3),
    batched=st.booleans(),
    seed=st.integers(0, 2**16),
    moves=st.lists(st.tuples(st.booleans(), st.integers(0, 100), st.booleans()), min_size=1, max_size=25),
)
def test_refused_actions_leave_the_env_as_a_twin_that_never_saw_them(turns, batched, seed, moves):
    scenario = ToyScenario(num_turns=turns)
    n = 2
    make = (lambda: unigrpo_env.make_vec(scenario, 1, n)) if batched else (lambda: unigrpo_env.InterleavedEnv(scenario))
    env, twin = make(), make()
    obs, _ = env.reset(seed=seed)
    twin_obs, _ = twin.reset(seed=seed)
    codec = scenario.text_codec
    record = (lambda e: e.trajectories()) if batched else (lambda e: e.trajectory)
    done = False
    for valid, kind, close in moves:
        if done:
            break
        if valid:
            action = _valid(obs, batched, n, close)
            obs, reward, terminated, *_ = env.step(action)
            twin_obs, twin_reward, *_ = twin.step(action)
            done = bool(terminated if not batched else terminated.all())
            continue
        before = copy.deepcopy(record(env))
        try:
            _step(env, _malformed(kind, obs, batched, n, codec)())
        except (ValidationError, InvalidActionError):
            pass
        else:
            raise AssertionError(f"malformed action of family {kind % 14} was accepted")
        assert record(env) == before
    while not done:  # finish both the same way
        action = _valid(obs, batched, n, close=True)
        obs, reward, terminated, *_ = env.step(action)
        twin_obs, twin_reward, *_ = twin.step(action)
        done = bool(terminated if not batched else terminated.all())
    assert record(env) == record(twin)
    assert torch.equal(torch.as_tensor(reward), torch.as_tensor(twin_reward))
