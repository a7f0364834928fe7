"""The policy protocol and its Hugging Face adapters, on tiny models of the real classes saved to a
temporary folder and loaded back with ``from_pretrained``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import unigrpo_env
from unigrpo_env.agents.policy import FlowPolicy, TextPolicy, TurnContext, UnifiedPolicy
from unigrpo_env.agents.rollout import RolloutSettings, rollout
from unigrpo_env.scenarios.shapes import task_split
from unigrpo_env.scenarios.shapes.evaluation import shapes_evaluator
from unigrpo_env.scenarios.shapes.policy import CheckpointError, load_shapes_policy


@pytest.fixture(scope="module")
def policy(tiny_checkpoint) -> UnifiedPolicy:
    return load_shapes_policy(tiny_checkpoint)


def context_for(prompts, reasoning=None) -> TurnContext:
    n = len(prompts)
    tokens = torch.zeros((n, 0), dtype=torch.long) if reasoning is None else reasoning
    return TurnContext(
        prompts=[(p,) for p in prompts],
        history=[[] for _ in prompts],
        images=torch.zeros((n, 0, 32, 32, 3), dtype=torch.uint8),
        reasoning=tokens,
        reasoning_lengths=torch.full((n,), tokens.shape[1], dtype=torch.long),
    )


def test_loaded_policy_follows_the_protocol_and_splits_parameters(policy):
    assert isinstance(policy.text, TextPolicy) and isinstance(policy.image, FlowPolicy)
    text, image = policy.text_parameters(), policy.image_parameters()
    assert text and image and not ({id(p) for p in text} & {id(p) for p in image})
    assert {id(p) for p in policy.parameters()} == {id(p) for p in text} | {id(p) for p in image}


def test_sampled_tokens_and_log_probs_match_a_recomputation(policy):
    prompts = [t.prompt for t in task_split("heldout")[:6]]
    context = context_for(prompts)
    sample = policy.text.sample(context, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sample.tokens.shape == sample.log_probs.shape and sample.lengths.max() == sample.tokens.shape[1]
    again = policy.text.sample(context, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens, sample.tokens)
    recomputed = policy.text.log_probs(context, sample.tokens, sample.lengths)
    assert torch.allclose(recomputed, sample.log_probs, atol=1e-4)
    mask = torch.arange(sample.tokens.shape[1])[None] < sample.lengths[:, None]
    assert (sample.log_probs[~mask] == 0).all() and (sample.log_probs[mask] < 0).all()
    recomputed.sum().backward()
    assert all(p.grad is not None for p in policy.text_parameters() if p.requires_grad and p.dim() > 1)
    policy.zero_grad()


def test_greedy_sampling_is_deterministic_and_temperature_is_validated(policy):
    context = context_for([t.prompt for t in task_split("train")[:3]])
    a = policy.text.sample(context, max_new_tokens=8, temperature=0.0)
    b = policy.text.sample(context, max_new_tokens=8, temperature=0.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError):
        policy.text.sample(context, max_new_tokens=8, temperature=-1.0)


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def test_velocity_has_gradients_and_cfg_behaves(policy):
    codec = unigrpo_env.make_scenario("t2i_reason").text_codec
    task = task_split("heldout")[0]
    from unigrpo_env.scenarios.shapes import answer_text

    reasoning = torch.tensor([codec.encode(answer_text(task), end_of_thinking=True)] * 2)
    condition = policy.image.condition(context_for([task.prompt] * 2, reasoning))
    assert (condition["text_ids"] != codec.pad_id).any() and condition["cond_image"] is None
    x_t = torch.randn(2, 3, 32, 32)
    v = policy.image.velocity(x_t, 0.5, condition)
    v.square().mean().backward()
    assert all(p.grad is not None for p in policy.image_parameters() if p.dim() > 1)
    policy.zero_grad()
    with torch.no_grad():
        v1 = policy.image.velocity(x_t, 0.5, condition, cfg_scale=1.0)
        v3 = policy.image.velocity(x_t, 0.5, condition, cfg_scale=3.0)
        v_uncond = policy.image.velocity(x_t, 0.5, policy.image.unconditional(condition))
    assert torch.allclose(v1, v.detach(), atol=1e-6)
    assert not torch.allclose(v3, v1, atol=1e-4)
    assert torch.allclose(v3, v_uncond + 3.0 * (v1 - v_uncond), atol=1e-5)
    counting = CountingModel(policy.image.model)
    original, policy.image.model = policy.image.model, counting
    try:
        policy.image.velocity(x_t, 0.5, condition)
        assert counting.calls == 1
        policy.image.velocity(x_t, 0.5, condition, cfg_scale=2.0)
        assert counting.calls == 2  # conditional and unconditional in one batched call
    finally:
        policy.image.model = original


def test_rollout_records_on_policy_log_probs(policy):
    envs = unigrpo_env.make_vec("t2i_reason", num_prompts=2, group_size=2, num_steps=4)
    result = rollout(policy, envs, RolloutSettings(sde_window=(1, 2)), seed=0)
    assert result.rewards.shape == (4,) and result.network_calls == 4
    assert result.trajectory is envs.trajectory  # the rollout keeps the env's own record, no copy
    text = envs.trajectories()[0].turns[0].text
    turn = result.trajectory.turns[0]
    assert text.has_log_probs and torch.equal(text.tokens, turn.text.tokens[0, : turn.text.lengths[0]])
    assert (
        turn.image.stochastic.tolist()
        == [False, True, True, False]
        == envs.trajectories()[0].turns[0].image.stochastic.tolist()
    )
    tokens, recorded = turn.text.padded()
    recomputed = policy.text.log_probs(result.context(0), tokens, turn.text.lengths)
    mask = torch.arange(tokens.shape[1])[None] < turn.text.lengths[:, None]
    assert torch.allclose(recomputed[mask], recorded[mask], atol=1e-4)  # the ratio is 1 on-policy


def test_evaluation_reports_every_category_and_writes_files(policy, tmp_path):
    scenario = unigrpo_env.make_scenario("t2i_reason", num_steps=3)
    report = shapes_evaluator(batch_size=6).evaluate(policy, scenario, limit=12, out_dir=tmp_path)
    assert set(report.pipeline) >= {"overall"} and report.pipeline["overall"].count == 12
    assert 0.0 <= report.probes["image_given_truth"]["overall"].correct <= 1.0
    assert set(report.metrics) == {"description_accuracy", "image_quality"}
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["pipeline"]["overall"]["count"] == 12 and (tmp_path / "grid.png").stat().st_size > 0


def test_evaluation_uses_the_runs_reward_and_finds_genevals_verdict_inside_a_sum(policy):
    evaluator = shapes_evaluator(batch_size=6)
    plain = evaluator.evaluate(policy, unigrpo_env.make_scenario("t2i_reason", num_steps=3), limit=6, run_probes=False)
    summed_scenario = unigrpo_env.make_scenario("t2i_reason", num_steps=3, reward="shapes_verifier:1.0,quality:0.5")
    summed = evaluator.evaluate(policy, summed_scenario, limit=6, run_probes=False)
    assert not plain.probes and not summed.probes
    # a reward given to the evaluator scores instead of the scenario's own
    also_summed = evaluator.evaluate(
        policy,
        unigrpo_env.make_scenario("t2i_reason", num_steps=3),
        limit=6,
        run_probes=False,
        reward=summed_scenario.reward,
    )
    assert also_summed.pipeline == summed.pipeline
    assert summed.overall("pipeline", "correct") == plain.overall("pipeline", "correct")  # same images, same verdicts
    assert summed.overall("pipeline", "reward") > plain.overall("pipeline", "reward")  # + 0.5 × quality (> 0)
    # the evaluation's image-quality column is the quality reward of the same images
    gain = summed.overall("pipeline", "reward") - plain.overall("pipeline", "reward")
    assert gain == pytest.approx(0.5 * plain.metrics["image_quality"]["overall"], abs=1e-5)
    assert 0.0 < plain.metrics["image_quality"]["overall"] <= 1.0


def test_bad_checkpoints_raise_checkpoint_error(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_shapes_policy(tmp_path / "missing")
    (tmp_path / "half" / "language_model").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="language_model/config.json"):
        load_shapes_policy(tmp_path / "half")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "flow_model" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="could not load"):
        load_shapes_policy(broken)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "unigrpo_env.cli.main", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "scenario", "t2i_reason", "--checkpoint", "/nonexistent/ckpt"], "does not exist"),
        (["eval", "scenario", "no_such_scenario"], "unknown scenario"),
        (["eval", "scenario", "t2i_reason", "--eval-cfg", "0.5"], "--eval-cfg"),
        (["eval", "scenario", "t2i_reason", "--cfg", "2"], "--cfg was renamed --eval-cfg"),
        (["eval", "scenario", "t2i_reason", "--bogus"], "No such option"),
        (["list", "everything"], "everything"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(args, message):
    done = run_cli(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unigrpo: error:") and message in lines[0]
    assert "Traceback" not in done.stderr


def test_cli_eval_on_a_checkpoint_folder(tiny_checkpoint, tmp_path):
    done = run_cli(
        "eval", "scenario", "t2i_reason", "--checkpoint", str(tiny_checkpoint), "--limit", "6", "--out", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    assert "overall" in done.stdout and (tmp_path / "eval.json").exists() and (tmp_path / "grid.png").exists()
