"""``images_per_text`` M > 1: each sampled reasoning drawn M times. The M episodes of a block share
one text (sampled once) and draw different images; a text's reward is the mean of its images' and
its advantage is taken over the prompt's texts, an image's over the images of its reasoning; the
text loss counts each text once. M = 1 is the paper's and stays the default."""

from __future__ import annotations

import math

import pytest
import torch
from test_agent import tiny_config

from unigrpo_env.agents.config import UniGRPOConfig
from unigrpo_env.agents.losses import group_advantages
from unigrpo_env.agents.unigrpo import UniGRPOAgent
from unigrpo_env.scenarios.shapes.policy import load_shapes_policy

M = 2


def _agent(tiny_checkpoint, **overrides):
    policy = load_shapes_policy(tiny_checkpoint)
    config = tiny_config(tiny_checkpoint, images_per_text=M, group_size=4, sde_window_size=None, **overrides)
    return UniGRPOAgent(policy, config), policy


def test_a_block_shares_one_text_sampled_once_and_draws_different_images(tiny_checkpoint):
    agent, policy = _agent(tiny_checkpoint)
    sampled_rows = []
    sample = policy.text.sample

    def spy(context, **options):
        sampled_rows.append(len(context))
        return sample(context, **options)

    policy.text.sample = spy
    batch = agent.collect(0)
    n = len(batch)
    assert sampled_rows == [n // M]  # one text per block
    turn = batch.trajectory.turns[0]
    tokens, log_probs = turn.text.padded()
    for first in range(0, n, M):
        block = slice(first, first + M)
        assert torch.equal(tokens[block], tokens[first].expand_as(tokens[block]))
        assert torch.allclose(log_probs[block], log_probs[first].expand_as(log_probs[block]), atol=0, equal_nan=True)
        latents = turn.image.latents[block, -1]
        assert not torch.equal(latents[0], latents[1])  # its own noise per image


def test_text_and_image_advantages_by_hand(tiny_checkpoint):
    agent, _ = _agent(tiny_checkpoint)
    batch = agent.collect(0)
    rewards, n = batch.rewards, len(batch)
    groups = batch.trajectory.group_ids
    text_rewards = rewards.view(-1, M).mean(dim=1)  # no NaN here
    per_text_groups = groups[::M]
    expected_text = group_advantages(text_rewards, per_text_groups, eps=agent.config.advantage_eps)
    assert torch.allclose(batch.text_advantages, expected_text.repeat_interleave(M), atol=1e-6)
    expected_image = torch.cat(
        [group_advantages(rewards[i : i + M], torch.zeros(M), eps=agent.config.advantage_eps) for i in range(0, n, M)]
    )
    assert torch.allclose(batch.advantages, expected_image, atol=1e-6)
    assert batch.text_rows.tolist() == [i % M == 0 for i in range(n)] and bool(batch.text_valid.all())


def test_the_text_loss_counts_each_text_once_and_both_sides_learn_on_policy(tiny_checkpoint):
    agent, policy = _agent(tiny_checkpoint, minibatches=2)
    recomputed_rows = []
    log_probs = policy.text.log_probs

    def spy(context, *args, **options):
        recomputed_rows.append(len(context))
        return log_probs(context, *args, **options)

    policy.text.log_probs = spy
    batch = agent.collect(0)
    batch.text_advantages = torch.linspace(-1, 1, len(batch))  # a signal even if the rewards tie
    batch.advantages = torch.linspace(1, -1, len(batch))
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    stats = agent.update(batch)
    # the old log-probs of minibatch 2, then the loss of minibatches 1 and 2: the first of each block only
    old_second, first, second = recomputed_rows
    assert old_second == second and first + second == len(batch) // M
    assert stats["first_ratio_text_max_dev"] == 0.0 and stats["first_ratio_image_max_dev"] == 0.0
    assert math.isfinite(stats["loss_text"]) and stats["text_log_prob_drift"] < 1e-4
    moved = {name.split(".")[0] for name, p in policy.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert moved == {"text", "image"}


def test_bad_settings_are_clear_errors(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"images_per_text \(3\) must divide group_size \(4\)"):
        UniGRPOConfig(images_per_text=3, group_size=4)
    with pytest.raises(ValueError, match="at least 2 texts per prompt"):
        UniGRPOConfig(images_per_text=4, group_size=4)
    assert UniGRPOConfig(images_per_text=4, group_size=4, train="image").images_per_text == 4
    with pytest.raises(ValueError, match="needs a single-turn scenario"):
        UniGRPOAgent(
            load_shapes_policy(tiny_checkpoint),
            tiny_config(
                tiny_checkpoint,
                images_per_text=2,
                group_size=4,
                scenario="edit_multiturn",
                scenario_options={"num_turns": 2},
            ),
        )
