"""The UniGRPO agent, unchanged, on real model classes: a tiny Qwen2 chat model (its own tokenizer
and chat template) writes, a tiny Stable Diffusion 3 pipeline draws in its VAE's latent space. One
iteration with LoRA adapters on both sides: exactly on-policy, and only the adapters move."""

from __future__ import annotations

import pytest
import torch
from test_chat_policy import chat_folder  # noqa: F401  (the fixture)
from test_sd3_policy import tiny_pipeline

from unigrpo_env import RewardOutput, Scenario, Task, VAECodec, World
from unigrpo_env.agents import UnifiedPolicy, UniGRPOAgent, UniGRPOConfig
from unigrpo_env.agents.chat_policy import chat_text_policy, reasoning_text, text_codec
from unigrpo_env.agents.sd3_policy import SD3FlowPolicy


class LatentPrompts(Scenario):
    """Two prompts; the chat model's tokenizer for text, the SD3 VAE's latents for images."""

    name = "latent_prompts"

    def __init__(self, tokenizer, vae):
        self.text_codec = text_codec(tokenizer, max_tokens=5)
        self.image_codec = VAECodec(vae, 16, sample=False)
        self.reward = lambda inputs: RewardOutput(scores=inputs.images.float().mean(dim=(1, 2, 3)) / 255.0)
        self.num_steps, self.shift = 3, 3.0

    def tasks(self, split):
        return [
            Task(prompts=(p,), category=p.split()[-1], split=split, index=i)
            for i, p in enumerate(["draw a red circle", "draw a blue square"])
        ]

    def default_world(self) -> World:
        return World.shifted(self.text_codec, self.image_codec, self.num_steps, self.shift)


