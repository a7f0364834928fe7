#!/usr/bin/env bash
# The device check of the engines issue, as one short run on one GPU: the medium random models of
# benchmarks/real_models.py (an SD3-medium-sized MMDiT and a Qwen2.5-0.5B-sized chat model, bf16,
# 512 px, LoRA on both sides, gradient checkpointing on), one process under DDP and then under
# FSDP2: seconds per iteration, its split, and the peak GPU memory of each. Writes ddp.json,
# fsdp.json and what each printed (ddp.txt, fsdp.txt) into ${OUT:-.}.
#
# A GPU machine without diffusers, gymnasium or pydantic: download their wheels here first (see the
# device notes) and install them there before this script, e.g. with PYTHONPATH=/tmp/site.
#
#   SIZE=tiny bash benchmarks/gpu_engines.sh    # a smoke test on the CPU (minutes)
#   OUT=$OUT bash benchmarks/gpu_engines.sh      # on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
size=${SIZE:-medium}
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
for engine in ddp fsdp; do
    "$python" -m torch.distributed.run --nproc_per_node 1 --master_port 29630 benchmarks/real_models.py \
        --size "$size" --engine "$engine" --iterations 3 --gradient-checkpointing on --adapter lora \
        --json "$out/$engine.json" 2>&1 | grep -v "Warning" | tee "$out/$engine.txt"
done
