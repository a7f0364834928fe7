"""Run by test_agent.py under ``torchrun --nproc_per_node 2`` (gloo, CPU), once with DDP and once
with FSDP2, on the same seeds: the test compares what the two engines compute.

``python distributed_fsdp.py OUT MODE`` with MODE ``ddp`` or ``fsdp``. Each process rolls out its
half of every group (the same rollouts under both engines, as the parameters are the same), takes
one backward pass, records the whole gradients, then a whole iteration (two minibatches, so the
old log-probabilities are recomputed under the engine), a checkpoint written and read back
through the trainer and a held-out evaluation; it writes what it saw into OUT/MODE-RANK.*.

Accelerate 1.x turns its FSDP plugin on only for GPU-type setups (``AcceleratorState`` keeps
``MULTI_CPU`` for CPU processes), while torch's FSDP2 itself runs on the CPU with gloo; so in
``fsdp`` mode the script sets Accelerate's state to FSDP after constructing the Accelerator
(:func:`forced_fsdp.fsdp_accelerator`), and Accelerate's own FSDP2 preparation (``fully_shard``
per block, the optimizer remapped to the shards) then runs as it would on GPUs. The policy is ShapesWorld's shipped checkpoint (its
reasoning ends at different lengths in the two processes) and trains both sides: the language model with
LoRA (its reference: the adapter switched off), the flow model in full (its reference: a frozen
copy), with different learning rates.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from forced_fsdp import fsdp_accelerator  # noqa: E402

from unigrpo_env.agents.config import UniGRPOConfig  # noqa: E402
from unigrpo_env.agents.decoding import all_finished, synchronized_decoding  # noqa: E402
from unigrpo_env.agents.trainer import Trainer  # noqa: E402
from unigrpo_env.scenarios.shapes.policy import load_shapes_policy  # noqa: E402

out, mode = Path(sys.argv[1]), sys.argv[2]
accelerator = fsdp_accelerator() if mode == "fsdp" else Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
config = UniGRPOConfig(
    num_prompts=2, group_size=4, minibatches=2, iterations=2, temperature=1.5,
    scenario_options={"num_steps": 3}, sde_window_size=None, cpu=True, train="both",
    text_adapter="lora", image_adapter="full", kl_text=0.1, regularizer="mse", lr_text=1e-3, lr_image=3e-4,
    eval_limit=6,
)  # fmt: skip
trainer = Trainer(config, out / f"run-{mode}", policy=load_shapes_policy(), scenario=None, accelerator=accelerator)
agent = trainer.agent
named = {name: p for name, p in agent.policy.named_parameters() if p.requires_grad}


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient in full (FSDP's are DTensor shards)."""
    full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return full.detach().float().clone().contiguous()


sharded = [
    name for name, p in named.items() if hasattr(p, "to_local") and p.to_local().numel() < p.numel()
]  # fmt: skip
units = sum(type(m).__name__.startswith("FSDP") for m in agent.training_forward.modules())

# decoding stops when every process is done: here rank 0 is done, rank 1 is not
done_here = torch.tensor([rank == 0])
with synchronized_decoding():
    synchronized_stop = all_finished(done_here)
local_stop = all_finished(done_here)

# one backward through the engine on this process's half of the groups (the processes' reasoning
# ends after different numbers of tokens: under FSDP decoding must go on until both are done)
batch = agent.collect(0)
every = torch.arange(len(batch))
old = agent._old_log_probs(batch, [every])
agent.policy.train()
with accelerator.autocast():
    loss, stats = agent._loss(batch, every, old)
accelerator.backward(loss)
gradients = {name: whole(p.grad) for name, p in named.items() if p.grad is not None}
agent.optimizer.zero_grad(set_to_none=True)

# a whole iteration (two minibatches: the second's old log-probabilities recomputed first), then
# the trainer's checkpoint written and read back into the sharded model
iteration = agent.train_iteration()
after = {name: whole(p) for name, p in named.items()}
trainer.save_checkpoint()
with torch.no_grad():
    for p in named.values():
        p.mul_(0.5)  # spoil the weights: the restore must bring them back
trainer._restore()
restored = all(torch.equal(whole(p), after[name]) for name, p in named.items())
# a held-out evaluation of the restored policy (under FSDP: inside the engine's module)
report = trainer._evaluate("eval_check")

if rank == 0:
    save_file(gradients, str(out / f"{mode}-gradients.safetensors"))
    save_file(after, str(out / f"{mode}-weights.safetensors"))
tokens = batch.trajectory.turns[0].text.padded()[0]
(out / f"{mode}-{rank}.json").write_text(
    json.dumps(
        {
            "rank": rank,
            "world_size": world,
            "distributed_type": str(accelerator.distributed_type),
            "sharded_parameters": len(sharded),
            "trained_parameters": len(named),
            "fsdp_units": units,
            "rewards": batch.rewards.tolist(),
            "tokens": tokens.tolist(),
            "loss": float(loss.detach()),
            "iteration_loss": iteration["loss"],
            "first_ratio_text_max_dev": iteration["first_ratio_text_max_dev"],
            "first_ratio_image_max_dev": iteration["first_ratio_image_max_dev"],
            "restored": restored,
            "decoded_tokens": int(batch.trajectory.turns[0].text.lengths.max()),
            "synchronized_stop": synchronized_stop,
            "local_stop": local_stop,
            "eval_reward": report.overall("pipeline", "reward"),
            "eval_tasks": report.pipeline["overall"].count,
        }
    )
)
accelerator.wait_for_everyone()
dist.destroy_process_group()  # a clean exit: gloo's threads stopped before the interpreter's
