"""Kill soak: a short training run killed with SIGKILL inside chosen phases (or at random moments),
resumed each time, must end with the metrics and weights of an uninterrupted run.

One uninterrupted run first (``unigrpo run scenario t2i_reason --iterations 6`` on a small config:
2 prompts x 4 rollouts, 4 held-out tasks, 4 denoising steps, a checkpoint after every iteration),
through the driver ``benchmarks/_kill_at.py`` without a kill, which counts the calls of each phase.
Then ``--cycles`` times, the same run in a new folder, killed and resumed:

* ``--mode phase`` (the default): the run goes through the driver, which SIGKILLs it from inside
  the N-th call of one phase (see ``_kill_at.py``): ``rollout`` (a training rollout done, its
  result lost), ``backward`` (after ``Accelerator.backward``, before the optimizer step),
  ``checkpoint`` (``trained_state.safetensors`` written half, then the kill) or ``replace`` (the
  trainer's ``os.replace``: a checkpoint folder, the ``LATEST`` pointer or the rewritten
  ``metrics.jsonl`` written but not published). A seeded RNG gives the phases of the cycles' first
  kills each of the four once, in a seeded order (the rest drawn), and draws N among the calls
  the run makes (in a fresh run, not those of checkpoint 0, whose loss leaves nothing to resume).
  Each kill is verified: exit status -9 (SIGKILL) and the driver's marker naming the phase and N;
  after a ``checkpoint`` kill the half-written file must be on disk (a kill that does not land
  where it was aimed stops the soak with an error). The run is then resumed with
  the plain CLI's ``--resume`` until it finishes; with probability 1/2 the first resume goes
  through the driver too and is killed at a drawn phase and call (N counted from its own start).
* ``--mode time``: killed at a random moment after one of its checkpoints (a seeded choice of
  which checkpoint to wait for, then a seeded delay of up to 1.5 iterations, so the kill lands in
  a rollout, a backward pass, a checkpoint write or the final evaluation, whichever is running),
  then ``--resume`` until it finishes; the first resume is itself killed again, with probability
  1/2, after its first new checkpoint.

Each cycle's ``metrics.jsonl`` (rows without their ``time*`` keys), final weights (the tensors of
every ``*.safetensors`` file in the checkpoint folder ``checkpoints/LATEST`` names) and
``summary.json`` (without ``wall_seconds``) are compared with the uninterrupted run's.

Prints "k of 5 resumed, identical metrics: yes/no", the kills per phase and the peak resident
memory of the runs (``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the largest of the child
processes). Subprocesses run with ``OMP_NUM_THREADS=1``; exits with status 1 if any cycle differs.

Run: ``python benchmarks/kill_soak.py [--mode phase|time] [--cycles 5] [--iterations 6] [--seed 0]
[--keep DIR]``.
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

CONFIG = "num_prompts: 2\ngroup_size: 4\neval_limit: 4\ncheckpoint_every: 1\nscenario_options:\n  num_steps: 4\n"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DRIVER = Path(__file__).with_name("_kill_at.py")
PHASES = ("rollout", "backward", "checkpoint", "replace")  # as _kill_at.py names them


def cli_args(config: Path, out: Path, iterations: int, resume: bool = False) -> list[str]:
    """The ``unigrpo`` CLI's arguments of the soak's run."""
    return ["run", "scenario", "t2i_reason", "--iterations", str(iterations), "--config", str(config),
            "--out", str(out), *(["--resume"] if resume else [])]  # fmt: skip


def command(config: Path, out: Path, iterations: int, resume: bool = False) -> list[str]:
    """The plain CLI."""
    return [sys.executable, "-m", "unigrpo_env.cli.main", *cli_args(config, out, iterations, resume)]


def driver(phase: str, n: int, marker: Path, args: list[str], calls: Path | None = None) -> list[str]:
    """The CLI through ``_kill_at.py``, killed at call ``n`` of ``phase`` ("none": not killed)."""
    return [sys.executable, str(DRIVER), "--phase", phase, "--n", str(n), "--marker", str(marker),
            *(["--calls", str(calls)] if calls is not None else []), "--", *args]  # fmt: skip


def latest(out: Path) -> int:
    """The iteration of the last complete checkpoint (-1 before the first)."""
    pointer = out / "checkpoints" / "LATEST"
    try:
        return int(pointer.read_text().strip().removeprefix("ckpt-"))
    except (OSError, ValueError):
        return -1


def leftovers(out: Path) -> list[str]:
    """What a kill left unpublished: temporary folders and files of the run folder."""
    return sorted(str(p.relative_to(out)) for p in [*out.glob(".*tmp*"), *(out / "checkpoints").glob(".*tmp*")])


def start(cmd: list[str], out: Path) -> subprocess.Popen:
    """``cmd`` as a subprocess; its stderr goes to ``<out>.log`` (a file: a pipe that nobody reads
    could fill and stall the run)."""
    with open(out.with_name(out.name + ".log"), "ab") as log:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=ENV)


def log_tail(out: Path) -> str:
    return out.with_name(out.name + ".log").read_text(errors="replace")[-2000:]


def finish(proc: subprocess.Popen, out: Path, timeout: float = 600) -> None:
    if proc.wait(timeout=timeout) != 0:
        raise RuntimeError(f"the run in {out} failed (exit {proc.returncode}): {log_tail(out)}")


@dataclass
class Kill:
    what: str  # where the kill was aimed
    latest: int  # the last complete checkpoint after the kill
    left: list[str]  # temporary folders and files the kill left
    phase: str | None = None  # the phase it landed in (--mode phase)

    def __str__(self) -> str:
        left = f", left {', '.join(self.left)}" if self.left else ""
        return f"{self.what}: last complete ckpt {self.latest}{left}"


@dataclass
class Cycle:
    """One cycle: its kills, how many resumes it took, and whether it ended as the uninterrupted run."""

    kills: list[Kill] = field(default_factory=list)
    resumes: int = 0
    metrics: bool = False
    weights: bool = False
    summary: bool = False
    seconds: float = 0.0

    def compare(self, out: Path, reference: Path) -> None:
        self.metrics = rows(out) == rows(reference)
        self.weights = same_weights(weights(out), weights(reference))
        self.summary = summary(out) == summary(reference)


# -- --mode phase ----------------------------------------------------------------------------------


def draw(rng: random.Random, phase: str, calls: dict[str, int], iterations: int, remaining: int, fresh: bool) -> int:
    """A call of ``phase`` to kill at, among those a run with ``remaining`` iterations to go makes.

    ``calls`` are the uninterrupted run's counts (``iterations`` iterations, ``iterations + 1``
    checkpoints: checkpoint 0 comes before the first iteration). Rollouts and backward passes come
    with iterations; ``save_file`` and ``os.replace`` calls with checkpoints, and a fresh run's
    first checkpoint's calls are left out (killed there, it has no checkpoint to resume from). A
    resumed run's own first ``os.replace`` (of the rewritten ``metrics.jsonl``) is counted in its
    range, so its last checkpoint's last call is not."""
    per, extra = (iterations, 0) if phase in ("rollout", "backward") else (iterations + 1, 1 if fresh else 0)
    if calls[phase] % per:
        raise RuntimeError(f"{calls[phase]} {phase} calls in {iterations} iterations: not a whole number per {per}")
    each = calls[phase] // per
    return rng.randint(1 + extra * each, (remaining + extra) * each)


