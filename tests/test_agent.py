"""The UniGRPO agent: losses against hand computations, on-policy ratios, which parameters learn,
two processes against one, kill-and-resume, and failing reward scorers."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import trainer_for

from unigrpo_env.agents.config import ConfigError, UniGRPOConfig
from unigrpo_env.agents.losses import (
    TEXT_LOSS_TYPES,
    clipped_surrogate,
    flow_grpo_loss,
    group_advantages,
    text_grpo_loss,
    text_kl,
)
from unigrpo_env.agents.trainer import RunFolderError
from unigrpo_env.agents.unigrpo import RewardFailureError, UniGRPOAgent
from unigrpo_env.reward import RewardOutput
from unigrpo_env.rewards import register_reward
from unigrpo_env.scenarios.shapes.policy import load_shapes_policy

HERE = Path(__file__).parent


# -- losses by hand ---------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(rewards, groups, eps=0.0 + 1e-12)
    std = math.sqrt(2 / 3)  # population std of 1, 2, 3
    assert adv.tolist() == pytest.approx([-1 / std, 0.0, 1 / std, 0.0, 0.0, 0.0], abs=1e-5)
    # NaN rewards are left out of the statistics and get advantage 0
    adv = group_advantages(torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([0, 0, 0]), eps=1e-12)
    assert adv.tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)
    # flow_grpo's global std: centred by group, scaled by the std of all centred rewards
    adv = group_advantages(torch.tensor([0.0, 2.0, 10.0, 10.0]), torch.tensor([0, 0, 1, 1]), eps=1e-12, global_std=True)
    centred = torch.tensor([-1.0, 1.0, 0.0, 0.0])
    assert adv.tolist() == pytest.approx((centred / centred.pow(2).mean().sqrt()).tolist(), abs=1e-5)


def test_clipped_surrogate_by_hand():
    log_ratio = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    value, clipped = clipped_surrogate(log_ratio, adv, 0.2)
    assert value.tolist() == pytest.approx([1.2, -1.5, 0.5, -0.8])
    assert clipped.tolist() == [True, False, False, True]


def test_text_loss_by_hand():
    old = torch.zeros(2, 3)
    new = torch.log(torch.tensor([[1.1, 1.5, 9.0], [0.9, 1.0, 1.0]]))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = text_grpo_loss(new, old, mask, adv, clip_range=0.2)
    row0 = (1.1 * 2 + 1.2 * 2) / 2  # the third token is padding
    row1 = (-0.9 + -1.0 + -1.0) / 3
    assert float(loss) == pytest.approx(-(row0 + row1) / 2, rel=1e-6)
    assert stats["text_clip_fraction"] == pytest.approx(1 / 5)


def test_text_loss_types_by_hand():
    old = torch.zeros(2, 3)
    new = torch.log(torch.tensor([[1.1, 1.5, 9.0], [0.9, 1.0, 1.0]]))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([2.0, -1.0])
    tokens0, tokens1 = 1.1 * 2 + 1.2 * 2, -0.9 + -1.0 + -1.0  # row 0's third token is padding
    bnpo, _ = text_grpo_loss(new, old, mask, adv, clip_range=0.2, loss_type="bnpo")
    assert float(bnpo) == pytest.approx(-(tokens0 + tokens1) / 5, rel=1e-6)
    dr, _ = text_grpo_loss(new, old, mask, adv, clip_range=0.2, loss_type="dr_grpo", max_tokens=4)
    assert float(dr) == pytest.approx(-(tokens0 / 4 + tokens1 / 4) / 2, rel=1e-6)
    only1, _ = text_grpo_loss(new, old, mask, adv, 0.2, torch.tensor([False, True]), loss_type="dr_grpo", max_tokens=4)
    assert float(only1) == pytest.approx(-tokens1 / 4, rel=1e-6)
    with pytest.raises(ValueError, match="max_tokens"):
        text_grpo_loss(new, old, mask, adv, clip_range=0.2, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        text_grpo_loss(new, old, mask, adv, clip_range=0.2, loss_type="mean")


def test_grpo_mean_favours_short_sequences_and_token_means_do_not():
    """With every advantage equal (SFT on the samples), GRPO's per-sequence mean gives a token of a
    short sequence more weight than one of a long sequence; the token-level reductions do not."""
    log_probs = torch.zeros(2, 4, requires_grad=True)  # on-policy; sequences of 1 and 4 tokens
    mask = torch.tensor([[True, False, False, False], [True, True, True, True]])
    weights = {}
    for loss_type in TEXT_LOSS_TYPES:
        loss, _ = text_grpo_loss(
            log_probs, log_probs.detach(), mask, torch.ones(2), 0.2, loss_type=loss_type, max_tokens=8
        )
        (grad,) = torch.autograd.grad(-loss, log_probs)
        weights[loss_type] = grad[mask].tolist()
    assert weights["grpo"] == pytest.approx([1 / 2, 1 / 8, 1 / 8, 1 / 8, 1 / 8])  # 1 / (N·|y_i|)
    assert weights["bnpo"] == pytest.approx([1 / 5] * 5)
    assert weights["dr_grpo"] == pytest.approx([1 / 16] * 5)  # 1 / (N·budget)


def test_text_kl_by_hand():
    new = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.8, 0.1, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.1], [0.4, 0.2, 0.3]]))
    mask = torch.tensor([[True, True, False], [True, True, True]])

    def k3(p, q):  # exp(ref − θ) − (ref − θ) − 1 with θ = log p, ref = log q
        return q / p - math.log(q / p) - 1

    row0 = (k3(0.5, 0.25) + k3(0.25, 0.25)) / 2
    row1 = (k3(0.8, 0.4) + k3(0.1, 0.2) + k3(0.2, 0.3)) / 3
    assert float(text_kl(new, ref, mask)) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert float(text_kl(new, ref, mask, torch.tensor([False, True]))) == pytest.approx(row1, rel=1e-6)
    assert float(text_kl(ref, ref, mask)) == 0.0  # no penalty at the reference


def test_flow_loss_by_hand_and_sample_mask():
    old = torch.zeros(3, 2)
    new = torch.log(torch.tensor([[1.0, 1.0001], [1.0, 0.5], [2.0, 2.0]]))
    adv = torch.tensor([1.0, 1.0, 5.0])
    loss, _ = flow_grpo_loss(new, old, adv, clip_range=1e-3, sample_mask=torch.tensor([True, True, False]))
    expected = -((1.0 + 1.0001) / 2 + (1.0 + 0.5) / 2) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


# -- the agent on a tiny policy ----------------------------------------------------------------------

TINY = dict(
    num_prompts=2, group_size=4, minibatches=1, eval_limit=6, scenario_options={"num_steps": 4}, checkpoint_every=2
)


def tiny_config(tiny_checkpoint, **overrides) -> UniGRPOConfig:
    return UniGRPOConfig(**{**TINY, "checkpoint": str(tiny_checkpoint), **overrides})


def test_first_epoch_is_exactly_on_policy(tiny_checkpoint):
    agent = UniGRPOAgent(load_shapes_policy(tiny_checkpoint), tiny_config(tiny_checkpoint, sde_window_size=None))
    stats = agent.train_iteration()
    assert stats["first_ratio_text_max_dev"] == 0.0 and stats["first_ratio_image_max_dev"] == 0.0
    assert stats["image_log_prob_drift"] < 1e-4 and stats["text_log_prob_drift"] < 1e-4


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo"])
def test_token_level_text_losses_train_on_policy(tiny_checkpoint, loss_type):
    agent = UniGRPOAgent(
        load_shapes_policy(tiny_checkpoint), tiny_config(tiny_checkpoint, train="text", text_loss_type=loss_type)
    )
    batch = agent.collect(0)
    assert [turn.text.max_tokens for turn in batch.trajectory.turns] == [
        agent.scenario.text_codec.max_tokens
    ]  # Dr. GRPO's normaliser
    stats = agent.update(batch)
    assert stats["first_ratio_text_max_dev"] == 0.0 and math.isfinite(stats["loss_text"])


@pytest.mark.parametrize("train", ["both", "text", "image"])
def test_gradients_reach_the_trained_parameter_groups_only(tiny_checkpoint, train):
    policy = load_shapes_policy(tiny_checkpoint)
    agent = UniGRPOAgent(policy, tiny_config(tiny_checkpoint, train=train))
    batch = agent.collect(0)
    batch.advantages = torch.linspace(-1, 1, len(batch))  # a signal even if the rewards tie
    index = torch.arange(len(batch))
    old = agent._old_log_probs(batch, [index])
    loss, _ = agent._loss(batch, index, old)
    loss.backward()

    def reached(params):
        return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)

    text_params, image_params = list(policy.text.parameters()), list(policy.image.parameters())
    assert reached(text_params) == (train in ("both", "text"))
    assert reached(image_params) == (train in ("both", "image"))


def test_text_kl_starts_at_zero_and_is_logged(tiny_checkpoint):
    agent = UniGRPOAgent(load_shapes_policy(tiny_checkpoint), tiny_config(tiny_checkpoint, train="text", kl_text=0.1))
    assert agent.reference_text is not None and agent.reference is None
    stats = agent.train_iteration()
    assert stats["kl_text"] == pytest.approx(0.0, abs=1e-6)  # the first update is at the reference
    assert stats["first_ratio_text_max_dev"] == 0.0
    assert UniGRPOAgent(load_shapes_policy(tiny_checkpoint), tiny_config(tiny_checkpoint)).reference_text is None


def test_reference_outputs_are_computed_once_per_batch_across_ppo_epochs(tiny_checkpoint):
    config = tiny_config(tiny_checkpoint, ppo_epochs=3, minibatches=2, kl_text=0.1, sde_window_size=2)
    agent = UniGRPOAgent(load_shapes_policy(tiny_checkpoint), config)
    calls = {"velocity": 0, "text": 0}
    velocity, log_probs = agent.reference.velocity, agent.reference_text.log_probs

    def count(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return counted

    agent.reference.velocity = count("velocity", velocity)
    agent.reference_text.log_probs = count("text", log_probs)
    batch = agent.collect(0)
    stats = agent.update(batch)
    # each minibatch of the first epoch once (2 SDE steps per image), then the cache
    assert calls == {"velocity": 2 * 2, "text": 2}
    cached = batch.reference_cache[("velocity", 0, batch.trajectory.turns[0].image.sde_steps[0])]
    assert bool(cached[1].all()) and math.isfinite(stats["regularizer_mse"]) and stats["kl_text"] >= 0.0


def test_learning_rates_warm_up_linearly(tiny_checkpoint):
    agent = UniGRPOAgent(
        load_shapes_policy(tiny_checkpoint),
        tiny_config(tiny_checkpoint, warmup_iterations=4, lr_text=1e-3, lr_image=2e-3),
    )
    assert [agent.learning_rate_scale(i) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    stats = agent.train_iteration()
    assert stats["lr_scale"] == 0.25
    assert {g["name"]: g["lr"] for g in agent.optimizer.param_groups} == pytest.approx({"text": 2.5e-4, "image": 5e-4})


def test_learning_rate_schedules_decay_to_zero_after_the_warm_up(tiny_checkpoint):
    def scales(**options):
        agent = UniGRPOAgent(load_shapes_policy(tiny_checkpoint), tiny_config(tiny_checkpoint, iterations=6, **options))
        return [agent.learning_rate_scale(i) for i in range(6)]

    assert scales(lr_schedule="linear", warmup_iterations=2) == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert scales(lr_schedule="cosine") == pytest.approx([(1 + math.cos(math.pi * i / 6)) / 2 for i in range(6)])
    assert scales() == [1.0] * 6


def test_two_processes_give_the_same_advantages_as_one(tmp_path):
    script = HERE / "distributed_advantages.py"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            str(script),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in results] == [2, 2] and sorted(r["rank"] for r in results) == [0, 1]
    # one process over the whole batch, in the gathered order (rank 0's episodes, then rank 1's)
    rewards = torch.tensor(results[0]["all_rewards"])
    groups = torch.tensor(results[0]["all_groups"])
    single = group_advantages(rewards, groups)
    two = torch.tensor(results[0]["advantages"] + results[1]["advantages"])
    assert torch.allclose(single, two, atol=1e-6)
    assert results[0]["agent_ran"] and results[1]["agent_ran"]


def _rows(path: Path):
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith("time")}
        for line in path.read_text().splitlines()
    ]


def test_killed_and_resumed_run_matches_an_uninterrupted_one(tiny_checkpoint, tmp_path):
    # warm-up and evaluation with CFG ride along: the learning-rate schedule resumes too
    config = tiny_config(tiny_checkpoint, scenario_options={"num_steps": 3}, warmup_iterations=3, eval_cfg=2.0)
    trainer_for(config.model_copy(update={"iterations": 3}), tmp_path / "straight").run()
    trainer_for(
        config.model_copy(update={"iterations": 2}), tmp_path / "killed"
    ).run()  # stops after its checkpoint at 2
    summary = trainer_for(config.model_copy(update={"iterations": 3}), tmp_path / "killed", resume=True).run()
    assert _rows(tmp_path / "straight" / "metrics.jsonl") == _rows(tmp_path / "killed" / "metrics.jsonl")
    for name in ("config.json", "summary.json", "reward_curve.png", "eval_before/grid.png", "eval_after/eval.json"):
        assert (tmp_path / "killed" / name).exists()
    assert {
        "heldout_reward_before",
        "heldout_reward_after",
        "per_category",
        "wall_seconds",
        "image_quality_after",
    } <= set(summary)
    assert (
        summary["eval_cfg"] == 2.0
        and json.loads((tmp_path / "killed" / "eval_after" / "eval.json").read_text())["cfg_scale"] == 2.0
    )
    assert [row["lr_scale"] for row in _rows(tmp_path / "killed" / "metrics.jsonl")] == pytest.approx(
        [1 / 3, 2 / 3, 1.0]
    )
    with pytest.raises(RunFolderError, match="already holds a run"):
        trainer_for(config, tmp_path / "straight")


def test_a_checkpoint_of_the_earlier_layout_still_resumes(tiny_checkpoint, tmp_path):
    """Run folders written before checkpoints went through accelerator.save_state hold the
    optimizer in a weights-only ``trainer_state.pt``; --resume still continues them exactly."""
    config = tiny_config(tiny_checkpoint, scenario_options={"num_steps": 3})
    trainer_for(config.model_copy(update={"iterations": 3}), tmp_path / "straight").run()
    trainer_for(config.model_copy(update={"iterations": 2}), tmp_path / "old").run()
    folder = tmp_path / "old" / "checkpoints" / (tmp_path / "old" / "checkpoints" / "LATEST").read_text()
    optimizer = torch.load(folder / "engine" / "optimizer.bin", weights_only=True)
    torch.save({"iteration": 2, "optimizer": optimizer}, folder / "trainer_state.pt")  # the earlier layout
    shutil.rmtree(folder / "engine")
    (folder / "trainer_state.json").unlink()
    trainer_for(config.model_copy(update={"iterations": 3}), tmp_path / "old", resume=True).run()
    assert _rows(tmp_path / "straight" / "metrics.jsonl") == _rows(tmp_path / "old" / "metrics.jsonl")


calls = {"n": 0}


@register_reward("test_partly_nan", override=True)
class PartlyNaN:
    """The verifier's score, but NaN for every fourth sample (a scorer that sometimes fails)."""

    def __call__(self, inputs):
        n = len(inputs)
        scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
        scores[::4] = float("nan")
        return RewardOutput(scores=scores)


