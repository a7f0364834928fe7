"""FLUX.1 as the image half of a unified policy.

:class:`FluxFlowPolicy` is a :class:`~unigrpo_env.agents.hf_policies.ConditionedFlowPolicy` over
the ``FluxTransformer2DModel`` of a diffusers ``FluxPipeline``. The environment's latents stay the
VAE's ``[N, C, h, w]``; what is particular to FLUX happens inside :meth:`FluxFlowPolicy.predict`:

* **packing**: the transformer reads 2×2 patches of the latent as tokens,
  ``[N, C, h, w] -> [N, (h/2)(w/2), 4C]`` (:func:`pack_latents`), and its output is unpacked
  back (:func:`unpack_latents`);
* **position ids**: each image token's (0, row, column) and zeros for the text tokens
  (:func:`latent_image_ids`), as the pipeline builds them;
* **timestep**: FLUX is given ``σ`` itself (the pipeline divides its ``σ·1000`` by 1000);
* **guidance**: FLUX.1-dev's distilled guidance is an *input* of the model (``guidance_scale``, a
  config value, used only where ``transformer.config.guidance_embeds``), not classifier-free
  guidance; ``cfg_scale`` is true CFG with a negative prompt, one batched call.

The condition is the pipeline's own ``encode_prompt`` (CLIP's pooled embedding and T5's sequence)
of the text the language model wrote, once per distinct text, the text encoders frozen and not
parameters of the policy (:class:`FluxPromptConditioner`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from unigrpo_env.agents.hf_policies import ConditionedFlowPolicy, PromptText
from unigrpo_env.agents.policy import TurnContext
from unigrpo_env.agents.prompt_conditioning import PipelineFlowPolicy, PromptConditioner, image_shift
from unigrpo_env.vae_codec import VAECodec

__all__ = [
    "pack_latents",
    "unpack_latents",
    "latent_image_ids",
    "FluxPromptConditioner",
    "FluxFlowPolicy",
    "FluxKontextConditioner",
    "FluxKontextFlowPolicy",
]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w] -> [N, (h/2)(w/2), 4C]``: each 2×2 patch one token, rows first."""
    n, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2×2 patches: the latent's height and width must be even, got {h}×{w}")
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`, for a latent of ``height × width``."""
    n, _, dim = tokens.shape
    c = dim // 4
    patches = tokens.view(n, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, c, height, width)


def latent_image_ids(
    height: int, width: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The position ids ``[(h/2)(w/2), 3]`` of the packed tokens of an ``height × width`` latent:
    (0, row, column) of each 2×2 patch."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)
    cols = torch.arange(width // 2, device=device, dtype=dtype)
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


class FluxPromptConditioner(PromptConditioner):
    """``encode_prompt`` of a ``FluxPipeline`` (CLIP's pooled embedding, T5's sequence), once per
    distinct text."""

    default_max_sequence_length = 512

    def encode_new(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts, prompt_2=texts, max_sequence_length=self.max_sequence_length
        )
        return embeds, pooled


class FluxFlowPolicy(PipelineFlowPolicy):
    """The transformer of a ``FluxPipeline`` as a :class:`~unigrpo_env.agents.policy.FlowPolicy`;
    see the module docstring.

    Args:
        pipeline: the ``FluxPipeline``.
        prompt_text: the text each episode's image is drawn from.
        guidance_scale: FLUX.1-dev's distilled guidance, a model input (ignored by a transformer
            without ``guidance_embeds``, such as FLUX.1-schnell's); the pipeline's default is 3.5.
        **conditioner_options: ``negative_prompt``, ``max_sequence_length``.
    """

    pipeline_class = "FluxPipeline"

    def __init__(
        self, pipeline: Any, prompt_text: PromptText, *, guidance_scale: float = 3.5, **conditioner_options: Any
    ):
        conditioner = FluxPromptConditioner(pipeline, prompt_text, **conditioner_options)
        super().__init__(pipeline.transformer, conditioner, conditioner.unconditional)
        self.guidance_scale = float(guidance_scale)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, condition: dict[str, Any]) -> torch.Tensor:
        n, _, height, width = x_t.shape
        dtype = next(self.model.parameters()).dtype
        embeds = condition["encoder_hidden_states"].to(dtype)
        tokens, ids = pack_latents(x_t), latent_image_ids(height, width, x_t.device, dtype)
        reference = condition.get("image_latents")
        if reference is not None:  # Kontext: the earlier image's tokens follow, their ids marked 1
            reference_ids = latent_image_ids(*reference.shape[2:], x_t.device, dtype)
            reference_ids[:, 0] = 1
            tokens = torch.cat([tokens, pack_latents(reference.to(x_t.device))], dim=1)
            ids = torch.cat([ids, reference_ids])
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full((n,), self.guidance_scale, device=x_t.device, dtype=torch.float32)
        out = self.model(
            hidden_states=tokens.to(dtype),
            timestep=t.to(dtype),  # FLUX is given σ itself
            guidance=guidance,
            pooled_projections=condition["pooled_projections"].to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=dtype),
            img_ids=ids,
            return_dict=False,
        )[0]
        return unpack_latents(out[:, : (height // 2) * (width // 2)].float(), height, width)

    def scheduler_arguments(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """FLUX's grid: ``num_steps`` uniform sigmas from 1 to ``1/num_steps``, shifted by ``mu``
        from the image's token count (2×2 patches), as ``FluxPipeline`` computes it."""
        tokens = (latent_shape[1] // 2) * (latent_shape[2] // 2)
        mu = image_shift(tokens, scheduler.config, max_shift=1.15)
        if scheduler.config.get("use_flow_sigmas", False):
            return {"num_inference_steps": num_steps, "mu": mu}
        return {"sigmas": list(np.linspace(1.0, 1.0 / num_steps, num_steps)), "mu": mu}

    def check_latent_shape(self, shape: tuple[int, ...]) -> None:
        """The transformer takes 2×2 patches of the latent packed into tokens: a quarter of its
        ``in_channels`` latent channels, and even sides."""
        channels, height, width = shape
        if channels * 4 != self.model.config.in_channels:
            raise ValueError(f"the transformer takes {self.model.config.in_channels // 4} latent channels")
        if height % 2 or width % 2:
            raise ValueError("the latent's sides must be even (2×2 patches)")


class FluxKontextConditioner(FluxPromptConditioner):
    """The prompt's condition plus the latents of the turn's earlier image: the last of the
    context's images, encoded by the pipeline's VAE (its mode, scaled and shifted, as the Kontext
    pipeline encodes its input image) at that image's own size; none in a first turn."""

    def __init__(self, pipeline: Any, prompt_text: PromptText, **options: Any):
        super().__init__(pipeline, prompt_text, **options)
        self._codecs: dict[int, VAECodec] = {}

    def codec(self, image_size: int) -> VAECodec:
        """The VAE codec of ``image_size``-pixel images (one per size, made on first use)."""
        if image_size not in self._codecs:
            self._codecs[image_size] = VAECodec(self.pipeline.vae, image_size, sample=False)
        return self._codecs[image_size]

    def __call__(self, context: TurnContext) -> dict[str, Any]:
        condition: dict[str, Any] = super().__call__(context)
        earlier = context.images
        condition["image_latents"] = (
            self.codec(int(earlier.shape[2])).encode(earlier[:, -1]) if earlier.shape[1] else None
        )
        return condition

    def unconditional(self, condition: dict[str, Any]) -> dict[str, Any]:
        return {**super().unconditional(condition), "image_latents": condition.get("image_latents")}


class FluxKontextFlowPolicy(FluxFlowPolicy):
    """FLUX.1 Kontext (``FluxKontextPipeline``) as the image policy of edits: each image is drawn
    conditioned on the previous turn's image, whose latents join the transformer's input tokens.
    ``FluxKontextFlowPolicy.from_pretrained(path, prompt_text, image_size)`` loads one.

    Args:
        pipeline: the ``FluxKontextPipeline``.
        prompt_text: the text each episode's image is drawn from (the edit instruction's reasoning).
        image_size: optional, the side of the environment's images in pixels, checked against the
            VAE's downsampling now (the earlier image is encoded at its own size in any case).
        guidance_scale, **conditioner_options: as for :class:`FluxFlowPolicy`.
    """

    pipeline_class = "FluxKontextPipeline"

    def __init__(
        self,
        pipeline: Any,
        prompt_text: PromptText,
        image_size: int | None = None,
        *,
        guidance_scale: float = 2.5,
        **options: Any,
    ):
        conditioner = FluxKontextConditioner(pipeline, prompt_text, **options)
        ConditionedFlowPolicy.__init__(self, pipeline.transformer, conditioner, conditioner.unconditional)
        self.guidance_scale = float(guidance_scale)
        if image_size is not None:
            conditioner.codec(int(image_size))  # checks the size against the VAE now
