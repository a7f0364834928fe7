"""Memory of a long episode: an 8-turn ``edit_multiturn`` batch of 32 episodes, played to the end.

The environment keeps one record of the batch (``BatchTrajectory``): per turn the reasoning
tokens and log-probabilities, the latents of every denoising step, the log-probabilities and the
finished images. This measures whether playing the batch costs more memory than that record: the
growth of the process's peak resident memory over the episode, against the bytes of the record's
own tensors. The actions are scripted (a short reasoning, then a straight-line step towards a
blank latent), so no model's memory enters; ``info["trajectory"]`` is read at every step, as an
agent that logs it would.

Run: ``python benchmarks/long_episode_memory.py [--turns 8] [--prompts 8] [--group-size 4]``.
"""

from __future__ import annotations

import argparse
import platform
import resource

import torch

import unigrpo_env
from unigrpo_env import FlowAction, TextAction


def record_bytes(trajectory) -> int:
    """The bytes of every tensor the batch's record holds (its turns, rewards and ids)."""
    total = trajectory.group_ids.numel() * trajectory.group_ids.element_size()
    for turn in trajectory.turns:
        for part in (turn.text, turn.image):
            for value in vars(part).values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
    return total


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    envs = unigrpo_env.make_vec("edit_multiturn", args.prompts, args.group_size, num_turns=args.turns)
    obs, _ = envs.reset(seed=0)
    eot = envs.scenario.text_codec.eot_id
    n = envs.num_envs
    start = peak_mib()
    steps = 0
    while True:
        if obs.phase == "text":
            action = TextAction(tokens=[[eot]] * n, lengths=obs.text_open.long().tolist())
        else:
            action = FlowAction(x_next=obs.x_t * 0.9, log_prob=torch.full((n,), -1.0), stochastic=True)
        obs, _, dones, _, info = envs.step(action)
        _ = info["trajectory"]
        steps += 1
        if bool(dones.all()):
            break
    grown = peak_mib() - start
    size = record_bytes(envs.trajectory) / 2**20
    print(f"machine: {platform.machine()}, torch {torch.__version__}, 1 thread, no GPU")
    print(f"edit_multiturn, {args.turns} turns, {args.prompts}×{args.group_size} = {n} episodes, {steps} steps")
    print(f"the batch's record: {size:.1f} MiB of tensors; peak resident memory grew {grown:.1f} MiB "
          f"over the episode ({grown / size:.2f}× the record)")  # fmt: skip


if __name__ == "__main__":
    main()