@register_reward("test_broken", override=True)
class Broken:
    def __call__(self, inputs):
        raise ConnectionError("reward server unreachable")


def test_failed_samples_are_left_out_and_counted(tiny_checkpoint):
    agent = UniGRPOAgent(
        load_shapes_policy(tiny_checkpoint),
        tiny_config(tiny_checkpoint, scenario_options={"num_steps": 3, "reward": "test_partly_nan"}),
    )
    stats = agent.train_iteration()
    assert stats["reward_failed"] == 2.0 and math.isfinite(stats["loss"])
    batch = agent.collect(1)
    assert (~batch.valid).sum() == 2 and (batch.advantages[~batch.valid] == 0).all()


def test_a_scorer_failing_for_most_of_a_batch_stops_the_run_with_a_checkpoint(tiny_checkpoint, tmp_path):
    config = tiny_config(tiny_checkpoint, iterations=3, scenario_options={"num_steps": 3, "reward": "test_broken"})
    with pytest.raises(RewardFailureError, match="reward server unreachable"):
        trainer_for(config, tmp_path / "run").run()
    assert (tmp_path / "run" / "checkpoints" / "LATEST").is_file()


def test_config_files_and_bad_values(tmp_path):
    (tmp_path / "c.yaml").write_text("iterations: 7\ntrain: text\nlr_text: 0.001\n")
    config = UniGRPOConfig.from_file(tmp_path / "c.yaml", seed=3)
    assert (config.iterations, config.train, config.lr_text, config.seed) == (7, "text", 0.001, 3)
    (tmp_path / "old.yaml").write_text("steps: 7\n")
    with pytest.raises(ValueError, match="steps was renamed iterations"):
        UniGRPOConfig.from_file(tmp_path / "old.yaml")
    (tmp_path / "c.json").write_text(json.dumps({"regularizer": "kl"}))
    assert UniGRPOConfig.from_file(tmp_path / "c.json").regularizer_coef == 0.04
    (tmp_path / "bad.yaml").write_text("iterations: [\n")
    with pytest.raises(ConfigError):
        UniGRPOConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(ValueError):
        UniGRPOConfig(stepz=3)
    with pytest.raises(ValueError):
        UniGRPOConfig(train="everything")


