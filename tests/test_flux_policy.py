"""FLUX.1 as the image policy, on a tiny random FluxPipeline built from configs in code: packing
and position ids as the pipeline's own, and the policy's ODE rollout equal to the pipeline's output
(distilled guidance as a model input; true CFG with a negative prompt)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from test_sd3_policy import PROMPTS, WORDS, _context, _tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from unigrpo_env import flow
from unigrpo_env.agents.flux_policy import FluxFlowPolicy, latent_image_ids, pack_latents, unpack_latents

STEPS, SHIFT = 4, 3.0


def tiny_pipeline(guidance_embeds: bool) -> FluxPipeline:
    """FLUX's hidden constraints: in_channels = 4 × the VAE's latent channels (2×2 packing),
    joint_attention_dim = T5's d_model, pooled_projection_dim = CLIP's hidden size, and the rope
    axes adding up to the attention head's size."""
    torch.manual_seed(0)
    clip = CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        projection_dim=32, max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    t5 = T5Config(vocab_size=len(WORDS), d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4, pad_token_id=0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.3611, shift_factor=0.1159,
    )  # fmt: skip
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), vae=vae,
        text_encoder=CLIPTextModel(clip), tokenizer=_tokenizer(), text_encoder_2=T5EncoderModel(t5), tokenizer_2=_tokenizer(),
    )  # fmt: skip
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.eval()  # as from_pretrained leaves them (T5 has dropout)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_packing_and_position_ids_are_the_pipelines():
    x = torch.randn(2, 4, 8, 6)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 8, 6)) and packed.shape == (2, 12, 16)
    assert torch.equal(unpack_latents(packed, 8, 6), x)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    assert torch.equal(latent_image_ids(8, 6), ids.reshape(-1, 3))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 4, 7, 8))


@pytest.mark.parametrize("guidance_embeds,cfg_scale", [(False, 1.0), (True, 1.0), (False, 2.0)])
def test_the_policys_ode_rollout_is_the_pipelines_own_output(guidance_embeds, cfg_scale):
    pipe = tiny_pipeline(guidance_embeds)
    policy = FluxFlowPolicy(pipe, lambda context: PROMPTS[: len(context)], guidance_scale=3.5, max_sequence_length=16)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = flow.timestep_schedule(STEPS, SHIFT)
    condition = policy.condition(_context(2))
    x = noise
    with torch.no_grad():
        for k in range(STEPS):
            x = flow.ode_step(policy.velocity(x, grid[k], condition, cfg_scale=cfg_scale), x, grid[k], grid[k + 1])
    theirs = pipe(
        prompt=PROMPTS, negative_prompt=[""] * 2 if cfg_scale > 1 else None, true_cfg_scale=cfg_scale,
        latents=pack_latents(noise), sigmas=list(np.linspace(1.0, 1.0 / STEPS, STEPS)), guidance_scale=3.5,
        output_type="latent", height=16, width=16, max_sequence_length=16,
    ).images  # fmt: skip
    assert torch.allclose(x, unpack_latents(theirs, 8, 8), atol=1e-5)
    assert {id(p) for p in policy.parameters()} == {id(p) for p in pipe.transformer.parameters()}


def test_kontext_draws_from_the_previous_image_as_the_pipeline_does(tmp_path):
    from diffusers import FluxKontextPipeline

    from unigrpo_env import VAECodec
    from unigrpo_env.agents.flux_policy import FluxKontextFlowPolicy

    flux = tiny_pipeline(guidance_embeds=True)
    pipe = FluxKontextPipeline(**flux.components)
    pipe.set_progress_bar_config(disable=True)
    policy = FluxKontextFlowPolicy(pipe, lambda context: PROMPTS[: len(context)], 16, max_sequence_length=16)
    earlier = torch.randint(0, 256, (2, 1, 16, 16, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    context = _context(2).model_copy(update={"images": earlier})  # a second turn: one image before it
    condition = policy.condition(context)
    reference = VAECodec(pipe.vae, 16, sample=False).encode(earlier[:, -1])
    assert torch.allclose(condition["image_latents"], reference)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = flow.timestep_schedule(STEPS, SHIFT)
    x = noise
    with torch.no_grad():
        for k in range(STEPS):
            x = flow.ode_step(policy.velocity(x, grid[k], condition), x, grid[k], grid[k + 1])
    theirs = pipe(
        image=reference, prompt=PROMPTS, latents=pack_latents(noise), sigmas=list(np.linspace(1.0, 1.0 / STEPS, STEPS)),
        guidance_scale=2.5, output_type="latent", height=16, width=16, max_area=16 * 16, max_sequence_length=16, _auto_resize=False,
    ).images  # fmt: skip
    assert torch.allclose(x, unpack_latents(theirs, 8, 8), atol=1e-5)
    # the earlier image matters, and a first turn (no earlier image) is plain FLUX
    blank = policy.condition(_context(2).model_copy(update={"images": torch.zeros_like(earlier)}))
    assert not torch.allclose(policy.velocity(noise, 1.0, blank), policy.velocity(noise, 1.0, condition))
    assert policy.condition(_context(2))["image_latents"] is None
    # and a saved Kontext pipeline loads as the same policy
    pipe.save_pretrained(tmp_path / "kontext")
    loaded = FluxKontextFlowPolicy.from_pretrained(
        tmp_path / "kontext", lambda context: PROMPTS[: len(context)], 16, max_sequence_length=16
    )
    assert torch.allclose(
        loaded.velocity(noise, 1.0, loaded.condition(context)), policy.velocity(noise, 1.0, condition), atol=1e-6
    )


def test_the_latent_shape_check_refuses_what_the_packing_cannot_take():
    policy = FluxFlowPolicy(tiny_pipeline(False), lambda context: PROMPTS[: len(context)], max_sequence_length=16)
    policy.check_latent_shape((4, 8, 8))
    for shape, reason in (((4, 7, 8), "even"), ((16, 8, 8), "4 latent channels")):
        with pytest.raises(ValueError, match=reason):
            policy.check_latent_shape(shape)


def test_the_time_grid_is_the_pipelines_own_and_moves_with_the_image_size():
    # FLUX.1's scheduler shifts with the image's token count (use_dynamic_shifting, mu); the world's
    # grid is what FluxPipeline itself denoises on, for each size
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_pipeline(False)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4, max_image_seq_len=64
    )
    policy = FluxFlowPolicy(pipe, lambda context: PROMPTS[: len(context)], max_sequence_length=16)
    grids = {}
    for size in (16, 32):
        latent = (4, size // 2, size // 2)  # the tiny VAE downsamples by 2
        grids[size] = policy.time_grid(4, latent)
        pipe(
            prompt=PROMPTS[:1], num_inference_steps=4, height=size, width=size, output_type="latent",
            max_sequence_length=16,
        )  # fmt: skip
        assert torch.equal(grids[size], pipe.scheduler.sigmas.float()), size
        assert grids[size][0] == 1.0 and grids[size][-1] == 0.0 and len(grids[size]) == 5
    assert not torch.allclose(grids[16], grids[32])  # more tokens, more shift toward noise
    assert bool((grids[32][1:-1] > grids[16][1:-1]).all())
