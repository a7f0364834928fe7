"""Run by test_agent.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): each process holds half of
every group's rewards; the advantages it computes must equal one process's over the whole batch.
It also runs the Accelerate-based agent's collect step, to show the trainer runs distributed."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_tiny_checkpoint  # noqa: E402

from unigrpo_env.agents.config import UniGRPOConfig  # noqa: E402
from unigrpo_env.agents.unigrpo import UniGRPOAgent, distributed_advantages  # noqa: E402
from unigrpo_env.scenarios.shapes.policy import load_shapes_policy  # noqa: E402

out = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
# two groups of four; each process holds two rollouts of each group
all_rewards = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.2, 0.8, 0.4])
all_groups = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
local = slice(rank * 4, rank * 4 + 4)
advantages, failed = distributed_advantages(accelerator, all_rewards[local], all_groups[local])

ckpt = out / "checkpoint"
if rank == 0:
    write_tiny_checkpoint(ckpt)
accelerator.wait_for_everyone()
config = UniGRPOConfig(
    num_prompts=1, group_size=4, minibatches=1, checkpoint=str(ckpt), scenario_options={"num_steps": 2}, cpu=True
)
agent = UniGRPOAgent(load_shapes_policy(ckpt), config, accelerator=accelerator)
stats = agent.train_iteration()
accelerator.wait_for_everyone()

(out / f"rank{rank}.json").write_text(
    json.dumps(
        {
            "rank": rank,
            "world_size": world,
            "advantages": advantages.tolist(),
            "all_rewards": all_rewards.tolist(),
            "all_groups": all_groups.tolist(),
            "agent_ran": bool(stats["iteration"] == 0.0 and agent.local_group_size == 2),
        }
    )
)
accelerator.wait_for_everyone()
accelerator.end_training()  # a clean exit: the process group destroyed before the interpreter stops