@pytest.mark.parametrize("adapter", ["lora"])
def test_one_iteration_on_a_chat_model_and_sd3_is_on_policy_and_moves_only_the_adapters(chat_folder, adapter):  # noqa: F811
    pipe = tiny_pipeline()
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        part.eval()
    pipe.set_progress_bar_config(disable=True)
    text = chat_text_policy(chat_folder)
    image = SD3FlowPolicy(pipe, reasoning_text(text.tokenizer), max_sequence_length=16)
    policy = UnifiedPolicy(text, image)
    config = UniGRPOConfig(
        scenario="latent_prompts", num_prompts=2, group_size=2, sde_window_size=None, text_adapter=adapter,
        image_adapter=adapter, lora_rank=2, lr_text=1e-2, lr_image=1e-2, iterations=1,
    )  # fmt: skip
    agent = UniGRPOAgent(policy, config, scenario=LatentPrompts(text.tokenizer, pipe.vae))
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    stats = agent.train_iteration()
    assert stats["first_ratio_text_max_dev"] == 0.0 and stats["first_ratio_image_max_dev"] == 0.0
    assert stats["text_log_prob_drift"] < 1e-4 and stats["image_log_prob_drift"] < 1e-4
    moved = {name for name, p in policy.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert moved and all("lora_" in name for name in moved)
    assert any(name.startswith("text.") for name in moved) and any(name.startswith("image.") for name in moved)
    assert agent.envs.trajectory.turns[0].image.latents.shape == (4, 4, 4, 8, 8)  # x_1 and 3 steps of [4, 8, 8] latents


def test_in_bf16_autocast_every_on_policy_ratio_is_exactly_1_and_the_rollout_agrees(
    chat_folder,  # noqa: F811
    fresh_accelerate_state,
):
    """bf16 mixed precision (Accelerate's autocast, the flow math in float32), two minibatches and
    two epochs with the optimizer's step switched off, so every minibatch of every epoch is on policy: the old
    log-probabilities are recomputed at each training minibatch's shape in the same autocast, so
    every ratio is exactly 1; the rollout's own log-probabilities (all episodes, one step at a
    time) agree with them to bf16's precision."""
    pipe = tiny_pipeline()
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        part.eval()
    pipe.set_progress_bar_config(disable=True)
    text = chat_text_policy(chat_folder)
    policy = UnifiedPolicy(text, SD3FlowPolicy(pipe, reasoning_text(text.tokenizer), max_sequence_length=16))
    config = UniGRPOConfig(
        scenario="latent_prompts", num_prompts=2, group_size=2, sde_window_size=None, text_adapter="lora",
        image_adapter="lora", lora_rank=2, iterations=1, minibatches=2, ppo_epochs=2,
        mixed_precision="bf16", warmup_iterations=0,
    )  # fmt: skip
    agent = UniGRPOAgent(policy, config, scenario=LatentPrompts(text.tokenizer, pipe.vae))
    assert agent.accelerator.mixed_precision == "bf16"
    agent.optimizer.step = lambda *args, **kwargs: None  # the policy stays the rollout's
    with torch.autocast("cpu", enabled=False):  # the test's own reference: nothing autocast here
        batch = agent.collect(0)
        stats = agent.update(batch)
    # the mean over the 4 minibatch steps of each step's largest |ratio − 1|: 0 means every one is 0
    assert stats["text_ratio_max_dev"] == 0.0 and stats["image_ratio_max_dev"] == 0.0
    # the rollout ran in bf16: its log-probabilities are the autocast recomputation's, not float32's
    every = torch.arange(len(batch))
    with torch.no_grad():
        with agent.accelerator.autocast():
            bf16 = agent._log_probs(batch, every).turns[0]
        fp32 = agent._log_probs(batch, every).turns[0]
    text_bf16, image_bf16, text_fp32, image_fp32 = bf16.text, bf16.image, fp32.text, fp32.image
    turn = batch.trajectory.turns[0]
    recorded_text, recorded_image = turn.text.padded()[1], turn.image.log_probs[:, turn.image.sde_steps]
    assert (image_bf16 - recorded_image).abs().max() <= stats["image_log_prob_drift"] + 1e-6
    assert (image_fp32 - recorded_image).abs().max() > 1e-5  # bf16 really was in use
    mask = torch.arange(recorded_text.shape[1])[None] < turn.text.lengths[:, None]
    assert ((text_bf16 - recorded_text).abs()[mask]).max() <= stats["text_log_prob_drift"] + 1e-6
    assert not torch.equal(text_fp32[mask], recorded_text[mask])
    # on this CPU bf16's kernels give the same numbers at the rollout's and the training's shapes
    # (drift 0.0); on GPUs they need not, which is why the old log-probabilities are recomputed
    assert stats["image_log_prob_drift"] < 0.05 and stats["text_log_prob_drift"] < 0.05


def test_gradient_checkpointing_changes_memory_not_numbers(chat_folder):  # noqa: F811
    """One iteration with and without activation checkpointing on both sides (LoRA): the same
    losses, ratios, gradient norms and updated adapters; the libraries' own switches are on."""
    from unigrpo_env.agents.checkpointing import is_gradient_checkpointing

    results = []
    for checkpointing in (False, True):
        pipe = tiny_pipeline()
        for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            part.eval()
        pipe.set_progress_bar_config(disable=True)
        torch.manual_seed(0)
        text = chat_text_policy(chat_folder)
        policy = UnifiedPolicy(text, SD3FlowPolicy(pipe, reasoning_text(text.tokenizer), max_sequence_length=16))
        config = UniGRPOConfig(
            scenario="latent_prompts", num_prompts=2, group_size=2, sde_window_size=None, text_adapter="lora",
            image_adapter="lora", lora_rank=2, lr_text=1e-2, lr_image=1e-2, iterations=1, minibatches=2,
            gradient_checkpointing=checkpointing,
        )  # fmt: skip
        agent = UniGRPOAgent(policy, config, scenario=LatentPrompts(text.tokenizer, pipe.vae))
        assert is_gradient_checkpointing(policy.text) == is_gradient_checkpointing(policy.image) == checkpointing
        stats = agent.train_iteration()
        results.append((stats, {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}))
    (plain, plain_weights), (checkpointed, checkpointed_weights) = results
    for key, value in plain.items():
        if not key.startswith("time_") and isinstance(value, float):
            assert checkpointed[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
    assert plain_weights.keys() == checkpointed_weights.keys() and plain_weights
    for name, weight in plain_weights.items():
        assert torch.allclose(weight, checkpointed_weights[name], atol=1e-6), name


def test_a_network_without_checkpointing_is_a_clear_error():
    from unigrpo_env.agents.checkpointing import GradientCheckpointingError, enable_gradient_checkpointing

    class Plain:
        model = torch.nn.Linear(2, 2)

    with pytest.raises(
        GradientCheckpointingError, match="the image model Linear is neither a transformers nor a diffusers"
    ):
        enable_gradient_checkpointing(Plain(), "image")
    with pytest.raises(GradientCheckpointingError, match="needs a text policy whose network is its .model"):
        enable_gradient_checkpointing(object(), "text")
