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

import os
from collections.abc import Sequence
from typing import Any

import torch

from unigrpo_env.agents.hf_policies import ConditionedFlowPolicy, PromptText
from unigrpo_env.agents.policy import TurnContext

__all__ = ["SD3PromptConditioner", "SD3FlowPolicy"]


class SD3PromptConditioner:
    """``encode_prompt`` of the pipeline's three text encoders, once per distinct text.

    Args:
        pipeline: the ``StableDiffusion3Pipeline`` (its tokenizers and text encoders are used).
        prompt_text: the text each episode's image is drawn from (e.g. the decoded reasoning, or
            the part after a final-answer marker).
        negative_prompt: the unconditional branch's text, for CFG (diffusers' default: empty).
        max_sequence_length: T5's token budget, as the pipeline's option.
    """

    def __init__(
        self, pipeline: Any, prompt_text: PromptText, *, negative_prompt: str = "", max_sequence_length: int = 256
    ):
        self.pipeline = pipeline
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # frozen: the policy never trains them
            encoder = getattr(pipeline, name, None)
            if encoder is not None:
                encoder.eval().requires_grad_(False)
        self.prompt_text = prompt_text
        self.negative_prompt = negative_prompt
        self.max_sequence_length = int(max_sequence_length)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [N, L, D], pooled_prompt_embeds [N, P])`` of ``texts``; the texts not
        seen before are encoded in one batched call."""
        new = [text for text in dict.fromkeys(texts) if text not in self.cache]
        if new:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=new,
                prompt_2=new,
                prompt_3=new,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
            for i, text in enumerate(new):
                self.cache[text] = (embeds[i], pooled[i])
        return torch.stack([self.cache[t][0] for t in texts]), torch.stack([self.cache[t][1] for t in texts])

    def __call__(self, context: TurnContext) -> dict[str, torch.Tensor]:
        embeds, pooled = self.encode(list(self.prompt_text(context)))
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def unconditional(self, condition: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The negative prompt's condition, for the same batch size."""
        n = condition["encoder_hidden_states"].shape[0]
        embeds, pooled = self.encode([self.negative_prompt] * n)
        device = condition["encoder_hidden_states"].device
        return {"encoder_hidden_states": embeds.to(device), "pooled_projections": pooled.to(device)}


class SD3FlowPolicy(ConditionedFlowPolicy):
    """The MMDiT of a ``StableDiffusion3Pipeline`` as a :class:`~unigrpo_env.agents.policy.FlowPolicy`;
    see the module docstring."""

    def __init__(self, pipeline: Any, prompt_text: PromptText, **conditioner_options: Any):
        conditioner = SD3PromptConditioner(pipeline, prompt_text, **conditioner_options)
        super().__init__(pipeline.transformer, conditioner, conditioner.unconditional)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        prompt_text: PromptText,
        *,
        dtype: torch.dtype = torch.float32,
        **options: Any,
    ) -> SD3FlowPolicy:
        """Load a ``StableDiffusion3Pipeline`` folder or hub id with diffusers' ``from_pretrained``."""
        from diffusers import StableDiffusion3Pipeline

        return cls(StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=dtype), prompt_text, **options)

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
