"""Where does a UniGRPO iteration spend its time, and what does CFG cost in rollouts?

1. **Training step split.** Runs ``--iterations`` iterations of :class:`UniGRPOAgent` on
   ``t2i_reason`` with the shipped ShapesWorld checkpoint and the default config (or ``--train``),
   and reports the median time of each phase as the agent measures it: rollout (reasoning +
   denoising), reward scoring, recomputing the old log-probabilities, loss and backward, optimizer.
2. **Rollout cost with and without CFG.** Times rollouts of the same P×G batch CFG-free (one
   network call per denoising step) and with CFG (two calls per step, batched as one call on a
   doubled batch), alternating, and prints the ratio of wall time and of network calls.

Run: ``python benchmarks/training_step.py [--iterations 6] [--rollouts 6] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from unigrpo_env.agents.config import UniGRPOConfig
from unigrpo_env.agents.rollout import RolloutSettings, rollout
from unigrpo_env.agents.unigrpo import UniGRPOAgent
from unigrpo_env.scenarios.shapes.policy import load_shapes_policy

PHASES = [
    ("rollout", "time_rollout"),
    ("reward", "time_reward"),
    ("old log-probs", "time_old_log_probs"),
    ("loss + backward", "time_loss_backward"),
    ("optimizer", "time_optimizer"),
]


def training_split(config: UniGRPOConfig, iterations: int) -> dict[str, float]:
    agent = UniGRPOAgent(load_shapes_policy(None), config)
    agent.train_iteration()  # warm-up: first-call allocations
    rows = [agent.train_iteration() for _ in range(iterations)]
    return {name: statistics.median(r[key] for r in rows) for name, key in PHASES}


def rollout_cost(config: UniGRPOConfig, repeats: int, cfg_scale: float) -> dict[str, dict[str, float]]:
    agent = UniGRPOAgent(load_shapes_policy(None), config)
    policy, envs = agent.policy.eval(), agent.envs
    prompts = list(range(config.num_prompts))
    times: dict[float, list[float]] = {1.0: [], cfg_scale: []}
    calls: dict[float, int] = {}
    for r in range(repeats + 1):
        for scale in (1.0, cfg_scale):
            settings = RolloutSettings(noise_level=config.noise_level, sde_window=(0, 3), cfg_scale=scale)
            start = time.perf_counter()
            result = rollout(policy, envs, settings, seed=r, options={"task_index": prompts})
            if r:  # the first round is a warm-up
                times[scale].append(time.perf_counter() - start)
            calls[scale] = result.network_calls
    return {str(s): {"seconds": statistics.median(t), "network_calls": calls[s]} for s, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--rollouts", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", default="both", choices=["both", "text", "image"])
    parser.add_argument("--cfg", type=float, default=2.0, help="the CFG scale to compare with CFG-free")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = UniGRPOConfig.for_scenario(
        "t2i_reason", train=args.train
    )  # what `unigrpo run scenario t2i_reason` trains with
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"batch: {config.num_prompts} prompts × {config.group_size} rollouts, {config.ppo_epochs} PPO epoch(s) × "
        f"{config.minibatches} minibatch(es), train={config.train}"
    )

    split = training_split(config, args.iterations)
    total = sum(split.values())
    print(f"\ntraining step, median of {args.iterations} iterations: {total:.2f} s")
    for name, seconds in split.items():
        print(f"  {name:<16} {seconds:7.3f} s  {seconds / total:6.1%}")

    cost = rollout_cost(config, args.rollouts, args.cfg)
    free, guided = cost["1.0"], cost[str(args.cfg)]
    print(f"\nrollout of {config.num_prompts * config.group_size} episodes, median of {args.rollouts}:")
    print(f"  CFG-free      {free['seconds']:.3f} s, {free['network_calls']} network calls")
    print(f"  CFG {args.cfg:<9} {guided['seconds']:.3f} s, {guided['network_calls']} network calls")
    print(
        f"  CFG / CFG-free: time ×{guided['seconds'] / free['seconds']:.2f}, "
        f"network calls ×{guided['network_calls'] / free['network_calls']:.2f}"
    )


if __name__ == "__main__":
    main()
