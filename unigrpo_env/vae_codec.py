"""Latent space: a diffusers ``AutoencoderKL`` behind the :class:`~unigrpo_env.codecs.ImageCodec` contract.

Latent-space flow models (Stable Diffusion 3, FLUX) denoise the latents of a VAE, not pixels. The
codec maps, with the VAE's own ``scaling_factor`` s and ``shift_factor`` b (0 where the VAE has
none, as SD 1.x / 2.x)::

    encode:  x = image / 127.5 − 1            ([N, H, W, 3] uint8 -> [N, 3, H, W] in [−1, 1])
             latents = (vae.encode(x).latent_dist.sample() − b) · s
    decode:  x = vae.decode(latents / s + b).sample
             image = round((clamp(x, −1, 1) + 1) · 127.5)   ([N, H, W, 3] uint8)

which is how diffusers' own SD3 and FLUX pipelines scale (``latents / s + b`` before
``vae.decode``). The environment's latents stay ``[N, C, h, w]`` float32 with ``C`` the VAE's latent
channels and ``h = w = image_size / 2^(len(block_out_channels) − 1)``; model-specific packing
(FLUX's 2×2 patches and position ids) belongs to the policy, not here.

The VAE runs under ``torch.no_grad`` in its own dtype (float32 unless told otherwise) on its own
device, in chunks of ``chunk_size`` images, so a large batch does not need one large activation.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from unigrpo_env._diffusers import dtype_option
from unigrpo_env.codecs import ImageCodec

__all__ = ["VAECodec"]


class VAECodec(ImageCodec):
    """A diffusers ``AutoencoderKL`` as an image codec; see the module docstring.

    Args:
        vae: the ``diffusers.AutoencoderKL`` (its weights are frozen: the codec never trains it).
        image_size: the side of the square RGB images, in pixels; a multiple of the VAE's
            downsampling factor.
        chunk_size: images per VAE call, for encoding and decoding alike.
        sample: encode with a sample of the latent distribution (as diffusers' training scripts
            do) or, with False, its mode (deterministic).
        generator: the generator of those samples.
    """

    def __init__(
        self,
        vae: Any,
        image_size: int,
        *,
        chunk_size: int = 8,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ):
        config = vae.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        if image_size < factor or image_size % factor:
            raise ValueError(
                f"image_size must be a positive multiple of the VAE's downsampling factor {factor}, got {image_size}"
            )
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.vae = vae.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.downsampling = factor
        self.latent_shape = (int(config.latent_channels), self.image_size // factor, self.image_size // factor)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.chunk_size = int(chunk_size)
        self.sample = bool(sample)
        self.generator = generator

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        image_size: int,
        *,
        subfolder: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **options: Any,
    ) -> VAECodec:
        """Load the VAE of a folder or hub id (``subfolder="vae"`` for a whole pipeline's folder)
        with diffusers' ``AutoencoderKL.from_pretrained``; ``options`` go to the codec."""
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, **dtype_option(dtype))
        return cls(vae.to(device), image_size, **options)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def to(self, device: str | torch.device) -> VAECodec:
        """Move the VAE to ``device`` (encoding and decoding then run there); returns the codec."""
        self.vae.to(device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, H, W, 3]`` uint8 images -> ``[N, C, h, w]`` float32 latents (on the images' device)."""
        if images.dim() != 4 or images.shape[-1] != 3 or tuple(images.shape[1:3]) != (self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape [N, {self.image_size}, {self.image_size}, 3], got {tuple(images.shape)}"
            )
        pixels = images.permute(0, 3, 1, 2).to(self.device, torch.float32) / 127.5 - 1.0
        chunks = []
        for chunk in pixels.split(self.chunk_size):
            posterior = self.vae.encode(chunk.to(self.dtype)).latent_dist
            z = posterior.sample(generator=self.generator) if self.sample else posterior.mode()
            chunks.append((z.float() - self.shift_factor) * self.scaling_factor)
        return torch.cat(chunks).to(images.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[N, C, h, w]`` latents -> ``[N, H, W, 3]`` uint8 images (on the latents' device)."""
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"expected latents of shape [N, {', '.join(map(str, self.latent_shape))}], got {tuple(latents.shape)}"
            )
        chunks = []
        for chunk in latents.detach().to(self.device, torch.float32).split(self.chunk_size):
            z = chunk / self.scaling_factor + self.shift_factor
            pixels = self.vae.decode(z.to(self.dtype)).sample.float()
            chunks.append(((pixels.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8))
        return torch.cat(chunks).permute(0, 2, 3, 1).contiguous().to(latents.device)
