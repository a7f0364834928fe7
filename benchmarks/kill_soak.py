"""Kill soak: a short training run killed with SIGKILL at random moments, resumed each time, must
end with the metrics of an uninterrupted run.

One uninterrupted run first (``unigrpo run scenario t2i_reason --iterations 6`` on a small config:
2 prompts x 4 rollouts, 4 held-out tasks, 4 denoising steps, a checkpoint after every iteration).
Then ``--cycles`` times: the same run in a new folder, killed with SIGKILL at a random moment after
one of its checkpoints (a seeded choice of which checkpoint to wait for, then a seeded delay of up
to 1.5 iterations, so the kill lands in a rollout, a backward pass, a checkpoint write or the final
evaluation), then ``--resume`` until it finishes — a resumed run is itself killed again, once,
with probability 1/2, after its first new checkpoint. Each cycle's ``metrics.jsonl`` (rows without
their ``time*`` keys), final weights (``trained_state.safetensors`` of the last checkpoint) and
``summary.json`` (without ``wall_seconds``) are compared with the uninterrupted run's.

Prints "k of 5 resumed, identical metrics: yes/no" and the peak resident memory of the runs
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the largest of the child processes). Subprocesses run
with ``OMP_NUM_THREADS=1``.

Run: ``python benchmarks/kill_soak.py [--cycles 5] [--iterations 6] [--seed 0] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

CONFIG = "num_prompts: 2\ngroup_size: 4\neval_limit: 4\ncheckpoint_every: 1\nscenario_options:\n  num_steps: 4\n"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(config: Path, out: Path, iterations: int, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "unigrpo_env.cli.main", "run", "scenario", "t2i_reason",
            "--iterations", str(iterations), "--config", str(config), "--out", str(out),
            *(["--resume"] if resume else [])]  # fmt: skip


def latest(out: Path) -> int:
    """The iteration of the last complete checkpoint (-1 before the first)."""
    pointer = out / "checkpoints" / "LATEST"
    try:
        return int(pointer.read_text().strip().removeprefix("ckpt-"))
    except (OSError, ValueError):
        return -1


def start(config: Path, out: Path, iterations: int, resume: bool) -> subprocess.Popen:
    """The run as a subprocess; its stderr goes to ``<out>.log`` (a file: a pipe that nobody reads
    could fill and stall the run)."""
    with open(out.with_name(out.name + ".log"), "ab") as log:
        return subprocess.Popen(
            command(config, out, iterations, resume), stdout=subprocess.DEVNULL, stderr=log, env=ENV
        )


@dataclass
class Kill:
    after: int  # the checkpoint waited for
    delay: float  # seconds after it
    latest: int  # the last complete checkpoint when the signal went
    writing: bool  # a checkpoint was being written (a .tmp-* folder existed)

    def __str__(self) -> str:
        where = ", during a checkpoint write" if self.writing else ""
        return f"after ckpt {self.after} + {self.delay:.2f} s (last complete: {self.latest}{where})"


def kill_when(proc: subprocess.Popen, out: Path, after: int, delay: float, timeout: float = 600) -> Kill | None:
    """SIGKILL ``proc`` ``delay`` seconds after checkpoint ``after`` is complete; None if it ended first."""
    deadline = time.monotonic() + timeout
    while latest(out) < after:
        if proc.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is not None:
        return None
    writing = any((out / "checkpoints").glob(".tmp-*"))
    at = latest(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return Kill(after, delay, at, writing)


def finish(proc: subprocess.Popen, out: Path, timeout: float = 600) -> None:
    if proc.wait(timeout=timeout) != 0:
        log = out.with_name(out.name + ".log").read_text(errors="replace")
        raise RuntimeError(f"the run in {out} failed (exit {proc.returncode}): {log[-2000:]}")


def rows(out: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith("time")}
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if line
    ]


def weights(out: Path) -> dict[str, torch.Tensor]:
    folder = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip()
    return load_file(str(folder / "trained_state.safetensors"))


def summary(out: Path) -> dict:
    data = json.loads((out / "summary.json").read_text())
    data.pop("wall_seconds", None)
    return data


@dataclass
class Cycle:
    kills: list[Kill] = field(default_factory=list)
    resumes: int = 0
    metrics: bool = False
    weights: bool = False
    summary: bool = False
    seconds: float = 0.0


def cycle(rng: random.Random, config: Path, out: Path, iterations: int, per_iteration: float, reference: Path) -> Cycle:
    started = time.perf_counter()
    result = Cycle()
    while not result.kills:  # a run that ended before its kill is started again, with a new draw
        shutil.rmtree(out, ignore_errors=True)
        after = rng.randrange(0, iterations)  # ckpt 0 is written after the first evaluation
        delay = rng.uniform(0, 1.5 * per_iteration)
        proc = start(config, out, iterations, resume=False)
        kill = kill_when(proc, out, after, delay)
        if kill is None:
            finish(proc, out)
        else:
            result.kills.append(kill)
    killed_again = False
    while True:
        result.resumes += 1
        proc = start(config, out, iterations, resume=True)
        restored = latest(out)
        if not killed_again and restored < iterations and rng.random() < 0.5:
            killed_again = True
            kill = kill_when(proc, out, restored + 1, rng.uniform(0, 1.5 * per_iteration))
            if kill is not None:
                result.kills.append(kill)
                continue
        finish(proc, out)
        break
    result.metrics = rows(out) == rows(reference)
    mine, theirs = weights(out), weights(reference)
    result.weights = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    result.summary = summary(out) == summary(reference)
    result.seconds = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="seeds which checkpoint to wait for and the delays")
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the run folders here (default: a temporary folder)"
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill_soak_")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(CONFIG)
    print(f"kill soak: {args.cycles} cycles of a {args.iterations}-iteration t2i_reason run, seed {args.seed}, "
          f"torch {torch.__version__}, {platform.machine()} {os.cpu_count()} cores, OMP_NUM_THREADS=1")  # fmt: skip
    try:
        reference = work / "uninterrupted"
        shutil.rmtree(reference, ignore_errors=True)
        began = time.perf_counter()
        finish(start(config, reference, args.iterations, resume=False), reference)
        train_seconds = json.loads((reference / "progress.json").read_text())["seconds"]
        per_iteration = train_seconds / args.iterations
        print(f"  uninterrupted run: {time.perf_counter() - began:.1f} s ({per_iteration:.2f} s an iteration)")
        results = []
        for i in range(args.cycles):
            result = cycle(rng, config, work / f"cycle-{i + 1}", args.iterations, per_iteration, reference)
            results.append(result)
            yes = {True: "yes", False: "NO"}
            print(f"  cycle {i + 1}: killed {len(result.kills)}x ({'; '.join(map(str, result.kills))}), "
                  f"{result.resumes} resume(s), metrics identical: {yes[result.metrics]}, weights identical: "
                  f"{yes[result.weights]}, summary identical: {yes[result.summary]} ({result.seconds:.1f} s)")  # fmt: skip
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    resumed = sum(r.metrics for r in results)
    every = all(r.metrics and r.weights and r.summary for r in results)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    kills = sum(len(r.kills) for r in results)
    writing = sum(k.writing for r in results for k in r.kills)
    print(f"{resumed} of {len(results)} resumed, identical metrics: {'yes' if resumed == len(results) else 'no'}"
          f" (weights and summary too: {'yes' if every else 'no'}; {kills} SIGKILLs, {writing} during a checkpoint write)")  # fmt: skip
    print(f"peak resident memory of the runs: {peak:.0f} MiB (the largest child process)")
    raise SystemExit(0 if every else 1)


if __name__ == "__main__":
    main()
