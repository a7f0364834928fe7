"""Environments that respond: after each image the scenario answers (``Scenario.respond``) with
each row's next prompt or the end of its episode and a turn reward; episodes of one batch play
their own number of turns, and the record, the files and both environments follow."""

from __future__ import annotations

import copy
import json
import math
import time

import numpy as np
import pytest
import torch
from conftest import ToyScenario
from gymnasium.utils.env_checker import check_env
from safetensors import safe_open
from safetensors.torch import save_file

import unigrpo_env
from unigrpo_env import FlowAction, InterleavedEnv, TextAction, Trajectory, TurnFeedback, TurnInputs

STOP = 2  # "</think>" in the toy vocabulary


class Countdown(ToyScenario):
    """Row i (or, ``by_task``, the task of index i) plays ``i % 3 + 1`` turns; turn k's reward is k + 1."""

    name = "countdown"

    def __init__(self, by_task: bool = False, **options):
        super().__init__(**options)
        self.by_task = by_task
        self.calls: list[TurnInputs] = []

    def turns_of(self, row: int, task) -> int:
        return (task.index if self.by_task else row) % 3 + 1

    def respond(self, inputs: TurnInputs) -> TurnFeedback:
        self.calls.append(inputs)
        prompts = [
            "draw it again" if inputs.turn + 1 < self.turns_of(int(row), task) else None
            for row, task in zip(inputs.rows, inputs.tasks)
        ]
        rewards = torch.full((len(inputs),), float(inputs.turn + 1))
        return TurnFeedback(next_prompts=prompts, rewards=rewards, info=[{"seen": int(r)} for r in inputs.rows])


def play_batch(envs, *, ended_tokens=None, nan_for_ended=False):
    """Play a batch to the end with fixed actions; returns the per-step (rewards, dones)."""
    obs, _ = envs.reset(seed=0)
    n = envs.num_envs
    steps = []
    while True:
        if obs.phase == "text":
            tokens = torch.tensor([[3, STOP]] * n)
            if ended_tokens is not None:
                tokens[~obs.alive] = torch.tensor(ended_tokens)
            action = TextAction(tokens=tokens, lengths=[2] * n)
        else:
            x_next = torch.zeros_like(obs.x_t)
            if nan_for_ended:
                x_next[~obs.alive] = math.nan
            action = FlowAction(x_next=x_next)
        obs, rewards, dones, _, info = envs.step(action)
        steps.append((obs.phase, rewards.copy(), dones.copy(), info))
        if dones.all():
            return obs, steps


def test_the_vector_env_ends_each_row_at_its_own_turn_with_its_turn_rewards(tmp_path):
    scenario = Countdown(num_steps=2)
    envs = unigrpo_env.make_vec(scenario, num_prompts=3, group_size=2)  # N = 6: rows play 1, 2, 3, 1, 2, 3 turns
    obs, steps = play_batch(envs)
    trajectory = envs.trajectory
    want = [i % 3 + 1 for i in range(6)]
    assert trajectory.turns_played().tolist() == want and trajectory.terminated
    # the steps that finished an image: per row, the turn reward (turn + 1) and, at its last, the terminal reward
    image_ends = [(phase, r, d, info) for phase, r, d, info in steps if "next_prompt" in info]
    assert len(image_ends) == 3
    terminal = trajectory.rewards.numpy()
    for k, (_, rewards, dones, info) in enumerate(image_ends):
        for i in range(6):
            if want[i] > k:  # row i played turn k
                expected = (k + 1) + (terminal[i] if want[i] == k + 1 else 0.0)
                assert rewards[i] == pytest.approx(expected), (k, i)
                assert info["_next_prompt"][i] and (info["next_prompt"][i] is None) == (want[i] == k + 1)
            else:
                assert rewards[i] == 0.0 and not info["_next_prompt"][i]
            assert dones[i] == (want[i] <= k + 1)  # from its own last step on
    # the other steps give nothing and end nothing new
    assert all((r == 0).all() for _, r, _, info in steps if "next_prompt" not in info)
    # each row's own record: only its turns, with their rewards and prompts
    for i in range(6):
        episode = trajectory.episode(i)
        assert [t.reward for t in episode.turns] == [float(k + 1) for k in range(want[i])]
        assert [t.prompt for t in episode.turns] == [f"draw a {episode.task.category} dot"] + ["draw it again"] * (
            want[i] - 1
        )
        assert episode.terminated and episode.reward == pytest.approx(float(terminal[i]))
        path = episode.save(tmp_path / f"e{i}.safetensors")
        assert Trajectory.load(path) == episode
    # the reward scored each row's own last image: rows of one cohort in one call
    turns = trajectory.turns
    assert [int(t.rows.sum()) for t in turns] == [6, 4, 2]
    assert all(obs.alive.logical_not())


def test_actions_for_ended_rows_are_ignored_and_leave_the_record_unchanged():
    envs = unigrpo_env.make_vec(Countdown(num_steps=2), num_prompts=3, group_size=2)
    play_batch(envs)
    reference = copy.deepcopy([envs.trajectory.episode(i) for i in range(6)])
    # the same batch again, with out-of-vocabulary tokens and NaN latents for every ended row
    play_batch(envs, ended_tokens=[99, 99], nan_for_ended=True)
    assert [envs.trajectory.episode(i) for i in range(6)] == reference


