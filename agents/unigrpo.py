"""The UniGRPO agent: collect a batch of grouped rollouts, then take PPO epochs over the joint loss.

One iteration, top to bottom:

1. **Collect.** Choose P training prompts (the same in every process), roll out G episodes of each
   through the batched environment — reasoning sampled with per-token log-probabilities, images
   denoised CFG-free with SDE steps inside a random window of consecutive steps and ODE steps
   outside it — and receive the terminal rewards.
2. **Advantages.** Gather every process's rewards, compute group-relative advantages
   ``Â_i = (R_i − mean_g) / (std_g + eps)``, keep this process's share. Samples whose reward is NaN
   (a failing scorer) are left out and counted. With ``images_per_text`` M > 1 (each reasoning
   drawn M times), a text's reward is the mean of its M images' rewards and its advantage is taken
   over the prompt's texts, while an image's advantage is taken over the M images of its reasoning.
3. **Update.** For ``ppo_epochs`` passes over ``minibatches``: recompute log-probabilities of the
   recorded tokens and denoising steps with gradients, and minimise
   ``−(J_text + λ·J_flow) + β·regulariser (+ β_text·KL_text)`` (:mod:`unigrpo_env.agents.losses`),
   with separate learning rates for the text and the image parameters (after an optional linear
   warm-up) and gradient clipping.

Under Accelerate each process runs its own rollouts. The training forward pass is one module call
per minibatch (:class:`TrainingForward`), handed to ``accelerator.prepare`` with the optimizer, so
the engine Accelerate wraps reduces the gradients itself: DDP for several processes (all-reduced in
buckets overlapped with the backward pass), or FSDP2 (parameters, gradients and optimizer state
sharded; each transformer block of the networks one unit, the rest of the policy the root unit).
``accelerator.accumulate`` accumulates ``gradient_accumulation_steps`` minibatches into one
optimizer step, reducing once per step. Under FSDP every other use of the policy — the rollouts,
the recomputed old log-probabilities, evaluation and checkpoints — also runs through that module
(:meth:`UniGRPOAgent.with_policy`), so the sharded parameters are gathered for it.

Under DeepSpeed (Accelerate's DeepSpeed plugin, ZeRO stage 2 or 3) ``accelerator.prepare`` makes the
module and the optimizer one ``DeepSpeedEngine``; ``accelerator.backward`` is the engine's backward
and, at the last minibatch of a step, its ``step`` (clipping to the config's ``gradient_clipping``,
which the agent sets to ``max_grad_norm``, the optimizer step, zeroing the gradients), so the
optimizer's own ``step``/``zero_grad`` are no-ops and ``clip_grad_norm_`` returns the norm the
engine clipped. ZeRO-2 partitions the gradients and the optimizer's state, the weights stay whole;
ZeRO-3 partitions the weights too, and gathers each submodule's around that submodule's forward
(DeepSpeed's hooks), wherever it is called from: the rollouts decode in step across processes
(:func:`~unigrpo_env.agents.decoding.synchronized_decoding`), as under FSDP.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from unigrpo_env import BatchTrajectory, flow
from unigrpo_env.agents.adapters import WithoutAdapter, attach_adapter, has_adapter
from unigrpo_env.agents.checkpointing import enable_gradient_checkpointing
from unigrpo_env.agents.config import UniGRPOConfig
from unigrpo_env.agents.decoding import synchronized_decoding
from unigrpo_env.agents.iteration_metrics import across_processes, reward_metrics
from unigrpo_env.agents.losses import flow_grpo_loss, group_advantages, masked_batch_mean, text_grpo_loss, text_kl
from unigrpo_env.agents.policy import TurnContext, UnifiedPolicy, check_policy_fits, world_of
from unigrpo_env.agents.rollout import Rollout, RolloutSettings, rollout
from unigrpo_env.lr_schedule import warmup_decay
from unigrpo_env.registration import make_scenario
from unigrpo_env.reward import RewardFunction
from unigrpo_env.scenario import Scenario
from unigrpo_env.vector import InterleavedVectorEnv

__all__ = [
    "UniGRPOAgent",
    "TrainingForward",
    "RewardFailureError",
    "Batch",
    "distributed_advantages",
    "prepare_trained_sides",
    "configure_deepspeed",
]


class RewardFailureError(RuntimeError):
    """The reward could not be computed for too much of a batch to learn from it."""


@dataclass
class Batch:
    """A collected batch as the update needs it: the rollout (the environment's batched trajectory
    and the policy's conditions), each turn's context, and the advantages."""

    rollout: Rollout
    contexts: list[TurnContext]
    settings: RolloutSettings
    advantages: torch.Tensor
    valid: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    # with images_per_text > 1: the texts' own advantages and validity [N], and which episodes train
    # their text (the first of each block of M that share it); None: the advantages above, every episode
    text_advantages: torch.Tensor | None = None
    text_valid: torch.Tensor | None = None
    text_rows: torch.Tensor | None = None
    # the frozen reference models' outputs, per key: (values [N, ...], which episodes are filled)
    reference_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def trajectory(self) -> BatchTrajectory:
        return self.rollout.trajectory

    @property
    def rewards(self) -> torch.Tensor:
        return self.rollout.trajectory.rewards

    @property
    def categories(self) -> list[str]:
        return [task.category for task in self.rollout.trajectory.tasks]

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    def reference(self, key: tuple, index: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A frozen reference model's output for episodes ``index``, computed once per batch: the
        reference never changes, so later PPO epochs reuse what the first epoch computed."""
        cached = self.reference_cache.get(key)
        if cached is not None and bool(cached[1][index.cpu()].all()):
            return cached[0][index]
        with torch.no_grad():
            value = compute()
        if cached is None:
            cached = (value.new_zeros((len(self),) + tuple(value.shape[1:])), torch.zeros(len(self), dtype=torch.bool))
            self.reference_cache[key] = cached
        cached[0][index] = value
        cached[1][index.cpu()] = True
        return value


def distributed_advantages(
    accelerator: Accelerator,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-4,
    global_std: bool = False,
) -> tuple[torch.Tensor, float]:
    """Group advantages over the rewards of *all* processes, so that a group split across processes
    gets exactly the advantages it would get in one; returns this process's share and the fraction
    of the whole batch whose reward failed (NaN)."""
    device = accelerator.device
    all_rewards = accelerator.gather(rewards.to(device))
    all_groups = accelerator.gather(group_ids.to(device))
    all_advantages = group_advantages(all_rewards, all_groups, eps=eps, global_std=global_std)
    n = rewards.shape[0]
    start = accelerator.process_index * n
    return all_advantages[start : start + n].cpu(), float(torch.isnan(all_rewards).float().mean())


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


def prepare_trained_sides(policy: UnifiedPolicy, config: UniGRPOConfig) -> tuple[bool, bool]:
    """Make the sides of ``policy`` that ``config.train`` names trainable, with the adapters the
    config chooses (``text_adapter``, ``image_adapter``), and freeze the others; returns whether
    the text and the image side train. The agent does this to the policy it trains, and a
    checkpoint under FSDP to a fresh copy of the starting policy, so that the trained state fits it."""
    train_text = config.train in ("both", "text")
    train_image = config.train in ("both", "image")
    policy.text.requires_grad_(train_text)
    policy.image.requires_grad_(train_image)
    lora = {"rank": config.lora_rank, "alpha": config.lora_alpha}
    if train_text:
        attach_adapter(policy.text, "text", config.text_adapter, targets=config.text_adapter_targets, **lora)
    if train_image:
        attach_adapter(policy.image, "image", config.image_adapter, targets=config.image_adapter_targets, **lora)
    return train_text, train_image


def _starting_model(part: Any) -> Any:
    """The frozen starting model of a policy side: its adapter disabled, or a copy made now. The
    copy shares the side's plain attributes (a conditioner with its pipeline's text encoders, a
    tokenizer): only the modules and tensors that train are copied."""
    if has_adapter(part):
        return WithoutAdapter(part)
    if any(hasattr(p, "ds_id") for p in part.parameters()):
        raise ValueError(
            "the policy was loaded with its parameters already partitioned by DeepSpeed ZeRO-3 (deepspeed.zero.Init: "
            "transformers' from_pretrained does so once an Accelerator with a ZeRO-3 plugin exists), so the agent "
            "cannot copy the frozen reference of a side trained in full: load the policy before making the "
            "Accelerator, as the CLI does (the engine partitions it when the agent prepares it)"
        )
    shared = {id(v): v for v in vars(part).values() if not isinstance(v, (torch.nn.Module, torch.Tensor, dict))}
    return copy.deepcopy(part, memo=shared).requires_grad_(False).eval()


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


def _select(condition: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    return {k: None if v is None else v[index.to(v.device)] for k, v in condition.items()}


class TrainingForward(torch.nn.Module):
    """The training forward pass of one minibatch as a module call: ``forward(index)`` is the
    log-probabilities of the recorded actions of episodes ``index`` of the current batch (see
    :meth:`UniGRPOAgent._log_probs`), with gradients.

    It holds the policy as its submodule, so ``accelerator.prepare`` can hand it to the engine:
    DDP wraps it, and every forward of a minibatch goes through the wrapper so the engine
    synchronises the gradients of the backward that follows; FSDP2 shards it in place, unit by
    unit (:attr:`_no_split_modules`). The batch is set beside the call (``batch``), not passed
    through it, as engines move their inputs between devices.

    ``forward(call=fn)`` runs ``fn()`` inside the module's forward instead: under FSDP that is how
    anything else that uses the policy (a rollout, an evaluation) gets its parameters gathered,
    as FSDP gathers a unit's parameters only around that unit's own forward."""

    def __init__(self, policy: UnifiedPolicy, log_probs: Callable[[Batch, torch.Tensor], Any]):
        super().__init__()
        self.policy = policy
        self._log_probs = log_probs
        self.batch: Batch | None = None

    @property
    def _no_split_modules(self) -> list[str]:
        """The block classes of the policy's networks (their own ``_no_split_modules``, as
        transformers and diffusers declare them): FSDP's transformer-based wrap makes each block
        one unit, and Accelerate reads this attribute of the model it prepares."""
        names: dict[str, None] = {}
        for module in self.policy.modules():
            names.update(dict.fromkeys(getattr(module, "_no_split_modules", None) or []))
        return list(names)

    def forward(
        self, index: torch.Tensor | None = None, *, call: Callable[[], Any] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, Any]] | Any:
        if call is not None:
            return call()
        if self.batch is None or index is None:
            raise RuntimeError("set the batch of the minibatch and pass its episode indices")
        return self._log_probs(self.batch, index)


class UniGRPOAgent:
    """UniGRPO on any :class:`UnifiedPolicy`; see the module docstring.

    Args:
        policy: the unified policy to train (its starting image model is the regulariser's reference).
        config: the hyperparameters.
        scenario: the scenario to train on; None builds ``config.scenario`` with ``config.scenario_options``.
        reward: scores the finished episodes instead of the scenario's own reward (None: the scenario's).
        accelerator: an ``accelerate.Accelerator``; one is made from the config if None.
    """

    def __init__(
        self,
        policy: UnifiedPolicy,
        config: UniGRPOConfig,
        *,
        scenario: Scenario | None = None,
        reward: RewardFunction | None = None,
        accelerator: Accelerator | None = None,
    ):
        self.config = config
        self.accelerator = accelerator or Accelerator(
            # without a GPU, say so: Accelerate then runs several processes (torchrun) on the CPU
            cpu=config.cpu or not _has_accelerator(),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
        if accelerator is None:
            warn_if_the_launchers_engine_is_off(self.accelerator)
        self.train_text, self.train_image = prepare_trained_sides(policy, config)
        if config.gradient_checkpointing:
            for side, part, trained in (
                ("text", policy.text, self.train_text),
                ("image", policy.image, self.train_image),
            ):
                if trained:
                    enable_gradient_checkpointing(part, side)
        self.policy = policy.to(self.accelerator.device)
        # The references are the starting models: the same network with its adapter disabled, or a
        # frozen copy (made before the engine shards the policy, so it is a whole copy).
        self.reference = None
        if self.train_image and config.regularizer != "none":
            self.reference = _starting_model(policy.image)
        self.reference_text = None
        if self.train_text and config.kl_text > 0:
            self.reference_text = _starting_model(policy.text)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            configure_deepspeed(self.accelerator.state.deepspeed_plugin.deepspeed_config, config, self.accelerator)
        groups = []
        if self.train_text:
            groups.append({"params": policy.text_parameters(), "lr": config.lr_text, "name": "text"})
        if self.train_image:
            groups.append({"params": policy.image_parameters(), "lr": config.lr_image, "name": "image"})
        # the training pass and the optimizer through the engine together (DDP wraps the module;
        # FSDP2 shards it in place and points the optimizer's groups at the shards; DeepSpeed makes
        # both one engine, whose optimizer keeps the groups, their names and learning rates)
        self.training_forward, self.optimizer = self.accelerator.prepare(
            TrainingForward(self.policy, self._log_probs), torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        )
        self.scenario = scenario if scenario is not None else make_scenario(config.scenario, **config.scenario_options)
        self.world = world_of(policy, self.scenario)  # the model's codecs and time grid
        check_policy_fits(policy, self.scenario, self.world)
        self.train_tasks = self.scenario.check_split("train")
        processes = self.accelerator.num_processes
        if config.group_size % processes:
            raise ValueError(
                f"group_size ({config.group_size}) must be divisible by the number of processes ({processes})"
            )
        self.local_group_size = config.group_size // processes
        m = config.images_per_text
        if m > 1:
            if self.local_group_size % m:
                raise ValueError(
                    f"images_per_text ({m}) must divide each process's share of a group ({self.local_group_size})"
                )
            if any(len(task.prompts) != 1 for task in self.train_tasks):
                raise ValueError(
                    f"images_per_text > 1 needs a single-turn scenario; {self.scenario.name!r} has more turns"
                )
        self.envs = InterleavedVectorEnv(
            self.scenario,
            config.num_prompts,
            self.local_group_size,
            device=self.accelerator.device,
            reward=reward,
            reward_timeout=config.reward_timeout,
            world=self.world,
        )
        self.iteration = 0

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

    def with_policy(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, which uses the policy outside the training pass (a rollout, an evaluation, a
        checkpoint), with the policy's parameters whole: under FSDP it runs inside the engine's
        module, whose forward gathers the root unit's shards (each block gathers its own when
        called); under ZeRO-3 it is called directly, as DeepSpeed's hooks gather every submodule's
        parameters around its forward wherever it is called from; under both, decoding loops are
        synchronised across processes (:mod:`unigrpo_env.agents.decoding`), as every gather is a
        collective. Otherwise it is called directly."""
        if not self.shards_parameters:
            return fn()
        with synchronized_decoding():  # every process decodes until all are done (the engine gathers per call)
            if self.zero_stage == 3:
                return fn()
            return self.training_forward(call=fn)

    # -- 1. collect ------------------------------------------------------------------------------

    def _shared_rng(self, iteration: int) -> np.random.Generator:
        """The same in every process: which prompts, which SDE window."""
        return np.random.default_rng([self.config.seed, iteration])

    def rollout_settings(self, rng: np.random.Generator) -> RolloutSettings:
        c = self.config
        window = None
        if c.sde_window_size is not None:
            last_start = max(0, min(c.sde_window_max_start, self.world.num_steps - c.sde_window_size))
            window = (int(rng.integers(0, last_start + 1)), c.sde_window_size)
        return RolloutSettings(
            temperature=c.temperature,
            noise_level=c.noise_level,
            sde_window=window,
            cfg_scale=c.rollout_cfg,
            images_per_text=c.images_per_text,
        )

    def collect(self, iteration: int) -> Batch:
        c = self.config
        rng = self._shared_rng(iteration)
        prompts = rng.choice(len(self.train_tasks), size=c.num_prompts, replace=c.num_prompts > len(self.train_tasks))
        settings = self.rollout_settings(rng)
        rank = self.accelerator.process_index
        seed = int(np.random.default_rng([c.seed, iteration, rank]).integers(0, 2**31 - 1))
        started = time.perf_counter()
        self.policy.eval()
        with self.accelerator.autocast():  # the rollout in the training's precision (the flow math upcasts)
            result = self.with_policy(
                partial(
                    rollout,
                    self.policy,
                    self.envs,
                    settings,
                    seed=seed,
                    options={"task_index": [int(i) for i in prompts]},
                    generator=torch.Generator().manual_seed(seed),
                )
            )
        rollout_seconds = time.perf_counter() - started
        trajectory = result.trajectory
        advantages, valid, failed_fraction = self._advantages(result, prompts)
        batch = Batch(
            rollout=result,
            contexts=[result.context(k) for k in range(len(trajectory.turns))],
            settings=settings,
            advantages=advantages,
            valid=valid,
        )
        if c.images_per_text > 1:
            self._text_and_image_advantages(batch, prompts)
        batch.stats = {
            **reward_metrics(trajectory.rewards, trajectory.reward_components, batch.categories),  # this process's
            "reward_failed_fraction": failed_fraction,
            "sde_window_start": float(settings.sde_window[0]) if settings.sde_window else 0.0,
            "network_calls_per_image": result.network_calls / max(1, len(trajectory.turns)),
            "time_rollout": rollout_seconds - trajectory.reward_seconds,
            "time_reward": trajectory.reward_seconds,
        }
        if trajectory.reward_error is not None:
            batch.stats["reward_error"] = trajectory.reward_error  # type: ignore[assignment]
        if failed_fraction > c.max_failed_fraction:
            detail = f" ({trajectory.reward_error})" if trajectory.reward_error else ""
            raise RewardFailureError(
                f"the reward failed for {failed_fraction:.0%} of iteration {iteration}'s batch, more than the allowed "
                f"{c.max_failed_fraction:.0%}{detail}"
            )
        return batch

    def _advantages(self, result: Rollout, prompts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float]:
        acc = self.accelerator
        group_ids = torch.as_tensor(prompts)[
            result.trajectory.group_ids
        ]  # the prompt's index: the same group in every process
        advantages, failed_fraction = distributed_advantages(
            acc, result.rewards, group_ids, eps=self.config.advantage_eps, global_std=self.config.global_std
        )
        return advantages, ~torch.isnan(result.rewards), failed_fraction

    def _text_and_image_advantages(self, batch: Batch, prompts: np.ndarray) -> None:
        """M = ``images_per_text`` images per reasoning (the M consecutive episodes of a block):

        * text: ``R_text = mean of its M images' rewards`` (NaN ones left out), and
          ``Â_text = (R_text − mean_g) / (std_g + eps)`` over the texts of the prompt group ``g``
          (every text counted once: each appears M times, which changes neither mean nor std);
        * image: ``Â_image = (R_i − mean_b) / (std_b + eps)`` over the M images of its block ``b``.
        """
        m, rewards = self.config.images_per_text, batch.rewards
        n = len(batch)
        block = torch.arange(n) // m
        valid = ~torch.isnan(rewards)
        count = torch.zeros(n // m).index_add_(0, block, valid.float())
        total = torch.zeros(n // m).index_add_(0, block, torch.where(valid, rewards, torch.zeros_like(rewards)))
        text_rewards = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))[block]
        group_ids = torch.as_tensor(prompts)[batch.trajectory.group_ids]
        c = self.config
        text_advantages, _ = distributed_advantages(
            self.accelerator, text_rewards, group_ids, eps=c.advantage_eps, global_std=c.global_std
        )
        batch.text_advantages = text_advantages
        batch.text_valid = ~torch.isnan(text_rewards)
        batch.text_rows = torch.arange(n) % m == 0
        batch.advantages = group_advantages(rewards, block, eps=c.advantage_eps)

    # -- 3. update ---------------------------------------------------------------------------------

    def _log_probs(
        self, batch: Batch, index: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, list]]:
        """Log-probabilities of the recorded actions of episodes ``index`` under the current policy,
        with gradients: per turn the tokens ``[n, L]`` and the SDE steps ``[n, S]``, plus what the
        regularisers and RatioNorm need (``extras["text_reference"]``: the reference language
        model's log-probabilities per text turn; ``extras["image"]``: per image turn)."""
        policy, settings = self.policy, batch.settings
        text_lp: list[torch.Tensor] = []
        image_lp: list[torch.Tensor] = []
        extras: dict[str, Any] = {"text_reference": [], "image": []}
        # the episodes whose text trains: all, or the first of each block sharing one (images_per_text)
        text_index = index if batch.text_rows is None else index[batch.text_rows[index.cpu()].to(index.device)]
        extras["text_index"] = text_index
        for k, turn in enumerate(batch.trajectory.turns):
            if self.train_text and len(text_index):
                tokens, _ = turn.text.padded()
                args = (batch.contexts[k].select(text_index), tokens[text_index], turn.text.lengths[text_index])
                text_lp.append(policy.text.log_probs(*args, temperature=settings.temperature))
                if self.reference_text is not None:
                    extras["text_reference"].append(
                        batch.reference(
                            ("text", k),
                            text_index,
                            partial(self.reference_text.log_probs, *args, temperature=settings.temperature),
                        )
                    )
            image = turn.image
            if self.train_image and image.sde_steps:
                condition = _select(batch.rollout.conditions[k], index)
                step_lp, reg_terms, norm_terms = [], [], []
                for s in image.sde_steps:
                    x_t, x_next = image.latents[index, s], image.latents[index, s + 1]
                    t, t_next = float(image.times[s]), float(image.times[s + 1])
                    v = policy.image.velocity(x_t, t, condition, cfg_scale=settings.cfg_scale)
                    log_prob, mean, std = flow.sde_step_log_prob(v, x_t, t, t_next, settings.noise_level, x_next)
                    step_lp.append(log_prob)
                    norm_terms.append((mean, batch.rollout.sde_means[k][s][index], std))
                    if self.reference is not None:
                        v_ref = batch.reference(
                            ("velocity", k, s),
                            index,
                            partial(self.reference.velocity, x_t, t, condition, cfg_scale=settings.cfg_scale),
                        )
                        if self.config.regularizer == "mse":
                            reg_terms.append(flow.velocity_mse(v, v_ref))
                        else:
                            _, mean_ref, _ = flow.sde_step_log_prob(v_ref, x_t, t, t_next, settings.noise_level, x_next)
                            reg_terms.append(flow.latent_kl(mean, mean_ref, std))
                image_lp.append(torch.stack(step_lp, dim=1))
                extras["image"].append(
                    {"reg": torch.stack(reg_terms, dim=1) if reg_terms else None, "ratio_norm": norm_terms}
                )
        return text_lp, image_lp, extras

    def _loss(
        self, batch: Batch, index: torch.Tensor, old: dict[str, list[torch.Tensor]], *, fill_old: bool = False
    ) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        advantages = batch.advantages[index].to(self.accelerator.device)
        valid = batch.valid[index].to(self.accelerator.device)
        self.accelerator.unwrap_model(self.training_forward).batch = batch
        text_lp, image_lp, extras = self.training_forward(index)
        text_index = extras["text_index"]
        if fill_old:  # the first minibatch: the policy has not moved yet, this pass is the old policy
            self._store_old(old, index, text_lp, image_lp, text_index)
        stats: dict[str, float] = {}
        loss = torch.zeros((), device=self.accelerator.device)
        # several processes: every mean divides by the whole minibatch's count over W (losses.py)
        divide = self._shared_denominator if self.accelerator.num_processes > 1 else None
        text_advantages, text_valid = advantages, valid
        if batch.text_advantages is not None:  # images_per_text > 1: the texts' own advantages
            text_advantages = batch.text_advantages[text_index].to(self.accelerator.device)
            text_valid = batch.text_valid[text_index].to(self.accelerator.device)
        for k, log_probs in enumerate(text_lp):
            text = batch.trajectory.turns[k].text
            lengths = text.lengths[text_index].to(log_probs.device)
            mask = torch.arange(log_probs.shape[1], device=log_probs.device)[None] < lengths[:, None]
            reduction = {"loss_type": c.text_loss_type, "max_tokens": text.max_tokens, "denominator": divide}
            text_loss, s = text_grpo_loss(
                log_probs, old["text"][k][text_index], mask, text_advantages, c.clip_range_text, text_valid, **reduction
            )
            loss = loss + text_loss / len(text_lp)
            if extras["text_reference"]:  # GRPO's β·KL to the starting language model
                kl = text_kl(log_probs, extras["text_reference"][k], mask, text_valid, **reduction)
                loss = loss + c.kl_text * kl / len(text_lp)
                stats["kl_text"] = stats.get("kl_text", 0.0) + float(kl.detach()) / len(text_lp)
            stats.update(s)
            stats["loss_text"] = stats.get("loss_text", 0.0) + float(text_loss.detach()) / len(text_lp)
        for k, log_probs in enumerate(image_lp):
            old_lp = old["image"][k][index]
            if c.ratio_norm:
                normed = [
                    flow.ratio_norm(log_probs[:, j] - old_lp[:, j], mean, mean_old, std)
                    for j, (mean, mean_old, std) in enumerate(extras["image"][k]["ratio_norm"])
                ]
                log_probs = old_lp + torch.stack(normed, dim=1)
            image_loss, s = flow_grpo_loss(log_probs, old_lp, advantages, c.clip_range_image, valid, denominator=divide)
            loss = loss + c.image_loss_weight * image_loss / len(image_lp)
            stats.update(s)
            stats["loss_image"] = stats.get("loss_image", 0.0) + float(image_loss.detach()) / len(image_lp)
            reg = extras["image"][k]["reg"]
            if reg is not None:
                if divide is not None:
                    reg_value = masked_batch_mean(reg.mean(dim=1), valid, divide)
                else:  # one process: the expression the recorded runs used (its sum order, bit for bit)
                    reg_value = reg.mean(dim=1)[valid].mean() if bool(valid.any()) else reg.sum() * 0.0
                loss = loss + c.regularizer_coef * reg_value / len(image_lp)
                stats[f"regularizer_{c.regularizer}"] = stats.get(f"regularizer_{c.regularizer}", 0.0) + float(
                    reg_value.detach()
                ) / len(image_lp)
        stats["loss"] = float(loss.detach())
        return loss, stats

    def _shared_denominator(self, count: torch.Tensor) -> torch.Tensor:
        """``Σ_processes count / W``: what each of the W processes divides its share's sum by, so
        that the engine's mean of their gradients is the gradient of the whole minibatch's mean."""
        total = self.accelerator.reduce(count.detach().to(torch.float32).reshape(1), reduction="sum")
        return (total[0] / self.accelerator.num_processes).to(count.dtype)

    @torch.no_grad()
    def _old_log_probs(self, batch: Batch, parts: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """The rollout policy's log-probabilities of the episodes in ``parts`` (the first epoch's
        minibatches after the first), recomputed with the training forward pass before any update.
        The first minibatch needs no extra pass: its own forward pass, detached, is the old policy
        (so its ratio is exactly 1, on-policy), and with a single minibatch per batch nothing is
        recomputed at all.

        Why recompute rather than reuse the rollout's own log-probabilities: under mixed precision
        (and with some kernels even in float32), a network's output depends on the batch shape it
        is computed at, and the rollout evaluates all N episodes one denoising step at a time while
        training evaluates a minibatch's steps together. Recomputed at the training minibatch's
        shape, in the same autocast, the old log-probabilities are exactly what the loss's forward
        pass gives before an update, so the ratio is exactly 1 on policy; the rollout's own values
        differ from them by the reported ``*_log_prob_drift``."""
        n = len(batch)
        old: dict[str, list[torch.Tensor]] = {"text": [], "image": []}
        for turn in batch.trajectory.turns:
            if self.train_text:
                old["text"].append(torch.full(turn.text.padded()[0].shape, math.nan, device=self.accelerator.device))
            if self.train_image and turn.image.sde_steps:
                old["image"].append(
                    torch.full((n, len(turn.image.sde_steps)), math.nan, device=self.accelerator.device)
                )
        for index in parts:
            with self.accelerator.autocast():  # as the loss's forward pass runs
                text_lp, image_lp, extras = self.with_policy(partial(self._log_probs, batch, index))
            self._store_old(old, index, text_lp, image_lp, extras["text_index"])
        return old

    @staticmethod
    def _store_old(
        old: dict[str, list[torch.Tensor]],
        index: torch.Tensor,
        text_lp: list[torch.Tensor],
        image_lp: list[torch.Tensor],
        text_index: torch.Tensor,
    ) -> None:
        for k, lp in enumerate(text_lp):
            old["text"][k][text_index] = lp.detach().float()
        for k, lp in enumerate(image_lp):
            old["image"][k][index] = lp.detach().float()

    def learning_rate_scale(self, iteration: int) -> float:
        """The learning rates' multiplier at ``iteration`` (counted from 0): a linear warm-up
        ``(iteration + 1) / warmup_iterations``, then ``lr_schedule`` over the remaining iterations
        (``constant``: 1; ``linear``: down to 0 at ``iterations``, as TRL's default; ``cosine``:
        ``(1 + cos(π·progress)) / 2``), evaluated at the iteration's start."""
        c = self.config
        return warmup_decay(iteration, c.warmup_iterations, c.iterations, c.lr_schedule)

    def update(self, batch: Batch) -> dict[str, float]:
        c, acc = self.config, self.accelerator
        scale = self.learning_rate_scale(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = {"text": c.lr_text, "image": c.lr_image}[group["name"]] * scale
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + self.iteration)
        partitions = [
            list(torch.randperm(len(batch), generator=generator).chunk(c.minibatches)) for _ in range(c.ppo_epochs)
        ]
        started = time.perf_counter()
        self.policy.train()
        old = self._old_log_probs(batch, partitions[0][1:])
        stats: dict[str, float] = {"time_old_log_probs": time.perf_counter() - started}
        history: list[dict[str, float]] = []
        loss_seconds = optimizer_seconds = 0.0
        for epoch, parts in enumerate(partitions):
            for m, index in enumerate(parts):
                first = epoch == 0 and m == 0
                # gradients reduced by the engine at the last minibatch of each optimizer step
                with acc.accumulate(self.training_forward):
                    t0 = time.perf_counter()
                    with acc.autocast():
                        loss, step_stats = self._loss(batch, index, old, fill_old=first)
                    if first:
                        stats.update(self._drift(batch, old))
                    # divided by gradient_accumulation_steps, as Accelerate does; under DeepSpeed the
                    # engine's backward, and at the step's last minibatch its step (clip, step, zero)
                    acc.backward(loss)
                    t1 = time.perf_counter()
                    if acc.sync_gradients:
                        # the norm before clipping (under DeepSpeed: the one the engine clipped in its step)
                        step_stats["grad_norm"] = float(
                            acc.clip_grad_norm_(self._trained_parameters(), c.max_grad_norm)
                        )
                    self.optimizer.step()  # a no-op until the step's last minibatch (under DeepSpeed: always)
                    self.optimizer.zero_grad(set_to_none=True)
                    optimizer_seconds += time.perf_counter() - t1
                    loss_seconds += t1 - t0
                step_stats["epoch"] = float(epoch)
                history.append(step_stats)
        first = history[0]
        stats["first_ratio_text_max_dev"] = first.get("text_ratio_max_dev", 0.0)
        stats["first_ratio_image_max_dev"] = first.get("image_ratio_max_dev", 0.0)
        for key in dict.fromkeys(k for h in history for k in h):
            stats[key] = float(np.mean([h[key] for h in history if key in h]))
        stats["lr_scale"] = scale
        stats["time_loss_backward"] = loss_seconds
        stats["time_optimizer"] = optimizer_seconds
        return stats

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _drift(self, batch: Batch, old: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """How far the recomputed log-probabilities are from those recorded during the rollout (a
        check that rollout and training compute the same policy)."""
        drift: dict[str, float] = {}
        turns = batch.trajectory.turns
        for k, lp in enumerate(old["text"]):
            text = turns[k].text
            mask = torch.arange(lp.shape[1], device=lp.device)[None] < text.lengths.to(lp.device)[:, None]
            mask &= ~torch.isnan(lp)  # texts not trained (shared by a block, images_per_text) are never recomputed
            diff = (lp - text.padded()[1].to(lp.device)).abs()[mask]
            drift["text_log_prob_drift"] = max(
                drift.get("text_log_prob_drift", 0.0), float(diff.max()) if diff.numel() else 0.0
            )
        for k, lp in enumerate(old["image"]):
            image = [turn.image for turn in turns if turn.image.sde_steps][k]
            diff = (lp - image.log_probs[:, image.sde_steps].to(lp.device)).abs()
            drift["image_log_prob_drift"] = max(
                drift.get("image_log_prob_drift", 0.0), float(diff.max()) if diff.numel() else 0.0
            )
        return drift

    # -- one iteration -----------------------------------------------------------------------------

    def train_iteration(self) -> dict[str, float]:
        """One iteration: collect a batch and update on it; returns the iteration's metrics, those
        of the whole batch over every process (:mod:`~unigrpo_env.agents.iteration_metrics`)."""
        batch = self.collect(self.iteration)
        stats = dict(batch.stats)
        stats.update(self.update(batch))
        trajectory = batch.trajectory
        stats = across_processes(
            self.accelerator, stats, trajectory.rewards, trajectory.reward_components, batch.categories
        )
        stats["iteration"] = float(self.iteration)
        self.iteration += 1
        return stats