def test_each_regulariser_has_its_own_weight_and_the_text_rate_follows_the_adapter():
    config = UniGRPOConfig(mse_weight=3.0, kl_weight=0.1)
    assert config.regularizer_coef == 3.0  # mse, the default regulariser
    assert config.model_copy(update={"regularizer": "kl"}).regularizer_coef == 0.1
    assert (
        UniGRPOConfig(regularizer="kl", mse_weight=3.0).regularizer_coef == 0.04
    )  # a recommended MSE weight does not leak into --reg kl
    assert UniGRPOConfig(regularizer="none", mse_weight=3.0).regularizer_coef == 0.0
    with pytest.raises(ValueError, match="mse_weight.*kl_weight"):
        UniGRPOConfig(regularizer_weight=3.0)  # the old, shared field says what replaced it
    # lr_text: the measured rate of each adapter unless given
    assert [UniGRPOConfig(text_adapter=a).lr_text for a in ("full", "lora", "ln_tuning")] == [1e-4, 1e-3, 3e-2]
    assert UniGRPOConfig(text_adapter="ln_tuning", lr_text=1e-2).lr_text == 1e-2
    assert UniGRPOConfig(lr_text=None).lr_text == 1e-4
    # ... resolved again when the adapter is re-assigned, unless it was given
    config = UniGRPOConfig()
    config.text_adapter = "ln_tuning"
    assert config.lr_text == 3e-2
    config.lr_text = 5e-3
    config.text_adapter = "lora"
    assert config.lr_text == 5e-3
    assert UniGRPOConfig.model_validate(UniGRPOConfig(text_adapter="lora").model_dump()).lr_text == 1e-3
    # an older run folder's config.json still resumes: its shared weight moves to its regulariser's field
    from unigrpo_env.agents.config import migrate_saved_config as _migrated

    assert UniGRPOConfig.model_validate(_migrated({"regularizer": "kl", "regularizer_weight": 0.5})).kl_weight == 0.5
    assert UniGRPOConfig.model_validate(_migrated({"regularizer_weight": 3.0})).mse_weight == 3.0
    assert UniGRPOConfig.model_validate(_migrated({"regularizer_weight": None})) == UniGRPOConfig()
    assert UniGRPOConfig.model_validate(_migrated({"steps": 12})).iterations == 12


