"""Stable Diffusion 3 as the image policy, on a tiny random StableDiffusion3Pipeline built from
configs in code (three text encoders, their tokenizers built locally with ``tokenizers``): the
policy's ODE rollout is the pipeline's own output, with and without CFG, and its condition is
encoded once per text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from unigrpo_env import VAECodec, flow
from unigrpo_env.agents.policy import TurnContext
from unigrpo_env.agents.sd3_policy import SD3FlowPolicy

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "a", "red", "green", "blue", "circle", "square", "draw"]
PROMPTS = ["draw a red circle", "draw a blue square"]
STEPS, SHIFT = 4, 3.0


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=16,
    )


def tiny_pipeline() -> StableDiffusion3Pipeline:
    """SD3's hidden constraints: pooled_projection_dim = 2 × CLIP's projection_dim, and
    joint_attention_dim = T5's d_model (≥ the two CLIP hidden sizes side by side)."""
    torch.manual_seed(0)
    clip = dict(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=32, max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    t5 = T5Config(vocab_size=len(WORDS), d_model=64, d_ff=37, d_kv=8, num_layers=1, num_heads=4, pad_token_id=0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=1.5, shift_factor=0.1,
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), vae=vae,
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer=_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)), tokenizer_2=_tokenizer(),
        text_encoder_3=T5EncoderModel(t5), tokenizer_3=_tokenizer(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def pipe() -> StableDiffusion3Pipeline:
    pipe = tiny_pipeline()
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        part.eval()  # as from_pretrained leaves them (T5 has dropout)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _context(n: int) -> TurnContext:
    return TurnContext(
        prompts=[("p",)] * n, history=[[] for _ in range(n)], images=torch.zeros((n, 0, 16, 16, 3), dtype=torch.uint8),
        reasoning=torch.zeros((n, 0), dtype=torch.long), reasoning_lengths=torch.zeros(n, dtype=torch.long),
    )  # fmt: skip


def _policy(pipe) -> SD3FlowPolicy:
    return SD3FlowPolicy(pipe, lambda context: PROMPTS[: len(context)], max_sequence_length=16)


def _ode_rollout(policy, noise: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    grid = flow.timestep_schedule(STEPS, SHIFT)
    condition = policy.condition(_context(noise.shape[0]))
    x = noise
    with torch.no_grad():
        for k in range(STEPS):
            x = flow.ode_step(policy.velocity(x, grid[k], condition, cfg_scale=cfg_scale), x, grid[k], grid[k + 1])
    return x


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_the_policys_ode_rollout_is_the_pipelines_own_output(pipe, cfg_scale):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = _ode_rollout(_policy(pipe), noise, cfg_scale)
    theirs = pipe(
        prompt=PROMPTS, latents=noise.clone(), sigmas=list(np.linspace(1.0, 1.0 / STEPS, STEPS)), guidance_scale=cfg_scale,
        output_type="latent", height=16, width=16, max_sequence_length=16,
    ).images  # fmt: skip
    assert theirs.shape == ours.shape == (2, 4, 8, 8)
    assert torch.allclose(ours, theirs, atol=1e-5)
    images = VAECodec(pipe.vae, 16).decode(ours)  # the env's decoder of these latents
    assert images.shape == (2, 16, 16, 3) and images.dtype == torch.uint8


def test_each_text_is_encoded_once_and_only_the_mmdit_trains(pipe):
    policy = _policy(pipe)
    calls = []
    encode = pipe.encode_prompt

    def counted(**kwargs):
        calls.append(list(kwargs["prompt"]))
        return encode(**kwargs)

    pipe.encode_prompt = counted
    try:
        policy.condition(_context(2))
        policy.condition(_context(2))  # cached
        policy.velocity(torch.zeros(2, 4, 8, 8), 0.5, policy.condition(_context(2)), cfg_scale=2.0)
        policy.velocity(torch.zeros(2, 4, 8, 8), 0.5, policy.condition(_context(2)), cfg_scale=2.0)
    finally:
        pipe.encode_prompt = encode
    assert calls == [PROMPTS, [""]]  # the two prompts once, the negative prompt once
    trained = {id(p) for p in policy.parameters()}
    assert trained == {id(p) for p in pipe.transformer.parameters()}
    assert not trained & {id(p) for p in pipe.text_encoder.parameters()}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    policy.velocity(x, 0.7, policy.condition(_context(2))).pow(2).mean().backward()
    assert all(p.grad is not None for p in pipe.transformer.parameters() if p.requires_grad)
    pipe.transformer.zero_grad(set_to_none=True)


def test_saves_the_mmdit_and_loads_from_a_pipeline_folder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipeline")
    loaded = SD3FlowPolicy.from_pretrained(
        tmp_path / "pipeline", lambda context: PROMPTS[: len(context)], max_sequence_length=16
    )
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(_ode_rollout(loaded, noise, 1.0), _ode_rollout(_policy(pipe), noise, 1.0), atol=1e-6)
    loaded.save_pretrained(str(tmp_path / "flow_model"))
    again = SD3Transformer2DModel.from_pretrained(tmp_path / "flow_model")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), pipe.transformer.state_dict().values()))


