"""Flow-matching / SDE math of Flow-GRPO and UniGRPO, in one place.

Conventions (Flow-GRPO, SD3, Bagel)::

    x_t = (1 - t)·x_0 + t·ε        t = 1 is noise, t = 0 is data
    v   = ε - x_0                  the velocity the network predicts
    x_{t+Δt} = x_t + Δt·v          Euler ODE step, Δt = t_next - t < 0

diffusers' flow-matching scheduler (``FlowMatchEulerDiscreteScheduler``, the one SD3 and FLUX
pipelines use) has the same convention with σ for t: ``scale_noise`` gives ``σ·ε + (1 − σ)·x_0``,
the models predict ``ε − x_0`` (the target of diffusers' SD3 / FLUX training scripts), ``step`` is
``x + (σ_next − σ)·v``, and the network is given ``σ·1000`` as its timestep. Its grid for n steps
with ``sigmas=linspace(1, 1/n, n)`` (what the FLUX pipeline passes) and a static ``shift`` is
:func:`timestep_schedule`'s. ``tests/test_flow.py`` checks all of this against diffusers itself.

Everything here is computed in float32: tensor inputs are cast to float32 inside and every
returned tensor is float32 (on the device of the main tensor argument).

Times ``t`` / ``t_next`` (and ``noise_level``) may be Python numbers, 0-d tensors, or 1-D
tensors of shape ``[B]`` (one value per sample).  A ``[B]`` tensor is broadcast over the
non-batch dimensions of the latent, i.e. reshaped to ``[B, 1, ..., 1]``.

"Averaged over non-batch dims" means: reshape to ``[B, -1]`` and take the mean over dim 1,
giving a ``[B]`` tensor (flow_grpo does this so that its published clip ranges carry over).
"""

from __future__ import annotations

import math
from numbers import Real

import torch

__all__ = [
    "timestep_schedule",
    "ode_step",
    "sde_sigma",
    "sde_step_std",
    "sde_step",
    "sde_step_log_prob",
    "gaussian_log_prob",
    "latent_kl",
    "velocity_mse",
    "cfg_velocity",
    "ratio_norm",
    "straight_line_velocity",
]

TimeLike = float | int | torch.Tensor

_F32 = torch.float32
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------
# internal helpers
# ----------------------------------------------------------------------------------------


