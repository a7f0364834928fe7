"""The oracle agent: plays every held-out task of ``t2i_reason`` perfectly.

Text phase: it writes the correct reasoning and scene description, then ``</think>``.
Image phase: it follows the straight-line velocity ``v = (x_t − x_0)/t`` towards the rendered
target ``x_0``, which drives the Euler ODE exactly onto the target image. The verifier must then
give it the full reward on every task — a check of the environment, the flow math and the
verifier together. Prints a GenEval-style table per category.

Run: ``python examples/oracle_agent.py [--split heldout] [--limit N] [--save-trajectory PATH]``
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from rich.console import Console
from rich.table import Table

import unigrpo_env
from unigrpo_env import FlowAction, TextAction, flow


def play_oracle(env, task_index: int, seed: int = 0):
    """One episode of the oracle on task ``task_index``; returns (reward, info)."""
    scenario = env.unwrapped.scenario
    obs, info = env.reset(seed=seed, options={"task_index": task_index})
    task = env.unwrapped.task
    obs, reward, terminated, _, info = env.step(TextAction(tokens=scenario.oracle_tokens(task)))
    x0 = scenario.target_latent(task)
    while not terminated:
        velocity = flow.straight_line_velocity(obs.x_t, x0, obs.t)
        x_next = flow.ode_step(velocity, obs.x_t, obs.t, obs.t_next)
        obs, reward, terminated, _, info = env.step(FlowAction(x_next=x_next))
    return reward, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="heldout", help="task split to play (train or heldout)")
    parser.add_argument("--limit", type=int, default=None, help="play only the first N tasks")
    parser.add_argument("--save-trajectory", default=None, help="save the first episode's trajectory here")
    args = parser.parse_args()

    env = unigrpo_env.make("t2i_reason", split=args.split)
    tasks = env.unwrapped.scenario.tasks(args.split)[: args.limit]
    rewards: dict[str, list[float]] = defaultdict(list)
    correct: dict[str, list[float]] = defaultdict(list)
    for index, task in enumerate(tasks):
        reward, info = play_oracle(env, index, seed=index)
        rewards[task.category].append(reward)
        correct[task.category].append(info["reward_components"]["correct"])
        if index == 0 and args.save_trajectory:
            info["trajectory"].save(args.save_trajectory)

    table = Table(title=f"oracle agent on t2i_reason ({args.split}, {len(tasks)} tasks)")
    for column in ("category", "tasks", "mean reward", "GenEval correct"):
        table.add_column(column)
    for category in sorted(rewards):
        r, c = rewards[category], correct[category]
        table.add_row(category, str(len(r)), f"{sum(r) / len(r):.3f}", f"{sum(c) / len(c):.3f}")
    all_r = [x for v in rewards.values() for x in v]
    all_c = [x for v in correct.values() for x in v]
    table.add_row("overall", str(len(all_r)), f"{sum(all_r) / len(all_r):.3f}", f"{sum(all_c) / len(all_c):.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
