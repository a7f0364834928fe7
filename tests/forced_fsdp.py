"""FSDP2 through Accelerate on the CPU, for the tests and benchmarks that need it.

Accelerate 1.x turns its FSDP plugin on only for GPU-type setups: on CPU processes its state stays
``MULTI_CPU`` and the plugin is ignored, although torch's FSDP2 itself runs on the CPU with gloo.
:func:`fsdp_accelerator` makes an Accelerator with the plugin and then sets Accelerate's state to
FSDP, as Accelerate does on GPUs, so that Accelerate's own FSDP2 preparation (``fully_shard`` per
block, the optimizer remapped to the shards, FSDP checkpoints) runs here. On a GPU machine it is
the plain Accelerator with the plugin.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def fsdp_accelerator(**options) -> Accelerator:
    """An Accelerator running FSDP2 with transformer-based wrapping (the policy's own blocks)."""
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
    )
    on_cpu = not torch.cuda.is_available()
    accelerator = Accelerator(cpu=on_cpu, fsdp_plugin=plugin, **options)
    if on_cpu:
        # both shared states: every AcceleratorState() re-reads PartialState's
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator
