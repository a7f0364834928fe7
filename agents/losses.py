"""UniGRPO's objective, term by term (docs/design.md, section 3). Every function returns a value to
*minimise* (−J) together with the statistics a trainer logs.

    J = J_text + λ·J_flow − β·regulariser

* Advantages: for the G rollouts of one prompt, ``Â_i = (R_i − mean_j R_j) / (std_j R_j + eps)``,
  shared by every token and every denoising step of rollout i (flow_grpo's "global std" variant
  divides by the std of the whole batch instead). With turn rewards (``Scenario.respond``) the
  return is ``R_i = R_i^term + Σ_k r_{i,k}``; or, per turn, the return-to-go
  ``G_{i,k} = Σ_{j≥k} γ^{j−k} r_{i,j} + γ^{K_i−1−k} R_i^term`` (:func:`returns_to_go`) normalised
  per group and turn over the rows that played it, or over the whole batch (GEM's ReBN)
  (:func:`turn_advantages`).
* Text (GRPO): per-token ratio ``r = π_θ(y_k|·) / π_old(y_k|·)``, clipped surrogate
  ``min(r·Â, clip(r, 1 − ε, 1 + ε)·Â)``, averaged over a sequence's tokens, then over sequences
  (``loss_type="grpo"``). That mean weights a token by 1/|y_i|, which favours short sequences: with
  advantages all equal it is the gradient of E[1/|y|]. TRL's two alternatives are offered:
  ``"bnpo"`` averages over all tokens of the batch; ``"dr_grpo"`` (Dr. GRPO, Liu et al. 2025) sums
  each sequence's tokens and divides by the token budget, the same for every sequence.
* Image (Flow-GRPO): per-step ratio of the Gaussian transition densities, the same surrogate,
  averaged over the trained steps, then over rollouts; optionally RatioNorm (GRPO-Guard).
* Several processes: each process's loss is a mean over its share of the minibatch, and the data-
  parallel engine averages the W processes' gradients. That average is the gradient of the whole
  minibatch's mean only if every process divides by the same number, the whole minibatch's count
  over W (its shares can differ: sequences without tokens, samples whose reward failed, tokens
  under ``bnpo``). Every batch-level mean here takes ``denominator``, a function from this
  process's count of averaged units to the number to divide by: the agent passes
  ``all-reduce(count) / W``; alone, the count itself (the default).
* Regularisers against the frozen reference model: velocity MSE (UniGRPO) or latent KL
  (Flow-GRPO), from :mod:`unigrpo_env.flow`; on the text, GRPO's per-token KL to the reference
  language model with the k3 estimator ``exp(ref − θ) − (ref − θ) − 1`` (DeepSeekMath, TRL's
  ``beta``), averaged like the surrogate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: This process's count of the units a mean is over → the number to divide by (see the module docstring).
Denominator = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "TEXT_LOSS_TYPES",
    "Denominator",
    "group_advantages",
    "returns_to_go",
    "turn_advantages",
    "clipped_surrogate",
    "text_grpo_loss",
    "text_kl",
    "flow_grpo_loss",
    "masked_batch_mean",
]

# How a per-token value [N, L] is reduced to one number (TRL's ``loss_type`` names).
TEXT_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-4,
    global_std: bool = False,
) -> torch.Tensor:
    """Group-relative advantages ``(R_i − mean_g) / (std_g + eps)`` with the population std
    (as flow_grpo); ``global_std`` divides by the std of all valid rewards instead.

    NaN rewards (samples a scorer could not score) are left out of the statistics and get
    advantage 0; the caller also masks them out of the loss. A group whose rewards are all equal
    gets advantages 0 (no signal), not a division by zero.
    """
    rewards = rewards.to(torch.float32)
    valid = ~torch.isnan(rewards)
    groups, index = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(len(groups), device=rewards.device).index_add_(0, index, valid.float())
    filled = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean = torch.zeros(len(groups), device=rewards.device).index_add_(0, index, filled) / count.clamp(min=1)
    centred = torch.where(valid, rewards - mean[index], torch.zeros_like(rewards))
    if global_std:
        std = centred[valid].pow(2).mean().sqrt() if bool(valid.any()) else rewards.new_tensor(0.0)
        scale = std.expand_as(rewards)
    else:
        var = torch.zeros(len(groups), device=rewards.device).index_add_(0, index, centred.pow(2)) / count.clamp(min=1)
        scale = var.sqrt()[index]
    return torch.where(valid, centred / (scale + eps), torch.zeros_like(rewards))


def returns_to_go(
    turn_rewards: torch.Tensor, terminal: torch.Tensor, turns_played: torch.Tensor, discount: float = 1.0
) -> torch.Tensor:
    """``G [N, K]``: each row's discounted return from each turn it played,

        ``G_{i,k} = Σ_{j=k}^{K_i−1} γ^{j−k} r_{i,j} + γ^{K_i−1−k} R_i``

    with ``r_{i,j}`` the turn rewards ``[N, K]`` (NaN: none, counted 0), ``R_i`` the terminal
    reward ``[N]`` (its own last image's, given at its last turn ``K_i − 1``) and ``K_i`` the turns
    row i played. NaN where a row did not play a turn, and on every turn of a row whose terminal
    reward is NaN (it could not be scored)."""
    n, k_max = turn_rewards.shape
    r = torch.nan_to_num(turn_rewards.to(torch.float32), nan=0.0)
    terminal = terminal.to(torch.float32)
    played = turns_played.to(torch.long)
    out = torch.full((n, k_max), torch.nan)
    running = torch.zeros(n)
    for k in range(k_max - 1, -1, -1):
        last = played == k + 1
        running = torch.where(last, r[:, k] + terminal, r[:, k] + discount * running)
        out[:, k] = torch.where(played > k, running, torch.full_like(running, torch.nan))
    return out


def turn_advantages(
    returns: torch.Tensor, group_ids: torch.Tensor, *, mode: str = "turn", eps: float = 1e-4
) -> torch.Tensor:
    """Per (row, turn) advantages ``[N, K]`` from the returns-to-go ``G`` (:func:`returns_to_go`;
    NaN: a turn the row did not play, or a row that could not be scored, advantage 0):

    * ``turn``: ``(G_{i,k} − mean_{g,k}) / (std_{g,k} + eps)`` over the rows of group ``g`` that
      played turn ``k``;
    * ``batch``: ``(G_{i,k} − mean) / (std + eps)`` over every (row, turn) of the batch (GEM's
      return batch normalisation)."""
    if mode == "turn":
        return torch.stack([group_advantages(returns[:, k], group_ids, eps=eps) for k in range(returns.shape[1])], 1)
    if mode == "batch":
        flat = returns.reshape(-1)
        return group_advantages(flat, torch.zeros_like(flat, dtype=torch.long), eps=eps).reshape(returns.shape)
    raise ValueError(f"unknown advantage mode {mode!r}: expected 'turn' or 'batch'")


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate ``min(r·Â, clip(r, 1 − ε, 1 + ε)·Â)`` with ``r = exp(log_ratio)``,
    elementwise; also returns where the clip was active."""
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    return torch.minimum(unclipped, clipped), (clipped < unclipped)


def _masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int, denominator: Denominator | None = None
) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim) / _divisor(mask.sum(dim), denominator).clamp(min=1.0)


