"""Activation (gradient) checkpointing of the policy's networks: memory for compute.

With checkpointing, a network keeps only its blocks' inputs during the forward pass and recomputes
each block's activations during the backward pass, so training memory grows with the number of
blocks instead of with every intermediate activation (about one extra forward pass of compute).
The networks are the libraries' own, so their own switches are used:

* a ``transformers`` model: ``activation_checkpointing_enable`` (``gradient_checkpointing_enable``
  before transformers 5) with the non-reentrant
  ``torch.utils.checkpoint`` (which also works when only a LoRA adapter, not the input
  embeddings, requires gradients);
* a ``diffusers`` model (SD3's or FLUX's transformer): ``enable_gradient_checkpointing``.

A ``peft``-wrapped network is switched on its base model. Only the training pass is affected:
both libraries checkpoint only while gradients are being computed (rollouts run under
``torch.no_grad``), and the computed values are the same, so ratios and log-probabilities do not
change.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["GradientCheckpointingError", "enable_gradient_checkpointing", "is_gradient_checkpointing"]


class GradientCheckpointingError(ValueError):
    """A network that cannot checkpoint its activations."""


def _base(part: Any, side: str) -> nn.Module:
    model = getattr(part, "model", None)
    if not isinstance(model, nn.Module):
        raise GradientCheckpointingError(
            f"gradient_checkpointing needs a {side} policy whose network is its .model attribute; "
            f"{type(part).__name__} has none"
        )
    get_base = getattr(model, "get_base_model", None)  # a peft model: its base network
    return get_base() if callable(get_base) else model


def enable_gradient_checkpointing(part: Any, side: str) -> None:
    """Switch on activation checkpointing of ``part``'s network (``side``: "text" or "image", for messages)."""
    model = _base(part, side)
    if hasattr(model, "gradient_checkpointing_enable"):  # transformers
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise GradientCheckpointingError(
                f"the {side} model {type(model).__name__} does not support gradient checkpointing; leave it off"
            )
        if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.x on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        try:
            model.enable_gradient_checkpointing()
        except ValueError as exc:  # diffusers: a model class without _supports_gradient_checkpointing
            raise GradientCheckpointingError(
                f"the {side} model {type(model).__name__} does not support gradient checkpointing; leave it off"
            ) from exc
    else:
        raise GradientCheckpointingError(
            f"the {side} model {type(model).__name__} is neither a transformers nor a diffusers model, so it has no "
            "gradient checkpointing switch; leave gradient_checkpointing off"
        )


def is_gradient_checkpointing(part: Any) -> bool:
    """Whether ``part``'s network checkpoints its activations."""
    model = _base(part, "")
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing", "gradient_checkpointing"):
        if hasattr(model, name):  # transformers 5.x, transformers 4.x and diffusers, in that order
            return bool(getattr(model, name))
    return False
