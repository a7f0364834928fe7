"""Run by test_agent.py under ``torchrun --nproc_per_node 2`` (gloo, CPU), once with DDP and once
with DeepSpeed ZeRO (stage 2 or 3) through Accelerate's DeepSpeed plugin, on the same seeds: the
test compares what the engines compute, as ``distributed_fsdp.py`` does for FSDP2 (the same
policy: ShapesWorld's shipped checkpoint, LoRA on the text side with its adapter-off reference, the
flow model in full with a frozen copy, two learning rates).

``python distributed_deepspeed.py OUT MODE`` with MODE ``ddp``, ``zero2`` or ``zero3``, or
``zero2-bf16`` (ZeRO-2 with Accelerate's ``mixed_precision="bf16"``: the engine's weights in bf16). Each process
rolls out its half of every group, takes one optimizer step (recording the whole gradients after
the engine's reduction, before the step), then a whole iteration (two minibatches, a warm-up
scaling both learning rates), a checkpoint written and read back through the trainer and a
held-out evaluation; it writes what it saw into OUT/MODE-RANK.json and (rank 0) the gradients and
weights into OUT/MODE-*.safetensors.

DeepSpeed runs on the CPU with its CPU accelerator (``DS_ACCELERATOR=cpu``; without oneCCL its
communication backend is gloo). Accelerate 1.x ignores the DeepSpeed plugin for ``cpu=True`` (the
state stays ``MULTI_CPU``, DDP), so the Accelerator is made with ``cpu=False`` and the gloo backend
named: on a machine without a GPU, Accelerate's device is then the CPU and its state DEEPSPEED.
The DeepSpeed config leaves ``gradient_clipping`` to the agent (``max_grad_norm``, below the
gradients' norm, so every step clips).
"""

import contextlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from unigrpo_env.agents.config import UniGRPOConfig  # noqa: E402
from unigrpo_env.agents.trainer import Trainer  # noqa: E402
from unigrpo_env.scenarios.shapes.policy import load_shapes_policy  # noqa: E402

out, mode = Path(sys.argv[1]), sys.argv[2]
engine_name, _, precision = mode.partition("-")  # "zero2-bf16": ZeRO-2 in bf16
MAX_GRAD_NORM = 0.05  # below the gradients' norm: every step clips
deepspeed = engine_name != "ddp"


def deepspeed_accelerator(stage: int) -> Accelerator:
    """An Accelerator running DeepSpeed ZeRO ``stage`` on CPU processes (gloo)."""
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every weight, however small
    plugin = DeepSpeedPlugin(hf_ds_config={"gradient_accumulation_steps": 1, "zero_optimization": zero})
    return Accelerator(
        deepspeed_plugin=plugin,
        mixed_precision=precision or "no",
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )


accelerator = Accelerator(cpu=True) if engine_name == "ddp" else deepspeed_accelerator(int(engine_name[-1]))
rank, world = accelerator.process_index, accelerator.num_processes
config = UniGRPOConfig(
    num_prompts=2, group_size=4, minibatches=2, iterations=2, temperature=1.5,
    scenario_options={"num_steps": 3}, sde_window_size=None, cpu=True, train="both",
    text_adapter="lora", image_adapter="full", kl_text=0.1, regularizer="mse", lr_text=1e-3, lr_image=3e-4,
    eval_limit=6, max_grad_norm=MAX_GRAD_NORM, warmup_iterations=4,
)  # fmt: skip
policy = load_shapes_policy()  # after the Accelerator: under ZeRO-3 transformers loads the language model partitioned
partitioned_at_load = sum(hasattr(p, "ds_id") for p in policy.parameters())
trainer = Trainer(config, out / f"run-{mode}", policy=policy, scenario=None, accelerator=accelerator)
agent = trainer.agent
named = {name: p for name, p in agent.policy.named_parameters() if p.requires_grad}
engine = agent.training_forward  # DDP's wrapper or the DeepSpeedEngine


