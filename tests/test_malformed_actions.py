"""The edges an outside fuzz found (issue: hardening): malformed actions are refused at
construction with pydantic's ValidationError (a ValueError), never coerced (floats are not
truncated to token ids or lengths), and the batched environment's every dtype and shape path
raises an InvalidActionError subclass and leaves the environment unchanged."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from pydantic import ValidationError

import unigrpo_env
from unigrpo_env import FlowAction, TextAction
from unigrpo_env import errors as E


@pytest.mark.parametrize(
    "build",
    [
        lambda: TextAction(tokens=None),
        lambda: TextAction(tokens=["a", "b"]),
        lambda: TextAction(tokens="ab"),
        lambda: TextAction(tokens=[[3.0], [5.0]]),  # floats are not token ids (were truncated)
        lambda: TextAction(tokens=[3.7]),
        lambda: TextAction(tokens=[True, False]),
        lambda: TextAction(tokens=[[3], [5]], lengths=[1.5, 1]),  # fractional lengths (were truncated)
        lambda: TextAction(tokens=[[3], [5]], lengths=[float("nan"), 1]),
        lambda: TextAction(tokens=[[3], [5]], lengths=[-1, 1]),
        lambda: TextAction(tokens=[3], log_probs="x"),
        lambda: FlowAction(x_next=None),
        lambda: FlowAction(x_next={"a": 1}),
        lambda: FlowAction(x_next="latent"),
        lambda: FlowAction(x_next=[[1, 2], [3]]),  # ragged
        lambda: FlowAction(x_next=torch.zeros(1), log_prob=object()),
    ],
)
def test_a_malformed_action_is_one_error_type_at_construction(build):
    with pytest.raises(ValidationError) as raised:
        build()
    assert isinstance(raised.value, ValueError)
    message = str(raised.value)
    assert "expected" in message or "must" in message, message


def test_integer_inputs_still_convert_without_loss():
    assert TextAction(tokens=[[3], [5]], lengths=[1, 0]).lengths.tolist() == [1, 0]
    assert TextAction(tokens=3).tokens.tolist() == [3] and TextAction(tokens=[]).tokens.dtype == torch.long
    assert FlowAction(x_next=[[1, 2]]).x_next.dtype == torch.float32


@pytest.fixture
def envs(toy_scenario):
    envs = unigrpo_env.make_vec(toy_scenario, num_prompts=1, group_size=2)
    envs.reset(seed=0)
    return envs


def _unchanged(envs, step, error):
    before = copy.deepcopy(envs.trajectories()), envs.phase
    with pytest.raises(error):
        step()
    assert (envs.trajectories(), envs.phase) == before


def test_batched_text_dtype_and_shape_paths(envs):
    tokens = torch.tensor([[3], [3]])
    _unchanged(envs, lambda: envs.step(TextAction(tokens=tokens, lengths=torch.tensor([1.5, 1.0]))), E.ActionDTypeError)
    nan = torch.tensor([float("nan"), 1.0])
    _unchanged(envs, lambda: envs.step(TextAction(tokens=tokens, lengths=nan)), E.ActionDTypeError)
    _unchanged(envs, lambda: envs.step(TextAction(tokens=tokens.float())), E.ActionDTypeError)
    _unchanged(
        envs,
        lambda: envs.step(TextAction(tokens=tokens, log_probs=torch.zeros(2, 1, dtype=torch.long))),
        E.ActionDTypeError,
    )
    _unchanged(envs, lambda: envs.step([TextAction(tokens=[3])]), E.ActionShapeError)


def test_a_list_of_flow_actions_with_a_vector_log_prob_is_refused(envs):
    envs.step(TextAction(tokens=[[3, 2], [3, 2]]))
    x = torch.zeros(3, 4, 4)
    vector = [FlowAction(x_next=x, log_prob=torch.zeros(2)), FlowAction(x_next=x, log_prob=torch.zeros(2))]
    _unchanged(envs, lambda: envs.step(vector), E.ActionShapeError)  # was RuntimeError: shape '[]' is invalid
    mixed = [
        FlowAction(x_next=x, stochastic=True, log_prob=-1.0),
        FlowAction(x_next=x, stochastic=False, log_prob=-1.0),
    ]
    _unchanged(envs, lambda: envs.step(mixed), E.InvalidActionError)
    envs.step(
        [FlowAction(x_next=x, log_prob=-1.0), FlowAction(x_next=x, log_prob=torch.tensor([-2.0]))]
    )  # one number each
    assert envs.trajectory.turns[0].image.log_probs[:, 0].tolist() == [-1.0, -2.0]


@pytest.mark.parametrize(
    "command", [["run", "scenario", "t2i_reason"], ["eval", "scenario", "t2i_reason"], ["pretrain", "shapes"]]
)
def test_out_on_an_existing_file_is_one_line_and_exit_2(command, tmp_path, capsys):
    from unigrpo_env.cli.main import main

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(SystemExit) as done:
        main([*command, "--out", str(a_file)])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "is a file" in err and len(err.strip().splitlines()) == 1, err
    assert a_file.read_text() == "not a folder"


def test_a_hung_reward_times_out_to_nan_scores_and_a_warning(toy_scenario):
    import threading
    import time

    release = threading.Event()

    def hangs(inputs):
        release.wait(30)  # a scorer stuck on a dead connection
        raise RuntimeError("never answered")

    env = unigrpo_env.InterleavedEnv(toy_scenario, reward=hangs, reward_timeout=0.3)
    obs, _ = env.reset(seed=0)
    started = time.monotonic()
    terminated = False
    with pytest.warns(RuntimeWarning, match="did not answer within 0.3 s"):
        while not terminated:  # every turn: a short text, then the denoising steps
            action = TextAction(tokens=[3, 2]) if obs.phase == "text" else FlowAction(x_next=obs.x_t * 0.5)
            obs, reward, terminated, _, info = env.step(action)
    release.set()
    assert time.monotonic() - started < 10 and terminated
    assert reward != reward and "TimeoutError" in info["reward_error"]  # NaN, and the reason
    with pytest.raises(ValueError, match="reward_timeout must be > 0"):
        unigrpo_env.InterleavedEnv(toy_scenario, reward_timeout=0)


# -- found by benchmarks/fuzz_actions.py (docs/reliability.md) ---------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: TextAction(tokens=[True, 3]),  # was token 1
        lambda: TextAction(tokens=[[3], [5]], lengths=[True, 1]),  # was length 1
        lambda: TextAction(tokens=[3], log_probs=False),  # was log-prob 0.0
        lambda: FlowAction(x_next=[[[True, 0.5]]]),  # was 1.0
        lambda: FlowAction(x_next=torch.zeros(3, 4, 4), log_prob=True),
        lambda: FlowAction(x_next=torch.zeros(3, 4, 4), stochastic="yes"),  # was True
        lambda: FlowAction(x_next=torch.zeros(3, 4, 4), stochastic=0),  # was False
        lambda: TextAction(tokens=[3], log_prob=[-0.5]),  # a misspelled field was ignored
        lambda: FlowAction(x_next=torch.zeros(3, 4, 4), log_probs=-1.0),
        lambda: TextAction(tokens=bytearray(b"\x03\x05")),  # was tokens [3, 5]
        lambda: TextAction(tokens=torch.tensor([3, 2]).to_sparse()),  # was NotImplementedError in step
        lambda: FlowAction(x_next=torch.zeros(3, 4, 4).to_sparse()),
        lambda: TextAction(tokens=[[3], [5]], lengths=torch.tensor([1, 1]).to_sparse()),
    ],
)
def test_booleans_unknown_fields_and_sparse_tensors_are_refused_at_construction(build):
    with pytest.raises(ValidationError) as raised:
        build()
    message = str(raised.value)
    assert "expected" in message or "must" in message or "Extra inputs" in message, message


@pytest.mark.parametrize(
    ("build", "example"),
    [
        (lambda: TextAction([3]), "TextAction(tokens=...)"),  # was a bare TypeError from pydantic
        (lambda: TextAction([3], [-0.5]), "TextAction(tokens=...)"),
        (lambda: FlowAction(torch.zeros(3, 4, 4)), "FlowAction(x_next=...)"),
        (lambda: FlowAction(torch.zeros(3, 4, 4), log_prob=-1.0), "FlowAction(x_next=...)"),
    ],
)
def test_positional_arguments_are_the_same_error_type_naming_the_keyword(build, example):
    with pytest.raises(ValidationError, match=re.escape(example)) as raised:
        build()
    assert isinstance(raised.value, ValueError)


def test_lengths_tensors_of_any_dtype_or_device_reach_the_env_checks(envs):
    """Complex, meta and wide unsigned lengths raised NotImplementedError or RuntimeError at construction."""
    tokens = torch.tensor([[3], [3]])
    complex_lengths = torch.tensor([1, 1], dtype=torch.complex64)
    _unchanged(envs, lambda: envs.step(TextAction(tokens=tokens, lengths=complex_lengths)), E.ActionDTypeError)
    meta_lengths = torch.tensor([1, 1], device="meta")
    _unchanged(envs, lambda: envs.step(TextAction(tokens=tokens, lengths=meta_lengths)), E.ActionDeviceError)
    huge = torch.tensor([2**63 + 1, 1], dtype=torch.uint64)
    _unchanged(envs, lambda: envs.step(TextAction(tokens=tokens, lengths=huge)), E.ActionShapeError)
    envs.step(TextAction(tokens=tokens, lengths=torch.tensor([1, 0], dtype=torch.uint32)))  # valid: unsigned ints
    assert envs.trajectory.turns[0].text.lengths.tolist() == [1, 0]


def test_a_list_of_text_actions_is_checked_per_episode_before_it_is_stacked(envs):
    """Float token tensors were truncated and integer or complex log-probs converted when the
    segments were copied into one batch; a segment on another device crashed the copy."""
    float_tokens = [TextAction(tokens=torch.tensor([3.7])), TextAction(tokens=[3])]
    _unchanged(envs, lambda: envs.step(float_tokens), E.ActionDTypeError)
    int_log_probs = [TextAction(tokens=[3], log_probs=torch.tensor([-1])), TextAction(tokens=[3], log_probs=[-1.0])]
    _unchanged(envs, lambda: envs.step(int_log_probs), E.ActionDTypeError)
    meta = [TextAction(tokens=torch.tensor([3], device="meta")), TextAction(tokens=[3])]
    _unchanged(envs, lambda: envs.step(meta), E.ActionDeviceError)


def test_a_list_of_flow_actions_is_checked_per_episode_before_it_is_stacked(envs):
    """torch.stack promoted a bf16 or integer latent (or an integer log_prob) among float32 ones
    to float32; latents on two devices raised RuntimeError."""
    envs.step(TextAction(tokens=[[3, 2], [3, 2]]))
    x = torch.zeros(3, 4, 4)
    for odd in (x.bfloat16(), x.long()):
        _unchanged(envs, lambda odd=odd: envs.step([FlowAction(x_next=odd), FlowAction(x_next=x)]), E.ActionDTypeError)
    int_log_prob = [FlowAction(x_next=x, log_prob=torch.tensor(-1)), FlowAction(x_next=x, log_prob=-1.0)]
    _unchanged(envs, lambda: envs.step(int_log_prob), E.ActionDTypeError)
    meta = [FlowAction(x_next=x.to("meta")), FlowAction(x_next=x)]
    _unchanged(envs, lambda: envs.step(meta), E.ActionDeviceError)


def test_the_single_env_refuses_a_log_prob_with_extra_dimensions(toy_scenario):
    env = unigrpo_env.InterleavedEnv(toy_scenario)
    env.reset(seed=0)
    env.step(TextAction(tokens=[3, 2]))
    before = copy.deepcopy(env.trajectory)
    with pytest.raises(E.ActionShapeError):  # was reshaped to [1] and accepted
        env.step(FlowAction(x_next=torch.zeros(3, 4, 4), log_prob=torch.zeros(1, 1)))
    assert env.trajectory == before
    env.step(FlowAction(x_next=torch.zeros(3, 4, 4), log_prob=torch.tensor([-1.0])))  # a number or [1]: fine
    env.step(FlowAction(x_next=torch.zeros(3, 4, 4), log_prob=-2.0))
    assert env.trajectory.turns[0].image.log_prob[:2].tolist() == [-1.0, -2.0]


def test_an_all_empty_text_step_is_refused_naming_the_open_episodes(envs):
    # a batched TextAction whose every row was empty used to be accepted as a no-op, so an agent could
    # loop forever without progress; the single env refuses an empty segment, and now the batch too
    empty = TextAction(tokens=torch.zeros(2, 0, dtype=torch.long))
    _unchanged(envs, lambda: envs.step(empty), E.ActionShapeError)
    zero_lengths = TextAction(tokens=[[3], [3]], lengths=[0, 0])
    _unchanged(envs, lambda: envs.step(zero_lengths), E.ActionShapeError)
    nothing = [TextAction(tokens=torch.zeros(0, dtype=torch.long)), None]
    with pytest.raises(E.ActionShapeError, match=re.escape("episode(s) [0, 1] are still writing")):
        envs.step(nothing)
    envs.step([TextAction(tokens=[3, 2]), None])  # episode 0 closes; episode 1 still writes
    _unchanged(envs, lambda: envs.step([None, None]), E.ActionShapeError)
    with pytest.raises(E.ActionShapeError, match=re.escape("episode(s) [1] are still writing")):
        envs.step(TextAction(tokens=[[3], [3]], lengths=[0, 0]))
    envs.step([None, TextAction(tokens=[2])])
    assert envs.phase == "image"
