"""Crafted trajectory files (issue: hardening): every malformed or inconsistent file is refused
with one error type, TrajectoryFileError (a ValueError), naming the problem; nothing loads
silently and no code runs."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import ToyScenario
from safetensors import safe_open
from safetensors.torch import save_file

import unigrpo_env
from unigrpo_env import FlowAction, TextAction, Trajectory
from unigrpo_env.trajectory import TrajectoryFileError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    env = unigrpo_env.InterleavedEnv(ToyScenario())
    obs, _ = env.reset(seed=0)
    terminated = False
    while not terminated:
        action = (
            TextAction(tokens=[3, 2], log_probs=[-0.5, -0.1])
            if obs.phase == "text"
            else FlowAction(x_next=obs.x_t * 0.5)
        )
        obs, _, terminated, _, info = env.step(action)
    path = info["trajectory"].save(tmp_path_factory.mktemp("t") / "good.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    return path, tensors, metadata


def _write(tmp_path, tensors, metadata, header_edit=None):
    header = json.loads(metadata["trajectory"])
    if header_edit is not None:
        header_edit(header)
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, str(path), metadata={**metadata, "trajectory": json.dumps(header)})
    return path


def _set(key, value):
    def edit(header):
        header[key] = value

    return edit


def test_a_good_file_round_trips(saved):
    path, *_ = saved
    assert Trajectory.load(path).terminated


@pytest.mark.parametrize(
    "change",
    [
        ("header", _set("terminated", "yes")),
        ("header", _set("seed", 1.5)),
        ("header", _set("reward", 1e400)),  # JSON's 1e400 reads back as inf
        ("header", _set("reward", "lots")),
        ("header", _set("turns", "none")),
        ("header", lambda h: h.pop("task")),
        ("header", _set("extra", 1)),
        ("header", lambda h: h["turns"][0]["segments"][0].update(kind="audio")),
        ("tensors", lambda t: t.update({"turn0.seg0.extra": torch.zeros(1)})),
        ("tensors", lambda t: t.pop("turn0.seg0.tokens")),
        ("tensors", lambda t: t.update({"turn0.seg0.tokens": t["turn0.seg0.tokens"].to(torch.int32)})),
        ("tensors", lambda t: t.update({"turn0.seg0.log_probs": torch.zeros(7)})),
        ("tensors", lambda t: t.update({"turn0.seg0.tokens": -t["turn0.seg0.tokens"] - 1})),
        ("tensors", lambda t: t.update({"turn0.seg1.t": torch.zeros(99)})),
        ("tensors", lambda t: t.update({"turn0.seg1.x_t": torch.zeros(2, 2)})),
    ],
)
def test_a_crafted_file_is_refused_with_one_error_type(saved, tmp_path, change):
    _, tensors, metadata = saved
    tensors = dict(tensors)
    where, edit = change
    if where == "header":
        path = _write(tmp_path, tensors, metadata, edit)
    else:
        edit(tensors)
        path = _write(tmp_path, tensors, metadata)
    with pytest.raises(TrajectoryFileError) as raised:
        Trajectory.load(path)
    assert isinstance(raised.value, ValueError) and "\n" not in str(raised.value)


def test_deep_json_and_garbage_are_the_same_error(saved, tmp_path):
    _, tensors, metadata = saved
    path = tmp_path / "deep.safetensors"
    save_file(tensors, str(path), metadata={**metadata, "trajectory": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(TrajectoryFileError):
        Trajectory.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(TrajectoryFileError):
        Trajectory.load(tmp_path / "junk.safetensors")


def test_an_oversized_header_is_refused_before_its_tensors_are_read(saved, tmp_path):
    from unigrpo_env.trajectory import MAX_HEADER_BYTES

    _, tensors, metadata = saved
    path = tmp_path / "big.safetensors"
    header = json.loads(metadata["trajectory"])
    header["scenario"] = "x" * (MAX_HEADER_BYTES + 1)
    save_file(tensors, str(path), metadata={**metadata, "trajectory": json.dumps(header)})
    with pytest.raises(TrajectoryFileError, match="more than the"):
        Trajectory.load(path)


def long_trajectory(turns: int) -> Trajectory:
    """A trajectory of ``turns`` turns, each a 2-token text segment and a one-step image segment
    (benchmarks/hostile_inputs.py times loading it too)."""
    from unigrpo_env import Task
    from unigrpo_env.trajectory import ImageSegment, TextSegment, Turn

    text = TextSegment(tokens=torch.tensor([1, 2]), log_probs=torch.tensor([-0.1, -0.2]))
    image = ImageSegment(
        x_t=torch.zeros(1, 1, 1, 1),
        x_next=torch.zeros(1, 1, 1, 1),
        t=torch.ones(1),
        t_next=torch.zeros(1),
        log_prob=torch.zeros(1),
        stochastic=torch.zeros(1, dtype=torch.bool),
    )
    task = Task(prompts=("p",), category="c", split="train", index=0)
    return Trajectory(scenario="toy", task=task, turns=[Turn(prompt="p", segments=[text, image])] * turns, reward=1.0)


def test_loading_is_linear_in_the_number_of_turns(tmp_path):
    # each segment used to scan every tensor name: 8x the turns took 64x the time (20,000 turns: 102 s);
    # now about 9x (the memory of a larger file is slower to reach)
    import time

    seconds = {}
    for turns in (1_000, 8_000):
        path = long_trajectory(turns).save(tmp_path / f"{turns}.safetensors")
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            loaded = Trajectory.load(path)
            best = min(best, time.perf_counter() - start)
        assert len(loaded.turns) == turns and loaded.turns[-1].image.num_steps == 1
        seconds[turns] = best
    assert seconds[8_000] / seconds[1_000] < 12, seconds


def test_an_absurd_number_of_turns_is_refused_before_per_turn_work(saved, tmp_path):
    from unigrpo_env.trajectory import MAX_SEGMENTS_PER_TURN, MAX_TURNS

    _, tensors, metadata = saved
    turn = {"prompt": "p", "segments": []}
    path = _write(tmp_path, tensors, metadata, _set("turns", [turn] * (MAX_TURNS + 1)))
    with pytest.raises(TrajectoryFileError, match=f"at most {MAX_TURNS}"):
        Trajectory.load(path)
    segment = {"kind": "text", "has_image": False}
    path = _write(tmp_path, tensors, metadata, _set("turns", [{"prompt": "p", "segments": [segment] * 17}]))
    with pytest.raises(TrajectoryFileError, match=f"at most {MAX_SEGMENTS_PER_TURN}"):
        Trajectory.load(path)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_file_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    # a FIFO used to block forever in safe_open
    path = tmp_path / "not-a-file.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(TrajectoryFileError, match=f"not a regular file .*{'FIFO' if kind == 'fifo' else 'folder'}"):
        Trajectory.load(path)


@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_reward_is_refused(saved, tmp_path, value):
    # the header's types are strict: true used to load as a reward of 1.0
    _, tensors, metadata = saved
    with pytest.raises(TrajectoryFileError, match="reward"):
        Trajectory.load(_write(tmp_path, tensors, metadata, _set("reward", value)))
    with pytest.raises(TrajectoryFileError, match="reward_components"):
        Trajectory.load(_write(tmp_path, tensors, metadata, _set("reward_components", {"a": value})))


def test_an_integer_reward_loads_as_a_float(saved, tmp_path):
    _, tensors, metadata = saved
    loaded = Trajectory.load(_write(tmp_path, tensors, metadata, _set("reward", 1)))
    assert loaded.reward == 1.0 and isinstance(loaded.reward, float)
