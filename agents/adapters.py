"""Parameter-efficient training with ``peft``: train adapters instead of every weight.

A side of the policy (text or image) is trained ``full`` (every weight), with ``lora`` (low-rank
updates ``W + (α/r)·B·A`` of chosen linear layers, Hu et al. 2021) or with ``ln_tuning`` (only
copies of the normalisation layers, Zhao et al. 2023, arXiv 2312.11420). The adapters are
``peft``'s own; this module only decides where they go and gives the agent three things:

* :func:`attach_adapter` wraps a policy side's network (its ``.model``) in a ``peft.PeftModel``,
  whose base weights are frozen, so ``UnifiedPolicy.text_parameters()`` / ``image_parameters()``
  return the adapter's parameters only;
* :class:`WithoutAdapter` calls the same policy side with its adapter disabled: the starting
  model, which the regulariser and the text KL compare against (docs/design.md, section 3: the
  reference is the base weights with the adapter disabled), without a second copy of it;
* :func:`merged_model` gives a plain copy of an adapted network with its adapter merged into the
  base weights; the policies' ``save_pretrained`` writes that, so a saved folder is an ordinary
  checkpoint that ``unigrpo eval`` reads like any other; :func:`adapter_state` /
  :func:`load_adapter_state` carry the adapter weights themselves across ``--resume``.

For a large model an adapter saves memory (no optimizer state or reference copy of the base
weights). What the adapters were measured to do on ShapesWorld's language model:
docs/experiments/parameter-efficient-training.md.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "AdapterKind",
    "DEFAULT_TARGETS",
    "AdapterError",
    "attach_adapter",
    "has_adapter",
    "WithoutAdapter",
    "starting_model",
    "adapter_disabled",
    "merged_model",
    "adapter_state",
    "load_adapter_state",
]

AdapterKind = Literal["full", "lora", "ln_tuning"]

#: Where the adapters go when the config names no targets (peft matches module-name suffixes).
DEFAULT_TARGETS: dict[str, dict[str, list[str] | str | None]] = {
    # Every linear layer of the language model except its output head (peft's "all-linear").
    "text": {"lora": "all-linear", "ln_tuning": None},  # None: peft's table for the architecture (Llama: every RMSNorm)
    # The attention projections of an MMDiT, both streams: what diffusers' SD3 LoRA scripts train.
    "image": {
        "lora": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
        "ln_tuning": ["norm1.linear", "norm1_context.linear", "norm_out.linear"],  # the adaLN modulations
    },
}


class AdapterError(ValueError):
    """An adapter that cannot be attached (a policy without a network, targets that match nothing)."""


def _network(part: Any, side: str) -> nn.Module:
    model = getattr(part, "model", None)
    if not isinstance(model, nn.Module):
        raise AdapterError(
            f"{side}_adapter needs a {side} policy whose network is its .model attribute (as CausalLMTextPolicy and "
            f"ConditionedFlowPolicy have); {type(part).__name__} has none: train it with {side}_adapter='full'"
        )
    return model


def attach_adapter(
    part: Any, side: str, kind: AdapterKind, *, rank: int = 8, alpha: float = 16.0, targets: list[str] | None = None
) -> None:
    """Wrap ``part.model`` in a ``peft`` model with a ``kind`` adapter (in place); ``full`` does nothing.

    Only the adapter's parameters require gradients afterwards. ``targets`` are module-name
    suffixes (``None``: :data:`DEFAULT_TARGETS`)."""
    if kind == "full":
        return
    from peft import LNTuningConfig, LoraConfig, get_peft_model

    model = _network(part, side)
    if has_adapter(part):
        raise AdapterError(f"the {side} policy already has an adapter")
    chosen = targets if targets is not None else DEFAULT_TARGETS[side][kind]
    if kind == "lora":
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=chosen, init_lora_weights=True)
    elif kind == "ln_tuning":
        config = LNTuningConfig(target_modules=chosen)
    else:
        raise AdapterError(f"unknown adapter kind {kind!r}: expected 'full', 'lora' or 'ln_tuning'")
    model.requires_grad_(False)
    try:
        with warnings.catch_warnings():  # peft asks norm layers for in/out features that LN tuning never uses
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            part.model = get_peft_model(model, config)
    except ValueError as exc:  # peft: targets not found, or an architecture without a default table
        raise AdapterError(
            f"cannot attach a {kind} adapter to the {side} model ({type(model).__name__}): {' '.join(str(exc).split())[:300]}"
        ) from exc


def has_adapter(part: Any) -> bool:
    from peft import PeftModel

    return isinstance(getattr(part, "model", None), PeftModel)


@contextlib.contextmanager
def adapter_disabled(part: Any) -> Iterator[None]:
    """Inside the block ``part`` computes with its base weights (its adapter switched off)."""
    with part.model.disable_adapter():
        yield


def starting_model(part: Any) -> Any:
    """The frozen starting model of a policy side: the side itself seen with its adapter disabled
    (:class:`WithoutAdapter`), or for a side trained in full a frozen copy made now. The copy shares
    the side's plain attributes (a conditioner with its pipeline's text encoders, a tokenizer): only
    the modules and tensors that train are copied."""
    if has_adapter(part):
        return WithoutAdapter(part)
    shared = {id(v): v for v in vars(part).values() if not isinstance(v, (nn.Module, torch.Tensor, dict))}
    return copy.deepcopy(part, memo=shared).requires_grad_(False).eval()


class WithoutAdapter:
    """A policy side seen with its adapter disabled and without gradients: the starting model.

    It forwards the two calls the agent makes of a reference — ``velocity`` (image) and
    ``log_probs`` (text) — so it stands wherever a frozen copy would."""

    def __init__(self, part: Any):
        if not has_adapter(part):
            raise AdapterError(f"{type(part).__name__} has no adapter to disable")
        self.part = part

    def velocity(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad(), adapter_disabled(self.part):
            return self.part.velocity(*args, **kwargs)

    def log_probs(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad(), adapter_disabled(self.part):
            return self.part.log_probs(*args, **kwargs)


def merged_model(model: nn.Module) -> nn.Module:
    """``model`` itself, or for a ``peft`` model a copy with its adapter merged into the base weights
    (``W + (α/r)·B·A``; the trained norm layers in place of the old): what ``save_pretrained`` writes."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model


def adapter_state(policy: nn.Module, *, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The trained adapter weights of ``policy`` (names as in its ``state_dict``): CPU copies, or
    with ``keep_vars`` the parameters themselves (as ``state_dict(keep_vars=True)``, for an engine
    that must gather them first)."""
    return {
        name: tensor if keep_vars else tensor.detach().cpu().contiguous()
        for name, tensor in policy.state_dict(keep_vars=keep_vars).items()
        if any(key in name for key in ("lora_", "ln_tuning_layers"))
    }


def load_adapter_state(policy: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put adapter weights saved by :func:`adapter_state` back; every saved name must exist."""
    expected = set(adapter_state(policy))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise AdapterError(
            f"the saved adapter does not fit this policy (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    policy.load_state_dict(state, strict=False)
