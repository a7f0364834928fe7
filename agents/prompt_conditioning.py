"""The condition of a diffusers pipeline's transformer: its own ``encode_prompt`` of the text the
language model wrote, computed once per distinct text and cached.

:class:`PromptConditioner` is what the SD3 and FLUX image policies share: the pipeline's text
encoders are frozen (the policy never trains them, and they are not its parameters), the texts of
a batch not seen before are encoded in one batched call, and the unconditional branch of CFG is
the negative prompt's condition. A subclass says how its pipeline encodes (:meth:`encode_new`). :class:`PipelineFlowPolicy` is
the image policies' shared loading: ``from_pretrained`` of the pipeline class each one names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from unigrpo_env._diffusers import dtype_option
from unigrpo_env.agents.hf_policies import ConditionedFlowPolicy, PromptText
from unigrpo_env.agents.policy import TurnContext

__all__ = ["PromptConditioner", "PipelineFlowPolicy"]


class PromptConditioner:
    """``{"encoder_hidden_states", "pooled_projections"}`` of each episode's text, cached per text.

    Args:
        pipeline: the diffusers pipeline (its tokenizers and text encoders are used).
        prompt_text: the text each episode's image is drawn from (e.g. the decoded reasoning, or
            the part after a final-answer marker).
        negative_prompt: the unconditional branch's text, for CFG (diffusers' default: empty).
        max_sequence_length: T5's token budget, as the pipeline's option (None: the pipeline's default).
    """

    #: The pipeline's own default T5 budget.
    default_max_sequence_length = 256

    def __init__(
        self,
        pipeline: Any,
        prompt_text: PromptText,
        *,
        negative_prompt: str = "",
        max_sequence_length: int | None = None,
    ):
        self.pipeline = pipeline
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # frozen: the policy never trains them
            encoder = getattr(pipeline, name, None)
            if encoder is not None:
                encoder.eval().requires_grad_(False)
        self.prompt_text = prompt_text
        self.negative_prompt = negative_prompt
        self.max_sequence_length = int(max_sequence_length or self.default_max_sequence_length)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    #: The pipeline's frozen networks the conditioner uses, moved with :meth:`to`.
    frozen_components = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")

    def to(self, device: str | torch.device) -> PromptConditioner:
        """Put the pipeline's text encoders and VAE, and the cached conditions, on ``device`` (the
        image policy keeps them on its transformer's device, so a GPU run encodes on the GPU);
        returns the conditioner."""
        for name in self.frozen_components:
            module = getattr(self.pipeline, name, None)
            if isinstance(module, torch.nn.Module):
                module.to(device)
        self.cache = {text: (embeds.to(device), pooled.to(device)) for text, (embeds, pooled) in self.cache.items()}
        return self

    def encode_new(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [n, L, D], pooled_prompt_embeds [n, P])`` of ``texts`` by the pipeline."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [N, L, D], pooled_prompt_embeds [N, P])`` of ``texts``; the texts not
        seen before are encoded in one batched call."""
        new = [text for text in dict.fromkeys(texts) if text not in self.cache]
        if new:
            embeds, pooled = self.encode_new(new)
            for i, text in enumerate(new):
                self.cache[text] = (embeds[i], pooled[i])
        return torch.stack([self.cache[t][0] for t in texts]), torch.stack([self.cache[t][1] for t in texts])

    def __call__(self, context: TurnContext) -> dict[str, Any]:
        embeds, pooled = self.encode(list(self.prompt_text(context)))
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def unconditional(self, condition: dict[str, Any]) -> dict[str, Any]:
        """The negative prompt's condition, for the same batch size."""
        n = condition["encoder_hidden_states"].shape[0]
        embeds, pooled = self.encode([self.negative_prompt] * n)
        device = condition["encoder_hidden_states"].device
        return {"encoder_hidden_states": embeds.to(device), "pooled_projections": pooled.to(device)}


class PipelineFlowPolicy(ConditionedFlowPolicy):
    """An image policy made from a diffusers pipeline of the class ``pipeline_class`` names."""

    #: The diffusers pipeline class the policy is made from (e.g. ``"FluxPipeline"``).
    pipeline_class: ClassVar[str] = ""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *args: Any, dtype: Any = None, **options: Any) -> Any:
        """Load a ``pipeline_class`` folder or hub id with diffusers' ``from_pretrained`` (float32
        unless ``dtype``); ``args`` and ``options`` go to the policy's constructor."""
        import diffusers
        import torch

        pipeline = getattr(diffusers, cls.pipeline_class).from_pretrained(path, **dtype_option(dtype or torch.float32))
        return cls(pipeline, *args, **options)
