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
* :func:`save_model` writes an adapted network as its class's ordinary checkpoint with the adapter
  merged into the base weights, shard by shard, without a second copy of the model
  (:func:`save_merged`), so a saved folder is one that ``unigrpo eval`` reads like any other;
  :func:`save_adapter` writes the adapter itself (``peft``'s format, and diffusers' LoRA format
  for an image model); :func:`adapter_state` gives the adapter weights that ``--resume`` restores.

For a large model an adapter saves memory (no optimizer state or reference copy of the base
weights). What the adapters were measured to do on ShapesWorld's language model:
docs/experiments/parameter-efficient-training.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
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
    "save_model",
    "save_merged",
    "save_adapter",
    "adapter_state",
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


#: The merged checkpoint is written shard by shard; a shard's merged weights are the only copies
#: held while it is written, so this bounds the extra memory of a save.
MERGED_SHARD_SIZE = "1GB"


def save_model(model: nn.Module, path: str | Path, *, max_shard_size: int | str = MERGED_SHARD_SIZE) -> None:
    """``model.save_pretrained(path)``; for a ``peft`` model, the model with its adapter merged
    (:func:`save_merged`), so the folder is an ordinary checkpoint of the model's class."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        save_merged(model, path, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(str(path))


def save_merged(model: nn.Module, path: str | Path, *, max_shard_size: int | str = MERGED_SHARD_SIZE) -> None:
    """Write a ``peft`` model's base model with its adapter merged (``W + (α/r)·B·A``; LN tuning's
    trained norm layers in place of the old) as its class's own checkpoint — a ``transformers`` or
    ``diffusers`` folder that ``from_pretrained`` reads — without a second copy of the model.

    The model is left exactly as it was (nothing is merged in place): the weight names are the base
    model's (``q_proj.base_layer.weight`` → ``q_proj.weight``, adapter weights left out), the
    checkpoint is split into shards of at most ``max_shard_size`` (``huggingface_hub``'s split, as
    the libraries' own ``save_pretrained`` does), and each adapted layer's merged weights are
    computed from a copy of that one layer when its shard is written and dropped after it, so a
    save holds at most one shard's merged weights beside the model (safetensors writes tensors
    from their memory, without a byte copy). Tied weights are left out as ``transformers`` does."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from peft.tuners.tuners_utils import BaseTunerLayer
    from safetensors.torch import save_file

    base = model.get_base_model()
    kind = _library_of(base)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tuners = {name: module for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)}
    # plain name -> (the base tensor, the adapted layer it belongs to or None, its name in that layer's base)
    plain: dict[str, tuple[torch.Tensor, str | None, str]] = {}
    for name, tensor in base.state_dict(keep_vars=True).items():
        parts = name.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in tuners), None)
        if owner is None:
            plain[name] = (tensor.detach(), None, name)
            continue
        rest = name[len(owner) + 1 :]
        if rest.startswith("base_layer."):  # the base layer's own weights; the rest are the adapter's
            local = rest[len("base_layer.") :]
            plain[f"{owner}.{local}"] = (tensor.detach(), owner, local)
    tensors = {name: value[0] for name, value in plain.items()}
    if kind == "transformers":
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        tensors = remove_tied_weights_from_state_dict(tensors, base)
    pattern = "model{suffix}.safetensors" if kind == "transformers" else "diffusion_pytorch_model{suffix}.safetensors"
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=pattern, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        merged_layers: dict[str, dict[str, torch.Tensor]] = {}
        shard: dict[str, torch.Tensor] = {}
        for name in names:
            tensor, owner, local = plain[name]
            if owner is not None:
                if owner not in merged_layers:
                    merged_layers[owner] = _merged_layer_state(tuners[owner])
                tensor = merged_layers[owner][local]
            shard[name] = tensor.contiguous()
        save_file(shard, str(path / filename), metadata={"format": "pt"})
        del shard, merged_layers
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (path / (pattern.format(suffix="") + ".index.json")).write_text(json.dumps(index, indent=2, sort_keys=True))
    if kind == "transformers":
        base.config.architectures = [type(base).__name__]
        base.config.save_pretrained(str(path))
        generation = getattr(base, "generation_config", None)
        if generation is not None and base.can_generate():
            generation.save_pretrained(str(path))
    else:
        base.save_config(str(path))


def _library_of(model: nn.Module) -> str:
    """``transformers`` or ``diffusers``: whose checkpoint layout the model's ``save_pretrained`` writes."""
    for cls in type(model).__mro__:
        root = cls.__module__.split(".")[0]
        if cls.__name__ == "PreTrainedModel" and root == "transformers":
            return "transformers"
        if cls.__name__ == "ModelMixin" and root == "diffusers":
            return "diffusers"
    raise AdapterError(
        f"cannot write a merged checkpoint of {type(model).__name__}: expected a transformers PreTrainedModel or a "
        "diffusers ModelMixin"
    )


def _merged_layer_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The state of an adapted layer's base layer with the adapter merged in, from a copy of that
    one layer (peft's own ``merge``), so the model's layer is untouched."""
    copied = copy.deepcopy(layer)
    copied.merge()
    return {name: tensor.detach() for name, tensor in copied.get_base_layer().state_dict().items()}


def save_adapter(part: Any, folder: str | Path) -> None:
    """Write a policy side's adapter as an adapter: ``peft``'s ``save_pretrained`` (``adapter_config.json``,
    ``adapter_model.safetensors``: ``PeftModel.from_pretrained(base, folder)`` loads it); for a LoRA
    on a ``diffusers`` model also ``pytorch_lora_weights.safetensors`` in diffusers' format (the
    ``transformer.`` prefix and the adapter's configuration in the metadata), which a pipeline's
    ``load_lora_weights(folder)`` loads."""
    from peft import LoraConfig, get_peft_model_state_dict

    model = part.model
    folder = Path(folder)
    model.save_pretrained(str(folder))
    config = model.peft_config[model.active_adapter]
    base = model.get_base_model()
    if isinstance(config, LoraConfig) and _library_of(base) == "diffusers":
        from diffusers.loaders import SD3LoraLoaderMixin  # any transformer pipeline's loader: one format

        prefix = "base_model.model."
        weights = {
            k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in get_peft_model_state_dict(model).items()
        }
        SD3LoraLoaderMixin.save_lora_weights(
            str(folder), transformer_lora_layers=weights, transformer_lora_adapter_metadata=config.to_dict()
        )


def adapter_state(policy: nn.Module, *, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The trained adapter weights of ``policy`` (names as in its ``state_dict``): CPU copies, or
    with ``keep_vars`` the parameters themselves (as ``state_dict(keep_vars=True)``, for an engine
    that must gather them first)."""
    return {
        name: tensor if keep_vars else tensor.detach().cpu().contiguous()
        for name, tensor in policy.state_dict(keep_vars=keep_vars).items()
        if any(key in name for key in ("lora_", "ln_tuning_layers"))
    }
