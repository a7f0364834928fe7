"""The world: the model's side of an environment.

An environment is made of two things. The **scenario** is the task family's side: its tasks and
splits and its reward. The **world** is the model's side: how its text is tokenized (the
:class:`~unigrpo_env.codecs.TextCodec`: tokenizer, end-of-thinking id, token limit), what its
latents are (the :class:`~unigrpo_env.codecs.ImageCodec`: latent shape, decoding to RGB), and the
time grid its images are denoised on. In TRL's terms the tokenizer belongs to the model, not to
the dataset; in diffusers' the scheduler belongs to the pipeline. So a policy brings its world,
and the same scenario runs with any policy's.

The time grid is the ``num_steps + 1`` times from 1 (noise) to 0 (data), float32, strictly
decreasing. :meth:`World.shifted` makes SD3's static-shift grid
``t' = s·t / (1 + (s − 1)·t)`` over a uniform ``t``; a model whose grid depends on the image
(FLUX's resolution-dependent shift) gives its own ``timesteps``.

``InterleavedEnv(scenario, world)``, ``make_vec(scenario, P, G, world=world)``: without a world
the environment takes the scenario's :meth:`~unigrpo_env.scenario.Scenario.default_world`
(ShapesWorld's scenarios have one, so ``gym.make("unigrpo/T2IReason-v0")`` needs none).
"""

from __future__ import annotations

import math

import torch

from unigrpo_env import flow
from unigrpo_env.codecs import ImageCodec, TextCodec

__all__ = ["World"]


class World:
    """What a model's tokens, latents and time grid are (see the module docstring).

    Args:
        text_codec: token ids <-> text, the end-of-thinking token and the token limit.
        image_codec: images <-> latents; its ``latent_shape`` is every latent's shape.
        timesteps: the time grid, ``num_steps + 1`` finite values from exactly 1 down to exactly 0,
            strictly decreasing.
    """

    def __init__(self, text_codec: TextCodec, image_codec: ImageCodec, timesteps: torch.Tensor):
        for codec, what, needs in (
            (text_codec, "text_codec", ("eot_id", "pad_id", "vocab_size", "max_tokens", "decode")),
            (image_codec, "image_codec", ("latent_shape", "image_size", "decode")),
        ):
            missing = [name for name in needs if not hasattr(codec, name)]
            if missing:
                raise TypeError(
                    f"{what} must be a unigrpo_env.{'TextCodec' if what == 'text_codec' else 'ImageCodec'} "
                    f"(it has no {', '.join(missing)}), got {type(codec).__name__}"
                )
        grid = torch.as_tensor(timesteps).detach().to("cpu", torch.float32).reshape(-1)
        values = grid.tolist()
        if len(values) < 2 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"timesteps must be at least 2 finite values, got {values[:8]}")
        if values[0] != 1.0 or values[-1] != 0.0 or any(b >= a for a, b in zip(values, values[1:])):
            raise ValueError(
                f"timesteps must fall strictly from exactly 1.0 to exactly 0.0, got {values[:4]} … {values[-2:]}"
            )
        self.text_codec = text_codec
        self.image_codec = image_codec
        self._timesteps = grid

    @classmethod
    def shifted(cls, text_codec: TextCodec, image_codec: ImageCodec, num_steps: int, shift: float = 1.0) -> World:
        """A world whose grid is ``num_steps`` uniform steps under SD3's static time shift ``shift``
        (1: uniform), :func:`unigrpo_env.flow.timestep_schedule`."""
        return cls(text_codec, image_codec, flow.timestep_schedule(num_steps, shift))

    @property
    def num_steps(self) -> int:
        """Denoising steps per image."""
        return len(self._timesteps) - 1

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.image_codec.latent_shape)

    @property
    def image_size(self) -> int:
        return int(self.image_codec.image_size)

    def timesteps(self) -> torch.Tensor:
        """The time grid, ``num_steps + 1`` float32 values from 1 to 0 (a copy)."""
        return self._timesteps.clone()

    def __repr__(self) -> str:
        return (
            f"World(vocab_size={self.text_codec.vocab_size}, max_tokens={self.text_codec.max_tokens}, "
            f"latent_shape={self.latent_shape}, num_steps={self.num_steps})"
        )
