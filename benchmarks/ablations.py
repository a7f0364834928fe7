"""The paper's comparisons in miniature: several arms × several seeds at the same budget.

    python benchmarks/ablations.py run --jobs 2              # train every arm and seed (long: hours on 2 cores)
    python benchmarks/ablations.py table                     # mean ± std per arm from the run folders

Arms (each is ``unigrpo run scenario t2i_reason`` with the flags shown, t2i_reason's defaults
otherwise, or those of ``--config FILE`` given to every run):

    uni         (UniGRPO: both, CFG-free rollouts, velocity MSE)
    text        --train text
    image       --train image
    cfg         --rollout-cfg 2          (CFG in rollouts; compare with ``uni`` evaluated with CFG)
    reg_none    --reg none
    reg_kl      --reg kl                 (Flow-GRPO's weight 0.04)
    reg_kl36    --config examples/configs/t2i_reason_kl_matched.yaml   (latent KL at weight 36,
                                         the average strength of t2i_reason's MSE 3; this arm's
                                         file replaces a --config given to the others)

Every finished run is also evaluated with CFG 2 (``unigrpo eval --checkpoint <final> --eval-cfg 2``),
and so is the starting checkpoint once per seed, so the CFG comparison evaluates both arms with
CFG. ``--jobs 2`` runs two at a time with one torch thread each; wall times are then per run on
one thread beside another run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ARMS: dict[str, list[str]] = {
    "uni": [],
    "text": ["--train", "text"],
    "image": ["--train", "image"],
    "cfg": ["--rollout-cfg", "2"],
    "reg_none": ["--reg", "none"],
    "reg_kl": ["--reg", "kl"],
    "reg_kl36": [
        "--config",
        str(Path(__file__).resolve().parents[1] / "examples" / "configs" / "t2i_reason_kl_matched.yaml"),
    ],
}
EVAL_CFG = 2.0


def _unigrpo(*args: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run(
        [sys.executable, "-m", "unigrpo_env.cli.main", *args], check=True, env=env, stdout=subprocess.DEVNULL
    )


def _run_one(root: Path, arm: str, seed: int, iterations: int | None, config: str | None, threads: int) -> str:
    out = root / f"{arm}-seed{seed}"
    if not (out / "summary.json").exists():
        own_config = "--config" in ARMS[arm]  # such an arm's file replaces the shared one
        extra = (["--iterations", str(iterations)] if iterations else []) + (
            ["--config", config] if config and not own_config else []
        )
        resume = ["--resume"] if (out / "checkpoints").exists() else []
        _unigrpo(
            "run",
            "scenario",
            "t2i_reason",
            "--seed",
            str(seed),
            "--out",
            str(out),
            *ARMS[arm],
            *extra,
            *resume,
            threads=threads,
        )
    final = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip()  # the trainer's pointer
    if not (out / "eval_after_cfg2" / "eval.json").exists():
        _unigrpo(
            "eval",
            "scenario",
            "t2i_reason",
            "--checkpoint",
            str(final),
            "--eval-cfg",
            str(EVAL_CFG),
            "--seed",
            str(seed),
            "--out",
            str(out / "eval_after_cfg2"),
            threads=threads,
        )
    return f"{arm} seed {seed} done"


def _base_one(root: Path, seed: int, threads: int) -> str:
    out = root / f"base-seed{seed}-cfg2"
    if not (out / "eval.json").exists():
        _unigrpo(
            "eval",
            "scenario",
            "t2i_reason",
            "--eval-cfg",
            str(EVAL_CFG),
            "--seed",
            str(seed),
            "--out",
            str(out),
            threads=threads,
        )
    return f"base seed {seed} evaluated with CFG {EVAL_CFG}"


def run(args: argparse.Namespace) -> None:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    threads = 1 if args.jobs > 1 else 2
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(_base_one, root, seed, threads) for seed in args.seeds]
        futures += [
            pool.submit(_run_one, root, arm, seed, args.iterations, args.config, threads)
            for seed in args.seeds
            for arm in args.arms
        ]
        for future in futures:
            print(future.result(), flush=True)


def _metrics(path: Path, window: int = 25) -> dict[str, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    rewards = [r["reward_mean"] for r in rows]
    return {
        "train_first": float(np.nanmean(rewards[:window])),
        "train_last": float(np.nanmean(rewards[-window:])),
        "rollout_seconds": float(np.mean([r["time_rollout"] for r in rows])),
        "calls_per_image": float(np.mean([r["network_calls_per_image"] for r in rows])),
    }


def _ms(values: list[float]) -> str:
    """Mean ± sample standard deviation (the mean alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def table(args: argparse.Namespace) -> None:
    root = Path(args.root)
    print(
        "| arm | seeds | held-out reward before → after | reward gain | GenEval correct before → after | correct gain "
        "| correct, evaluated with CFG 2, before → after | description accuracy before → after | image quality before → after "
        "| train reward first → last 25 iterations | rollout s / iteration | network calls / image | minutes per run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arm in args.arms:
        rows = []
        for seed in args.seeds:
            out = root / f"{arm}-seed{seed}"
            if not (out / "summary.json").exists() or not (out / "eval_after_cfg2" / "eval.json").exists():
                continue
            summary = json.loads((out / "summary.json").read_text())
            summary["cfg2_after"] = json.loads((out / "eval_after_cfg2" / "eval.json").read_text())["pipeline"][
                "overall"
            ]["correct"]
            summary["cfg2_before"] = json.loads((root / f"base-seed{seed}-cfg2" / "eval.json").read_text())["pipeline"][
                "overall"
            ]["correct"]
            summary.update(_metrics(out / "metrics.jsonl"))
            summary["seed"] = seed
            rows.append(summary)
        if not rows:
            continue

        def ms(key: str, rows: list[dict] = rows) -> str:
            return _ms([r[key] for r in rows])

        reward_gain = _ms([r["heldout_reward_after"] - r["heldout_reward_before"] for r in rows])
        gain = _ms([r["heldout_correct_after"] - r["heldout_correct_before"] for r in rows])
        minutes = [r["wall_seconds"] / 60 for r in rows]
        print(
            f"| {arm} | {', '.join(str(r['seed']) for r in rows)} "
            f"| {ms('heldout_reward_before')} → {ms('heldout_reward_after')} | {reward_gain} "
            f"| {ms('heldout_correct_before')} → {ms('heldout_correct_after')} | {gain} "
            f"| {ms('cfg2_before')} → {ms('cfg2_after')} "
            f"| {ms('description_accuracy_before')} → {ms('description_accuracy_after')} "
            f"| {ms('image_quality_before')} → {ms('image_quality_after')} "
            f"| {ms('train_first')} → {ms('train_last')} "
            f"| {np.mean([r['rollout_seconds'] for r in rows]):.2f} | {np.mean([r['calls_per_image'] for r in rows]):.0f} "
            f"| {min(minutes):.1f}–{max(minutes):.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--root", default="runs/ablations", help="folder of the run folders")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=None, help="iterations per run (default: the config's)")
    parser.add_argument(
        "--config",
        default=None,
        help="a config file for every run (e.g. examples/configs/t2i_reason_full_training.yaml)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each with one thread when > 1)")
    args = parser.parse_args()
    run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    main()
