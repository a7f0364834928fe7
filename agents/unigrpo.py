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

Everything about devices, precision, processes and the distributed engine (the module and optimizer
prepared together, the policy gathered for rollouts, the shared loss denominator) is
:class:`~unigrpo_env.agents.engine.Engine`'s; here the Accelerator appears only through the calls
every engine answers the same way (``autocast``, ``accumulate``, ``backward``, ``clip_grad_norm_``,
``gather``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from unigrpo_env import flow
from unigrpo_env.agents.adapters import attach_adapter
from unigrpo_env.agents.batch import Batch, MinibatchLogProbs, OldLogProbs, TurnLogProbs
from unigrpo_env.agents.checkpointing import enable_gradient_checkpointing
from unigrpo_env.agents.config import UniGRPOConfig
from unigrpo_env.agents.engine import Engine
from unigrpo_env.agents.iteration_metrics import across_processes, reward_metrics
from unigrpo_env.agents.losses import (
    flow_grpo_loss,
    group_advantages,
    masked_batch_mean,
    returns_to_go,
    text_grpo_loss,
    text_kl,
    turn_advantages,
)
from unigrpo_env.agents.policy import UnifiedPolicy, check_policy_fits, world_of
from unigrpo_env.agents.rollout import Rollout, RolloutSettings, rollout
from unigrpo_env.lr_schedule import warmup_decay
from unigrpo_env.registration import make_scenario
from unigrpo_env.reward import RewardFunction
from unigrpo_env.scenario import Scenario
from unigrpo_env.vector import InterleavedVectorEnv

__all__ = [
    "UniGRPOAgent",
    "RewardFailureError",
    "Batch",
    "distributed_advantages",
    "distributed_turn_advantages",
    "prepare_trained_sides",
]


class RewardFailureError(RuntimeError):
    """The reward could not be computed for too much of a batch to learn from it."""


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


def distributed_turn_advantages(
    accelerator: Accelerator,
    returns: torch.Tensor,
    terminal: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    mode: str,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, float]:
    """Per (episode, turn) advantages over the returns-to-go ``[N, K]`` of *all* processes (each
    process's K padded to the largest with NaN, "not played"), so a group split across processes
    gets what it would get in one; returns this process's share ``[N, K]`` and the fraction of the
    whole batch whose terminal reward failed (NaN)."""
    device = accelerator.device
    k = returns.shape[1]
    padded = accelerator.pad_across_processes(returns.to(device), dim=1, pad_index=math.nan)
    all_returns = accelerator.gather(padded)
    all_groups = accelerator.gather(group_ids.to(device))
    all_terminal = accelerator.gather(terminal.to(device))
    advantages = turn_advantages(all_returns.cpu(), all_groups.cpu(), mode=mode, eps=eps)
    n = returns.shape[0]
    start = accelerator.process_index * n
    return advantages[start : start + n, :k], float(torch.isnan(all_terminal).float().mean())


def prepare_trained_sides(policy: UnifiedPolicy, config: UniGRPOConfig) -> tuple[bool, bool]:
    """Make the sides of ``policy`` that ``config.train`` names trainable, with the adapters the
    config chooses (``text_adapter``, ``image_adapter``), and freeze the others; returns whether
    the text and the image side train. The agent does this to the policy it trains, and a
    checkpoint written from a fresh copy of the starting policy (an engine that shards the policy),
    so that the trained state fits it."""
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


def _played(batch: Batch, turn: int, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``valid`` of the episodes ``index``, restricted to those that played ``turn`` (an episode
    the scenario's answer ended earlier has no actions there to learn from)."""
    rows = batch.trajectory.turns[turn]
    if rows.all_rows:
        return valid
    return valid & rows.rows[index.cpu()].to(valid.device)


def _weighted(value: torch.Tensor, weights: dict[int, torch.Tensor] | None, turn: int, turns: int) -> torch.Tensor:
    """``value`` of ``turn`` as its share of its side's mean over ``turns`` turns (:meth:`UniGRPOAgent._turn_weights`)."""
    if weights is None:
        return value / turns
    return value * weights[turn].to(value.device)


def _weighted_stat(value: torch.Tensor, weights: dict[int, torch.Tensor] | None, turn: int, turns: int) -> float:
    """The logged share of ``value`` (:func:`_weighted`; with equal turns, as the recorded runs logged it)."""
    if weights is None:
        return float(value.detach()) / turns
    return float(value.detach() * weights[turn])


def _select(condition: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    return {k: None if v is None else v[index.to(v.device)] for k, v in condition.items()}


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
        self.engine = Engine(config, accelerator)  # devices, precision, processes, the distributed engine
        self.accelerator = self.engine.accelerator
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
            self.reference = self.engine.starting_model(policy.image)
        self.reference_text = None
        if self.train_text and config.kl_text > 0:
            self.reference_text = self.engine.starting_model(policy.text)
        groups = []
        if self.train_text:
            groups.append({"params": policy.text_parameters(), "lr": config.lr_text, "name": "text"})
        if self.train_image:
            groups.append({"params": policy.image_parameters(), "lr": config.lr_image, "name": "image"})
        # the training pass (the log-probabilities of a minibatch of the batch being trained on,
        # self._batch) and the optimizer, through the engine together
        self._batch: Batch | None = None
        self.training_forward, self.optimizer = self.engine.prepare(
            self.policy, self._training_pass, torch.optim.AdamW(groups, weight_decay=config.weight_decay)
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

    def with_policy(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, which uses the policy outside the training pass (a rollout, an evaluation, a
        checkpoint), with the policy's parameters whole (:meth:`Engine.with_policy`)."""
        return self.engine.with_policy(self.training_forward, fn)

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
        advantages, valid, failed_fraction, per_turn = self._advantages(result, prompts)
        batch = Batch.of(result, settings, advantages, valid)
        batch.turn_advantages = per_turn
        if c.images_per_text > 1:  # the one place images_per_text shapes the update
            self._share_texts(batch, prompts)
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

    def _advantages(
        self, result: Rollout, prompts: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        """The advantages of the batch: ``[N]`` shared by every turn (``advantage='trajectory'``:
        the return ``R_i = R_i^term + Σ_k r_{i,k}``, which without turn rewards is the terminal
        reward) or per (episode, turn) ``[N, K]`` (``'turn'``, ``'batch'``: the return-to-go,
        :func:`~unigrpo_env.agents.losses.turn_advantages`); the episodes whose terminal reward is
        a number; the failed fraction of the whole batch."""
        acc, c = self.accelerator, self.config
        trajectory = result.trajectory
        group_ids = torch.as_tensor(prompts)[
            trajectory.group_ids
        ]  # the prompt's index: the same group in every process
        terminal = result.rewards
        turn_rewards = torch.stack(
            [t.rewards if t.rewards is not None else torch.full((len(terminal),), math.nan) for t in trajectory.turns],
            1,
        )
        valid = ~torch.isnan(terminal)
        if c.advantage == "trajectory":
            returns = terminal
            if bool((~torch.isnan(turn_rewards)).any()):  # the turn rewards add to the return
                returns = terminal + torch.nan_to_num(turn_rewards, nan=0.0).sum(dim=1)
            advantages, failed_fraction = distributed_advantages(
                acc, returns, group_ids, eps=c.advantage_eps, global_std=c.global_std
            )
            return advantages, valid, failed_fraction, None
        returns = returns_to_go(turn_rewards, terminal, trajectory.turns_played(), c.turn_discount)
        per_turn, failed_fraction = distributed_turn_advantages(
            acc, returns, terminal, group_ids, mode=c.advantage, eps=c.advantage_eps
        )
        return per_turn[:, 0], valid, failed_fraction, per_turn

    def _share_texts(self, batch: Batch, prompts: np.ndarray) -> None:
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
        image_advantages = group_advantages(rewards, block, eps=c.advantage_eps)
        batch.share_texts(m, text_advantages, ~torch.isnan(text_rewards), image_advantages)

    # -- 3. update ---------------------------------------------------------------------------------

    def _training_pass(self, index: torch.Tensor) -> MinibatchLogProbs:
        """The training forward pass of episodes ``index`` of the batch being trained on."""
        if self._batch is None:
            raise RuntimeError("no batch to train on: the training pass runs inside update()")
        return self._log_probs(self._batch, index)

    def _log_probs(self, batch: Batch, index: torch.Tensor) -> MinibatchLogProbs:
        """Log-probabilities of the recorded actions of episodes ``index`` under the current policy,
        with gradients, per turn: the tokens ``[n, L]`` (of the episodes whose text trains) and the
        SDE steps ``[n, S]``, with what the regularisers and RatioNorm need (:class:`TurnLogProbs`)."""
        policy, settings = self.policy, batch.settings
        text_index = batch.text_index(index)
        turns: dict[int, TurnLogProbs] = {}
        for k, turn in enumerate(batch.trajectory.turns):
            out = turns[k] = TurnLogProbs()
            if self.train_text and len(text_index):
                tokens, _ = turn.text.padded()
                args = (batch.contexts[k].select(text_index), tokens[text_index], turn.text.lengths[text_index])
                out.text = policy.text.log_probs(*args, temperature=settings.temperature)
                if self.reference_text is not None:
                    out.text_reference = batch.reference(
                        ("text", k),
                        text_index,
                        partial(self.reference_text.log_probs, *args, temperature=settings.temperature),
                    )
            image = turn.image
            if self.train_image and image.sde_steps:
                condition = _select(batch.rollout.conditions[k], index)
                step_lp, reg_terms = [], []
                for s in image.sde_steps:
                    x_t, x_next = image.latents[index, s], image.latents[index, s + 1]
                    t, t_next = float(image.times[s]), float(image.times[s + 1])
                    v = policy.image.velocity(x_t, t, condition, cfg_scale=settings.cfg_scale)
                    log_prob, mean, std = flow.sde_step_log_prob(v, x_t, t, t_next, settings.noise_level, x_next)
                    step_lp.append(log_prob)
                    out.ratio_norm.append((mean, batch.rollout.sde_means[k][s][index], std))
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
                out.image = torch.stack(step_lp, dim=1)
                out.regularizer = torch.stack(reg_terms, dim=1) if reg_terms else None
        return MinibatchLogProbs(index=index, text_index=text_index, turns=turns)

    def _loss(
        self, batch: Batch, index: torch.Tensor, old: OldLogProbs, *, fill_old: bool = False
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``−(J_text + λ·J_flow) + β·regulariser (+ β_text·KL_text)`` of the minibatch ``index``,
        each side averaged over its trained turns; with ``fill_old`` (the first minibatch, before any
        update) this very pass, detached, is the old policy's."""
        c, device = self.config, self.engine.device
        self._batch = batch
        minibatch = self.training_forward(index)
        if fill_old:  # the first minibatch: the policy has not moved yet, this pass is the old policy
            old.store(minibatch)
        text_index = minibatch.text_index
        valid = batch.valid[index].to(device)
        text_valid = batch.text_valid[text_index].to(device)
        # several processes: every mean divides by the whole minibatch's count over W (losses.py)
        divide = self.engine.mean_denominator()
        stats: dict[str, float] = {}
        loss = torch.zeros((), device=device)
        texts, images = minibatch.texts(), minibatch.images()
        # each side is averaged over its turns: equally while every episode played every turn (the
        # recorded runs' expression), else by the (episode, turn) pairs each turn holds
        text_weights = self._turn_weights(batch, [k for k, _ in texts], text_index, text_valid)
        image_weights = self._turn_weights(batch, [k for k, _ in images], index, valid)
        for k, log_probs in texts:
            text = batch.trajectory.turns[k].text
            played = _played(batch, k, text_index, text_valid)  # the episodes that played turn k
            text_advantages = batch.advantages_at(k, text_index, text=True).to(device)
            lengths = text.lengths[text_index].to(log_probs.device)
            mask = torch.arange(log_probs.shape[1], device=log_probs.device)[None] < lengths[:, None]
            reduction = {"loss_type": c.text_loss_type, "max_tokens": text.max_tokens, "denominator": divide}
            text_loss, s = text_grpo_loss(
                log_probs, old.text[k][text_index], mask, text_advantages, c.clip_range_text, played, **reduction
            )
            loss = loss + _weighted(text_loss, text_weights, k, len(texts))
            reference = minibatch.turns[k].text_reference
            if reference is not None:  # GRPO's β·KL to the starting language model
                kl = text_kl(log_probs, reference, mask, played, **reduction)
                loss = loss + _weighted(c.kl_text * kl, text_weights, k, len(texts))
                stats["kl_text"] = stats.get("kl_text", 0.0) + _weighted_stat(kl, text_weights, k, len(texts))
            stats.update(s)
            stats["loss_text"] = stats.get("loss_text", 0.0) + _weighted_stat(text_loss, text_weights, k, len(texts))
        for k, turn in images:
            log_probs, old_lp = turn.image, old.image[k][index]
            played = _played(batch, k, index, valid)
            advantages = batch.advantages_at(k, index).to(device)
            if c.ratio_norm:
                normed = [
                    flow.ratio_norm(log_probs[:, j] - old_lp[:, j], mean, mean_old, std)
                    for j, (mean, mean_old, std) in enumerate(turn.ratio_norm)
                ]
                log_probs = old_lp + torch.stack(normed, dim=1)
            image_loss, s = flow_grpo_loss(
                log_probs, old_lp, advantages, c.clip_range_image, played, denominator=divide
            )
            loss = loss + _weighted(c.image_loss_weight * image_loss, image_weights, k, len(images))
            stats.update(s)
            stats["loss_image"] = stats.get("loss_image", 0.0) + _weighted_stat(
                image_loss, image_weights, k, len(images)
            )
            reg = turn.regularizer
            if reg is not None:
                if divide is not None:
                    reg_value = masked_batch_mean(reg.mean(dim=1), played, divide)
                else:  # one process: the expression the recorded runs used (its sum order, bit for bit)
                    reg_value = reg.mean(dim=1)[played].mean() if bool(played.any()) else reg.sum() * 0.0
                loss = loss + _weighted(c.regularizer_coef * reg_value, image_weights, k, len(images))
                stats[f"regularizer_{c.regularizer}"] = stats.get(f"regularizer_{c.regularizer}", 0.0) + _weighted_stat(
                    reg_value, image_weights, k, len(images)
                )
        stats["loss"] = float(loss.detach())
        return loss, stats

    def _turn_weights(
        self, batch: Batch, turns: list[int], index: torch.Tensor, valid: torch.Tensor
    ) -> dict[int, torch.Tensor] | None:
        """Each turn's weight in its side's mean, ``n_k / Σ_j n_j`` with ``n_k`` the scored episodes
        of the minibatch that played turn ``k`` (over every process), or None while every episode
        played every turn (each turn then weighs ``1 / K``, as the recorded runs computed it)."""
        if all(batch.trajectory.turns[k].all_rows for k in turns):
            return None
        counts = torch.stack([_played(batch, k, index, valid).sum().to(torch.float32) for k in turns])
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        shares = counts / counts.sum().clamp(min=1.0)
        return dict(zip(turns, shares))

    @torch.no_grad()
    def _old_log_probs(self, batch: Batch, parts: list[torch.Tensor]) -> OldLogProbs:
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
        old = OldLogProbs.empty(batch, text=self.train_text, image=self.train_image, device=self.engine.device)
        for index in parts:
            with self.accelerator.autocast():  # as the loss's forward pass runs
                old.store(self.with_policy(partial(self._log_probs, batch, index)))
        return old

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
                    # divided by gradient_accumulation_steps, as Accelerate does (an engine that
                    # steps inside its backward does so here at the step's last minibatch: engine.py)
                    acc.backward(loss)
                    t1 = time.perf_counter()
                    if acc.sync_gradients:
                        # the norm before clipping (or the one the engine clipped in its own step)
                        step_stats["grad_norm"] = float(
                            acc.clip_grad_norm_(self._trained_parameters(), c.max_grad_norm)
                        )
                    self.optimizer.step()  # a no-op until the step's last minibatch (or always, see above)
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
        self._batch = None  # the batch is not kept past its update
        stats["lr_scale"] = scale
        stats["time_loss_backward"] = loss_seconds
        stats["time_optimizer"] = optimizer_seconds
        return stats

    def _trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _drift(self, batch: Batch, old: OldLogProbs) -> dict[str, float]:
        """How far the recomputed log-probabilities are from those recorded during the rollout (a
        check that rollout and training compute the same policy)."""
        drift: dict[str, float] = {}
        turns = batch.trajectory.turns
        for k, lp in sorted(old.text.items()):
            text = turns[k].text
            mask = torch.arange(lp.shape[1], device=lp.device)[None] < text.lengths.to(lp.device)[:, None]
            mask &= ~torch.isnan(lp)  # texts not trained (shared by a block, images_per_text) are never recomputed
            diff = (lp - text.padded()[1].to(lp.device)).abs()[mask]
            drift["text_log_prob_drift"] = max(
                drift.get("text_log_prob_drift", 0.0), float(diff.max()) if diff.numel() else 0.0
            )
        for k, lp in sorted(old.image.items()):
            image = turns[k].image
            diff = (lp - image.log_probs[:, image.sde_steps].to(lp.device)).abs()
            if not turns[k].all_rows:  # episodes that did not play turn k have no recorded steps
                diff = diff[turns[k].rows.to(lp.device)]
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
