"""Tests for unigrpo_env.flow (flow-matching / SDE math)."""

import math

import pytest
import torch

from unigrpo_env import flow
from unigrpo_env.flow import (
    cfg_velocity,
    gaussian_log_prob,
    latent_kl,
    ode_step,
    ratio_norm,
    sde_sigma,
    sde_step,
    sde_step_log_prob,
    sde_step_std,
    straight_line_velocity,
    timestep_schedule,
    velocity_mse,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed))


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("n", [1, 2, 10, 25, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_schedule_endpoints_monotone(n, shift):
    s = timestep_schedule(n, shift)
    assert s.dtype == torch.float32
    assert s.shape == (n + 1,)
    assert s[0].item() == 1.0
    assert s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all())


def test_schedule_uniform_and_shift_formula():
    n = 10
    u = timestep_schedule(n, 1.0)
    expected_u = torch.tensor([1 - i / n for i in range(n + 1)], dtype=torch.float32)
    torch.testing.assert_close(u, expected_u, atol=1e-7, rtol=0)
    for shift in (3.0, 0.3):
        s = timestep_schedule(n, shift)
        expected = [shift * t / (1 + (shift - 1) * t) for t in (1 - i / n for i in range(n + 1))]
        torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)
    # shift > 1 puts more steps near the noise end: every interior point moves up
    assert bool((timestep_schedule(n, 3.0)[1:-1] > u[1:-1]).all())


def test_schedule_errors():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            timestep_schedule(bad)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            timestep_schedule(5, bad)


# ----------------------------------------------------------------------------- ODE


def test_ode_step_scalar_and_per_sample_times():
    x = _rand(3, 2, 4, seed=1)
    v = _rand(3, 2, 4, seed=2)
    out = ode_step(v, x, 0.8, 0.6)
    torch.testing.assert_close(out, x - 0.2 * v)
    t = torch.tensor([1.0, 0.5, 0.3])
    tn = torch.tensor([0.9, 0.25, 0.0])
    out = ode_step(v, x, t, tn)
    for i in range(3):
        torch.testing.assert_close(out[i], x[i] + (tn[i] - t[i]) * v[i])
    # 0-d tensors work too
    torch.testing.assert_close(ode_step(v, x, torch.tensor(0.8), torch.tensor(0.6)), x - 0.2 * v)


# ----------------------------------------------------------------------------- SDE sigma / std


def test_sde_sigma_and_std_formula():
    t, tn, a = 0.6, 0.5, 0.7
    sig = sde_sigma(t, tn, a)
    assert sig.dtype == torch.float32
    assert sig.item() == pytest.approx(a * math.sqrt(t / (1 - t)), rel=1e-6)
    assert sde_step_std(t, tn, a).item() == pytest.approx(a * math.sqrt(t / (1 - t)) * math.sqrt(t - tn), rel=1e-6)
    # per-sample
    ts = torch.tensor([0.6, 0.3])
    tns = torch.tensor([0.5, 0.1])
    sig = sde_sigma(ts, tns, a)
    assert sig.shape == (2,)
    assert sig[1].item() == pytest.approx(a * math.sqrt(0.3 / 0.7), rel=1e-6)


def test_t_equal_one_clamp_matches_flow_grpo_rule():
    a, tn = 0.7, 0.9
    # flow_grpo: std_dev_t = sqrt(sigma / (1 - where(sigma == 1, sigma_max, sigma))) * noise_level
    sigma_hand = math.sqrt(1.0 / (1.0 - tn)) * a
    assert sde_sigma(1.0, tn, a).item() == pytest.approx(sigma_hand, rel=1e-6)
    x = _rand(2, 3, 4, 4, seed=3)
    v = _rand(2, 3, 4, 4, seed=4)
    eps = _rand(2, 3, 4, 4, seed=5)
    x_next, lp, mean, std = sde_step(v, x, 1.0, tn, a, noise=eps)
    dt = tn - 1.0
    # mean = x + [v + σ²/(2t)(x + (1-t)v)]Δt with t = 1
    mean_hand = x + (v + sigma_hand**2 / 2.0 * x) * dt
    std_hand = sigma_hand * math.sqrt(-dt)  # = a here
    assert std_hand == pytest.approx(a)
    assert torch.isfinite(std).all() and torch.isfinite(lp).all() and torch.isfinite(mean).all()
    assert std.shape == (2, 1, 1, 1)
    torch.testing.assert_close(std, torch.full((2, 1, 1, 1), std_hand), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mean, mean_hand, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_next, mean_hand + std_hand * eps, atol=1e-5, rtol=1e-5)
    # first grid step of a real schedule is finite too
    s = timestep_schedule(10, 3.0)
    _, lp, _, std = sde_step(v, x, s[0], s[1], 0.8, generator=_gen(1))
    assert torch.isfinite(lp).all() and torch.isfinite(std).all() and (std > 0).all()


