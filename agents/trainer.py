"""The trainer: runs UniGRPO for a number of iterations and keeps a run folder.

It takes its parts as arguments, as TRL's trainers do — the policy to train, the scenario to train
on, optionally a reward that replaces the scenario's and the held-out evaluator —, and the config
(:func:`unigrpo_env.agents.parts.build_parts` makes the parts a config names, as the CLI does)::

    RUN/
      config.json          the resolved UniGRPOConfig
      metrics.jsonl        one line per iteration: rewards (overall, per category, per component),
                           losses, clip fractions, ratio statistics, regulariser, time per phase
      eval_before/ eval_after/   held-out evaluation (eval.json, grid.png) of the start and the end
      reward_curve.png     training reward per iteration, held-out reward before and after
      checkpoints/         ckpt-NNNNNN/, LATEST (the newest complete one); each checkpoint holds
                             the policy in the checkpoint layout (with peft adapters merged into the
                             weights, written shard by shard without a second copy: an ordinary
                             checkpoint, which `unigrpo eval` reads), adapters/text/ and adapters/image/
                             (each adapter as an adapter: peft's format, and diffusers' LoRA format
                             for an image model's LoRA),
                             trained_state.safetensors (what trained: adapters, or a side's every
                             weight), trainer_state.json (the iteration) and engine/ (Accelerate's
                             save_state: the optimizer, the RNG states; under FSDP also the
                             sharded model; under DeepSpeed the engine's own checkpoint)
      summary.json         held-out reward before/after (overall, per category), wall time

Checkpoints are written atomically (into a temporary folder, renamed when complete, then the
``LATEST`` pointer is replaced in one ``os.replace``), so a run killed at any moment resumes from
its last complete checkpoint with ``resume=True`` and continues exactly as if never interrupted:
every random choice of an iteration derives from (seed, iteration), and the trained weights and the
optimizer state are restored (``accelerator.load_state``), with the same number of processes.

The engine's state goes through ``accelerator.save_state`` / ``load_state``. Model weights are
never pickled: with one process or DDP the trainer's save hook leaves the model out of Accelerate's
files (it is already in the checkpoint, in safetensors) and its load hook restores it from
``trained_state.safetensors``; under FSDP Accelerate writes and reads the sharded model itself
(torch's distributed checkpoint), the trained state is gathered for ``trained_state.safetensors``,
and the merged policy is written from a CPU copy of the starting policy (``starting_policy``) with
the trained state put in. Under DeepSpeed ``engine/`` is the engine's own checkpoint
(``save_checkpoint``: the trained weights of the module and each process's optimizer partition,
fp32 master weights included, as torch pickles; the frozen weights left out); ZeRO-3's partitioned
weights are gathered for ``trained_state.safetensors`` and the merged policy written as under FSDP.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from unigrpo_env import bounded_json
from unigrpo_env.agents.adapters import adapter_state, has_adapter
from unigrpo_env.agents.config import UniGRPOConfig, migrate_saved_config
from unigrpo_env.agents.engine import Engine
from unigrpo_env.agents.evaluation import EvalReport, Evaluator
from unigrpo_env.agents.parts import load_policy
from unigrpo_env.agents.policy import UnifiedPolicy
from unigrpo_env.agents.unigrpo import RewardFailureError, UniGRPOAgent, prepare_trained_sides
from unigrpo_env.reward import RewardFunction
from unigrpo_env.scenario import Scenario

__all__ = ["Trainer", "RunFolderError", "TRAINED_STATE_FILE", "load_run_config", "trained_state"]

#: In a checkpoint: the weights that trained (adapters, or a side's every weight), for --resume.
TRAINED_STATE_FILE = "trained_state.safetensors"
#: In a checkpoint: the iteration it was written after.
TRAINER_STATE_FILE = "trainer_state.json"
#: In a checkpoint: the folder of ``accelerator.save_state`` (optimizer, RNG states; FSDP's shards).
ENGINE_STATE_DIR = "engine"


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (exists without --resume, nothing to resume...)."""