def gathered(modifier_rank=None):
    """The trained parameters whole on every process (ZeRO-3 partitions them); with
    ``modifier_rank`` what that process writes into them is partitioned back on leaving."""
    if engine_name == "zero3":
        import deepspeed as ds

        return ds.zero.GatheredParameters(list(named.values()), modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def whole_weights() -> dict[str, torch.Tensor]:
    with gathered():
        return {name: p.detach().float().clone().contiguous() for name, p in named.items()}


def master_weights() -> dict[str, torch.Tensor]:
    """The optimizer's fp32 copies of the weights, gathered from the partitions (DeepSpeed only)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().float().clone() for name, p in named.items()}


def whole_gradients() -> dict[str, torch.Tensor]:
    if deepspeed:
        from deepspeed.utils import safe_get_full_grad  # the reduced gradient, gathered from the partitions

        grads = {name: safe_get_full_grad(p) for name, p in named.items()}
    else:
        grads = {name: p.grad for name, p in named.items()}
    return {name: g.detach().float().clone().contiguous() for name, g in grads.items() if g is not None}


trained_elements = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in named.values())
partitioned = optimizer_elements = 0
if engine_name == "zero3":  # each weight holds its partition only
    partitioned = sum(p.ds_tensor.numel() < p.ds_numel for p in named.values())
    optimizer_elements = sum(t.numel() for t in engine.optimizer.fp32_partitioned_groups_flat)
elif engine_name == "zero2":  # the weights whole, the optimizer's fp32 copies (and the gradients) in partitions
    optimizer_elements = sum(t.numel() for t in engine.optimizer.single_partition_of_fp32_groups)

# one optimizer step on this process's half of the groups, the whole gradients recorded before it
batch = agent.collect(0)
every = torch.arange(len(batch))
old = agent._old_log_probs(batch, [every])
agent.policy.train()
with accelerator.autocast():
    loss, stats = agent._loss(batch, every, old)
if deepspeed:
    engine.backward(loss)  # what accelerator.backward does, split: its engine.step follows below
    gradients = whole_gradients()
    engine.step()  # clips to gradient_clipping, steps, zeroes the gradients
    first_norm = float(engine.get_global_grad_norm())
else:
    accelerator.backward(loss)
    gradients = whole_gradients()
    first_norm = float(accelerator.clip_grad_norm_(agent._trained_parameters(), MAX_GRAD_NORM))
    agent.optimizer.step()
    agent.optimizer.zero_grad(set_to_none=True)

# a whole iteration (two minibatches: the second's old log-probabilities recomputed first; the
# warm-up's 1/4 of each group's learning rate), then the trainer's checkpoint written and read back
iteration = agent.train_iteration()
learning_rates = {group["name"]: group["lr"] for group in agent.optimizer.param_groups}
after = whole_weights()
master_after = master_weights() if deepspeed else {}
trainer.save_checkpoint()
with gathered(modifier_rank=0), torch.no_grad():
    for p in named.values():
        p.mul_(0.5)  # spoil the weights: the restore must bring them back
spoiled = any(not torch.equal(w, after[name]) for name, w in whole_weights().items())
trainer._restore()
restored = all(torch.equal(w, after[name]) for name, w in whole_weights().items())
restored_master = all(torch.equal(w, master_after[name]) for name, w in master_weights().items()) if deepspeed else True
report = trainer._evaluate("eval_check")  # the restored policy (under ZeRO-3: partitioned)

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
            "engine": type(engine).__name__,
            "zero_stage": agent.engine.zero_stage,
            "mixed_precision": accelerator.mixed_precision,
            "bf16_enabled": bool(engine.bfloat16_enabled()) if deepspeed else False,
            "weight_dtypes": sorted({str(p.dtype) for p in named.values()}),
            "shards_parameters": agent.engine.shards_parameters,
            "gradient_clipping": float(engine.gradient_clipping()) if deepspeed else None,
            "partitioned_at_load": partitioned_at_load,
            "partitioned_parameters": partitioned,
            "trained_parameters": len(named),
            "trained_elements": trained_elements,
            "optimizer_partition_elements": optimizer_elements,
            "learning_rates": learning_rates,
            "rewards": batch.rewards.tolist(),
            "tokens": tokens.tolist(),
            "decoded_tokens": int(batch.trajectory.turns[0].text.lengths.max()),
            "loss": float(loss.detach()),
            "first_grad_norm": first_norm,
            "iteration_loss": iteration["loss"],
            "iteration_grad_norm": iteration["grad_norm"],
            "first_ratio_text_max_dev": iteration["first_ratio_text_max_dev"],
            "first_ratio_image_max_dev": iteration["first_ratio_image_max_dev"],
            "spoiled": spoiled,
            "restored": restored,
            "restored_master": restored_master,
            "eval_reward": report.overall("pipeline", "reward"),
            "eval_tasks": report.pipeline["overall"].count,
        }
    )
)
accelerator.wait_for_everyone()
dist.destroy_process_group()  # a clean exit: gloo's threads stopped before the interpreter's