def test_t2i_reason_recommends_the_measured_recipe_and_flags_can_undo_it(tmp_path):
    recipe = UniGRPOConfig.for_scenario("t2i_reason")
    assert (recipe.text_adapter, recipe.lr_text, recipe.image_adapter, recipe.lr_image) == (
        "ln_tuning",
        3e-2,
        "full",
        1e-3,
    )
    assert (recipe.warmup_iterations, recipe.lr_schedule, recipe.regularizer_coef) == (25, "cosine", 3.0)
    # --text-adapter full from the command line gets full training's own rate, not LN tuning's 3e-2
    assert UniGRPOConfig.for_scenario("t2i_reason", text_adapter="full").lr_text == 1e-4
    assert UniGRPOConfig.for_scenario("t2i_reason", regularizer="kl").regularizer_coef == 0.04
    # the plain defaults the earlier tables were measured with, one file away
    full = UniGRPOConfig.for_scenario(
        "t2i_reason", Path(__file__).parent.parent / "examples" / "configs" / "t2i_reason_full_training.yaml"
    )
    plain = UniGRPOConfig(scenario="t2i_reason")
    assert full == plain and (
        plain.text_adapter,
        plain.lr_text,
        plain.lr_image,
        plain.lr_schedule,
        plain.regularizer_coef,
    ) == ("full", 1e-4, 1e-4, "constant", 1.0)
    # edit_multiturn takes the recipe with its own length and warm-up
    edit = UniGRPOConfig.for_scenario("edit_multiturn")
    assert (edit.text_adapter, edit.lr_image, edit.iterations, edit.warmup_iterations) == ("ln_tuning", 1e-3, 72, 15)


def test_the_policy_recipe_then_the_scenarios_settings_sit_under_the_file_and_the_overrides(tmp_path):
    from unigrpo_env.agents.hf_policy_loader import HF_TRAINING_DEFAULTS
    from unigrpo_env.scenarios.shapes.edit_multiturn import EditMultiTurnScenario
    from unigrpo_env.scenarios.shapes.policy import SHAPES_TRAINING_DEFAULTS

    task = EditMultiTurnScenario.training_defaults  # task-specific: iterations, warm-up
    assert task and set(task) | set(SHAPES_TRAINING_DEFAULTS) <= set(UniGRPOConfig.model_fields)
    config = UniGRPOConfig.for_scenario("edit_multiturn")
    assert config.scenario == "edit_multiturn"
    assert all(getattr(config, k) == v for k, v in {**SHAPES_TRAINING_DEFAULTS, **task}.items())
    (tmp_path / "c.yaml").write_text("iterations: 7\n")
    config = UniGRPOConfig.for_scenario("edit_multiturn", tmp_path / "c.yaml", seed=4)
    assert (config.iterations, config.seed) == (7, 4)
    # t2i_reason's config is exactly what it was when the recipe sat on the scenario
    assert UniGRPOConfig.for_scenario("t2i_reason") == UniGRPOConfig(scenario="t2i_reason", **SHAPES_TRAINING_DEFAULTS)
    # the hf kind brings the paper's recipe, whatever the scenario; a flag or the file still wins
    real = UniGRPOConfig.for_scenario("t2i_reason", policy="hf")
    assert all(getattr(real, k) == v for k, v in HF_TRAINING_DEFAULTS.items()) and real.text_adapter == "full"
    (tmp_path / "hf.yaml").write_text("policy: hf\nlr_image: 3.0e-4\n")
    real = UniGRPOConfig.for_scenario("t2i_reason", tmp_path / "hf.yaml")
    assert (real.lr_image, real.lr_text) == (3e-4, 1e-6)


def test_the_agent_trains_on_edit_dialogues_unchanged(tiny_checkpoint):
    """Three turns, one trajectory, one advantage: every turn's tokens and denoising steps get
    gradients, and the first ratio is exactly 1."""
    policy = load_shapes_policy(tiny_checkpoint)
    agent = UniGRPOAgent(policy, tiny_config(tiny_checkpoint, scenario="edit_multiturn", sde_window_size=None))
    batch = agent.collect(0)
    assert len(batch.trajectory.turns) == 3 and all(t.image.sde_steps for t in batch.trajectory.turns)
    assert {"reward/shapes_scene", "reward/edit_fidelity"} <= set(batch.stats)
    minibatch = agent._log_probs(batch, torch.arange(len(batch)))
    assert sorted(minibatch.turns) == [0, 1, 2] and len(minibatch.texts()) == 3 and len(minibatch.images()) == 3
    for k in range(3):  # each turn's log-probabilities depend on the parameters
        policy.zero_grad()
        turn = minibatch.turns[k]
        (turn.text.sum() + turn.image.sum()).backward(retain_graph=True)
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in policy.text.parameters())
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in policy.image.parameters())
    policy.zero_grad()
    stats = agent.train_iteration()
    assert stats["first_ratio_text_max_dev"] == 0.0 and stats["first_ratio_image_max_dev"] == 0.0