# ----------------------------------------------------------------------------- SDE step / log-prob


def test_sde_step_log_prob_matches_torch_normal_per_sample_times():
    B = 4
    x = _rand(B, 3, 5, 5, seed=10)
    v = _rand(B, 3, 5, 5, seed=11)
    t = torch.tensor([1.0, 0.8, 0.5, 0.1])
    tn = torch.tensor([0.95, 0.6, 0.45, 0.0])
    x_next, lp, mean, std = sde_step(v, x, t, tn, 0.7, generator=_gen(12))
    assert x_next.shape == x.shape and mean.shape == x.shape
    assert lp.shape == (B,)
    assert std.shape == (B, 1, 1, 1)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).reshape(B, -1).mean(1)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=0)
    # std per sample is σ_t sqrt(-Δt) with the clamp at t = 1
    for i in range(B):
        expected = sde_step_std(t[i].item(), tn[i].item(), 0.7).item()
        assert std[i].item() == pytest.approx(expected, rel=1e-5)


def test_sde_step_log_prob_recompute_on_policy_exact():
    x = _rand(3, 2, 8, seed=20)
    v = _rand(3, 2, 8, seed=21)
    t = torch.tensor([0.9, 0.5, 0.2])
    tn = torch.tensor([0.8, 0.4, 0.1])
    x_next, lp, mean, std = sde_step(v, x, t, tn, 0.8, generator=_gen(22))
    lp2, mean2, std2 = sde_step_log_prob(v, x, t, tn, 0.8, x_next)
    assert torch.equal(lp, lp2)
    assert torch.equal(mean, mean2)
    assert torch.equal(std, std2)
    # gradients flow through the velocity into the recomputed log-prob
    v_param = v.clone().requires_grad_(True)
    lp3, _, _ = sde_step_log_prob(v_param, x, t, tn, 0.8, x_next.detach())
    lp3.sum().backward()
    assert v_param.grad is not None and torch.isfinite(v_param.grad).all()
    assert v_param.grad.abs().sum() > 0
    # a different velocity gives a different (lower, since x_next was sampled around mean) log-prob
    lp_other, _, _ = sde_step_log_prob(v + 1.0, x, t, tn, 0.8, x_next)
    assert not torch.allclose(lp_other, lp)


def test_sde_step_pre_drawn_noise_and_generator_reproducible():
    x = _rand(2, 6, seed=30)
    v = _rand(2, 6, seed=31)
    a = sde_step(v, x, 0.7, 0.6, 0.7, generator=_gen(5))
    b = sde_step(v, x, 0.7, 0.6, 0.7, generator=_gen(5))
    assert torch.equal(a[0], b[0])
    eps = torch.randn(2, 6, generator=_gen(5))
    c = sde_step(v, x, 0.7, 0.6, 0.7, noise=eps)
    assert torch.equal(a[0], c[0])
    torch.testing.assert_close(c[0], c[2] + c[3] * eps, atol=0, rtol=0)


def test_sde_step_to_ode_as_noise_vanishes():
    x = _rand(4, 3, 8, 8, seed=40)
    v = _rand(4, 3, 8, 8, seed=41)
    eps = _rand(4, 3, 8, 8, seed=42)
    ode = ode_step(v, x, 0.6, 0.5)
    diffs = []
    for a in (1e-1, 1e-2, 1e-4, 1e-6):
        x_next = sde_step(v, x, 0.6, 0.5, a, noise=eps)[0]
        diffs.append((x_next - ode).abs().max().item())
    assert all(d1 > d2 for d1, d2 in zip(diffs, diffs[1:]))
    assert diffs[2] < 1e-3
    assert diffs[3] < 1e-5


def test_noise_level_zero_is_exact_ode_step():
    x = _rand(3, 4, 4, seed=50)
    v = _rand(3, 4, 4, seed=51)
    t = torch.tensor([1.0, 0.7, 0.2])
    tn = torch.tensor([0.9, 0.3, 0.0])
    x_next, lp, mean, std = sde_step(v, x, t, tn, 0.0, generator=_gen(52))
    ode = ode_step(v, x, t, tn)
    assert torch.equal(x_next, ode)
    assert torch.equal(mean, ode)
    assert torch.equal(std, torch.zeros(3, 1, 1))
    assert torch.equal(lp, torch.zeros(3))
    lp2, _, _ = sde_step_log_prob(v, x, t, tn, 0.0, x_next)
    assert torch.equal(lp2, torch.zeros(3))
    # per-sample noise level: only the zero-noise sample gets log_prob 0, no NaNs anywhere
    a = torch.tensor([0.0, 0.7, 0.7])
    x_next, lp, mean, std = sde_step(v, x, t, tn, a, generator=_gen(53))
    assert torch.equal(x_next[0], ode[0])
    assert lp[0].item() == 0.0 and torch.isfinite(lp).all() and lp[1].item() != 0.0


