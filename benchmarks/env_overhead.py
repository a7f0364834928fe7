"""How much does the environment add to a rollout?

Times batches of P×G = 4×8 episodes of ``t2i_reason`` through ``unigrpo_env.make_vec`` with a
small velocity network (SDE sampling, one network call per step), against a bare loop doing the
same tensor work without the environment: the same network calls, the same ``flow.sde_step``
math, the same decoding and reward scoring, and keeping the latents and log-probs a trainer keeps.

Run: ``python benchmarks/env_overhead.py [--episodes 20] [--steps 10] [--threads 2]``.
The two loops alternate, so drifts of the machine hit both alike; medians are reported.

It also times one ``env.step`` of the single environment along a long image phase
(``--long-steps`` denoising steps): every step returns ``info["trajectory"]``, the episode so far,
so a trajectory built by copying would cost more at every step; a view costs the same.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import unigrpo_env
from unigrpo_env import FlowAction, RewardInputs, TextAction, flow


class SmallVelocityNet(nn.Module):
    """A small time-conditioned conv net ``v_θ(x_t, t)`` for 3×32×32 pixel latents."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.inp = nn.Conv2d(3, channels, 3, padding=1)
        self.time = nn.Linear(1, channels)
        self.body = nn.Sequential(
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.SiLU(),
        )
        self.out = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((x.shape[0], 1), float(t), device=x.device)
        h = self.inp(x) + self.time(tt)[:, :, None, None]
        return self.out(self.body(h))


class ZeroCostVelocity(nn.Module):
    """``v = −x_t``: no compute, so the timing difference is the environment's own cost."""

    def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return -x


def env_episode(envs, net, tokens, seed: int) -> float:
    start = time.perf_counter()
    obs, _ = envs.reset(seed=seed)
    obs, *_ = envs.step(TextAction(tokens=tokens))
    generator = torch.Generator().manual_seed(seed)
    done = False
    while not done:
        v = net(obs.x_t, obs.t)
        x_next, log_prob, _, _ = flow.sde_step(v, obs.x_t, obs.t, obs.t_next, 0.7, generator=generator)
        obs, rewards, terminated, _, _ = envs.step(FlowAction(x_next=x_next, log_prob=log_prob))
        done = bool(terminated.all())
    return time.perf_counter() - start


def bare_episode(scenario, tasks, net, n: int, seed: int) -> float:
    start = time.perf_counter()
    times = [float(t) for t in scenario.timesteps()]
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn((n, *scenario.image_codec.latent_shape), generator=generator)
    latents, log_probs = [x_t], []
    for t, t_next in zip(times[:-1], times[1:]):
        v = net(x_t, t)
        x_t, log_prob, _, _ = flow.sde_step(v, x_t, t, t_next, 0.7, generator=generator)
        latents.append(x_t)
        log_probs.append(log_prob)
    images = scenario.image_codec.decode(x_t)
    empty = images.new_zeros((n, 0, *images.shape[1:]))
    scenario.reward(RewardInputs(images=images, tasks=tasks, texts=[[""]] * n, earlier_images=empty))
    return time.perf_counter() - start


def step_cost_along_an_episode(num_steps: int, repeats: int) -> tuple[float, float]:
    """Median seconds of one image-phase ``env.step`` (with its ``info["trajectory"]``) over the
    first and over the last tenth of a ``num_steps``-step image phase."""
    env = unigrpo_env.make("t2i_reason", num_steps=num_steps)
    early: list[float] = []
    late: list[float] = []
    tenth = max(1, num_steps // 10)
    for seed in range(repeats):
        obs, _ = env.reset(seed=seed)
        obs, *_ = env.step(TextAction(tokens=[env.text_codec.eot_id]))
        for k in range(num_steps):
            action = FlowAction(x_next=flow.ode_step(-obs.x_t, obs.x_t, obs.t, obs.t_next))
            start = time.perf_counter()
            obs, _, _, _, info = env.step(action)
            _ = info["trajectory"].turns[0].image.x_next  # what a caller reads of it
            seconds = time.perf_counter() - start
            if k < tenth:
                early.append(seconds)
            elif k >= num_steps - tenth:
                late.append(seconds)
    return statistics.median(early), statistics.median(late)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=20, help="batches of 32 episodes per loop")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--long-steps", type=int, default=400, help="denoising steps of the single-env step-cost probe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    envs = unigrpo_env.make_vec(
        "t2i_reason", num_prompts=args.prompts, group_size=args.group_size, num_steps=args.steps
    )
    scenario = envs.scenario
    n = envs.num_envs
    envs.reset(seed=0)
    tasks = envs.tasks
    tokens = torch.full((n, 1), scenario.text_codec.eot_id)  # one end-of-thinking token per episode

    def measure(net: nn.Module) -> tuple[float, float]:
        env_times, bare_times = [], []
        with torch.no_grad():
            env_episode(envs, net, tokens, seed=123)  # warm-up
            bare_episode(scenario, tasks, net, n, seed=123)
            for k in range(args.episodes):
                env_times.append(env_episode(envs, net, tokens, seed=k))
                bare_times.append(bare_episode(scenario, tasks, net, n, seed=k))
        return statistics.median(env_times), statistics.median(bare_times)

    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )
    print(f"batch: {args.prompts}x{args.group_size} = {n} episodes, {args.steps} SDE steps, 3x32x32 latents")
    env_med, bare_med = measure(SmallVelocityNet().eval())
    print("small velocity network (3 convs of 64 channels):")
    print(f"  bare loop : {bare_med * 1e3:8.1f} ms per batch (median of {args.episodes})")
    print(f"  make_vec  : {env_med * 1e3:8.1f} ms per batch (median of {args.episodes})")
    print(f"  ratio env/bare = {env_med / bare_med:.3f}  (overhead {100 * (env_med / bare_med - 1):+.1f}%)")
    env_zero, bare_zero = measure(ZeroCostVelocity())
    per_step = (env_zero - bare_zero) / (args.steps + 1)
    print("zero-cost velocity (v = -x_t), i.e. the environment's own cost:")
    print(f"  bare loop : {bare_zero * 1e3:8.1f} ms per batch;  make_vec: {env_zero * 1e3:8.1f} ms per batch")
    print(
        f"  the environment adds {(env_zero - bare_zero) * 1e3:.2f} ms per batch = {per_step * 1e6:.0f} us per step "
        f"({per_step / ((bare_med - bare_zero) / args.steps) * 100:.1f}% of one network call)"
    )

    early, late = step_cost_along_an_episode(args.long_steps, repeats=3)
    print(f"single env, one image step with info['trajectory'], {args.long_steps}-step image phase:")
    print(
        f"  first tenth: {early * 1e6:.0f} us per step;  last tenth: {late * 1e6:.0f} us per step  (ratio {late / early:.2f})"
    )


if __name__ == "__main__":
    main()
