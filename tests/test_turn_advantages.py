"""Advantages with turn rewards: the return-to-go and its per-turn and per-batch normalisations,
computed by hand, and the agent training on episodes of their own lengths."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import write_tiny_checkpoint

from unigrpo_env import TurnFeedback, TurnInputs
from unigrpo_env.agents.config import UniGRPOConfig
from unigrpo_env.agents.losses import returns_to_go, turn_advantages
from unigrpo_env.agents.unigrpo import UniGRPOAgent
from unigrpo_env.scenarios.shapes.edit_multiturn import EditMultiTurnScenario
from unigrpo_env.scenarios.shapes.policy import load_shapes_policy

NAN = math.nan
EPS = 1e-4


def test_returns_to_go_by_hand():
    # row 0 plays 1 turn, row 1 two, row 2 three; γ = 0.5
    turn_rewards = torch.tensor([[1.0, NAN, NAN], [1.0, 2.0, NAN], [NAN, 1.0, 1.0]])
    terminal = torch.tensor([2.0, 4.0, 0.0])
    returns = returns_to_go(turn_rewards, terminal, torch.tensor([1, 2, 3]), discount=0.5)
    expected = torch.tensor(
        [
            [1 + 2, NAN, NAN],  # the terminal reward arrives at the row's own last turn
            [1 + 0.5 * (2 + 4), 2 + 4, NAN],
            [0 + 0.5 * (1 + 0.5 * (1 + 0)), 1 + 0.5 * (1 + 0), 1 + 0],
        ]
    )
    assert torch.allclose(returns, expected, equal_nan=True)
    # an unscored row (NaN terminal) has no return at any turn
    assert torch.isnan(returns_to_go(turn_rewards, torch.tensor([NAN, 4.0, 0.0]), torch.tensor([1, 2, 3]))[0]).all()


def test_turn_and_batch_advantages_by_hand():
    returns = torch.tensor([[3.0, NAN, NAN], [4.0, 6.0, NAN], [0.75, 1.5, 1.0], [1.0, NAN, NAN]])
    groups = torch.tensor([0, 0, 0, 1])
    per_turn = turn_advantages(returns, groups, mode="turn", eps=EPS)
    # turn 0, group 0: 3, 4, 0.75 -> mean 2.5833.., population std
    mean0 = (3 + 4 + 0.75) / 3
    std0 = math.sqrt(((3 - mean0) ** 2 + (4 - mean0) ** 2 + (0.75 - mean0) ** 2) / 3)
    assert per_turn[:3, 0].tolist() == pytest.approx([(v - mean0) / (std0 + EPS) for v in (3, 4, 0.75)], rel=1e-5)
    # turn 1, group 0: only rows 1 and 2 played it: 6 and 1.5 -> ±2.25 / (2.25 + eps); row 0 gets 0
    assert per_turn[:3, 1].tolist() == pytest.approx([0.0, 2.25 / (2.25 + EPS), -2.25 / (2.25 + EPS)], rel=1e-5)
    # turn 2: one row alone in its group, and a group of one: no signal
    assert per_turn[:, 2].tolist() == [0.0, 0.0, 0.0, 0.0] and per_turn[3].tolist() == [0.0, 0.0, 0.0]
    # batch: every played (row, turn) of the batch together
    played = [3.0, 4.0, 6.0, 0.75, 1.5, 1.0, 1.0]
    mean = sum(played) / len(played)
    std = math.sqrt(sum((v - mean) ** 2 for v in played) / len(played))
    batch = turn_advantages(returns, groups, mode="batch", eps=EPS)
    assert batch[1, 1].item() == pytest.approx((6.0 - mean) / (std + EPS), rel=1e-5)
    assert batch[0, 1].item() == 0.0 and batch[3, 0].item() == pytest.approx((1.0 - mean) / (std + EPS), rel=1e-5)
    with pytest.raises(ValueError, match="unknown advantage mode"):
        turn_advantages(returns, groups, mode="episode")


class Stopping(EditMultiTurnScenario):
    """edit_multiturn whose episode ``i`` of a batch stops after ``i % 3 + 1`` turns; turn k's reward is 0.1·k."""

    name = "stopping"

    def respond(self, inputs: TurnInputs) -> TurnFeedback:
        k = inputs.turn + 1
        prompts = [task.prompts[k] if k < int(row) % 3 + 1 else None for row, task in zip(inputs.rows, inputs.tasks)]
        return TurnFeedback(next_prompts=prompts, rewards=torch.full((len(inputs),), 0.1 * inputs.turn))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    write_tiny_checkpoint(root)
    return root


def _config(checkpoint, **overrides) -> UniGRPOConfig:
    base = dict(num_prompts=2, group_size=3, minibatches=1, sde_window_size=None, checkpoint=str(checkpoint))
    return UniGRPOConfig(**{**base, **overrides})


@pytest.mark.parametrize("advantage", ["trajectory", "turn", "batch"])
def test_the_agent_trains_on_episodes_of_their_own_length(checkpoint, advantage):
    scenario = Stopping(num_turns=3, num_steps=3)
    agent = UniGRPOAgent(
        load_shapes_policy(checkpoint), _config(checkpoint, advantage=advantage, turn_discount=0.9), scenario=scenario
    )
    batch = agent.collect(0)
    trajectory = batch.trajectory
    played = trajectory.turns_played()
    assert played.tolist() == [i % 3 + 1 for i in range(6)]
    turn_rewards = torch.stack([t.rewards for t in trajectory.turns], 1)
    groups = torch.as_tensor(trajectory.group_ids)  # one process: the prompts' groups, in batch order
    if advantage == "trajectory":
        assert batch.turn_advantages is None
        returns = trajectory.rewards + torch.nan_to_num(turn_rewards, nan=0.0).sum(dim=1)
        assert torch.isclose(returns[1], trajectory.rewards[1] + 0.1)  # turns 0 and 1: 0 + 0.1
    else:
        assert batch.turn_advantages.shape == (6, 3)
        returns = returns_to_go(turn_rewards, trajectory.rewards, played, 0.9)
        expected = turn_advantages(returns, groups, mode=advantage, eps=agent.config.advantage_eps)
        assert torch.allclose(batch.turn_advantages, expected)
        not_played = torch.arange(3)[None] >= played[:, None]
        assert (batch.turn_advantages[not_played] == 0).all()
    # each side's mean weighs a turn by the episodes that played it: 6, 4 and 2 of them
    weights = agent._turn_weights(batch, [0, 1, 2], torch.arange(6), batch.valid)
    assert [round(float(w), 6) for w in weights.values()] == [0.5, round(4 / 12, 6), round(2 / 12, 6)]
    stats = agent.update(batch)
    assert stats["first_ratio_text_max_dev"] == 0.0 and stats["first_ratio_image_max_dev"] == 0.0  # on-policy
    assert math.isfinite(stats["loss"]) and stats["image_log_prob_drift"] < 1e-4


def test_images_per_text_takes_trajectory_advantages():
    with pytest.raises(ValueError, match="takes advantage='trajectory'"):
        UniGRPOConfig(images_per_text=2, group_size=4, advantage="turn")