def _f32(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x.to(_F32)


def _batched(x: torch.Tensor, name: str) -> torch.Tensor:
    x = _f32(x, name)
    if x.ndim < 1:
        raise ValueError(f"{name} must have a batch dimension (ndim >= 1), got a 0-d tensor")
    return x


def _same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _scalar_or_batch(value: TimeLike, name: str, device: torch.device | None, batch: int | None) -> torch.Tensor:
    """Convert a number / 0-d / [B] tensor to a float32 tensor (0-d or [B]) on ``device``."""
    if isinstance(value, torch.Tensor):
        out = value.detach().to(device=device if device is not None else value.device, dtype=_F32)
    elif isinstance(value, Real) and not isinstance(value, bool):
        out = torch.tensor(float(value), dtype=_F32, device=device)
    else:
        raise TypeError(f"{name} must be a float or a torch.Tensor, got {type(value).__name__}")
    if out.ndim > 1:
        raise ValueError(f"{name} must be a number, a 0-d tensor or a 1-D tensor [B]; got shape {tuple(out.shape)}")
    if out.ndim == 1 and batch is not None and out.shape[0] not in (1, batch):
        raise ValueError(f"{name} has {out.shape[0]} entries but the batch size is {batch}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} must be finite")
    return out


def _bcast(value: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a 0-d / [B] tensor to [B or 1, 1, ..., 1] with ``ndim`` dims."""
    if value.ndim == 0:
        return value.reshape([1] * ndim)
    return value.reshape([value.shape[0]] + [1] * (ndim - 1))


def _check_times(t: torch.Tensor, t_next: torch.Tensor) -> None:
    if bool((t > 1).any()) or bool((t < 0).any()):
        raise ValueError("t must lie in [0, 1]")
    if bool((t_next > 1).any()) or bool((t_next < 0).any()):
        raise ValueError("t_next must lie in [0, 1]")
    if not bool((t_next < t).all()):
        raise ValueError(
            "t_next must be strictly smaller than t (the reverse process goes from t = 1, noise, to t = 0, data)"
        )


def _check_noise_level(noise_level: torch.Tensor) -> None:
    if bool((noise_level < 0).any()):
        raise ValueError("noise_level must be >= 0")


def _std_tensor(std, device) -> torch.Tensor:
    if isinstance(std, torch.Tensor):
        return std.to(dtype=_F32, device=device)
    return torch.tensor(float(std), dtype=_F32, device=device)


def _mean_over_nonbatch(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B]: mean over every dim except the first."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def _sigma_from_times(t: torch.Tensor, t_next: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
    """σ_t = a·sqrt(t / (1 - t)), with 1 - t replaced by 1 - t_next where t == 1."""
    denom = torch.where(t == 1.0, 1.0 - t_next, 1.0 - t)
    return noise_level * torch.sqrt(t / denom)


def _sde_mean_std(
    velocity: torch.Tensor,
    x_t: torch.Tensor,
    t: TimeLike,
    t_next: TimeLike,
    noise_level: TimeLike,
):
    """Shared core of sde_step / sde_step_log_prob (inputs already float32, shapes checked).

    Returns (mean, std) with mean shaped like x_t and std of shape [B, 1, ..., 1].
    """
    batch, ndim, device = x_t.shape[0], x_t.ndim, x_t.device
    t_ = _scalar_or_batch(t, "t", device, batch)
    tn_ = _scalar_or_batch(t_next, "t_next", device, batch)
    a_ = _scalar_or_batch(noise_level, "noise_level", device, batch)
    _check_times(t_, tn_)
    _check_noise_level(a_)
    t_b, tn_b, a_b = _bcast(t_, ndim), _bcast(tn_, ndim), _bcast(a_, ndim)
    dt = tn_b - t_b  # < 0
    sigma = _sigma_from_times(t_b, tn_b, a_b)
    # mean = x_t + [ v + σ²/(2t)·(x_t + (1 - t)·v) ]·Δt      (t > 0 is guaranteed: t > t_next >= 0)
    mean = x_t + (velocity + sigma**2 / (2.0 * t_b) * (x_t + (1.0 - t_b) * velocity)) * dt
    # std = σ_t·sqrt(-Δt)
    std = sigma * torch.sqrt(-dt)
    std = std.expand([batch] + [1] * (ndim - 1)).contiguous()
    return mean, std


def _log_prob_allow_zero_std(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample mean Gaussian log-density; elements with std == 0 contribute 0 (NaN-free)."""
    zero = std == 0
    safe_std = torch.where(zero, torch.ones_like(std), std)
    elem = -((x - mean) ** 2) / (2.0 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI
    elem = torch.where(zero, torch.zeros_like(elem), elem)
    return _mean_over_nonbatch(elem)


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------


def timestep_schedule(num_steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """Time grid of ``num_steps + 1`` float32 values from exactly 1.0 down to exactly 0.0.

    Uniform grid ``t_i = 1 - i / num_steps`` then the SD3 / flow_grpo time shift::

        t' = shift·t / (1 + (shift - 1)·t)

    ``shift > 1`` spends more steps near t = 1 (noise).  The map is strictly increasing on
    [0, 1] and fixes 0 and 1, so the grid stays strictly decreasing; the endpoints are set
    exactly.  Computed in float64, returned as float32 on ``device``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if isinstance(shift, bool) or not isinstance(shift, Real):
        raise ValueError(f"shift must be a positive number, got {shift!r}")
    shift = float(shift)
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift}")
    t = 1.0 - torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    t = shift * t / (1.0 + (shift - 1.0) * t)
    t[0] = 1.0
    t[-1] = 0.0
    return t.to(dtype=_F32, device=device)


def ode_step(velocity: torch.Tensor, x_t: torch.Tensor, t: TimeLike, t_next: TimeLike) -> torch.Tensor:
    """Euler step of the probability-flow ODE::

        x_{t+Δt} = x_t + Δt·v,    Δt = t_next - t < 0

    ``t`` / ``t_next``: number, 0-d, or [B] (broadcast over non-batch dims).
    Returns a float32 tensor shaped like ``x_t``.
    """
    x_t = _batched(x_t, "x_t")
    velocity = _f32(velocity, "velocity")
    _same_shape(velocity, x_t, "velocity", "x_t")
    batch, ndim = x_t.shape[0], x_t.ndim
    t_ = _scalar_or_batch(t, "t", x_t.device, batch)
    tn_ = _scalar_or_batch(t_next, "t_next", x_t.device, batch)
    _check_times(t_, tn_)
    dt = _bcast(tn_, ndim) - _bcast(t_, ndim)
    return x_t + velocity * dt


def sde_sigma(t: TimeLike, t_next: TimeLike, noise_level: TimeLike) -> torch.Tensor:
    """The SDE diffusion scale σ_t of Flow-GRPO (NOT the step std)::

        σ_t = a·sqrt(t / (1 - t)),       a = noise_level

    σ_t is infinite at t = 1.  Clamp rule (flow_grpo: ``sqrt(sigma / (1 - where(sigma == 1,
    sigma_max, sigma))) * noise_level`` with ``sigma_max = sigmas[1]``, the next grid value):
    **where t == 1 exactly, the denominator uses (1 - t_next) instead of (1 - t)**, i.e.
    σ_1 = a·sqrt(1 / (1 - t_next)).

    Inputs: numbers, 0-d or [B] tensors (t_next < t, both in [0, 1], noise_level >= 0).
    Returns a float32 tensor with the broadcast shape of the inputs (0-d or [B]).
    """
    device = next((v.device for v in (t, t_next, noise_level) if isinstance(v, torch.Tensor)), None)
    t_ = _scalar_or_batch(t, "t", device, None)
    tn_ = _scalar_or_batch(t_next, "t_next", device, None)
    a_ = _scalar_or_batch(noise_level, "noise_level", device, None)
    t_, tn_, a_ = torch.broadcast_tensors(t_, tn_, a_)
    _check_times(t_, tn_)
    _check_noise_level(a_)
    return _sigma_from_times(t_, tn_, a_)


def sde_step_std(t: TimeLike, t_next: TimeLike, noise_level: TimeLike) -> torch.Tensor:
    """Std of one SDE step::

        std = σ_t·sqrt(-Δt),     Δt = t_next - t,   σ_t from :func:`sde_sigma` (clamped at t = 1)

    Returns a float32 tensor with the broadcast shape of the inputs (0-d or [B]).
    """
    sigma = sde_sigma(t, t_next, noise_level)
    device = sigma.device
    t_ = _scalar_or_batch(t, "t", device, None)
    tn_ = _scalar_or_batch(t_next, "t_next", device, None)
    return sigma * torch.sqrt(t_ - tn_)


def sde_step_log_prob(
    velocity: torch.Tensor,
    x_t: torch.Tensor,
    t: TimeLike,
    t_next: TimeLike,
    noise_level: TimeLike,
    x_next: torch.Tensor,
):
    """Log-probability of a GIVEN ``x_next`` under the Flow-GRPO SDE step driven by ``velocity``.

    This is what a trainer calls to recompute log-probs (with gradients through ``velocity``)
    for recorded transitions.  With ``a = noise_level``, Δt = t_next - t < 0::

        σ_t  = a·sqrt(t / (1 - t))                  (where t == 1: a·sqrt(1 / (1 - t_next)))
        mean = x_t + [ v + σ_t² / (2t) · ( x_t + (1 - t)·v ) ]·Δt
        std  = σ_t · sqrt(-Δt)
        log_prob = mean over non-batch dims of
                   -(x_next - mean)² / (2·std²) - log(std) - ½·log(2π)

    ``x_next`` is used as given (pass a detached tensor; gradients flow via ``mean``).

    noise_level == 0 convention: the step is the deterministic Euler ODE step (std = 0, a
    Dirac); its log_prob is defined as 0 (NaN-free zeros, no gradient), so ratios of such
    steps are exactly 1.  With a per-sample noise_level only the zero-noise samples get 0.

    Returns ``(log_prob [B], mean [like x_t], std [B, 1, ..., 1])``, all float32.
    """
    x_t = _batched(x_t, "x_t")
    velocity = _f32(velocity, "velocity")
    x_next = _f32(x_next, "x_next")
    _same_shape(velocity, x_t, "velocity", "x_t")
    _same_shape(x_next, x_t, "x_next", "x_t")
    mean, std = _sde_mean_std(velocity, x_t, t, t_next, noise_level)
    log_prob = _log_prob_allow_zero_std(x_next, mean, std)
    return log_prob, mean, std


def sde_step(
    velocity: torch.Tensor,
    x_t: torch.Tensor,
    t: TimeLike,
    t_next: TimeLike,
    noise_level: TimeLike,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
):
    """Flow-GRPO's Euler–Maruyama step of the reverse SDE with the same marginals as the ODE::

        σ_t  = a·sqrt(t / (1 - t))                  (where t == 1: a·sqrt(1 / (1 - t_next)))
        mean = x_t + [ v + σ_t² / (2t) · ( x_t + (1 - t)·v ) ]·Δt
        std  = σ_t · sqrt(-Δt)
        x_{t+Δt} = mean + std·ε,    ε ~ N(0, I)

    ``noise``: optional pre-drawn ε shaped like ``x_t``; otherwise ε is drawn with
    ``torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=float32)`` (always
    drawn, even when noise_level == 0, so RNG consumption does not depend on the noise level).

    ``log_prob`` is the Gaussian log-density of ``x_next.detach()`` under N(mean, std²),
    averaged over the non-batch dims (computed by :func:`sde_step_log_prob`).  ``x_next``
    itself keeps the autograd graph of ``velocity``.

    noise_level == 0: ``x_next`` equals :func:`ode_step` bit for bit, std = 0 and log_prob = 0.

    Returns ``(x_next [like x_t], log_prob [B], mean [like x_t], std [B, 1, ..., 1])``, float32.
    """
    x_t = _batched(x_t, "x_t")
    velocity = _f32(velocity, "velocity")
    _same_shape(velocity, x_t, "velocity", "x_t")
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=_F32)
    else:
        noise = _f32(noise, "noise").to(x_t.device)
        _same_shape(noise, x_t, "noise", "x_t")
    mean, std = _sde_mean_std(velocity, x_t, t, t_next, noise_level)
    x_next = mean + std * noise
    log_prob = _log_prob_allow_zero_std(x_next.detach(), mean, std)
    return x_next, log_prob, mean, std


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, std²), averaged over non-batch dims::

        per element: -(x - mean)² / (2·std²) - log(std) - ½·log(2π)

    ``std`` (> 0) must broadcast to ``x`` (e.g. [B, 1, ..., 1], a scalar).  Returns [B] float32.
    """
    x = _batched(x, "x")
    mean = _f32(mean, "mean")
    _same_shape(mean, x, "mean", "x")
    std = _std_tensor(std, x.device)
    elem = -((x - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return _mean_over_nonbatch(elem.expand_as(x))


def latent_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """Flow-GRPO's KL between N(mean, std²) and N(mean_ref, std²) (equal std), per dimension::

        KL = mean over non-batch dims of (mean - mean_ref)² / (2·std²)

    ``std`` (> 0) must broadcast to ``mean``.  Returns [B] float32.
    """
    mean = _batched(mean, "mean")
    mean_ref = _f32(mean_ref, "mean_ref")
    _same_shape(mean, mean_ref, "mean", "mean_ref")
    std = _std_tensor(std, mean.device)
    elem = (mean - mean_ref) ** 2 / (2.0 * std**2)
    return _mean_over_nonbatch(elem.expand_as(mean))


def velocity_mse(v: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """UniGRPO's regulariser ‖v - v_ref‖², averaged over non-batch dims::

        mse = mean over non-batch dims of (v - v_ref)²

    Returns [B] float32.
    """
    v = _batched(v, "v")
    v_ref = _f32(v_ref, "v_ref")
    _same_shape(v, v_ref, "v", "v_ref")
    return _mean_over_nonbatch((v - v_ref) ** 2)


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on velocities::

        v = v_uncond + scale·(v_cond - v_uncond)

    ``scale`` is a finite number >= 0 (0 → unconditional, 1 → conditional, > 1 → guided);
    negative raises ValueError.  ``scale == 1`` returns ``v_cond`` (as float32) exactly,
    without touching ``v_uncond``'s values.  Returns a float32 tensor shaped like ``v_cond``.
    """
    v_cond = _f32(v_cond, "v_cond")
    v_uncond = _f32(v_uncond, "v_uncond")
    _same_shape(v_cond, v_uncond, "v_cond", "v_uncond")
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError("scale must be a single number")
        scale = float(scale.item())
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise ValueError(f"scale must be a number, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite number >= 0, got {scale}")
    if scale == 1.0:
        return v_cond
    return v_uncond + scale * (v_cond - v_uncond)


def ratio_norm(
    log_ratio: torch.Tensor,
    mean: torch.Tensor,
    mean_old: torch.Tensor,
    std: torch.Tensor | float,
) -> torch.Tensor:
    """GRPO-Guard RatioNorm of a per-step image log-ratio::

        log r̃ = σ_t·sqrt|Δt| · ( log r + ‖μ_old - μ_θ‖² / (2·σ_t²·|Δt|) )
              = std · ( log r + ‖μ_old - μ_θ‖² / (2·std²) )

    where σ_t is the SDE sigma (:func:`sde_sigma`) and ``std = σ_t·sqrt|Δt|`` is the step std
    returned by :func:`sde_step` / :func:`sde_step_log_prob` -- so only ``std`` is needed.
    ‖·‖² is taken per dimension (mean over the non-batch dims), matching the per-dimension
    averaged log-probs.

    Args:
        log_ratio: [B] log π_θ - log π_old (per-dimension averaged log-probs).
        mean: μ_θ, [B, ...].   mean_old: μ_old, same shape.
        std: step std (> 0), one value per sample: a number, 0-d, [B], or [B, 1, ..., 1].

    Returns [B] float32.
    """
    mean = _batched(mean, "mean")
    mean_old = _f32(mean_old, "mean_old")
    _same_shape(mean, mean_old, "mean", "mean_old")
    batch = mean.shape[0]
    log_ratio = _f32(log_ratio, "log_ratio").to(mean.device)
    if log_ratio.numel() != batch:
        raise ValueError(f"log_ratio must have {batch} entries (one per sample), got shape {tuple(log_ratio.shape)}")
    log_ratio = log_ratio.reshape(batch)
    std_t = _std_tensor(std, mean.device)
    if std_t.numel() == 1:
        std_t = std_t.reshape(1).expand(batch)
    elif std_t.numel() == batch and std_t.shape[0] == batch:
        std_t = std_t.reshape(batch)
    else:
        raise ValueError(
            f"std must hold one value per sample (number, [B] or [B, 1, ..., 1]), got shape {tuple(std_t.shape)}"
        )
    sq = _mean_over_nonbatch((mean_old - mean) ** 2)
    return std_t * (log_ratio + sq / (2.0 * std_t**2))


def straight_line_velocity(x_t: torch.Tensor, x_0: torch.Tensor, t: TimeLike) -> torch.Tensor:
    """Oracle velocity that points from ``x_t`` straight at ``x_0``::

        v = (x_t - x_0) / t          (t > 0)

    An Euler step with it to any t_next lands on ``x_0 + (t_next / t)·(x_t - x_0)`` -- the
    straight line between x_0 and the current point -- and a step to t_next = 0 lands exactly
    on x_0 (so Euler integration over any schedule ends on x_0).

    ``t``: number, 0-d or [B].  Returns a float32 tensor shaped like ``x_t``.
    """
    x_t = _batched(x_t, "x_t")
    x_0 = _f32(x_0, "x_0")
    _same_shape(x_t, x_0, "x_t", "x_0")
    t_ = _scalar_or_batch(t, "t", x_t.device, x_t.shape[0])
    if bool((t_ <= 0).any()) or bool((t_ > 1).any()):
        raise ValueError("t must lie in (0, 1] for the straight-line velocity")
    return (x_t - x_0) / _bcast(t_, x_t.ndim)
