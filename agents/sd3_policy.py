"""Stable Diffusion 3 / 3.5 as the image half of a unified policy.

:class:`SD3FlowPolicy` is a :class:`~unigrpo_env.agents.hf_policies.ConditionedFlowPolicy` over the
MMDiT (``SD3Transformer2DModel``) of a diffusers ``StableDiffusion3Pipeline``:

* the condition of an image is the pipeline's own ``encode_prompt`` of the text the language model
  wrote (:class:`SD3PromptConditioner`): computed once per image, never per step, and cached per
  text, so the three frozen text encoders run once for every distinct prompt and may then leave
  the accelerator;
* every denoising step is one call of the MMDiT, given the timestep as the pipeline gives it,
  ``σ·1000`` (docs/design.md, section 2: diffusers' σ is the project's t, and the model predicts
  ``ε − x_0``); classifier-free guidance batches the conditional and the negative prompt's
  branches into one call;
* only the MMDiT is the policy's network (``.model``, what an adapter wraps and an optimizer
  trains); the text encoders and the VAE are not parameters of the policy.

The latents are the VAE's (:class:`~unigrpo_env.VAECodec` over ``pipeline.vae``), ``[N, C, h, w]``.
"""

from __future__ import annotations

from typing import Any

import torch

from unigrpo_env.agents.hf_policies import PromptText
from unigrpo_env.agents.prompt_conditioning import PipelineFlowPolicy, PromptConditioner, image_shift

__all__ = ["SD3PromptConditioner", "SD3FlowPolicy"]


class SD3PromptConditioner(PromptConditioner):
    """``encode_prompt`` of a ``StableDiffusion3Pipeline``'s three text encoders (two CLIPs' pooled
    embeddings, T5's and the CLIPs' sequences), once per distinct text."""

    default_max_sequence_length = 256

    def encode_new(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=texts,
            prompt_2=texts,
            prompt_3=texts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled


class SD3FlowPolicy(PipelineFlowPolicy):
    """The MMDiT of a ``StableDiffusion3Pipeline`` as a :class:`~unigrpo_env.agents.policy.FlowPolicy`;
    see the module docstring. ``SD3FlowPolicy.from_pretrained(path, prompt_text)`` loads one."""

    pipeline_class = "StableDiffusion3Pipeline"

    def __init__(self, pipeline: Any, prompt_text: PromptText, **conditioner_options: Any):
        conditioner = SD3PromptConditioner(pipeline, prompt_text, **conditioner_options)
        super().__init__(pipeline.transformer, conditioner, conditioner.unconditional)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, condition: dict[str, Any]) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(
            hidden_states=x_t.to(dtype),
            timestep=(t * 1000.0).to(dtype),  # the pipeline's timestep: σ·1000
            encoder_hidden_states=condition["encoder_hidden_states"].to(dtype),
            pooled_projections=condition["pooled_projections"].to(dtype),
            return_dict=False,
        )[0]
        return out.float()

    def scheduler_arguments(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """SD3's grid: the scheduler's static ``shift``, or with ``use_dynamic_shifting`` (SD3.5's
        variants) ``mu`` from the image's token count, as ``StableDiffusion3Pipeline`` computes it."""
        arguments: dict[str, Any] = {"num_inference_steps": num_steps}
        config = scheduler.config
        if config.get("use_dynamic_shifting", None):
            patch = int(self.model.config.patch_size)
            tokens = (latent_shape[1] // patch) * (latent_shape[2] // patch)
            arguments["mu"] = image_shift(tokens, config, max_shift=1.16)
        return arguments

    def check_latent_shape(self, shape: tuple[int, ...]) -> None:
        """The MMDiT draws latents of its ``in_channels``, with sides that are multiples of its
        patch size and at most ``pos_embed_max_size`` patches (its position-embedding table)."""
        config = self.model.config
        patch, largest = int(config.patch_size), config.pos_embed_max_size
        channels, height, width = shape
        if channels != config.in_channels:
            raise ValueError(f"the transformer takes {config.in_channels} latent channels")
        if height % patch or width % patch:
            raise ValueError(f"the latent's sides must be multiples of the patch size {patch}")
        if largest is not None and max(height, width) > largest * patch:
            raise ValueError(
                f"the transformer's position embeddings cover latents of at most {largest * patch}×{largest * patch}"
            )
