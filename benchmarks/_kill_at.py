"""Run the ``unigrpo`` CLI with a SIGKILL planted inside one phase of training (the kill soak's driver).

The wrappers are installed from outside the product code, by monkeypatching module attributes
before the CLI's entry (``unigrpo_env.cli.main.main``) runs; nothing in the package changes. Each
wrapper counts its calls, and at the ``--n``-th call of the ``--phase`` it writes the marker file
(``--marker``: one JSON line, ``{"phase": ..., "n": ..., ...}``) and sends SIGKILL to its own
process, so the run dies exactly there and its exit status is -9:

* ``rollout`` — ``unigrpo_env.agents.unigrpo.rollout``, the training rollout as the agent calls
  it (held-out evaluation imports its own name and is not counted): the call runs to the end and
  the process dies before returning its result, so the rollout's work is done and lost;
* ``backward`` — ``accelerate.Accelerator.backward``: the backward pass runs, the process dies
  before the optimizer step;
* ``checkpoint`` — ``unigrpo_env.agents.trainer.save_file`` (safetensors' writer, which writes a
  checkpoint's ``trained_state.safetensors``): the first half of the bytes it would write is put
  at the target path, then the process dies — a checkpoint write cut in the middle;
* ``replace`` — ``os.replace`` as the trainer module calls it (``unigrpo_env.agents.trainer.os``
  becomes a proxy of ``os`` whose ``replace`` is wrapped): the process dies before the rename, so
  a completely written checkpoint folder (or ``LATEST`` pointer, or rewritten ``metrics.jsonl``)
  is never published;
* ``none`` — no kill: the run only counts the calls (``--calls``), which the soak uses to choose
  ``--n`` within range.

``--calls PATH`` writes the per-phase call counts as JSON when the run ends (not when killed).

Run: ``python benchmarks/_kill_at.py --phase PHASE --n N --marker PATH [--calls PATH] -- ARGS``,
where ``ARGS`` are the ``unigrpo`` CLI's (e.g. ``run scenario t2i_reason --iterations 6 ...``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

PHASES = ("rollout", "backward", "checkpoint", "replace")


class _Plan:
    """Counts the calls of each phase and kills the process at call ``n`` of ``phase``."""

    def __init__(self, phase: str, n: int, marker: Path):
        self.phase, self.n, self.marker = phase, n, marker
        self.calls: Counter[str] = Counter()

    def due(self, phase: str) -> bool:
        """Count one call of ``phase``; whether it is the one to kill in."""
        self.calls[phase] += 1
        return phase == self.phase and self.calls[phase] == self.n

    def kill(self, **detail: Any) -> None:
        """Write the marker, then SIGKILL this process (no cleanup, no exit handlers run)."""
        self.marker.write_text(json.dumps({"phase": self.phase, "n": self.n, **detail}) + "\n")
        os.kill(os.getpid(), signal.SIGKILL)


class _OsWithKillingReplace:
    """``os`` for the trainer module: every attribute is the real one's, except ``replace``."""

    def __init__(self, plan: _Plan):
        self._plan = plan

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def replace(self, src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if self._plan.due("replace"):
            self._plan.kill(src=Path(src).name, dst=Path(dst).name)
        return os.replace(src, dst, *args, **kwargs)


def install(plan: _Plan) -> None:
    """Wrap the four phases' functions (module attributes, patched in place)."""
    import accelerate
    from safetensors.torch import save

    import unigrpo_env.agents.trainer as trainer
    import unigrpo_env.agents.unigrpo as agent

    real_rollout = agent.rollout

    @functools.wraps(real_rollout)
    def rollout(*args: Any, **kwargs: Any) -> Any:
        due = plan.due("rollout")
        result = real_rollout(*args, **kwargs)
        if due:
            plan.kill(episodes=len(result.trajectory.rewards))
        return result

    agent.rollout = rollout

    real_backward = accelerate.Accelerator.backward

    @functools.wraps(real_backward)
    def backward(self: accelerate.Accelerator, loss: Any, **kwargs: Any) -> Any:
        result = real_backward(self, loss, **kwargs)
        if plan.due("backward"):
            plan.kill(loss=float(loss.detach()))
        return result

    accelerate.Accelerator.backward = backward

    real_save_file = trainer.save_file

    @functools.wraps(real_save_file)
    def save_file(tensors: dict, filename: str | os.PathLike, metadata: dict | None = None) -> None:
        if plan.due("checkpoint"):
            data = save(tensors, metadata=metadata)  # the bytes save_file would write
            Path(filename).write_bytes(data[: len(data) // 2])
            plan.kill(file=str(Path(filename).resolve()), written=len(data) // 2, total=len(data))
        return real_save_file(tensors, filename, metadata=metadata)

    trainer.save_file = save_file
    trainer.os = _OsWithKillingReplace(plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=(*PHASES, "none"), required=True)
    parser.add_argument("--n", type=int, default=1, help="kill at this call of the phase (1: the first)")
    parser.add_argument("--marker", type=Path, required=True, help="written just before the kill")
    parser.add_argument("--calls", type=Path, default=None, help="write the call counts here when the run ends")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the unigrpo CLI's arguments")
    args = parser.parse_args()
    cli_args = args.cli[1:] if args.cli[:1] == ["--"] else args.cli
    plan = _Plan(args.phase, args.n, args.marker)
    install(plan)
    from unigrpo_env.cli.main import main as unigrpo

    try:
        unigrpo(cli_args)
    finally:
        if args.calls is not None:
            args.calls.write_text(json.dumps({phase: plan.calls[phase] for phase in PHASES}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