def test_the_single_env_terminates_at_its_episodes_own_end():
    env = InterleavedEnv(Countdown(by_task=True, num_steps=2))
    for index in range(3):  # the tasks of index 0, 1, 2 play 1, 2, 3 turns
        obs, _ = env.reset(seed=0, options={"task_index": index})
        rewards, feedback = [], []
        terminated = False
        while not terminated:
            action = (
                TextAction(tokens=[3, STOP]) if obs.phase == "text" else FlowAction(x_next=torch.zeros_like(obs.x_t))
            )
            obs, reward, terminated, truncated, info = env.step(action)
            rewards.append(reward)
            if "feedback" in info:
                feedback.append(info["feedback"])
        turns = index + 1
        assert len(env.unwrapped.trajectory.turns) == turns and obs.phase == "done" and not truncated
        assert [f["next_prompt"] for f in feedback] == ["draw it again"] * index + [None]
        assert [f["seen"] for f in feedback] == [0] * turns
        ends = [r for r, kind in zip(rewards, _kinds(rewards)) if kind]
        terminal = env.unwrapped.trajectory.reward
        assert sum(rewards) == pytest.approx(sum(range(1, turns + 1)) + terminal)
        assert ends  # the image-finishing steps carried the turn rewards


def _kinds(rewards):
    return [r != 0.0 for r in rewards]


def test_check_env_passes_on_a_responding_scenario():
    check_env(InterleavedEnv(Countdown(by_task=True, num_steps=2)))


class Broken(Countdown):
    name = "broken"

    def __init__(self, mode: str, **options):
        super().__init__(**options)
        self.mode = mode

    def respond(self, inputs):
        if inputs.turn == 0:
            return super().respond(inputs)
        if self.mode == "raise":
            raise RuntimeError("critic offline")
        if self.mode == "hang":
            time.sleep(5)
        if self.mode == "short":
            return TurnFeedback(next_prompts=["again"])
        if self.mode == "not_a_string":
            return TurnFeedback(next_prompts=[7] * len(inputs))
        if self.mode == "rewards_shape":
            return TurnFeedback(next_prompts=[None] * len(inputs), rewards=torch.zeros(len(inputs), 2))
        raise AssertionError(self.mode)


@pytest.mark.parametrize(
    "mode,reason",
    [
        ("raise", "critic offline"),
        ("hang", "did not answer within"),
        ("short", "next prompts for"),
        ("not_a_string", "must be a string or None"),
        ("rewards_shape", "rewards must have shape"),
    ],
)
def test_a_broken_respond_ends_its_rows_with_nan_and_the_reason(mode, reason):
    envs = unigrpo_env.make_vec(Broken(mode, num_steps=2), num_prompts=3, group_size=2, reward_timeout=0.5)
    with pytest.warns(RuntimeWarning) if mode == "hang" else _nothing():
        obs, steps = play_batch(envs)
    trajectory = envs.trajectory
    failed = [i for i in range(6) if i % 3 + 1 > 1]  # the rows that reached the broken second answer
    assert all(math.isnan(float(trajectory.rewards[i])) for i in failed)
    assert all(not math.isnan(float(trajectory.rewards[i])) for i in range(6) if i not in failed)
    info = steps[-1][3]
    assert reason in info["feedback_error"][failed[0]] and info["_feedback_error"].tolist() == [
        i in failed for i in range(6)
    ]
    assert all(len(trajectory.episode(i).turns) == (2 if i in failed else 1) for i in range(6))
    envs.reset(seed=1)  # the environment keeps working


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_max_turns_bounds_an_episode_and_must_be_positive():
    scenario = Countdown(num_steps=2)
    scenario.max_turns = 2
    envs = unigrpo_env.make_vec(scenario, num_prompts=3, group_size=2)
    play_batch(envs)
    assert envs.trajectory.turns_played().tolist() == [1, 2, 2, 1, 2, 2]
    scenario.max_turns = 0
    with pytest.raises(ValueError, match="max_turns must be an integer >= 1"):
        unigrpo_env.make_vec(scenario, num_prompts=3, group_size=2)


def test_the_default_respond_is_the_tasks_script():
    scenario = ToyScenario(num_turns=3)
    task = scenario.tasks("train")[0]
    inputs = TurnInputs(
        rows=torch.tensor([0]), turn=1, images=torch.zeros(1, 4, 4, 3, dtype=torch.uint8), texts=["red"],
        tasks=[task], prompts=[task.prompts[:2]], group_ids=torch.zeros(1, dtype=torch.long),
    )  # fmt: skip
    assert scenario.respond(inputs).next_prompts == [task.prompts[2]]
    last = inputs.model_copy(update={"turn": 2})
    answer = scenario.respond(last)
    assert answer.next_prompts == [None] and answer.rewards is None


def test_a_version_1_trajectory_file_still_loads(tmp_path):
    env = InterleavedEnv(Countdown(by_task=True, num_steps=2))
    obs, _ = env.reset(seed=0, options={"task_index": 1})
    terminated = False
    while not terminated:
        action = TextAction(tokens=[3, STOP]) if obs.phase == "text" else FlowAction(x_next=torch.zeros_like(obs.x_t))
        obs, _, terminated, _, info = env.step(action)
    new = info["trajectory"].save(tmp_path / "v2.safetensors")
    with safe_open(str(new), framework="pt") as f:
        header = json.loads(f.metadata()["trajectory"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for turn in header["turns"]:
        del turn["reward"]  # what version 1 wrote
    save_file(
        tensors,
        str(tmp_path / "v1.safetensors"),
        metadata={"format": "unigrpo-trajectory/1", "trajectory": json.dumps(header)},
    )
    old = Trajectory.load(tmp_path / "v1.safetensors")
    assert [t.reward for t in old.turns] == [None, None] and old.turns[0].segments == info["trajectory"].turns[
        0
    ].segments
    assert [t.reward for t in Trajectory.load(new).turns] == [1.0, 2.0]
    assert np.isfinite(old.reward)
