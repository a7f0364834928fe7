"""Crafted trajectory files (issue: hardening): every malformed or inconsistent file is refused
with one error type, TrajectoryFileError (a ValueError), naming the problem; nothing loads
silently and no code runs."""

from __future__ import annotations

import json

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