# ----------------------------------------------------------------------------- marginals


def _exact_velocity(x, t, mu0, s0):
    """Exact marginal velocity for 1-D Gaussian data.

    x_0 ~ N(mu0, s0²), ε ~ N(0, 1) independent, x_t = (1-t)·x_0 + t·ε.
      m_t   = E[x_t]     = (1-t)·mu0
      s_t²  = Var[x_t]   = (1-t)²·s0² + t²
      Cov(x_0, x_t) = (1-t)·s0²,    Cov(ε, x_t) = t
    Gaussian conditioning:
      E[x_0 | x_t = x] = mu0 + (1-t)·s0² / s_t² · (x - m_t)
      E[ε   | x_t = x] =         t      / s_t² · (x - m_t)
    so v(x, t) = E[ε - x_0 | x_t = x] = -mu0 + (t - (1-t)·s0²) / s_t² · (x - m_t).
    """
    m_t = (1 - t) * mu0
    s2 = (1 - t) ** 2 * s0**2 + t**2
    return -mu0 + (t - (1 - t) * s0**2) / s2 * (x - m_t)


@pytest.mark.parametrize("mode", ["sde", "ode"])
def test_marginal_preservation_gaussian(mode):
    mu0, s0 = 0.7, 0.5
    n_particles, n_steps = 40_000, 300
    g = _gen(123)
    x = torch.randn(n_particles, 1, generator=g)
    sched = timestep_schedule(n_steps, 1.0)
    for i in range(n_steps):
        t, tn = sched[i].item(), sched[i + 1].item()
        v = _exact_velocity(x, t, mu0, s0)
        if mode == "sde":
            x = sde_step(v, x, t, tn, 0.7, generator=g)[0]
        else:
            x = ode_step(v, x, t, tn)
    mean, var = x.mean().item(), x.var().item()
    assert mean == pytest.approx(mu0, rel=0.03)
    assert var == pytest.approx(s0**2, rel=0.05)


def test_marginal_intermediate_time_sde():
    """Halfway through, the SDE particles carry the exact marginal of x_t as well."""
    mu0, s0 = 0.7, 0.5
    g = _gen(7)
    x = torch.randn(40_000, 1, generator=g)
    sched = timestep_schedule(200, 1.0)
    for i in range(100):
        t, tn = sched[i].item(), sched[i + 1].item()
        x = sde_step(_exact_velocity(x, t, mu0, s0), x, t, tn, 0.7, generator=g)[0]
    t = sched[100].item()
    assert x.mean().item() == pytest.approx((1 - t) * mu0, rel=0.05)
    assert x.var().item() == pytest.approx((1 - t) ** 2 * s0**2 + t**2, rel=0.05)


# ----------------------------------------------------------------------------- losses / regularisers


def test_gaussian_log_prob_hand():
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    mean = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    std = torch.tensor([[2.0], [0.5]])
    c = 0.5 * math.log(2 * math.pi)
    e0 = [-(1.0) / 8 - math.log(2) - c, -0.0 - math.log(2) - c]
    e1 = [-(1.0) / 0.5 - math.log(0.5) - c, -(4.0) / 0.5 - math.log(0.5) - c]
    expected = torch.tensor([sum(e0) / 2, sum(e1) / 2])
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected, atol=1e-6, rtol=0)
    # scalar std
    ref = torch.distributions.Normal(mean, 1.5).log_prob(x).mean(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, 1.5), ref, atol=1e-6, rtol=0)


def test_latent_kl_hand():
    mean = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    mean_ref = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 2.0]])
    std = torch.tensor([[0.5], [2.0]])
    expected = torch.tensor([(0 + 1 + 4) / (2 * 0.25) / 3, (1 + 1 + 4) / (2 * 4.0) / 3])
    torch.testing.assert_close(latent_kl(mean, mean_ref, std), expected, atol=1e-6, rtol=0)
    assert torch.equal(latent_kl(mean, mean, std), torch.zeros(2))