def kill_in(args: list[str], out: Path, phase: str, n: int, marker: Path) -> Kill:
    """Run ``args`` through the driver, killed at call ``n`` of ``phase``; verify it died there."""
    marker.unlink(missing_ok=True)
    proc = start(driver(phase, n, marker, args), out)
    code = proc.wait(timeout=600)
    if code != -signal.SIGKILL:
        raise RuntimeError(f"the kill in {phase} #{n} did not happen: exit {code} in {out}: {log_tail(out)}")
    landed = json.loads(marker.read_text())
    if (landed["phase"], landed["n"]) != (phase, n):
        raise RuntimeError(f"aimed at {phase} #{n}, the marker says {landed}")
    what = f"{phase} #{n}"
    if phase == "checkpoint":
        cut = Path(landed["file"])
        if not cut.is_file() or cut.stat().st_size != landed["written"]:
            raise RuntimeError(f"the half-written {cut} is not on disk as written")
        what += f" ({cut.relative_to(out)} cut at {landed['written']:,} of {landed['total']:,} bytes)"
    elif phase == "replace":
        what += f" ({landed['src']} -> {landed['dst']} not done)"
    if latest(out) < 0:
        raise RuntimeError(f"the kill in {phase} #{n} left no complete checkpoint to resume in {out}")
    return Kill(what, latest(out), leftovers(out), phase)


def phase_cycle(
    rng: random.Random, first: str, config: Path, out: Path, iterations: int, calls: dict[str, int], marker: Path
) -> Cycle:
    """Kill a fresh run in ``first``, then resume (the first resume killed too, with probability 1/2)."""
    result = Cycle()
    shutil.rmtree(out, ignore_errors=True)
    n = draw(rng, first, calls, iterations, iterations, fresh=True)
    result.kills.append(kill_in(cli_args(config, out, iterations), out, first, n, marker))
    kill_again = rng.random() < 0.5
    while True:
        result.resumes += 1
        restored = latest(out)
        if kill_again and restored < iterations:
            kill_again = False
            phase = rng.choice(PHASES)
            n = draw(rng, phase, calls, iterations, iterations - restored, fresh=False)
            result.kills.append(kill_in(cli_args(config, out, iterations, resume=True), out, phase, n, marker))
            continue
        finish(start(command(config, out, iterations, resume=True), out), out)
        return result


# -- --mode time -----------------------------------------------------------------------------------


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
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return Kill(f"after ckpt {after} + {delay:.2f} s", latest(out), leftovers(out))


