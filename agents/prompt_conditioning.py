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

    @property
    def pipeline(self) -> Any:
        """The diffusers pipeline the policy was made from."""
        return self.conditioner.pipeline

    def default_image_size(self) -> int:
        """The pipeline's own default image side: ``default_sample_size × vae_scale_factor``."""
        pipeline = self.pipeline
        return int(pipeline.default_sample_size) * int(pipeline.vae_scale_factor)

    def time_grid(self, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The ``num_steps + 1`` times the pipeline itself denoises latents of ``latent_shape`` on
        (its scheduler's ``sigmas`` after ``set_timesteps``, as the pipeline calls it), float32."""
        scheduler = type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)  # not the pipeline's own
        scheduler.set_timesteps(**self.scheduler_arguments(scheduler, int(num_steps), latent_shape))
        return torch.as_tensor(scheduler.sigmas, dtype=torch.float32).cpu()

    def scheduler_arguments(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """The arguments of ``scheduler.set_timesteps`` the pipeline passes for ``num_steps`` steps."""
        return {"num_inference_steps": num_steps}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *args: Any, dtype: Any = None, **options: Any) -> Any:
        """Load a ``pipeline_class`` folder or hub id with diffusers' ``from_pretrained`` (float32
        unless ``dtype``); ``args`` and ``options`` go to the policy's constructor."""
        import diffusers
        import torch

        pipeline = getattr(diffusers, cls.pipeline_class).from_pretrained(path, **dtype_option(dtype or torch.float32))
        return cls(pipeline, *args, **options)


def image_shift(tokens: int, config: Any, *, max_shift: float) -> float:
    """The resolution-dependent shift ``mu`` of FLUX's and SD3.5's schedulers: linear in the image's
    token count, from ``base_shift`` at ``base_image_seq_len`` tokens to ``max_shift`` at
    ``max_image_seq_len`` (the scheduler config's values; the pipelines' defaults otherwise)::

        mu = base_shift + (tokens − base_len) · (max_shift − base_shift) / (max_len − base_len)
    """
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    low, high = config.get("base_shift", 0.5), config.get("max_shift", max_shift)
    slope = (high - low) / (max_len - base_len)
    return tokens * slope + (low - slope * base_len)