def test_the_frozen_text_encoders_and_vae_follow_the_transformer_and_the_reference_shares_them():
    """On a GPU the transformer is moved to it with the policy; the pipeline's text encoders and
    VAE (not the policy's parameters) follow on the first condition, so prompts are encoded there
    (shown with the meta device, which every machine has). The frozen reference copy of a side
    trained in full shares the conditioner (no second host copy of T5) and copies the MMDiT."""
    from unigrpo_env.agents.adapters import starting_model

    pipe = tiny_pipeline()
    policy = _policy(pipe)
    reference = starting_model(policy)
    assert reference.conditioner is policy.conditioner and reference.model is not policy.model
    assert all(p.device.type == "cpu" for p in pipe.text_encoder_3.parameters())
    policy.model.to("meta")
    policy.conditioner.encode = lambda texts: (  # no real encoding on the meta device
        torch.zeros(len(texts), 3, 8, device="meta"),
        torch.zeros(len(texts), 8, device="meta"),
    )
    condition = policy.condition(_context(2))
    assert condition["encoder_hidden_states"].device.type == "meta"
    for part in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae):
        assert all(p.device.type == "meta" for p in part.parameters()), type(part).__name__


def test_the_latent_shape_check_refuses_what_the_mmdit_cannot_draw(pipe):
    from types import SimpleNamespace

    from unigrpo_env.agents.policy import PolicyMismatchError, check_policy_fits

    policy = _policy(pipe)
    policy.check_latent_shape((4, 8, 8))
    largest = pipe.transformer.config.pos_embed_max_size  # patch size 1: the largest side in latents
    policy.check_latent_shape((4, largest, largest))
    for shape, reason in (((4, largest + 1, 8), "at most"), ((3, 8, 8), "4 latent channels")):
        with pytest.raises(ValueError, match=reason):
            policy.check_latent_shape(shape)
    with pytest.raises(ValueError, match="pos_embed_max_size"):  # what the check stands in for
        policy.predict(torch.zeros(1, 4, largest + 1, 8), torch.ones(1), policy.condition(_context(1)))

    world = SimpleNamespace(latent_shape=(4, largest + 1, 8), image_size=776)
    with pytest.raises(PolicyMismatchError, match=r"scenario 'big' \(shape \(4, 97, 8\), image size 776\)"):
        check_policy_fits(SimpleNamespace(text=SimpleNamespace(), image=policy), SimpleNamespace(name="big"), world)


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_time_grid_is_the_pipelines_own(pipe, dynamic):
    # SD3's static shift, or SD3.5's dynamic one: the world's grid is what the pipeline denoises on
    from diffusers import FlowMatchEulerDiscreteScheduler

    kept = pipe.scheduler
    pipe.scheduler = (
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=256)
        if dynamic
        else FlowMatchEulerDiscreteScheduler(shift=3.0)
    )
    try:
        policy = _policy(pipe)
        grids = {}
        for size in (8, 16):
            grids[size] = policy.time_grid(5, (4, size // 2, size // 2))
            pipe(prompt=PROMPTS[:1], num_inference_steps=5, height=size, width=size, output_type="latent",
                 max_sequence_length=16)  # fmt: skip
            assert torch.equal(grids[size], pipe.scheduler.sigmas.float()), size
        assert torch.equal(grids[8], grids[16]) != dynamic  # static: one grid; dynamic: it moves with the size
        if not dynamic:  # the pipeline's own grid is not shift(1 - i/N): its sigmas run to the shifted 1/1000
            assert not torch.allclose(grids[8], flow.timestep_schedule(5, 3.0), atol=1e-3)
    finally:
        pipe.scheduler = kept
