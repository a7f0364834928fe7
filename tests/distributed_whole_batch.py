"""Run by test_agent.py: one process with a whole batch against two processes with half of each
group, under DDP (gloo, CPU), on the same episodes.

``python distributed_whole_batch.py OUT one LOSS_TYPE`` (a plain process) collects a batch of 2
prompts × 4 episodes (``train both``: LoRA on the text side with its adapter-off KL reference,
the flow model in full with the velocity-MSE regulariser), makes one episode's reward NaN (so
the two halves hold different numbers of scored episodes) and saves it; then takes one optimizer
step on the whole batch. ``torchrun --nproc_per_node 2 distributed_whole_batch.py OUT two
LOSS_TYPE`` loads that batch in both processes, and each takes its half of every group (the
share a two-process rollout gives it) through the same optimizer step under DDP. Each run
writes its loss, the whole gradients before the step and the weights after it.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_tiny_checkpoint  # noqa: E402

from unigrpo_env.agents.config import UniGRPOConfig  # noqa: E402
from unigrpo_env.agents.losses import group_advantages  # noqa: E402
from unigrpo_env.agents.unigrpo import UniGRPOAgent  # noqa: E402
from unigrpo_env.scenarios.shapes.policy import load_shapes_policy  # noqa: E402

out, mode, loss_type = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
ckpt = out / "checkpoint"
if mode == "one":
    write_tiny_checkpoint(ckpt)
config = UniGRPOConfig(
    num_prompts=2, group_size=4, minibatches=1, checkpoint=str(ckpt), scenario_options={"num_steps": 3},
    sde_window_size=None, cpu=True, train="both", text_adapter="lora", image_adapter="full", kl_text=0.1,
    regularizer="mse", lr_text=1e-3, lr_image=3e-4, max_grad_norm=100.0, text_loss_type=loss_type,
    temperature=1.5,
)  # fmt: skip
torch.manual_seed(0)  # the LoRA adapters' initial weights, as the Trainer seeds them
agent = UniGRPOAgent(load_shapes_policy(ckpt), config, accelerator=accelerator)
named = {name: p for name, p in agent.policy.named_parameters() if p.requires_grad}

saved = out / f"batch-{loss_type}.pt"
if mode == "one":
    batch = agent.collect(0)
    rewards = batch.trajectory.rewards
    rewards[1] = float("nan")  # a failed score: rank 0's half has 3 scored episodes, rank 1's 4
    group_ids = batch.trajectory.group_ids
    batch.advantages = group_advantages(rewards, group_ids, eps=config.advantage_eps)
    batch.valid = ~torch.isnan(rewards)
    torch.save(batch, saved)
    index = torch.arange(len(batch))
else:
    batch = torch.load(saved, weights_only=False)
    # this process's share of every group: the first or the second half of each group's episodes
    group_ids = batch.trajectory.group_ids
    position = torch.zeros_like(group_ids)
    for g in group_ids.unique():
        members = (group_ids == g).nonzero().flatten()
        position[members] = torch.arange(len(members))
    index = ((position >= config.group_size // 2) == bool(rank)).nonzero().flatten()

old = agent._old_log_probs(batch, [])  # one minibatch: its own forward pass is the old policy
agent.policy.train()
loss, stats = agent._loss(batch, index, old, fill_old=True)
accelerator.backward(loss)
gradients = {name: p.grad.detach().clone() for name, p in named.items() if p.grad is not None}
accelerator.clip_grad_norm_(agent._trained_parameters(), config.max_grad_norm)
agent.optimizer.step()
weights = {name: p.detach().clone() for name, p in named.items()}

if rank == 0:
    save_file(gradients, str(out / f"{mode}-{loss_type}-gradients.safetensors"))
    save_file(weights, str(out / f"{mode}-{loss_type}-weights.safetensors"))
losses = [None] * world
if world > 1:
    dist.all_gather_object(losses, float(loss.detach()))
else:
    losses = [float(loss.detach())]
(out / f"{mode}-{loss_type}-{rank}.json").write_text(
    json.dumps(
        {
            "world_size": world,
            "episodes": len(index),
            "scored": int(batch.valid[index].sum()),
            "losses": losses,
            "trained_tensors": len(gradients),
        }
    )
)
if world > 1:
    accelerator.wait_for_everyone()
    dist.destroy_process_group()
