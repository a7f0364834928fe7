"""Run by test_agent.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): the agent's training
pass goes through Accelerate's DDP. Each process holds half of every group; after one backward
the engine's gradients must be the mean of the two processes' own (what one process computes on
the whole batch, as each loss is a mean over equally many episodes), reduced in the engine's
buckets (counted with a DDP communication hook), and a whole iteration leaves the same weights
in both processes."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_tiny_checkpoint  # noqa: E402

from unigrpo_env.agents.config import UniGRPOConfig  # noqa: E402
from unigrpo_env.agents.unigrpo import UniGRPOAgent  # noqa: E402
from unigrpo_env.scenarios.shapes.policy import load_shapes_policy  # noqa: E402

out = Path(sys.argv[1])
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
ckpt = out / "checkpoint"
if rank == 0:
    write_tiny_checkpoint(ckpt)
accelerator.wait_for_everyone()
config = UniGRPOConfig(
    num_prompts=2, group_size=4, minibatches=1, checkpoint=str(ckpt), scenario_options={"num_steps": 3},
    sde_window_size=None, cpu=True,
)  # fmt: skip
agent = UniGRPOAgent(load_shapes_policy(ckpt), config, accelerator=accelerator)
wrapped = agent.training_forward
reductions = []


def counting_hook(state, bucket):
    reductions.append(len(bucket.gradients()))
    return default_hooks.allreduce_hook(state, bucket)


wrapped.register_comm_hook(dist.group.WORLD, counting_hook)
params = agent._trained_parameters()

# one backward through the engine, against each process's own gradients averaged by hand
batch = agent.collect(0)
batch.advantages = torch.linspace(-1, 1, len(batch)) * (1 + rank)  # a signal, different per process
every = torch.arange(len(batch))
old = agent._old_log_probs(batch, [every])
agent.policy.train()
loss, _ = agent._loss(batch, every, old)
loss.backward()
synced = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
steps_reduced = len(reductions)
agent.optimizer.zero_grad(set_to_none=True)
with wrapped.no_sync():
    loss, _ = agent._loss(batch, every, old)
    loss.backward()
own = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
averaged = []
for g in own:
    total = g.clone()
    dist.all_reduce(total)
    averaged.append(total / world)
gradients_match = all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(synced, averaged))
differ_locally = any(not torch.allclose(a, b) for a, b in zip(synced, own))
agent.optimizer.zero_grad(set_to_none=True)

# a whole iteration: the same weights in both processes afterwards, and the same metrics, those of
# the whole batch (the rewards of both processes' shares gathered)
collected = []
collect = agent.collect
agent.collect = lambda iteration: collected.append(collect(iteration)) or collected[-1]
stats = agent.train_iteration()
share = collected[0]
every_reward = accelerator.gather(share.rewards)
every_correct = accelerator.gather(share.trajectory.reward_components["correct"])
every_stats = [None] * world
dist.all_gather_object(every_stats, stats)
own_reward_mean = float(share.rewards.mean())
flat = torch.cat([p.detach().flatten() for p in params])
gathered = [torch.zeros_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
accelerator.wait_for_everyone()
(out / f"ddp{rank}.json").write_text(
    json.dumps(
        {
            "rank": rank,
            "world_size": world,
            "wrapped_in_ddp": isinstance(wrapped, DistributedDataParallel),
            "gradients_match": gradients_match,
            "differ_locally": differ_locally,
            "buckets_per_backward": steps_reduced,
            "gradients_in_buckets": sum(reductions[:steps_reduced]),
            "trained_tensors": len(params),
            "weights_equal_across_processes": bool(torch.equal(gathered[0], gathered[1])),
            "loss_finite": bool(torch.isfinite(torch.tensor(stats["loss"]))),
            "metrics_equal_across_processes": every_stats[0] == every_stats[1],
            "reward_mean": stats["reward_mean"],
            "whole_batch_reward_mean": float(every_reward.mean()),
            "own_reward_mean": own_reward_mean,
            "reward_correct": stats["reward/correct"],
            "whole_batch_correct": float(every_correct.mean()),
            "episodes": len(share),
            "whole_batch_episodes": int(every_reward.numel()),
        }
    )
)
accelerator.wait_for_everyone()
dist.destroy_process_group()  # a clean exit: gloo's threads stopped before the interpreter's