def load_run_config(out_dir: str | Path, **overrides: Any) -> UniGRPOConfig:
    """The config of the run in ``out_dir`` (its ``config.json``), with ``overrides`` (e.g. a new
    number of ``iterations``) on top: what resuming that run trains with."""
    saved = Path(out_dir) / "config.json"
    if not saved.is_file():
        raise RunFolderError(f"nothing to resume in {str(out_dir)!r}: it has no config.json")
    try:
        data = bounded_json.loads(saved.read_bytes(), what=f"{str(saved)!r}")
    except bounded_json.BoundedJSONError as exc:
        raise RunFolderError(f"cannot resume the run in {str(out_dir)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"cannot resume the run in {str(out_dir)!r}: its config.json is not a JSON object")
    return UniGRPOConfig.model_validate({**migrate_saved_config(data), **overrides})


def trained_state(policy: UnifiedPolicy, sides: list[str]) -> dict[str, torch.Tensor]:
    """What trained of ``policy``'s ``sides`` ("text", "image"): an adapted side's adapter weights,
    a side trained in full its whole state (names as in ``policy.state_dict()``).

    Under FSDP and DeepSpeed ZeRO-3 every process must call it (a partitioned weight is gathered
    whole, one at a time, in the same order everywhere); each gets the whole state."""
    state: dict[str, torch.Tensor] = {}
    for side in sides:
        part = getattr(policy, side)
        weights = adapter_state(part, keep_vars=True) if has_adapter(part) else part.state_dict(keep_vars=True)
        for name, tensor in weights.items():
            state[f"{side}.{name}"] = Engine.whole_copy(tensor)
    return state


class Trainer:
    """Run UniGRPO on ``scenario`` with ``policy`` into the run folder ``out_dir``.

    Args:
        config: the hyperparameters (its ``scenario``, ``policy`` and ``checkpoint`` fields are
            recorded in the run folder; the parts themselves are the arguments below).
        out_dir: the run folder.
        policy: the unified policy to train.
        scenario: the scenario to train on (its ``"train"`` split) and evaluate on (``config.eval_split``).
        reward: scores the episodes instead of the scenario's own reward (None: the scenario's).
        evaluator: the held-out evaluator (None: the generic :class:`Evaluator`).
        resume: continue the run in ``out_dir`` from its last checkpoint; ``config`` must be the
            run's own (:func:`load_run_config`), except for ``iterations``.
        accelerator: an ``accelerate.Accelerator`` (None: one made from the config).
        on_iteration: called with each iteration's metrics (the CLI's progress bar).
        on_status: called with a line about what the trainer is doing.
        on_eval_progress: called as ``(name, done, total)`` while a held-out evaluation runs
            (``name``: "eval_before" or "eval_after"; the CLI's progress bar).
        starting_policy: loads the starting policy again, on the CPU (None: the config's
            ``policy`` and ``checkpoint``); used only under FSDP and ZeRO-3, where the main process
            writes a checkpoint's merged policy from such a copy with the trained state put in.
    """

    def __init__(
        self,
        config: UniGRPOConfig,
        out_dir: str | Path,
        *,
        policy: UnifiedPolicy,
        scenario: Scenario,
        reward: RewardFunction | None = None,
        evaluator: Evaluator | None = None,
        resume: bool = False,
        accelerator: Accelerator | None = None,
        on_iteration: Callable[[dict[str, Any]], None] | None = None,
        on_status: Callable[[str], None] | None = None,
        on_eval_progress: Callable[[str, int, int], None] | None = None,
        starting_policy: Callable[[], UnifiedPolicy] | None = None,
    ):
        self.out = Path(out_dir)
        self.resume = resume
        self.on_iteration = on_iteration
        self.on_status = on_status or (lambda message: None)
        self.on_eval_progress = on_eval_progress
        if resume:
            saved = load_run_config(self.out, iterations=config.iterations)
            if saved != config:
                fields = sorted(k for k in UniGRPOConfig.model_fields if getattr(saved, k) != getattr(config, k))
                raise RunFolderError(
                    f"the run in {str(self.out)!r} was started with other settings ({', '.join(fields)})"
                )
        elif (self.out / "metrics.jsonl").exists():
            raise RunFolderError(
                f"{str(self.out)!r} already holds a run; pass --resume to continue it or choose another --out"
            )
        self.config = config
        self.reward = reward
        self.evaluator = evaluator if evaluator is not None else Evaluator()
        torch.manual_seed(config.seed)
        self.agent = UniGRPOAgent(policy, config, scenario=scenario, reward=reward, accelerator=accelerator)
        self.agent.scenario.check_split(config.eval_split)  # a bad split stops the run before anything is written
        self.accelerator = self.agent.accelerator
        self.is_main = self.accelerator.is_main_process
        self.starting_policy = starting_policy or partial(
            load_policy, config.policy, config.checkpoint, scenario=config.scenario
        )
        if not self.agent.engine.shards_parameters:
            # the model's weights are in the checkpoint already, in safetensors: keep them out of
            # Accelerate's files (it would write the whole policy again) and restore them ourselves
            self.accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
            self.accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())

    @property
    def trained_sides(self) -> list[str]:
        return [side for side, trains in (("text", self.agent.train_text), ("image", self.agent.train_image)) if trains]

    # -- checkpoints -----------------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write ckpt-NNNNNN atomically and point LATEST at it; keep the two newest. Every process
        calls it (the engine's state and, under FSDP, the gathering of the trained state are
        collective); the main process writes the files."""
        acc = self.accelerator
        acc.wait_for_everyone()
        final = self.checkpoints / f"ckpt-{self.agent.iteration:06d}"
        tmp = self.checkpoints / f".tmp-{self.agent.iteration:06d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / ENGINE_STATE_DIR), safe_serialization=True, **self.agent.engine.save_state_options())
        policy = acc.unwrap_model(self.agent.policy)
        trained = trained_state(policy, self.trained_sides)
        if self.is_main:
            if self.agent.engine.shards_parameters:
                self._save_merged_copy(trained, tmp)
            else:
                policy.save_pretrained(tmp)  # plain models: adapters are merged into the saved weights
            save_file(trained, str(tmp / TRAINED_STATE_FILE))
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps({"iteration": self.agent.iteration}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.checkpoints / ".LATEST.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.checkpoints / "LATEST")
            for old in sorted(self.checkpoints.glob("ckpt-*"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _write_progress(self, seconds: float) -> None:
        """``progress.json``: the run's seconds up to the checkpoint just written (``--resume``
        adds to them), written with every checkpoint and atomically (a kill during the write
        keeps the previous file)."""
        if self.is_main:
            progress = self.out / ".progress.json.tmp"
            progress.write_text(json.dumps({"seconds": seconds}))
            os.replace(progress, self.out / "progress.json")

    def _save_merged_copy(self, trained: dict[str, torch.Tensor], folder: Path) -> None:
        """Under FSDP or ZeRO-3 no process holds the policy whole: write its checkpoint layout from a
        CPU copy of the starting policy, given the same trained sides and adapters, with ``trained`` put in."""
        with self.agent.engine.loading_whole():
            copy = self.starting_policy()
        prepare_trained_sides(copy, self.config)
        missing = set(trained) - set(copy.state_dict())
        if missing:
            raise RunFolderError(
                f"the starting policy does not fit the trained state (no {sorted(missing)[:3]}); "
                "pass the Trainer a starting_policy that loads the policy it trains"
            )
        copy.load_state_dict(trained, strict=False)
        copy.save_pretrained(folder)

    def _restore(self) -> int:
        pointer = self.checkpoints / "LATEST"
        if not pointer.is_file():
            raise RunFolderError(f"nothing to resume in {str(self.out)!r}: no complete checkpoint yet")
        folder = self.checkpoints / pointer.read_text().strip()
        policy = self.accelerator.unwrap_model(self.agent.policy)
        if (folder / ENGINE_STATE_DIR).is_dir():
            # the engine's state: the optimizer (and RNG states); under FSDP the sharded model too
            self.accelerator.load_state(str(folder / ENGINE_STATE_DIR), **self.agent.engine.load_state_options())
            if not self.agent.engine.shards_parameters:
                self._load_trained_state(policy, folder)
            self.agent.iteration = int(json.loads((folder / TRAINER_STATE_FILE).read_text())["iteration"])
            return self.agent.iteration
        # a checkpoint of an earlier release: the optimizer state in a weights-only torch file
        self._load_trained_state(policy, folder)
        state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
        self.agent.optimizer.load_state_dict(state["optimizer"])
        self.agent.iteration = int(state["iteration"])
        return self.agent.iteration

    def _load_trained_state(self, policy: UnifiedPolicy, folder: Path) -> None:
        saved = load_file(str(folder / TRAINED_STATE_FILE))
        expected = set(trained_state(policy, self.trained_sides))
        if set(saved) != expected:
            missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
            raise RunFolderError(
                f"the checkpoint in {str(folder)!r} does not fit this policy (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        policy.load_state_dict(saved, strict=False)

    # -- the run ---------------------------------------------------------------------------------

    def _evaluate(self, name: str) -> EvalReport:
        c = self.config
        evaluate = partial(
            self.evaluator.evaluate,
            self.accelerator.unwrap_model(self.agent.policy),
            self.agent.scenario,
            split=c.eval_split,
            seed=c.seed,
            cfg_scale=c.eval_cfg,
            temperature=c.temperature,
            limit=c.eval_limit,
            reward=self.reward,
            reward_timeout=c.reward_timeout,
            run_probes=False,
            checkpoint=c.checkpoint,
            out_dir=self.out / name if self.is_main else None,
            progress=None if self.on_eval_progress is None else partial(self.on_eval_progress, name),
        )
        return self.agent.with_policy(evaluate)  # under FSDP, with the policy's shards gathered

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        c = self.config
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        if self.resume:
            start = self._restore()
            before = EvalReport.model_validate_json((self.out / "eval_before" / "eval.json").read_text())
            kept = [line for line in metrics_path.read_text().splitlines() if _row_before(line, start)]
            if self.is_main:  # atomically: a kill during the rewrite keeps the old file
                rewritten = metrics_path.with_name(".metrics.jsonl.tmp")
                rewritten.write_text("".join(line + "\n" for line in kept))
                os.replace(rewritten, metrics_path)
            previous_seconds = (
                json.loads((self.out / "progress.json").read_text())["seconds"]
                if (self.out / "progress.json").exists()
                else 0.0
            )
        else:
            if self.is_main:
                (self.out / "config.json").write_text(c.model_dump_json(indent=2))
            self.on_status("evaluating the starting policy on the held-out tasks")
            before = self._evaluate("eval_before")
            previous_seconds = 0.0
            self.save_checkpoint()
            self._write_progress(previous_seconds + time.perf_counter() - started)
        try:
            while self.agent.iteration < c.iterations:
                metrics = self.agent.train_iteration()
                if self.is_main:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(_jsonable(metrics)) + "\n")
                if self.on_iteration is not None:
                    self.on_iteration(metrics)
                if self.agent.iteration % c.checkpoint_every == 0 or self.agent.iteration == c.iterations:
                    self.save_checkpoint()
                    self._write_progress(previous_seconds + time.perf_counter() - started)
        except RewardFailureError:
            self.save_checkpoint()
            raise
        self.on_status("evaluating the trained policy on the held-out tasks")
        after = self._evaluate("eval_after")
        summary = {
            "scenario": c.scenario,
            "train": c.train,
            "seed": c.seed,
            "iterations": c.iterations,
            "heldout_reward_before": before.overall("pipeline", "reward"),
            "heldout_reward_after": after.overall("pipeline", "reward"),
            "heldout_correct_before": before.overall("pipeline", "correct"),
            "heldout_correct_after": after.overall("pipeline", "correct"),
            # held-out tasks whose reward could not be computed (the means above leave them out)
            "heldout_unscored_before": before.pipeline["overall"].unscored,
            "heldout_unscored_after": after.pipeline["overall"].unscored,
            "heldout_tasks": after.pipeline["overall"].count,
            **{
                f"{name}_{when}": report.metrics[name]["overall"]
                for name in before.metrics
                for when, report in (("before", before), ("after", after))
            },
            "eval_cfg": c.eval_cfg,
            "per_category": {
                category: {
                    "reward_before": before.pipeline[category].reward,
                    "reward_after": after.pipeline[category].reward,
                    "correct_before": before.pipeline[category].correct,
                    "correct_after": after.pipeline[category].correct,
                    "unscored_before": before.pipeline[category].unscored,
                    "unscored_after": after.pipeline[category].unscored,
                    "tasks": after.pipeline[category].count,
                }
                for category in before.pipeline
            },
            "wall_seconds": previous_seconds + time.perf_counter() - started,
            "processes": self.accelerator.num_processes,
        }
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            _plot_rewards(metrics_path, summary, self.out / "reward_curve.png")
        return summary


def _row_before(line: str, start: int) -> bool:
    """Whether a ``metrics.jsonl`` line is a whole row of an iteration before ``start`` (a line cut
    short by a kill in the middle of its write is dropped with the iterations after the checkpoint)."""
    try:
        return int(json.loads(line)["iteration"]) < start
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return False


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _plot_rewards(metrics_path: Path, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    iterations = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(iterations, [r.get("reward_mean") for r in rows], label="train reward (batch mean)", alpha=0.8)
    if iterations:
        ax.scatter(
            [0, iterations[-1] + 1],
            [summary["heldout_reward_before"], summary["heldout_reward_after"]],
            color="red",
            zorder=3,
            label="held-out reward (before / after)",
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.set_title(f"UniGRPO on {summary['scenario']} (train={summary['train']}, seed {summary['seed']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