def test_the_renamed_steps_flag_says_its_new_name():
    done = subprocess.run(
        [sys.executable, "-m", "unigrpo_env.cli.main", "run", "scenario", "t2i_reason", "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--steps was renamed --iterations" in done.stderr and "Traceback" not in done.stderr


def test_ddp_reduces_the_gradients_in_buckets_and_two_processes_agree(tmp_path):
    """Two real processes (gloo): the training pass is wrapped in DDP by accelerator.prepare; its
    gradients are the mean of the processes' own (one process's over the whole batch), reduced in
    the engine's buckets, not one reduce per parameter; an iteration leaves equal weights."""
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
         str(HERE / "distributed_ddp.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((tmp_path / f"ddp{r}.json").read_text()) for r in range(2)]
    assert sorted(r["rank"] for r in results) == [0, 1] and all(r["world_size"] == 2 for r in results)
    for r in results:
        assert r["wrapped_in_ddp"] and r["gradients_match"] and r["differ_locally"], r
        assert 1 <= r["buckets_per_backward"] < r["trained_tensors"], r  # buckets, not a reduce per tensor
        assert r["gradients_in_buckets"] == r["trained_tensors"], r  # every trained gradient was reduced
        assert r["weights_equal_across_processes"] and r["loss_finite"], r
        # the logged metrics are the whole batch's, the same on both processes
        assert r["metrics_equal_across_processes"] and r["whole_batch_episodes"] == 2 * r["episodes"] == 8, r
        assert r["reward_mean"] == pytest.approx(r["whole_batch_reward_mean"], abs=1e-6), r
        assert r["reward_correct"] == pytest.approx(r["whole_batch_correct"], abs=1e-6), r
    assert any(abs(r["own_reward_mean"] - r["whole_batch_reward_mean"]) > 1e-4 for r in results), results


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_two_processes_with_half_of_each_group_compute_what_one_process_with_the_whole_batch_does(tmp_path, loss_type):
    """`train both` (LoRA text with its KL reference, the flow model in full with the velocity
    MSE): one process takes an optimizer step on a batch of 2 groups × 4; two DDP processes take it
    with half of each group each. One episode's reward failed, so the halves hold 3 and 4 scored
    episodes: the losses' means divide by the whole minibatch's count over the processes
    (losses.py), and the loss, the gradients and the updated weights are one process's."""
    from safetensors.torch import load_file

    script = str(HERE / "distributed_whole_batch.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = {"grpo": "29560", "bnpo": "29561"}[loss_type]  # a port of its own (no other test's)
    launches = {
        "one": [sys.executable, script, str(tmp_path), "one", loss_type],
        "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                script, str(tmp_path), "two", loss_type],
    }  # fmt: skip
    for mode, command in launches.items():
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, (mode, done.stderr[-3000:])
    one = json.loads((tmp_path / f"one-{loss_type}-0.json").read_text())
    two = [json.loads((tmp_path / f"two-{loss_type}-{r}.json").read_text()) for r in range(2)]
    assert one["world_size"] == 1 and all(r["world_size"] == 2 for r in two)
    assert sorted(r["scored"] for r in two) == [3, 4] and sum(r["episodes"] for r in two) == one["episodes"] == 8
    assert sum(two[0]["losses"]) / 2 == pytest.approx(one["losses"][0], abs=1e-6)
    for what, tolerance in (("gradients", 1e-7), ("weights", 1e-6)):
        a = load_file(str(tmp_path / f"one-{loss_type}-{what}.safetensors"))
        b = load_file(str(tmp_path / f"two-{loss_type}-{what}.safetensors"))
        assert a.keys() == b.keys() and len(a) == one["trained_tensors"] > 0
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst < tolerance, (what, worst)
    assert (
        max(float(g.abs().max()) for g in load_file(str(tmp_path / f"one-{loss_type}-gradients.safetensors")).values())
        > 1e-3
    )


def test_fsdp_computes_what_ddp_computes_and_checkpoints_through_the_engine(tmp_path):
    """Two real processes (gloo), once under DDP and once under Accelerate's FSDP2 (forced on the
    CPU, where Accelerate 1.x keeps MULTI_CPU: see tests/distributed_fsdp.py): the parameters are
    really sharded; rollouts under the sharded policy are the same, though the processes' reasoning
    ends after different numbers of tokens (decoding goes on, drawing nothing, until every
    process is done, as every block's forward is a collective under FSDP); the loss, the whole gradients
    after the engine's reduction and the weights after an iteration (two minibatches, LoRA on the
    text side with its adapter-off reference, the flow model in full with a frozen copy, two
    learning rates) agree with DDP's to float tolerance; the first ratio is exactly 1 on both sides;
    a checkpoint written through accelerator.save_state restores the weights, and its merged
    policy folder (written from a CPU copy under FSDP) holds DDP's weights; a held-out evaluation
    under FSDP scores what DDP's does."""
    from safetensors.torch import load_file

    results = {}
    for mode, port in (("ddp", "29545"), ("fsdp", "29546")):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
             str(HERE / "distributed_fsdp.py"), str(tmp_path), mode],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = [json.loads((tmp_path / f"{mode}-{r}.json").read_text()) for r in range(2)]
    for mode, ranks in results.items():
        assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["world_size"] == 2 for r in ranks), mode
        assert all(r["restored"] for r in ranks), mode
        for r in ranks:
            assert r["first_ratio_text_max_dev"] == 0.0 and r["first_ratio_image_max_dev"] == 0.0, (mode, r)
    for ranks in results.values():  # the two processes' reasoning ends after different numbers of tokens
        assert ranks[0]["decoded_tokens"] != ranks[1]["decoded_tokens"]
        assert [r["local_stop"] for r in ranks] == [True, False] and not any(r["synchronized_stop"] for r in ranks)
    for r in results["fsdp"]:
        assert r["distributed_type"] == "DistributedType.FSDP" and r["fsdp_units"] >= 3, r
        assert r["sharded_parameters"] == r["trained_parameters"] > 0, r  # every trained weight split in two
    for ddp, fsdp in zip(results["ddp"], results["fsdp"]):
        assert ddp["rewards"] == fsdp["rewards"] and ddp["tokens"] == fsdp["tokens"]  # the same rollouts
        assert ddp["loss"] == pytest.approx(fsdp["loss"], abs=1e-7)
        assert ddp["iteration_loss"] == pytest.approx(fsdp["iteration_loss"], abs=1e-6)
        assert ddp["eval_tasks"] == fsdp["eval_tasks"] == 6 and ddp["eval_reward"] == fsdp["eval_reward"]
    # gradients agree to 1e-8 (the reductions add in another order); the weights after two Adam steps
    # to 1e-5: Adam's step lr·m/(√v + ε) amplifies a 1e-10 difference of a gradient element near ε
    # into a few thousandths of a step (lr_image 3e-4): 1.5e-6 seen on an AMD EPYC CPU, 6e-8 elsewhere
    for kind, tolerance in (("gradients", 1e-8), ("weights", 1e-5)):
        ddp, fsdp = (load_file(str(tmp_path / f"{mode}-{kind}.safetensors")) for mode in ("ddp", "fsdp"))
        assert set(ddp) == set(fsdp) and len(ddp) == results["fsdp"][0]["trained_parameters"]
        assert any(float(t.abs().max()) > 0 for t in ddp.values()), kind
        for name in ddp:
            assert torch.allclose(ddp[name], fsdp[name], atol=tolerance, rtol=1e-5), (kind, name)
    merged = {
        mode: {
            f.relative_to(tmp_path / f"run-{mode}" / "checkpoints" / "ckpt-000001").as_posix(): load_file(str(f))
            for f in (tmp_path / f"run-{mode}" / "checkpoints" / "ckpt-000001").glob("*_model/*.safetensors")
        }
        for mode in ("ddp", "fsdp")
    }
    assert set(merged["ddp"]) == set(merged["fsdp"]) == {
        "language_model/model.safetensors", "flow_model/diffusion_pytorch_model.safetensors"
    }  # fmt: skip
    for file, tensors in merged["ddp"].items():
        for name, tensor in tensors.items():
            assert torch.allclose(tensor.float(), merged["fsdp"][file][name].float(), atol=1e-5), (file, name)
    engine = tmp_path / "run-fsdp" / "checkpoints" / "ckpt-000001" / "engine"
    assert (engine / "pytorch_model_fsdp_0").is_dir() and (engine / "optimizer_0").is_dir()
    assert not list((tmp_path / "run-ddp" / "checkpoints" / "ckpt-000001" / "engine").glob("model*"))


def _deepspeed_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.skipif(
    not _deepspeed_importable(), reason='DeepSpeed is not installed (pip install "unigrpo-env[deepspeed]")'
)
def test_deepspeed_zero2_and_zero3_compute_what_ddp_computes_and_checkpoint_through_the_engine(tmp_path):
    """Two real processes (gloo), under DDP and under Accelerate's DeepSpeed plugin with ZeRO-2,
    ZeRO-3 and ZeRO-2 in bf16 (DeepSpeed's CPU accelerator: see tests/distributed_deepspeed.py): ZeRO-2 partitions the
    optimizer's fp32 weights, ZeRO-3 every trained weight too; the engine clips to max_grad_norm
    (the agent's gradient_clipping); the rollouts are the same (under ZeRO-3 the processes' reasoning
    ends after different numbers of tokens and decoding goes on in step); the loss, the whole
    gradients after the engine's reduction, the gradient norms and the weights after an iteration
    (two minibatches, two learning rates warmed up) agree with DDP's to float tolerance; the
    first ratio is exactly 1; a checkpoint written through the engine restores the weights and
    the optimizer's fp32 copies, and its trained state and merged policy folder (gathered under
    ZeRO-3) hold DDP's weights; a held-out evaluation scores what DDP's does."""
    from safetensors.torch import load_file

    results = {}
    for mode, port in (("ddp", "29547"), ("zero2", "29548"), ("zero3", "29549"), ("zero2-bf16", "29550")):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
             str(HERE / "distributed_deepspeed.py"), str(tmp_path), mode],
            capture_output=True, text=True, timeout=400,
            env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        results[mode] = [json.loads((tmp_path / f"{mode}-{r}.json").read_text()) for r in range(2)]
    for mode, ranks in results.items():
        assert sorted(r["rank"] for r in ranks) == [0, 1] and all(r["world_size"] == 2 for r in ranks), mode
        for r in ranks:
            assert r["spoiled"] and r["restored"] and r["restored_master"], (mode, r)
            assert r["first_ratio_text_max_dev"] == 0.0 and r["first_ratio_image_max_dev"] == 0.0, (mode, r)
            assert r["first_grad_norm"] > 0.05, (mode, r)  # every step clips
            assert r["learning_rates"] == pytest.approx({"text": 1e-3 / 4, "image": 3e-4 / 4}), (mode, r)
    for stage, mode in ((2, "zero2"), (3, "zero3")):
        for r in results[mode]:
            assert r["distributed_type"] == "DistributedType.DEEPSPEED" and r["engine"] == "DeepSpeedEngine", r
            assert r["zero_stage"] == stage and r["shards_parameters"] == (stage == 3), r
            assert r["gradient_clipping"] == 0.05, r  # max_grad_norm, set by the agent
            assert r["optimizer_partition_elements"] <= r["trained_elements"] // 2 + 64, r  # about half each
    for r in results["zero3"]:
        assert r["partitioned_parameters"] == r["trained_parameters"] > 0, r  # every trained weight split in two
    assert results["zero3"][0]["decoded_tokens"] != results["zero3"][1]["decoded_tokens"]
    # Measured (DeepSpeed 0.19.8, torch 2.13 CPU): ZeRO-2 gradients equal DDP's, weights within
    # 5.3e-7; ZeRO-3 reduce-scatters in its own summation order: gradients within 4.9e-8 (of 0.063),
    # and Adam's lr·m/(√v + eps) magnifies that for gradients near zero: weights within 1.8e-5 after
    # three steps (525 of 2.4M elements beyond 1e-6), the second step's gradient norm within 1.1e-4.
    tolerances = {  # (loss after an iteration, its gradient norm (relative), gradients, weights)
        "zero2": (1e-6, 1e-5, 1e-8, 1e-6),
        "zero3": (1e-5, 1e-3, 2e-7, 1e-4),
    }
    for mode, (loss_tolerance, norm_tolerance, gradient_tolerance, weight_tolerance) in tolerances.items():
        for ddp, ds in zip(results["ddp"], results[mode]):
            assert ddp["rewards"] == ds["rewards"] and ddp["tokens"] == ds["tokens"], mode  # the same rollouts
            assert ddp["loss"] == pytest.approx(ds["loss"], abs=1e-7), mode
            assert ddp["first_grad_norm"] == pytest.approx(ds["first_grad_norm"], rel=1e-5), mode
            assert ddp["iteration_loss"] == pytest.approx(ds["iteration_loss"], abs=loss_tolerance), mode
            assert ddp["iteration_grad_norm"] == pytest.approx(ds["iteration_grad_norm"], rel=norm_tolerance), mode
            assert ddp["eval_tasks"] == ds["eval_tasks"] == 6 and ddp["eval_reward"] == ds["eval_reward"], mode
        for kind, tolerance in (("gradients", gradient_tolerance), ("weights", weight_tolerance)):
            ddp, ds = (load_file(str(tmp_path / f"{m}-{kind}.safetensors")) for m in ("ddp", mode))
            assert set(ddp) == set(ds) and len(ddp) == results[mode][0]["trained_parameters"]
            assert any(float(t.abs().max()) > 0 for t in ddp.values()), kind
            for name in ddp:
                assert torch.allclose(ddp[name], ds[name], atol=tolerance, rtol=1e-5), (mode, kind, name)
    checkpoint = {mode: tmp_path / f"run-{mode}" / "checkpoints" / "ckpt-000001" for mode in results}
    saved = {
        mode: {
            f.relative_to(folder).as_posix(): load_file(str(f))
            for f in [*folder.glob("*_model/*.safetensors"), folder / "trained_state.safetensors"]
        }
        for mode, folder in checkpoint.items()
    }
    for mode, (*_, weight_tolerance) in tolerances.items():
        assert set(saved[mode]) == set(saved["ddp"]) == {
            "language_model/model.safetensors", "flow_model/diffusion_pytorch_model.safetensors",
            "trained_state.safetensors",
        }  # fmt: skip
        for file, tensors in saved["ddp"].items():
            assert set(tensors) == set(saved[mode][file]), (mode, file)
            for name, tensor in tensors.items():
                other = saved[mode][file][name]
                assert tensor.shape == other.shape, (mode, file, name)  # whole: ZeRO-3's weights gathered
                assert torch.allclose(tensor.float(), other.float(), atol=weight_tolerance, rtol=1e-5), (
                    mode, file, name,
                )  # fmt: skip
        engine = checkpoint[mode] / "engine"
        assert (engine / "latest").is_file() and list((engine / "pytorch_model").glob("*optim_states.pt")), mode
    assert not list((checkpoint["ddp"] / "engine").glob("pytorch_model*"))
    # bf16 (Accelerate's mixed_precision with the DeepSpeed plugin): the engine holds the weights in
    # bf16; rollouts, the on-policy first ratio (exactly 1), the checkpoint and the evaluation work
    for r, fp32 in zip(results["zero2-bf16"], results["zero2"]):
        assert r["mixed_precision"] == "bf16" and r["bf16_enabled"] and r["weight_dtypes"] == ["torch.bfloat16"], r
        assert fp32["weight_dtypes"] == ["torch.float32"], fp32
        assert r["first_ratio_text_max_dev"] == 0.0 and r["first_ratio_image_max_dev"] == 0.0, r
        assert r["spoiled"] and r["restored"] and r["restored_master"] and r["eval_tasks"] == 6, r
        assert math.isfinite(r["iteration_loss"]) and r["loss"] == pytest.approx(fp32["loss"], abs=0.05), (r, fp32)


def _fp16_agent(tiny_checkpoint, init_scale: float) -> UniGRPOAgent:
    """An agent in fp16 autocast with Accelerate's gradient scaler. Accelerate makes neither on a
    CPU (its fp16 needs a GPU), while torch has both for the CPU: the test gives the Accelerator
    torch's CPU scaler, and Accelerate's own fp16 machinery (scaled backward, unscale before
    clipping, skipped steps) does the rest, as it does on a GPU."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    config = tiny_config(tiny_checkpoint, scenario_options={"num_steps": 3}, sde_window_size=None, minibatches=2)
    return UniGRPOAgent(load_shapes_policy(tiny_checkpoint), config, accelerator=accelerator)


def test_fp16_trains_through_the_engines_gradient_scaler(tiny_checkpoint, fresh_accelerate_state):
    """fp16 autocast with the gradient scaler: the first minibatch is exactly on policy; the loss
    is scaled for the backward pass and the gradients unscaled before clipping and the step, so
    scales of 2^8 and 2^12 give the same gradient norm (powers of two are exact in fp16, while the
    norm before unscaling would differ 16-fold) and both step; an overflowing scale skips the
    step, leaves the weights as they were and shrinks."""
    results = {}
    for scale in (2.0**8, 2.0**12):
        agent = _fp16_agent(tiny_checkpoint, scale)
        start = [p.detach().clone() for p in agent._trained_parameters()]
        with agent.accelerator.autocast():
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
        stats = agent.train_iteration()
        assert stats["first_ratio_text_max_dev"] == 0.0 and stats["first_ratio_image_max_dev"] == 0.0
        assert not agent.optimizer.step_was_skipped and agent.accelerator.scaler.get_scale() == scale
        results[scale] = (stats["grad_norm"], [p.detach().clone() for p in agent._trained_parameters()])
    (norm_low, weights_low), (norm_high, weights_high) = results[2.0**8], results[2.0**12]
    # equal but for the gradient elements small enough to underflow in fp16 at the lower scale: on
    # one CPU the norms agreed to 1e-7, on another (AMD EPYC, 2026-12-07) to 4.4e-6; unscaled
    # before clipping, they would differ 16-fold
    assert 0 < norm_low < 100 and norm_high == pytest.approx(norm_low, rel=1e-4)
    # both stepped: their weights moved, by the same amounts but for the few gradient elements small
    # enough to underflow in fp16 at the lower scale (Adam's first step is about lr·sign(g) for each)
    moved = [not torch.equal(a, b) for a, b in zip(weights_low, start)]
    assert any(moved) and sum(not torch.equal(a, b) for a, b in zip(weights_low, weights_high)) < len(start)
    agent = _fp16_agent(tiny_checkpoint, 2.0**100)  # inf gradients in fp16
    before = [p.detach().clone() for p in agent._trained_parameters()]
    stats = agent.train_iteration()
    assert agent.optimizer.step_was_skipped and agent.accelerator.scaler.get_scale() < 2.0**100
    assert not math.isfinite(stats["grad_norm"])
    assert all(torch.equal(a, p) for a, p in zip(before, agent._trained_parameters()))


def test_the_launchers_mixed_precision_applies_unless_the_config_names_one(tiny_checkpoint, tmp_path):
    """`accelerate launch` with a config file's `mixed_precision: bf16` sets
    ACCELERATE_MIXED_PRECISION; a run whose config leaves `mixed_precision` unset trains in it,
    and one that names a precision keeps its own."""
    script = (
        "import sys; sys.path.insert(0, {tests!r})\n"
        "from unigrpo_env.agents.config import UniGRPOConfig\n"
        "from unigrpo_env.agents.unigrpo import UniGRPOAgent\n"
        "from unigrpo_env.scenarios.shapes.policy import load_shapes_policy\n"
        "config = UniGRPOConfig(checkpoint={ckpt!r}, num_prompts=1, group_size=2, cpu=True{extra})\n"
        "print(UniGRPOAgent(load_shapes_policy({ckpt!r}), config).accelerator.mixed_precision)\n"
    )
    seen = []
    for extra in ("", ", mixed_precision='no'"):
        code = script.format(tests=str(HERE), ckpt=str(tiny_checkpoint), extra=extra)
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
            env={**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16", "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        seen.append(done.stdout.strip().splitlines()[-1])
    assert seen == ["bf16", "no"]


def test_a_launcher_asking_for_an_engine_accelerate_does_not_run_here_is_a_warning(tiny_checkpoint):
    """`accelerate launch` with an FSDP config on a machine without GPUs: Accelerate runs the
    processes without FSDP, and the agent says so instead of training with another engine silently."""
    from unigrpo_env.agents.engine import warn_if_the_launchers_engine_is_off

    config = UniGRPOConfig(checkpoint=str(tiny_checkpoint), num_prompts=1, group_size=2, cpu=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_FSDP", "true")
        with pytest.warns(RuntimeWarning, match="asks for FSDP, but Accelerate enables it only on GPUs"):
            agent = UniGRPOAgent(load_shapes_policy(str(tiny_checkpoint)), config)
        patch.setenv("ACCELERATE_USE_FSDP", "false")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warn_if_the_launchers_engine_is_off(agent.accelerator)


def test_no_hand_made_gradient_reduction_is_left():
    import re

    pattern = re.compile(r"reduce\([^)]*\.grad|\.grad\.copy_\(")
    for path in (HERE.parent / "agents").glob("*.py"):
        assert not pattern.search(path.read_text()), path


def test_the_example_accelerate_configs_load_and_both_launchers_run_the_cli_on_two_processes(
    tmp_path, small_run_config
):
    """Every config in examples/accelerate/ is one Accelerate reads; `unigrpo run` trains with two
    processes end to end under `accelerate launch --config_file` (the 8-GPU DDP config, with
    `--num_processes 2`: on a machine without GPUs Accelerate's launcher starts CPU processes) and
    under `torchrun --nproc_per_node 2`; only the main process prints the progress and the table."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = HERE.parent / "examples" / "accelerate"
    loaded = {c.name: load_config_from_file(str(c)) for c in sorted(folder.glob("*.yaml"))}
    assert set(loaded) == {
        "one_gpu.yaml", "eight_gpus_ddp.yaml", "two_nodes_ddp.yaml", "eight_gpus_fsdp.yaml", "two_nodes_fsdp.yaml",
        "eight_gpus_zero2.yaml", "eight_gpus_zero3.yaml",
    }  # fmt: skip
    assert loaded["eight_gpus_ddp.yaml"].num_processes == 8 and loaded["two_nodes_ddp.yaml"].num_machines == 2
    for name in ("eight_gpus_fsdp.yaml", "two_nodes_fsdp.yaml"):
        assert str(loaded[name].distributed_type) == "DistributedType.FSDP", name
        assert loaded[name].fsdp_config["fsdp_version"] == 2, name
    for name, stage in (("eight_gpus_zero2.yaml", 2), ("eight_gpus_zero3.yaml", 3)):
        assert str(loaded[name].distributed_type) == "DistributedType.DEEPSPEED", name
        ds = loaded[name].deepspeed_config
        assert ds["zero_stage"] == stage and ds["zero3_init_flag"] is False, name
        # the agent sets these (gradient_clipping = max_grad_norm; its own learning rates)
        assert "gradient_clipping" not in ds and "deepspeed_config_file" not in ds, name
    accelerate = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(folder / "eight_gpus_ddp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        "29543",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29544"]
    for name, launcher in (("accelerate", accelerate), ("torchrun", torchrun)):
        out = tmp_path / name
        done = subprocess.run(
            [*launcher, "-m", "unigrpo_env.cli.main", "run", "scenario", "t2i_reason", "--iterations", "1",
             "--config", str(small_run_config), "--out", str(out)],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        errors = [line for line in done.stderr.splitlines() if "Error" in line and "File " not in line]
        assert done.returncode == 0, (name, errors[-5:])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["iterations"] == 1 and summary["processes"] == 2, name
        printed = done.stdout + done.stderr
        assert printed.count("run folder:") == 1 and printed.count("held-out reward, before") == 1, (name, printed)


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_a_two_process_run_killed_with_sigkill_resumes_to_the_same_metrics(tmp_path):
    """torchrun, 2 processes: one worker is killed with SIGKILL after the checkpoint of iteration
    2; `--resume` with 2 processes continues to the metrics of an uninterrupted 2-process run."""
    import signal
    import time

    config = tmp_path / "c.yaml"
    config.write_text(
        "num_prompts: 2\ngroup_size: 4\neval_limit: 2\ncheckpoint_every: 1\nscenario_options:\n  num_steps: 8\n"
    )

    def command(out, port, *extra):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "unigrpo_env.cli.main", "run", "scenario", "t2i_reason", "--iterations", "5",
                "--config", str(config), "--out", str(out), *extra]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(
        command(tmp_path / "straight", 29551), capture_output=True, text=True, timeout=300, env=env
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = tmp_path / "killed"
    launcher = subprocess.Popen(command(killed, 29552), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    latest = killed / "checkpoints" / "LATEST"
    while time.monotonic() < deadline and launcher.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "ckpt-000002":
            break
        time.sleep(0.05)
    assert launcher.poll() is None, "the run ended before it could be killed"
    workers = _children(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    assert not (killed / "summary.json").exists()
    resumed = subprocess.run(command(killed, 29553, "--resume"), capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _rows(tmp_path / "straight" / "metrics.jsonl") == _rows(killed / "metrics.jsonl")
    assert json.loads((killed / "summary.json").read_text())["processes"] == 2


@register_reward("test_half_nan", override=True)
class HalfNaN:
    """The verifier's score for every other sample, NaN for the rest (a scorer failing half the time)."""

    def __init__(self):
        from unigrpo_env.rewards import get_reward

        self.verifier = get_reward("shapes_verifier")

    def __call__(self, inputs):
        out = self.verifier(inputs)
        scores = out.scores.clone()
        scores[1::2] = float("nan")
        return RewardOutput(scores=scores)


def test_a_half_failing_reward_is_reported_as_such_not_as_a_clean_score(small_run_config, tmp_path, capsys):
    from unigrpo_env.cli.main import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        main(["run", "scenario", "t2i_reason", "--iterations", "1", "--config", str(small_run_config),
              "--reward", "test_half_nan", "--out", str(out)])  # fmt: skip
    assert done.value.code == 0
    summary = json.loads((out / "summary.json").read_text())
    tasks = summary["heldout_tasks"]
    assert summary["heldout_unscored_before"] == summary["heldout_unscored_after"] == tasks // 2
    assert (
        sum(row["unscored_after"] for name, row in summary["per_category"].items() if name != "overall") == tasks // 2
    )
    printed = " ".join(capsys.readouterr().out.split())
    assert f"the reward failed for {tasks // 2} of {tasks} held-out tasks" in printed
    assert "scored" in printed  # the table's reward cells say how many tasks their means cover


def test_a_row_cut_short_by_a_kill_is_dropped_on_resume(tiny_checkpoint, tmp_path):
    """A kill in the middle of writing a metrics row leaves half a line; --resume drops it (with
    the iterations after the checkpoint) and continues to the uninterrupted run's metrics."""
    config = tiny_config(tiny_checkpoint, scenario_options={"num_steps": 3}, checkpoint_every=1)
    trainer_for(config.model_copy(update={"iterations": 3}), tmp_path / "straight").run()
    trainer_for(config.model_copy(update={"iterations": 2}), tmp_path / "killed").run()
    with (tmp_path / "killed" / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 2, "reward_me')  # the kill came mid-write
    trainer_for(config.model_copy(update={"iterations": 3}), tmp_path / "killed", resume=True).run()
    assert _rows(tmp_path / "straight" / "metrics.jsonl") == _rows(tmp_path / "killed" / "metrics.jsonl")