def time_cycle(rng: random.Random, config: Path, out: Path, iterations: int, per_iteration: float) -> Cycle:
    """Kill a fresh run at a random moment, then resume (the first resume killed too, with probability 1/2)."""
    result = Cycle()
    while not result.kills:  # a run that ended before its kill is started again, with a new draw
        shutil.rmtree(out, ignore_errors=True)
        after = rng.randrange(0, iterations)  # ckpt 0 is written after the first evaluation
        delay = rng.uniform(0, 1.5 * per_iteration)
        proc = start(command(config, out, iterations), out)
        kill = kill_when(proc, out, after, delay)
        if kill is None:
            finish(proc, out)
        else:
            result.kills.append(kill)
    killed_again = False
    while True:
        result.resumes += 1
        proc = start(command(config, out, iterations, resume=True), out)
        restored = latest(out)
        if not killed_again and restored < iterations and rng.random() < 0.5:
            killed_again = True
            kill = kill_when(proc, out, restored + 1, rng.uniform(0, 1.5 * per_iteration))
            if kill is not None:
                result.kills.append(kill)
                continue
        finish(proc, out)
        return result


# -- comparison ------------------------------------------------------------------------------------


def rows(out: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith("time")}
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if line
    ]


def weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of every ``*.safetensors`` file of the last complete checkpoint, by file (its
    path in the checkpoint folder, the folder's name first)."""
    folder = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip()
    return {f"{folder.name}/{p.relative_to(folder)}": load_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def same_weights(mine: dict[str, dict[str, torch.Tensor]], theirs: dict[str, dict[str, torch.Tensor]]) -> bool:
    return mine.keys() == theirs.keys() and all(
        mine[f].keys() == theirs[f].keys() and all(torch.equal(mine[f][k], theirs[f][k]) for k in mine[f]) for f in mine
    )


def summary(out: Path) -> dict:
    data = json.loads((out / "summary.json").read_text())
    data.pop("wall_seconds", None)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("phase", "time"), default="phase",
                        help="kill inside a chosen phase (default) or at a random moment")  # fmt: skip
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="seeds the phases and calls (or moments) of the kills")
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep the run folders here (default: a temporary folder)"
    )
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill_soak_")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(CONFIG)
    print(f"kill soak ({args.mode} mode): {args.cycles} cycles of a {args.iterations}-iteration t2i_reason run, "
          f"seed {args.seed}, torch {torch.__version__}, {platform.machine()} {os.cpu_count()} cores, "
          "OMP_NUM_THREADS=1")  # fmt: skip
    began = time.perf_counter()
    results: list[Cycle] = []
    try:
        reference = work / "uninterrupted"
        shutil.rmtree(reference, ignore_errors=True)
        counted = work / "calls.json"
        finish(start(driver("none", 0, work / "unused", cli_args(config, reference, args.iterations), counted),
                     reference), reference)  # fmt: skip
        calls = json.loads(counted.read_text())
        train_seconds = json.loads((reference / "progress.json").read_text())["seconds"]
        per_iteration = train_seconds / args.iterations
        print(f"  uninterrupted run: {time.perf_counter() - began:.1f} s ({per_iteration:.2f} s an iteration; "
              f"calls: {', '.join(f'{p} {c}' for p, c in calls.items())})")  # fmt: skip
        firsts = list(PHASES)  # --mode phase: the first kills' phases, each once, then drawn
        if args.mode == "phase":  # (--mode time draws as before this mode existed)
            rng.shuffle(firsts)
            firsts += [rng.choice(PHASES) for _ in range(args.cycles - len(firsts))]
        for i in range(args.cycles):
            out = work / f"cycle-{i + 1}"
            started = time.perf_counter()
            if args.mode == "phase":
                result = phase_cycle(rng, firsts[i], config, out, args.iterations, calls, work / "killed_in.json")
            else:
                result = time_cycle(rng, config, out, args.iterations, per_iteration)
            result.compare(out, reference)
            result.seconds = time.perf_counter() - started
            results.append(result)
            yes = {True: "yes", False: "NO"}
            print(f"  cycle {i + 1}: killed {len(result.kills)}x [{'; '.join(map(str, result.kills))}], "
                  f"{result.resumes} resume(s), metrics identical: {yes[result.metrics]}, weights identical: "
                  f"{yes[result.weights]}, summary identical: {yes[result.summary]} ({result.seconds:.1f} s)")  # fmt: skip
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    resumed = sum(r.metrics for r in results)
    every = all(r.metrics and r.weights and r.summary for r in results)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    kills = [k for r in results for k in r.kills]
    if args.mode == "phase":
        per_phase = Counter(k.phase for k in kills)
        where = ", ".join(f"{p} {per_phase[p]}" for p in PHASES)
    else:
        where = f"{sum(bool(k.left) for k in kills)} leaving a checkpoint write unpublished"
    print(f"{resumed} of {len(results)} resumed, identical metrics: {'yes' if resumed == len(results) else 'no'}"
          f" (weights and summary too: {'yes' if every else 'no'}; {len(kills)} SIGKILLs: {where}); "
          f"{time.perf_counter() - began:.0f} s in all")  # fmt: skip
    print(f"peak resident memory of the runs: {peak:.0f} MiB (the largest child process)")
    raise SystemExit(0 if every else 1)


if __name__ == "__main__":
    main()