def test_velocity_mse_hand():
    v = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    v_ref = torch.tensor([[[1.0, 0.0], [3.0, 1.0]], [[1.0, 1.0], [1.0, -1.0]]])
    expected = torch.tensor([(0 + 4 + 0 + 9) / 4, 1.0])
    torch.testing.assert_close(velocity_mse(v, v_ref), expected, atol=1e-6, rtol=0)


def test_cfg_velocity():
    vc = _rand(2, 3, seed=60)
    vu = _rand(2, 3, seed=61)
    assert torch.equal(cfg_velocity(vc, vu, 1.0), vc)
    assert torch.equal(cfg_velocity(vc, vu, 0.0), vu)
    out = cfg_velocity(vc, vu, 4.5)
    assert not torch.allclose(out, vc)
    torch.testing.assert_close(out, vu + 4.5 * (vc - vu))
    with pytest.raises(ValueError):
        cfg_velocity(vc, vu, -0.5)
    with pytest.raises(ValueError):
        cfg_velocity(vc, vu[:, :2], 2.0)


def test_ratio_norm_hand():
    log_ratio = torch.tensor([0.1, -0.2])
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    mean_old = torch.tensor([[1.5, 2.0], [1.0, 1.0]])
    sigma, dt = 2.0, 0.04  # σ_t and |Δt|
    std = torch.full((2, 1), sigma * math.sqrt(dt))
    sq = [(0.25 + 0) / 2, (1 + 1) / 2]
    expected = torch.tensor([sigma * math.sqrt(dt) * (lr + s / (2 * sigma**2 * dt)) for lr, s in zip([0.1, -0.2], sq)])
    torch.testing.assert_close(ratio_norm(log_ratio, mean, mean_old, std), expected, atol=1e-6, rtol=0)
    # scalar std and [B] std give the same
    torch.testing.assert_close(ratio_norm(log_ratio, mean, mean_old, 0.4), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ratio_norm(log_ratio, mean, mean_old, std.reshape(2)), expected, atol=1e-6, rtol=0)
    # on-policy: log r = 0 and identical means -> 0
    assert torch.equal(ratio_norm(torch.zeros(2), mean, mean, std), torch.zeros(2))
    with pytest.raises(ValueError):
        ratio_norm(log_ratio, mean, mean_old, torch.ones(2, 2))


