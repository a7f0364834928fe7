"""The policy kind ``hf``: a chat model that writes and a diffusers pipeline that draws.

``load_hf_policy(text_model=..., image_model=...)`` builds the :class:`UnifiedPolicy` of a real run:
the text side from a chat model (:func:`~unigrpo_env.agents.chat_policy.chat_text_policy`), the
image side from the pipeline the folder or hub id holds — ``StableDiffusion3Pipeline``,
``FluxPipeline`` or ``FluxKontextPipeline``, read from its ``model_index.json`` — drawing from the
reasoning (or the text after ``answer_marker``). With ``checkpoint`` (a run's checkpoint folder),
the trained language model and transformer saved there replace the starting ones. The policy
carries its world (``policy.world``: the chat tokenizer, the pipeline's VAE and the pipeline's own
time grid), which the environments of a run use; the prompt scenarios load no model.

``dtype`` is the trained networks' (the chat model and the transformer); ``frozen_dtype`` (default:
``dtype``) the pipeline's frozen ones — its text encoders and VAE. A side trained in full wants fp32
weights for AdamW while T5-XXL, which it never trains, can stay in bf16: 9.5 GB instead of 19 GB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unigrpo_env._diffusers import dtype_option
from unigrpo_env.agents.chat_policy import chat_text_policy, reasoning_text
from unigrpo_env.agents.chat_policy import text_codec as chat_text_codec
from unigrpo_env.agents.flux_policy import FluxFlowPolicy, FluxKontextFlowPolicy
from unigrpo_env.agents.policy import CheckpointError, PolicyMismatchError, UnifiedPolicy
from unigrpo_env.agents.sd3_policy import SD3FlowPolicy
from unigrpo_env.vae_codec import VAECodec
from unigrpo_env.world import World

__all__ = ["IMAGE_POLICIES", "HF_TRAINING_DEFAULTS", "load_hf_policy", "pipeline_world", "check_latent_channels"]

#: The diffusers pipeline classes the ``hf`` kind draws with, and their image policies.
IMAGE_POLICIES = {policy.pipeline_class: policy for policy in (SD3FlowPolicy, FluxFlowPolicy, FluxKontextFlowPolicy)}


def load_hf_policy(
    checkpoint: str | None = None,
    *,
    text_model: str | None = None,
    image_model: str | None = None,
    image_size: int | None = None,
    num_steps: int = 10,
    max_tokens: int = 256,
    answer_marker: str | None = None,
    dtype: str = "float32",
    frozen_dtype: str | None = None,
    **image_options: Any,
) -> UnifiedPolicy:
    """A chat model and a diffusers pipeline as one policy, with its world; see the module
    docstring. ``image_options`` go to the image policy (``max_sequence_length``,
    ``guidance_scale``, ...).

    The world (``policy.world``) is the models' own: the chat tokenizer (``max_tokens`` a turn,
    ``</think>`` closing it), the pipeline's VAE (the same object the pipeline holds: one VAE) at
    ``image_size`` pixels (default: the pipeline's, ``default_sample_size × vae_scale_factor``),
    and the pipeline's own time grid for ``num_steps`` steps at that size (SD3's static shift,
    FLUX's resolution-dependent ``mu``). A size the transformer cannot draw is a
    :class:`~unigrpo_env.agents.policy.PolicyMismatchError` here, before anything runs."""
    import diffusers

    if text_model is None or image_model is None:
        raise CheckpointError("the policy kind 'hf' needs text_model and image_model (--text-model, --image-model)")
    torch_dtype = torch_dtype_named(dtype, "dtype")
    frozen = torch_dtype if frozen_dtype is None else torch_dtype_named(frozen_dtype, "frozen_dtype")
    trained = Path(checkpoint) if checkpoint is not None else None
    text = chat_text_policy(trained / "language_model" if trained else text_model, dtype=torch_dtype)
    try:
        kind = diffusers.DiffusionPipeline.load_config(image_model)["_class_name"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"image_model {image_model!r} is not a diffusers pipeline folder or hub id: {' '.join(str(exc).split())[:200]}"
        ) from exc
    if kind not in IMAGE_POLICIES:
        raise CheckpointError(f"image_model {image_model!r} holds a {kind}; expected one of {sorted(IMAGE_POLICIES)}")
    # diffusers reads a dtype per component ({"transformer": ..., "default": ...})
    dtypes = torch_dtype if frozen == torch_dtype else {"transformer": torch_dtype, "default": frozen}
    pipeline = getattr(diffusers, kind).from_pretrained(image_model, **dtype_option(dtypes))
    for name, module in pipeline.components.items():  # an older diffusers reads no dict: all in float32
        wanted = torch_dtype if name == "transformer" else frozen
        if isinstance(module, torch.nn.Module) and wanted != torch.float32:
            if {p.dtype for p in module.parameters()} == {torch.float32}:
                module.to(wanted)
    if trained is not None:
        pipeline.transformer = type(pipeline.transformer).from_pretrained(
            trained / "flow_model", **dtype_option(torch_dtype)
        )
    check_latent_channels(pipeline)
    prompt_text = reasoning_text(text.tokenizer, answer_marker)
    if kind == "FluxKontextPipeline":
        image = FluxKontextFlowPolicy(pipeline, prompt_text, image_size, **image_options)
    else:
        image = IMAGE_POLICIES[kind](pipeline, prompt_text, **image_options)
    return UnifiedPolicy(text, image, world=pipeline_world(text, image, image_size, num_steps, max_tokens))


def pipeline_world(
    text: Any, image: Any, image_size: int | None = None, num_steps: int = 10, max_tokens: int = 256
) -> World:
    """The world of a chat policy ``text`` and a pipeline policy ``image``: see :func:`load_hf_policy`."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise CheckpointError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    size = image.default_image_size() if image_size is None else image_size
    try:
        codec = VAECodec(image.pipeline.vae, size, sample=False)
    except ValueError as exc:
        raise PolicyMismatchError(f"image_size {size}: {exc}") from None
    try:
        image.check_latent_shape(codec.latent_shape)
    except ValueError as exc:
        raise PolicyMismatchError(
            f"image_size {size} gives latents of shape {codec.latent_shape}, which the {type(image.pipeline).__name__}'s "
            f"transformer cannot draw: {exc}"
        ) from None
    return World(chat_text_codec(text.tokenizer, max_tokens), codec, image.time_grid(num_steps, codec.latent_shape))


#: The recipe of the ``hf`` kind (``load_hf_policy.training_defaults``), under a run's config file
#: and flags: UniGRPO's values for Bagel-7B trained in full (arXiv 2603.23500: text lr 1e-6, image lr
#: 3e-5, image clip 1e-6, SDE noise level 0.8 on a window of 3 steps starting in [0, 5], two PPO
#: epochs, the velocity MSE at weight 1, no text KL). They were chosen for a 7 B model trained in
#: full, not measured here; LoRA wants larger rates (flow_grpo's SD3 LoRA runs use 3e-4), so set
#: lr_text / lr_image with --text-adapter lora. Resource settings (prompts, group size, minibatches)
#: are the config's own.
HF_TRAINING_DEFAULTS = {
    "lr_text": 1e-6,
    "lr_image": 3e-5,
    "clip_range_image": 1e-6,
    "noise_level": 0.8,
    "sde_window_size": 3,
    "sde_window_max_start": 5,
    "ppo_epochs": 2,
    "regularizer": "mse",
    "mse_weight": 1.0,
    "kl_text": 0.0,
}

load_hf_policy.training_defaults = HF_TRAINING_DEFAULTS


def torch_dtype_named(name: str, option: str) -> torch.dtype:
    """``torch.<name>`` (``"bfloat16"`` → ``torch.bfloat16``), or a :class:`CheckpointError` naming ``option``."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(
            f"{option} must name a floating-point torch dtype (float32, bfloat16, float16); got {name!r}"
        )
    return dtype


def check_latent_channels(pipeline: Any) -> None:
    """Raise :class:`CheckpointError` unless the transformer reads the VAE's latents: SD3's takes
    the latent channels themselves, FLUX's 2×2 patches of them (4× the channels)."""
    latent = int(pipeline.vae.config.latent_channels)
    expected = latent * 4 if "Flux" in type(pipeline).__name__ else latent
    found = int(pipeline.transformer.config.in_channels)
    if found != expected:
        raise CheckpointError(
            f"the {type(pipeline).__name__}'s transformer takes {found} input channels, but its VAE's latents need "
            f"{expected} ({latent} latent channels{', packed 2×2' if expected != latent else ''})"
        )
