"""The ShapesWorld unified policy: the tiny Llama and the flow transformer behind the protocol.

``load_shapes_policy()`` loads the checkpoint shipped in the package (or any folder written by
``unigrpo pretrain shapes``) with ``from_pretrained``, exactly as a real checkpoint loads:

    checkpoint/
      language_model/   config.json, model.safetensors, tokenizer files   (transformers)
      flow_model/       config.json, diffusion_pytorch_model.safetensors  (diffusers)

Registered as the policy kind ``shapes`` (an entry point in the package's pyproject.toml), which
the ShapesWorld scenarios name in ``default_policy``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from unigrpo_env.agents.hf_policies import CausalLMTextPolicy, ConditionedFlowPolicy
from unigrpo_env.agents.policy import CheckpointError, PolicyMismatchError, UnifiedPolicy
from unigrpo_env.scenarios.shapes.conditioning import ShapesConditioner
from unigrpo_env.scenarios.shapes.language_model import chat_prompt_ids
from unigrpo_env.scenarios.shapes.tokenizer import END_OF_THINKING, build_tokenizer

__all__ = ["DEFAULT_CHECKPOINT", "SHAPES_TRAINING_DEFAULTS", "CheckpointError", "shapes_policy", "load_shapes_policy"]

#: The checkpoint that ships with the package (made by ``unigrpo pretrain shapes``).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"

#: The recipe of these models (``load_shapes_policy.training_defaults``): LN tuning of the language
#: model, the image model at lr 1e-3 after a warm-up with a cosine decay, and a stronger velocity
#: MSE (how it was chosen: docs/experiments/parameter-efficient-training.md; what it gives:
#: docs/experiments/main-job.md). Tuned on these two small models, for them only.
SHAPES_TRAINING_DEFAULTS = {
    "text_adapter": "ln_tuning",
    "lr_image": 1e-3,
    "warmup_iterations": 25,
    "lr_schedule": "cosine",
    "mse_weight": 3.0,
}


def shapes_policy(language_model, tokenizer, flow_model) -> UnifiedPolicy:
    """A :class:`UnifiedPolicy` from in-memory ShapesWorld models."""
    reference = build_tokenizer().get_vocab(with_added_tokens=True)
    vocab = tokenizer.get_vocab()
    if vocab != reference:
        raise CheckpointError("the checkpoint's tokenizer does not match ShapesWorld's vocabulary (ids differ)")
    end = vocab[END_OF_THINKING]
    text = CausalLMTextPolicy(
        language_model,
        partial(chat_prompt_ids, tokenizer),
        eot_id=end,
        pad_id=tokenizer.pad_token_id,
        tokenizer=tokenizer,
    )
    conditioner = ShapesConditioner(
        vocab,
        max_text_tokens=flow_model.config.max_text_tokens,
        image_size=flow_model.config.image_size,
        pad_id=tokenizer.pad_token_id,
        end_id=end,
        model_vocab_size=flow_model.config.vocab_size,
        unk_id=tokenizer.unk_token_id,
    )
    image = ConditionedFlowPolicy(flow_model, conditioner, conditioner.unconditional)
    return UnifiedPolicy(text, image)


def load_shapes_policy(
    checkpoint: str | Path | None = None, device: str | torch.device = "cpu", image_size: int | None = None
) -> UnifiedPolicy:
    """Load a ShapesWorld checkpoint folder (default: the shipped one) as a unified policy. Its flow
    model draws one canvas size; ``image_size`` (``--image-size``), if given, must be it."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from unigrpo_env.scenarios.shapes.flow_model import ShapesFlowTransformer

    root = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {str(root)!r} does not exist")
    for part in ("language_model", "flow_model"):
        if not (root / part / "config.json").is_file():
            raise CheckpointError(
                f"checkpoint folder {str(root)!r} has no {part}/config.json (expected the layout of `unigrpo pretrain shapes`)"
            )
    try:
        language_model = AutoModelForCausalLM.from_pretrained(root / "language_model")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "language_model")
        flow_model = ShapesFlowTransformer.from_pretrained(root / "flow_model")
    except Exception as exc:  # noqa: BLE001 - any loading failure is a bad checkpoint
        raise CheckpointError(
            f"could not load the checkpoint in {str(root)!r}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ) from exc
    if image_size is not None and image_size != flow_model.config.image_size:
        raise PolicyMismatchError(
            f"image_size {image_size}: the flow model in {str(root)!r} draws {flow_model.config.image_size}-pixel "
            "images only"
        )
    policy = shapes_policy(language_model.eval(), tokenizer, flow_model.eval())
    return policy.to(device)


load_shapes_policy.training_defaults = SHAPES_TRAINING_DEFAULTS