def test_ratio_norm_with_sde_outputs():
    x = _rand(2, 4, 4, seed=70)
    v_old = _rand(2, 4, 4, seed=71)
    v_new = v_old + 0.01 * _rand(2, 4, 4, seed=72)
    x_next, lp_old, mean_old, std = sde_step(v_old, x, 0.5, 0.45, 0.7, generator=_gen(73))
    lp_new, mean_new, _ = sde_step_log_prob(v_new, x, 0.5, 0.45, 0.7, x_next)
    out = ratio_norm(lp_new - lp_old, mean_new, mean_old, std)
    assert out.shape == (2,) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- straight line


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 7, 25])
def test_straight_line_velocity_lands_on_x0(shift, n):
    x0 = _rand(3, 2, 5, seed=80)
    x = _rand(3, 2, 5, seed=81)
    sched = timestep_schedule(n, shift)
    for i in range(n):
        v = straight_line_velocity(x, x0, sched[i])
        x = ode_step(v, x, sched[i], sched[i + 1])
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_straight_line_velocity_stays_on_line():
    x0 = _rand(2, 4, seed=82)
    x1 = _rand(2, 4, seed=83)
    v = straight_line_velocity(x1, x0, 1.0)
    torch.testing.assert_close(v, x1 - x0)
    x = ode_step(v, x1, 1.0, 0.3)
    torch.testing.assert_close(x, 0.7 * x0 + 0.3 * x1, atol=1e-6, rtol=0)
    # per-sample t
    t = torch.tensor([0.5, 0.25])
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    torch.testing.assert_close(straight_line_velocity(xt, x0, t), x1 - x0, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        straight_line_velocity(x1, x0, 0.0)


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_outputs_are_float32(dtype):
    x = _rand(2, 3, 4, seed=90).to(dtype)
    v = _rand(2, 3, 4, seed=91).to(dtype)
    t = torch.tensor([0.8, 0.5], dtype=dtype)
    tn = torch.tensor([0.7, 0.25], dtype=dtype)
    assert ode_step(v, x, t, tn).dtype == torch.float32
    outs = sde_step(v, x, t, tn, 0.7, noise=x)
    assert all(o.dtype == torch.float32 for o in outs)
    outs = sde_step_log_prob(v, x, t, tn, 0.7, x)
    assert all(o.dtype == torch.float32 for o in outs)
    assert gaussian_log_prob(x, v, torch.ones(2, 1, 1, dtype=dtype)).dtype == torch.float32
    assert latent_kl(x, v, torch.ones(2, 1, 1, dtype=dtype)).dtype == torch.float32
    assert velocity_mse(x, v).dtype == torch.float32
    assert cfg_velocity(x, v, 1.0).dtype == torch.float32
    assert cfg_velocity(x, v, 2.0).dtype == torch.float32
    assert ratio_norm(torch.zeros(2, dtype=dtype), x, v, torch.ones(2, dtype=dtype)).dtype == torch.float32
    assert straight_line_velocity(x, v, t).dtype == torch.float32
    assert sde_sigma(t, tn, 0.7).dtype == torch.float32
    assert sde_step_std(t, tn, 0.7).dtype == torch.float32


# ----------------------------------------------------------------------------- validation


def test_input_validation():
    x = _rand(2, 3, seed=100)
    v = _rand(2, 3, seed=101)
    with pytest.raises(ValueError):  # t_next == t
        sde_step(v, x, 0.5, 0.5, 0.7)
    with pytest.raises(ValueError):  # t_next > t
        ode_step(v, x, 0.4, 0.5)
    with pytest.raises(ValueError):  # t > 1
        sde_step(v, x, 1.2, 0.5, 0.7)
    with pytest.raises(ValueError):  # t_next < 0
        sde_step(v, x, 0.5, -0.1, 0.7)
    with pytest.raises(ValueError):  # negative noise level
        sde_step(v, x, 0.5, 0.4, -0.1)
    with pytest.raises(ValueError):  # shape mismatch velocity / x_t
        sde_step(v[:, :2], x, 0.5, 0.4, 0.7)
    with pytest.raises(ValueError):  # shape mismatch noise
        sde_step(v, x, 0.5, 0.4, 0.7, noise=torch.zeros(2, 4))
    with pytest.raises(ValueError):  # shape mismatch x_next
        sde_step_log_prob(v, x, 0.5, 0.4, 0.7, torch.zeros(3, 3))
    with pytest.raises(ValueError):  # per-sample t of the wrong batch size
        ode_step(v, x, torch.tensor([0.5, 0.4, 0.3]), 0.1)
    with pytest.raises(ValueError):  # per-sample t with one violating sample
        sde_step(v, x, torch.tensor([0.5, 0.4]), torch.tensor([0.4, 0.4]), 0.7)
    with pytest.raises(ValueError):  # 2-D time tensor
        ode_step(v, x, torch.full((2, 1), 0.5), 0.1)
    with pytest.raises(ValueError):  # 0-d latent
        ode_step(torch.tensor(1.0), torch.tensor(1.0), 0.5, 0.1)
    with pytest.raises(ValueError):
        velocity_mse(x, v[:, :2])
    with pytest.raises(ValueError):
        latent_kl(x, v[:1], 1.0)
    with pytest.raises(ValueError):
        sde_sigma(0.5, 0.6, 0.7)
    with pytest.raises(TypeError):
        ode_step(v, x, "0.5", 0.1)


def test_all_exports_exist():
    for name in flow.__all__:
        assert hasattr(flow, name)


# -- the convention, checked against diffusers' own flow-matching scheduler -------------------------


def test_diffusers_flow_match_scheduler_has_the_projects_convention():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    n, shift = 10, 3.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))  # what the FLUX pipeline passes
    grid = flow.timestep_schedule(n, shift)
    assert torch.allclose(scheduler.sigmas.float(), grid, atol=1e-6)  # the same time grid
    assert torch.allclose(scheduler.timesteps.float(), grid[:-1] * 1000, atol=1e-3)  # the model sees σ·1000
    g = torch.Generator().manual_seed(0)
    x0, noise, v = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    # x_t = (1 − t)·x_0 + t·ε
    t = scheduler.timesteps[3:4]
    noised = scheduler.scale_noise(x0, t, noise)
    sigma = float(grid[3])
    assert torch.allclose(noised, (1 - sigma) * x0 + sigma * noise, atol=1e-5)
    # v = ε − x_0: the straight line from x_t to x_0 has that velocity
    assert torch.allclose(flow.straight_line_velocity(noised, x0, sigma), noise - x0, atol=1e-4)
    # one Euler step per grid interval: x + (σ_next − σ)·v
    x = noise.clone()
    ours = noise.clone()
    for k, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(v, timestep, x).prev_sample
        ours = flow.ode_step(v, ours, grid[k], grid[k + 1])
        assert torch.allclose(x, ours, atol=1e-5)
