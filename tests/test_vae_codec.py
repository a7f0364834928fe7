"""The VAE codec on a tiny random diffusers AutoencoderKL built from a config in code: its
scaling and shift as diffusers' pipelines apply them, chunking, loading from a saved folder, and
an environment whose latents are a VAE's."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyScenario
from diffusers import AutoencoderKL

import unigrpo_env
from unigrpo_env import FlowAction, InterleavedEnv, TextAction, VAECodec

SCALE, SHIFT = 1.5, 0.1


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=SCALE,
        shift_factor=SHIFT,
    ).eval()


def images(n: int = 5, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_encode_and_decode_apply_the_vaes_scaling_and_shift():
    vae = tiny_vae()
    codec = VAECodec(vae, 16, sample=False)
    assert codec.latent_shape == (4, 8, 8) and codec.image_size == 16
    batch = images()
    latents = codec.encode(batch)
    x = batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        expected = (vae.encode(x).latent_dist.mode() - SHIFT) * SCALE
        pixels = vae.decode(latents / SCALE + SHIFT).sample
    assert latents.dtype == torch.float32 and latents.shape == (5, 4, 8, 8)
    assert torch.allclose(latents, expected, atol=1e-6)
    decoded = codec.decode(latents)
    assert decoded.dtype == torch.uint8 and decoded.shape == (5, 16, 16, 3)
    assert torch.equal(decoded, ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    assert not latents.requires_grad and not any(p.requires_grad for p in vae.parameters())


def test_chunks_give_the_same_result_as_one_call():
    vae = tiny_vae()
    batch = images(7)
    whole, chunked = VAECodec(vae, 16, sample=False, chunk_size=16), VAECodec(vae, 16, sample=False, chunk_size=2)
    assert torch.allclose(whole.encode(batch), chunked.encode(batch), atol=1e-6)
    latents = whole.encode(batch)
    assert torch.equal(whole.decode(latents), chunked.decode(latents))


def test_sampled_encoding_follows_its_generator():
    vae = tiny_vae()

    def sampled(seed: int) -> torch.Tensor:
        return VAECodec(vae, 16, generator=torch.Generator().manual_seed(seed)).encode(images())

    assert torch.equal(sampled(3), sampled(3)) and not torch.equal(sampled(3), sampled(4))
    assert not torch.allclose(sampled(3), VAECodec(vae, 16, sample=False).encode(images()))


def test_loads_from_a_saved_folder_and_a_pipelines_vae_subfolder(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "pipeline" / "vae")
    direct = VAECodec.from_pretrained(tmp_path / "pipeline" / "vae", 16, sample=False)
    nested = VAECodec.from_pretrained(tmp_path / "pipeline", 16, subfolder="vae", sample=False)
    reference = VAECodec(vae, 16, sample=False).encode(images())
    assert torch.allclose(direct.encode(images()), reference, atol=1e-6)
    assert torch.allclose(nested.encode(images()), reference, atol=1e-6)
    assert (nested.scaling_factor, nested.shift_factor) == (SCALE, SHIFT)


def test_bad_sizes_are_refused_with_what_was_expected():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor 2"):
        VAECodec(vae, 15)
    codec = VAECodec(vae, 16)
    with pytest.raises(ValueError, match=r"\[N, 16, 16, 3\]"):
        codec.encode(images(size=8))
    with pytest.raises(ValueError, match=r"\[N, 4, 8, 8\]"):
        codec.decode(torch.zeros(2, 3, 8, 8))


class LatentToy(ToyScenario):
    """The toy scenario, its images drawn in the latent space of the tiny VAE."""

    def __init__(self):
        super().__init__(num_turns=2, num_steps=3, image_size=16)
        self.image_codec = VAECodec(tiny_vae(), 16, sample=False)


def test_an_environment_denoises_vae_latents_and_scores_decoded_images():
    env = InterleavedEnv(LatentToy())
    obs, _ = env.reset(seed=0)
    for _ in range(2):  # two turns: the second conditions on the first's decoded image
        obs, *_ = env.step(TextAction(tokens=[3, 2]))
        assert obs.phase == "image" and obs.x_t.shape == (4, 8, 8)
        while obs.phase == "image":
            obs, reward, terminated, _, info = env.step(FlowAction(x_next=obs.x_t * 0.5))
    assert terminated and 0.0 <= reward <= 1.0
    trajectory = info["trajectory"]
    assert trajectory.turns[1].image.x_next.shape == (3, 4, 8, 8) and trajectory.final_image.shape == (16, 16, 3)
    envs = unigrpo_env.make_vec(LatentToy(), num_prompts=2, group_size=2)
    obs, _ = envs.reset(seed=1)
    obs, *_ = envs.step(TextAction(tokens=[[2]] * 4))
    assert obs.x_t.shape == (4, 4, 8, 8)


def test_the_codec_moves_its_vae_and_an_environment_puts_it_on_its_device():
    from unigrpo_env.codecs import PixelCodec

    codec = VAECodec(tiny_vae(), 16, sample=False)
    assert codec.to("meta") is codec and codec.device.type == "meta"
    pixel = PixelCodec(8)
    assert pixel.to("meta") is pixel  # nothing to move

    import unigrpo_env
    from unigrpo_env.registration import make_scenario

    scenario = make_scenario("t2i_reason")
    moved = []
    scenario.image_codec.to = lambda device: moved.append(str(device)) or scenario.image_codec
    unigrpo_env.make_vec(scenario, num_prompts=1, group_size=2)
    assert moved == ["cpu"]
