"""Throughput of one UniGRPO iteration with 1 and 2 processes at the same global batch.

Each setting runs under ``torchrun`` (gloo on the CPU, NCCL on GPUs): ``t2i_reason`` with the
shipped ShapesWorld checkpoint and the default config, the global batch fixed (``--prompts`` ×
``--group-size`` episodes; with P processes each rolls out ``group_size / P`` of every group), one
warm-up iteration, then ``--iterations`` measured ones. Reported: episodes per second of a whole
iteration (median), the ratio to one process, and the gradient communication per optimizer step —
the time DDP's all-reduce of its buckets takes, measured with a DDP communication hook (from the
bucket's hand-off to the reduced result; it overlaps the backward pass, so it is not all added to
the step).

With ``--fsdp`` it also runs 2 processes under FSDP2 (Accelerate's plugin; on the CPU, where
Accelerate declines it, forced as in ``tests/forced_fsdp.py``) and reports, for DDP and FSDP, the
peak memory of a process (resident memory on the CPU, allocated GPU memory on a GPU) beside the
throughput. On a GPU machine, ``--processes N`` sets how many GPUs the DDP/FSDP settings use.

Run: ``python benchmarks/scaling.py [--iterations 4] [--prompts 4] [--group-size 8] [--fsdp]
[--processes 2]``. The settings are 1 process × 1 thread, 1 process × 2 threads and
2 processes × 1 thread (this machine's two cores used by one process or split between two).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(out: Path, iterations: int, prompts: int, group_size: int, engine: str) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from unigrpo_env.agents.config import UniGRPOConfig
    from unigrpo_env.agents.unigrpo import UniGRPOAgent
    from unigrpo_env.scenarios.shapes.policy import load_shapes_policy

    if engine == "fsdp":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from forced_fsdp import fsdp_accelerator

        accelerator = fsdp_accelerator()
    else:
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    config = UniGRPOConfig(num_prompts=prompts, group_size=group_size, iterations=iterations + 1)
    agent = UniGRPOAgent(load_shapes_policy(None), config, accelerator=accelerator)
    communication: list[float] = []
    if accelerator.num_processes > 1 and engine == "ddp":

        def timed_allreduce(state, bucket):
            started = time.perf_counter()

            def done(future):
                communication.append(time.perf_counter() - started)
                return future.value()[0]

            return default_hooks.allreduce_hook(state, bucket).then(done)

        agent.training_forward.register_comm_hook(dist.group.WORLD, timed_allreduce)
    agent.train_iteration()  # warm-up
    communication.clear()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(iterations):
        accelerator.wait_for_everyone()
        started = time.perf_counter()
        agent.train_iteration()
        accelerator.wait_for_everyone()
        seconds.append(time.perf_counter() - started)
    steps = iterations * config.ppo_epochs * config.minibatches // config.gradient_accumulation_steps
    if accelerator.is_main_process:
        out.write_text(
            json.dumps(
                {
                    "engine": engine if accelerator.num_processes > 1 else "none",
                    "processes": accelerator.num_processes,
                    "threads": torch.get_num_threads(),
                    "iteration_seconds": statistics.median(seconds),
                    "episodes_per_second": prompts * group_size / statistics.median(seconds),
                    "communication_seconds_per_step": sum(communication) / steps if communication else 0.0,
                    "buckets_per_step": len(communication) / steps if communication else 0,
                    "peak_memory_mib": (
                        torch.cuda.max_memory_allocated() / 2**20
                        if torch.cuda.is_available()
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                    ),
                }
            )
        )


def run(processes: int, threads: int, args: argparse.Namespace, port: int, engine: str = "ddp") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        command += ["--master_port", str(port), __file__, "--worker", str(out)]
        command += ["--iterations", str(args.iterations), "--prompts", str(args.prompts)]
        command += ["--group-size", str(args.group_size), "--engine", engine]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--fsdp", action="store_true", help="also 2 processes under FSDP2")
    parser.add_argument("--processes", type=int, default=2, help="processes of the DDP/FSDP settings")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="ddp", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.iterations, args.prompts, args.group_size, args.engine)
    n = args.processes
    settings = [(1, 1, "ddp"), (1, 2, "ddp"), (n, 1, "ddp")] + ([(n, 1, "fsdp")] if args.fsdp else [])
    results = [run(p, t, args, 29610 + i, engine) for i, (p, t, engine) in enumerate(settings)]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {device}")
    print(f"t2i_reason, shipped ShapesWorld checkpoint, default config, global batch {args.prompts}×{args.group_size}, "
          f"median of {args.iterations} iterations")  # fmt: skip
    base = results[0]["episodes_per_second"]
    for r in results:
        comm = r["communication_seconds_per_step"]
        engine = f" {r['engine'].upper()}" if r["engine"] != "none" else ""
        print(f"  {r['processes']} process(es){engine} × {r['threads']} thread(s): {r['iteration_seconds']:.2f} s/iteration, "
              f"{r['episodes_per_second']:.1f} episodes/s ({r['episodes_per_second'] / base:.2f}× one process, one thread), "
              f"peak memory {r['peak_memory_mib']:.0f} MiB per process"
              + (f"; all-reduce {comm * 1000:.1f} ms per step in {r['buckets_per_step']:.0f} bucket(s)" if comm else ""))  # fmt: skip


if __name__ == "__main__":
    main()
