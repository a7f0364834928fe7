"""The engine around the algorithm: devices, precision, processes, and the distributed engine that
Accelerate wraps the training pass in — DDP, FSDP2 or DeepSpeed ZeRO — with everything each of
them needs, so that :mod:`unigrpo_env.agents.unigrpo` reads as the algorithm alone.

Under Accelerate each process runs its own rollouts. The training forward pass is one module call
per minibatch (:class:`TrainingForward`), handed to ``accelerator.prepare`` with the optimizer, so
the engine Accelerate wraps reduces the gradients itself: DDP for several processes (all-reduced in
buckets overlapped with the backward pass), or FSDP2 (parameters, gradients and optimizer state
sharded; each transformer block of the networks one unit, the rest of the policy the root unit).
``accelerator.accumulate`` accumulates ``gradient_accumulation_steps`` minibatches into one
optimizer step, reducing once per step. Under FSDP every other use of the policy — the rollouts,
the recomputed old log-probabilities, evaluation and checkpoints — also runs through that module
(:meth:`Engine.with_policy`), so the sharded parameters are gathered for it.

Under DeepSpeed (Accelerate's DeepSpeed plugin, ZeRO stage 2 or 3) ``accelerator.prepare`` makes the
module and the optimizer one ``DeepSpeedEngine``; ``accelerator.backward`` is the engine's backward
and, at the last minibatch of a step, its ``step`` (clipping to the config's ``gradient_clipping``,
which :func:`configure_deepspeed` sets to ``max_grad_norm``, the optimizer step, zeroing the
gradients), so the optimizer's own ``step``/``zero_grad`` are no-ops and ``clip_grad_norm_`` returns
the norm the engine clipped. ZeRO-2 partitions the gradients and the optimizer's state, the weights
stay whole; ZeRO-3 partitions the weights too, and gathers each submodule's around that submodule's
forward (DeepSpeed's hooks), wherever it is called from: the rollouts decode in step across
processes (:func:`~unigrpo_env.agents.decoding.synchronized_decoding`), as under FSDP.

For checkpoints the engine says how to see a weight whole (:meth:`Engine.whole_copy`: an FSDP
shard or a ZeRO-3 partition gathered), how to load a model that is not partitioned
(:meth:`Engine.loading_whole`) and what its own ``save_state`` / ``load_state`` take.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from unigrpo_env.agents.adapters import starting_model
from unigrpo_env.agents.decoding import synchronized_decoding

if TYPE_CHECKING:
    from unigrpo_env.agents.config import UniGRPOConfig

__all__ = ["Engine", "TrainingForward", "configure_deepspeed", "warn_if_the_launchers_engine_is_off"]


class TrainingForward(torch.nn.Module):
    """The training forward pass of one minibatch as a module call: ``forward(*args)`` is
    ``compute(*args)`` (the agent's log-probabilities of a minibatch, with gradients).

    It holds the policy as its submodule, so ``accelerator.prepare`` can hand it to the engine:
    DDP wraps it, and every forward of a minibatch goes through the wrapper so the engine
    synchronises the gradients of the backward that follows; FSDP2 shards it in place, unit by
    unit (:attr:`_no_split_modules`). Pass small arguments (episode indices): engines move their
    inputs between devices, so anything large stays beside the call, with the caller.

    ``forward(call=fn)`` runs ``fn()`` inside the module's forward instead: under FSDP that is how
    anything else that uses the policy (a rollout, an evaluation) gets its parameters gathered,
    as FSDP gathers a unit's parameters only around that unit's own forward."""

    def __init__(self, policy: torch.nn.Module, compute: Callable[..., Any]):
        super().__init__()
        self.policy = policy
        self._compute = compute

    @property
    def _no_split_modules(self) -> list[str]:
        """The block classes of the policy's networks (their own ``_no_split_modules``, as
        transformers and diffusers declare them): FSDP's transformer-based wrap makes each block
        one unit, and Accelerate reads this attribute of the model it prepares."""
        names: dict[str, None] = {}
        for module in self.policy.modules():
            names.update(dict.fromkeys(getattr(module, "_no_split_modules", None) or []))
        return list(names)

    def forward(self, *args: Any, call: Callable[[], Any] | None = None) -> Any:
        if call is not None:
            return call()
        return self._compute(*args)


def warn_if_the_launchers_engine_is_off(accelerator: Accelerator) -> None:
    """Warn when ``accelerate launch``'s config asked for FSDP or DeepSpeed (it sets
    ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``) but the Accelerator runs another engine:
    Accelerate 1.x turns those plugins on only for GPUs, so CPU processes would train with DDP."""
    for variable, engine, kind in (
        ("ACCELERATE_USE_FSDP", "FSDP", DistributedType.FSDP),
        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", DistributedType.DEEPSPEED),
    ):
        if os.environ.get(variable, "false").lower() in ("1", "true", "yes") and accelerator.distributed_type != kind:
            warnings.warn(
                f"the launcher's config asks for {engine}, but Accelerate enables it only on GPUs: these "
                f"{accelerator.num_processes} process(es) train with {accelerator.distributed_type.value} instead",
                RuntimeWarning,
                stacklevel=3,
            )


def _has_accelerator() -> bool:
    """Whether this machine has a GPU or another accelerator torch can use."""
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def configure_deepspeed(ds_config: dict[str, Any], config: UniGRPOConfig, accelerator: Accelerator) -> None:
    """Fill DeepSpeed's config (Accelerate's DeepSpeed plugin's, in place) with what the agent
    decides, before ``accelerator.prepare`` hands it to the engine:

    * ``gradient_clipping``: the engine clips in its ``step``, so it is ``max_grad_norm`` (``auto``
      or absent: set; another number: an error, as the run would clip at a norm its config does not say);
    * ``train_micro_batch_size_per_gpu`` (``auto``): the episodes of one minibatch in one process,
      ``num_prompts · group_size / processes / minibatches`` (rounded up); there is no data loader,
      so the engine only records it (``train_batch_size`` follows from it);
    * no ``scheduler`` section: the agent sets each group's learning rate itself every iteration
      (``warmup_iterations``, ``lr_schedule``), and an engine scheduler would overwrite them at every
      step. An ``optimizer`` section is refused by Accelerate (the agent passes its own AdamW)."""
    if "scheduler" in ds_config:
        raise ValueError(
            "the DeepSpeed config has a scheduler section: leave it out, the agent sets the learning rates itself "
            "(warmup_iterations, lr_schedule)"
        )
    clipping = ds_config.get("gradient_clipping", "auto")
    if clipping == "auto":
        ds_config["gradient_clipping"] = config.max_grad_norm
    elif float(clipping) != config.max_grad_norm:
        raise ValueError(
            f"the DeepSpeed config clips gradients to {clipping} but max_grad_norm is {config.max_grad_norm}: "
            "set gradient_clipping to auto (the engine then clips to max_grad_norm) or make them equal"
        )
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        episodes = config.num_prompts * config.group_size // accelerator.num_processes
        ds_config["train_micro_batch_size_per_gpu"] = max(1, math.ceil(episodes / config.minibatches))


class Engine:
    """The Accelerator and the distributed engine it runs, as the agent and the trainer use them.

    Args:
        config: the run's config (precision, gradient accumulation, ``cpu``; under DeepSpeed also
            the clipping norm and the minibatch size, :func:`configure_deepspeed`).
        accelerator: an ``accelerate.Accelerator``; None makes one from the config (without a GPU
            on the CPU, where Accelerate then runs several processes with torchrun).
    """

    def __init__(self, config: UniGRPOConfig, accelerator: Accelerator | None = None):
        self.config = config
        if accelerator is None:
            accelerator = Accelerator(
                cpu=config.cpu or not _has_accelerator(),
                mixed_precision=config.mixed_precision,
                gradient_accumulation_steps=config.gradient_accumulation_steps,
            )
            warn_if_the_launchers_engine_is_off(accelerator)
        self.accelerator = accelerator

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage (0 to 3), or None when the engine is not DeepSpeed."""
        if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
            return None
        return int(self.accelerator.state.deepspeed_plugin.zero_stage)

    @property
    def shards_parameters(self) -> bool:
        """Whether the engine partitions the policy's parameters across processes (FSDP, ZeRO-3)."""
        return self.accelerator.distributed_type == DistributedType.FSDP or self.zero_stage == 3

    # -- before training -----------------------------------------------------------------------

    def starting_model(self, part: Any) -> Any:
        """The frozen starting model of a policy side (:func:`~unigrpo_env.agents.adapters.starting_model`),
        taken before the engine partitions the policy, so a copy is a whole copy."""
        if any(hasattr(p, "ds_id") for p in part.parameters()):
            raise ValueError(
                "the policy was loaded with its parameters already partitioned by DeepSpeed ZeRO-3 (deepspeed.zero.Init: "
                "transformers' from_pretrained does so once an Accelerator with a ZeRO-3 plugin exists), so the agent "
                "cannot copy the frozen reference of a side trained in full: load the policy before making the "
                "Accelerator, as the CLI does (the engine partitions it when the agent prepares it)"
            )
        return starting_model(part)

    def prepare(
        self, policy: torch.nn.Module, compute: Callable[..., Any], optimizer: torch.optim.Optimizer
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The training pass (:class:`TrainingForward` of ``policy`` computing ``compute``) and the
        optimizer through the engine together: DDP wraps the module; FSDP2 shards it in place and
        points the optimizer's groups at the shards; DeepSpeed makes both one engine, whose
        optimizer keeps the groups, their names and learning rates."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            configure_deepspeed(self.accelerator.state.deepspeed_plugin.deepspeed_config, self.config, self.accelerator)
        return self.accelerator.prepare(TrainingForward(policy, compute), optimizer)

    # -- during training -----------------------------------------------------------------------

    def with_policy(self, training_forward: torch.nn.Module, fn: Callable[[], Any]) -> Any:
        """``fn()``, which uses the policy outside the training pass (a rollout, an evaluation, a
        checkpoint), with the policy's parameters whole: under FSDP it runs inside the engine's
        module ``training_forward``, whose forward gathers the root unit's shards (each block
        gathers its own when called); under ZeRO-3 it is called directly, as DeepSpeed's hooks
        gather every submodule's parameters around its forward wherever it is called from; under
        both, decoding loops are synchronised across processes
        (:mod:`unigrpo_env.agents.decoding`), as every gather is a collective. Otherwise it is
        called directly."""
        if not self.shards_parameters:
            return fn()
        with synchronized_decoding():  # every process decodes until all are done (the engine gathers per call)
            if self.zero_stage == 3:
                return fn()
            return training_forward(call=fn)

    def mean_denominator(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What the losses divide a share's sum by with several processes (None with one):
        ``Σ_processes count / W``, so that the engine's mean of the W processes' gradients is the
        gradient of the whole minibatch's mean (:mod:`unigrpo_env.agents.losses`)."""
        if self.accelerator.num_processes == 1:
            return None
        return self._shared_denominator

    def _shared_denominator(self, count: torch.Tensor) -> torch.Tensor:
        total = self.accelerator.reduce(count.detach().to(torch.float32).reshape(1), reduction="sum")
        return (total[0] / self.accelerator.num_processes).to(count.dtype)

    # -- checkpoints ---------------------------------------------------------------------------

    @staticmethod
    def whole_copy(tensor: torch.Tensor) -> torch.Tensor:
        """A CPU copy of a weight in full: a DTensor (FSDP) is this process's shard of it, and a ZeRO-3
        parameter (it has DeepSpeed's ``ds_id``) holds only its partition until gathered. Under
        either, every process must call it, for the same weights in the same order (a collective)."""
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        elif hasattr(tensor, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor]):  # whole on every process inside the block
                return tensor.detach().cpu().clone()
        return tensor.detach().cpu().clone()

    @contextmanager
    def loading_whole(self) -> Iterator[None]:
        """Models loaded inside the block come whole. Under DeepSpeed ZeRO-3 Accelerate points
        transformers at its DeepSpeed config (transformers' ``HfDeepSpeedConfig``), and
        ``from_pretrained`` then loads partitioned (``deepspeed.zero.Init``, a collective): a copy that
        the main process alone loads would wait for the others forever."""
        kept = getattr(self.accelerator.state.deepspeed_plugin, "dschf", None)  # None unless DeepSpeed
        if kept is None:
            yield
            return
        from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            set_hf_deepspeed_config(kept)

    def save_state_options(self) -> dict[str, Any]:
        """What ``save_state`` passes to the engine. DeepSpeed's checkpoint holds the module's
        weights (torch pickles, beside its optimizer partitions): the frozen ones are left out,
        being the starting policy's, in the checkpoint's policy folder already."""
        return {"exclude_frozen_parameters": True} if self.zero_stage is not None else {}

    def load_state_options(self) -> dict[str, Any]:
        """What ``load_state`` passes to the engine: DeepSpeed's module state without the frozen
        weights (see :meth:`save_state_options`) loads non-strictly; the trained weights come
        from the optimizer's fp32 partitions, and with ZeRO-2 also from ``trained_state.safetensors``."""
        return {"load_module_strict": False} if self.zero_stage is not None else {}