def _divisor(count: torch.Tensor, denominator: Denominator | None) -> torch.Tensor:
    """What a mean over ``count`` units divides by: the count itself, or ``denominator(count)``."""
    return count if denominator is None else denominator(count)


def masked_batch_mean(values: torch.Tensor, mask: torch.Tensor, denominator: Denominator | None = None) -> torch.Tensor:
    """The mean of ``values [N]`` over the entries ``mask`` selects, divided by
    ``denominator(count)`` when given (several processes); 0 when none is selected."""
    return _masked_mean(values, mask, 0, denominator)


def _text_mean(
    per_token: torch.Tensor,
    token_mask: torch.Tensor,
    sample_mask: torch.Tensor | None,
    loss_type: str = "grpo",
    max_tokens: int | None = None,
    denominator: Denominator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce a per-token value ``[N, L]`` over the sequences that have tokens (and pass
    ``sample_mask``); also returns those sequences.

    * ``grpo``: the mean over each sequence's tokens, then over the sequences;
    * ``bnpo``: the mean over all their tokens;
    * ``dr_grpo``: the sum over each sequence's tokens divided by ``max_tokens`` (the token budget),
      then the mean over the sequences.
    """
    sequences = token_mask.any(dim=1) if sample_mask is None else (sample_mask & token_mask.any(dim=1))
    if loss_type == "grpo":
        return _masked_mean(_masked_mean(per_token, token_mask, dim=1), sequences, 0, denominator), sequences
    tokens = token_mask & sequences[:, None]
    total = (per_token * tokens.to(per_token.dtype)).sum()
    if loss_type == "bnpo":
        return total / _divisor(tokens.sum().to(per_token.dtype), denominator).clamp(min=1), sequences
    if loss_type == "dr_grpo":
        if not max_tokens or max_tokens < 1:
            raise ValueError("loss_type 'dr_grpo' needs max_tokens, the token budget of a sequence")
        return total / (_divisor(sequences.sum().to(per_token.dtype), denominator).clamp(min=1) * max_tokens), sequences
    raise ValueError(f"loss_type must be one of {TEXT_LOSS_TYPES}, got {loss_type!r}")


@torch.no_grad()
def _ratio_stats(prefix: str, log_ratio: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Clip fraction, mean ratio and largest |ratio − 1| over the entries selected by ``mask``."""
    ratio = torch.exp(log_ratio)[mask]
    if not ratio.numel():
        return {f"{prefix}_clip_fraction": 0.0, f"{prefix}_ratio_mean": 1.0, f"{prefix}_ratio_max_dev": 0.0}
    return {
        f"{prefix}_clip_fraction": float(clipped[mask].float().mean()),
        f"{prefix}_ratio_mean": float(ratio.mean()),
        f"{prefix}_ratio_max_dev": float((ratio - 1).abs().max()),
    }


def text_grpo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    token_mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    sample_mask: torch.Tensor | None = None,
    *,
    loss_type: str = "grpo",
    max_tokens: int | None = None,
    denominator: Denominator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's text loss: −(the clipped surrogate reduced by ``loss_type``: by default the mean over
    sequences of the mean over their tokens). Shapes: ``[N, L]`` log-probs and ``token_mask``,
    ``[N]`` advantages; ``max_tokens`` is the token budget ``dr_grpo`` divides by."""
    log_ratio = log_probs - old_log_probs
    surrogate, clipped = clipped_surrogate(log_ratio, advantages[:, None], clip_range)
    mean, sequences = _text_mean(surrogate, token_mask, sample_mask, loss_type, max_tokens, denominator)
    return -mean, _ratio_stats("text", log_ratio, clipped, token_mask & sequences[:, None])


def text_kl(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    token_mask: torch.Tensor,
    sample_mask: torch.Tensor | None = None,
    *,
    loss_type: str = "grpo",
    max_tokens: int | None = None,
    denominator: Denominator | None = None,
) -> torch.Tensor:
    """GRPO's KL penalty to the reference language model on the sampled tokens, with the
    unbiased, non-negative k3 estimator ``KL ≈ exp(ref − θ) − (ref − θ) − 1`` per token,
    reduced like the text surrogate (``loss_type``)."""
    delta = ref_log_probs - log_probs
    return _text_mean(torch.exp(delta) - delta - 1.0, token_mask, sample_mask, loss_type, max_tokens, denominator)[0]


def flow_grpo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    sample_mask: torch.Tensor | None = None,
    *,
    denominator: Denominator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-GRPO's image loss: −mean over rollouts of the mean over trained steps of the clipped
    surrogate of the per-step ratio. Shapes: ``[N, S]`` log-probs (S trained steps, already
    RatioNorm-ed if that option is on), ``[N]`` advantages."""
    log_ratio = log_probs - old_log_probs
    surrogate, clipped = clipped_surrogate(log_ratio, advantages[:, None], clip_range)
    per_rollout = surrogate.mean(dim=1)
    mask = torch.ones_like(per_rollout, dtype=torch.bool) if sample_mask is None else sample_mask
    loss = -_masked_mean(per_rollout, mask, 0, denominator)
    return loss, _ratio_stats("image", log_ratio, clipped, mask)
