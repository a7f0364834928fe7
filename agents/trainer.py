"""The trainer: runs UniGRPO for a number of iterations and keeps a run folder.

    RUN/
      config.json          the resolved UniGRPOConfig
      metrics.jsonl        one line per iteration: rewards (overall, per category, per component),
                           losses, clip fractions, ratio statistics, regulariser, time per phase
      eval_before/ eval_after/   held-out evaluation (eval.json, grid.png) of the start and the end
      reward_curve.png     training reward per iteration, held-out reward before and after
      checkpoints/         ckpt-NNNNNN/ (policy in the checkpoint layout + trainer state), LATEST;
                           with peft adapters the policy is saved merged, and adapters.safetensors
                           holds the adapter weights that --resume restores
      summary.json         held-out reward before/after (overall, per category), wall time

Checkpoints are written atomically (into a temporary folder, renamed when complete, then the
``LATEST`` pointer is replaced in one ``os.replace``), so a run killed at any moment resumes from
its last complete checkpoint with ``resume=True`` and continues exactly as if never interrupted:
every random choice of an iteration derives from (seed, iteration), and the model and optimizer
states are restored.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from unigrpo_env.agents.adapters import adapter_state, has_adapter, load_adapter_state
from unigrpo_env.agents.config import UniGRPOConfig
from unigrpo_env.agents.evaluation import EvalReport, evaluate
from unigrpo_env.agents.shapes_policy import load_shapes_policy
from unigrpo_env.agents.unigrpo import RewardFailureError, UniGRPOAgent

__all__ = ["Trainer", "RunFolderError", "ADAPTER_FILE"]

#: In a checkpoint of a run with adapters: the adapter weights (the models beside it are merged).
ADAPTER_FILE = "adapters.safetensors"


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (exists without --resume, nothing to resume...)."""


class Trainer:
    """Run UniGRPO with ``config`` into the run folder ``out_dir``.

    Args:
        config: the hyperparameters.
        out_dir: the run folder.
        resume: continue the run in ``out_dir`` from its last checkpoint.
        on_iteration: called with each iteration's metrics (the CLI's progress bar).
    """

    def __init__(
        self,
        config: UniGRPOConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        on_iteration: Callable[[dict[str, Any]], None] | None = None,
        on_status: Callable[[str], None] | None = None,
    ):
        self.out = Path(out_dir)
        self.resume = resume
        self.on_iteration = on_iteration
        self.on_status = on_status or (lambda message: None)
        if resume:
            saved = self.out / "config.json"
            if not saved.is_file():
                raise RunFolderError(f"nothing to resume in {str(self.out)!r}: it has no config.json")
            config = UniGRPOConfig.model_validate({**_migrated(json.loads(saved.read_text())), "steps": config.steps})
        elif (self.out / "metrics.jsonl").exists():
            raise RunFolderError(f"{str(self.out)!r} already holds a run; pass --resume to continue it or choose another --out")
        self.config = config
        torch.manual_seed(config.seed)
        policy = load_shapes_policy(config.checkpoint)
        self.agent = UniGRPOAgent(policy, config)
        self.accelerator = self.agent.accelerator
        self.is_main = self.accelerator.is_main_process

    # -- checkpoints -----------------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Write ckpt-NNNNNN atomically and point LATEST at it; keep the two newest."""
        self.accelerator.wait_for_everyone()
        final = self.checkpoints / f"ckpt-{self.agent.iteration:06d}"
        if self.is_main:
            tmp = self.checkpoints / f".tmp-{self.agent.iteration:06d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            policy = self.accelerator.unwrap_model(self.agent.policy)
            policy.save_pretrained(tmp)  # plain models: adapters are merged into the saved weights
            adapters = adapter_state(policy)
            if adapters:  # and the adapters themselves, for --resume
                save_file(adapters, str(tmp / ADAPTER_FILE))
            torch.save(
                {"iteration": self.agent.iteration, "optimizer": self.agent.optimizer.state_dict()},
                tmp / "trainer_state.pt",
            )
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.checkpoints / ".LATEST.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.checkpoints / "LATEST")
            for old in sorted(self.checkpoints.glob("ckpt-*"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def _restore(self) -> int:
        pointer = self.checkpoints / "LATEST"
        if not pointer.is_file():
            raise RunFolderError(f"nothing to resume in {str(self.out)!r}: no complete checkpoint yet")
        folder = self.checkpoints / pointer.read_text().strip()
        policy = self.agent.policy
        full = [name for name in ("text", "image") if not has_adapter(getattr(policy, name))]
        if len(full) < 2:  # an adapted side's base weights are the starting checkpoint's (frozen): only its adapter trained
            load_adapter_state(policy, load_file(str(folder / ADAPTER_FILE)))
        if full:  # a side trained in full: its saved weights (the saved models are read only then)
            saved = load_shapes_policy(folder)
            for name in full:
                getattr(policy, name).load_state_dict(getattr(saved, name).state_dict())
        state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
        self.agent.optimizer.load_state_dict(state["optimizer"])
        self.agent.iteration = int(state["iteration"])
        return self.agent.iteration

    # -- the run ---------------------------------------------------------------------------------

    def _evaluate(self, name: str) -> EvalReport:
        c = self.config
        policy = self.accelerator.unwrap_model(self.agent.policy)
        report = evaluate(
            policy,
            c.scenario,
            split=c.eval_split,
            seed=c.seed,
            cfg_scale=c.eval_cfg,
            temperature=c.temperature,
            limit=c.eval_limit,
            image_given_truth=False,
            scenario_options=c.scenario_options,
            out_dir=self.out / name if self.is_main else None,
        )
        return report

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        c = self.config
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        if self.resume:
            start = self._restore()
            before = EvalReport.model_validate_json((self.out / "eval_before" / "eval.json").read_text())
            kept = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["iteration"] < start]
            if self.is_main:
                metrics_path.write_text("".join(line + "\n" for line in kept))
            previous_seconds = json.loads((self.out / "progress.json").read_text())["seconds"] if (self.out / "progress.json").exists() else 0.0
        else:
            if self.is_main:
                (self.out / "config.json").write_text(c.model_dump_json(indent=2))
            self.on_status("evaluating the starting policy on the held-out tasks")
            before = self._evaluate("eval_before")
            self.save_checkpoint()
            previous_seconds = 0.0
        try:
            while self.agent.iteration < c.steps:
                metrics = self.agent.step()
                if self.is_main:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(_jsonable(metrics)) + "\n")
                if self.on_iteration is not None:
                    self.on_iteration(metrics)
                if self.agent.iteration % c.checkpoint_every == 0 or self.agent.iteration == c.steps:
                    self.save_checkpoint()
                    if self.is_main:
                        (self.out / "progress.json").write_text(
                            json.dumps({"seconds": previous_seconds + time.perf_counter() - started})
                        )
        except RewardFailureError:
            self.save_checkpoint()
            raise
        self.on_status("evaluating the trained policy on the held-out tasks")
        after = self._evaluate("eval_after")
        summary = {
            "scenario": c.scenario,
            "train": c.train,
            "seed": c.seed,
            "steps": c.steps,
            "heldout_reward_before": before.overall("pipeline", "reward"),
            "heldout_reward_after": after.overall("pipeline", "reward"),
            "heldout_correct_before": before.overall("pipeline", "correct"),
            "heldout_correct_after": after.overall("pipeline", "correct"),
            "description_accuracy_before": before.description_accuracy["overall"],
            "description_accuracy_after": after.description_accuracy["overall"],
            "image_quality_before": before.image_quality.get("overall", float("nan")),
            "image_quality_after": after.image_quality.get("overall", float("nan")),
            "eval_cfg": c.eval_cfg,
            "per_category": {
                category: {
                    "reward_before": before.pipeline[category].reward,
                    "reward_after": after.pipeline[category].reward,
                    "correct_before": before.pipeline[category].correct,
                    "correct_after": after.pipeline[category].correct,
                }
                for category in before.pipeline
            },
            "wall_seconds": previous_seconds + time.perf_counter() - started,
        }
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            _plot_rewards(metrics_path, summary, self.out / "reward_curve.png")
        return summary


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
        ax.scatter([0, iterations[-1] + 1], [summary["heldout_reward_before"], summary["heldout_reward_after"]],
                   color="red", zorder=3, label="held-out reward (before / after)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.set_title(f"UniGRPO on {summary['scenario']} (train={summary['train']}, seed {summary['seed']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _migrated(saved: dict) -> dict:
    """A run folder's ``config.json`` from an older release, in today's fields: the shared
    ``regularizer_weight`` (None = the regulariser's default) became that regulariser's own weight."""
    saved = dict(saved)
    if "regularizer_weight" in saved:
        weight = saved.pop("regularizer_weight")
        field = {"mse": "mse_weight", "kl": "kl_weight"}.get(saved.get("regularizer", "mse"))
        if weight is not None and field is not None:
            saved[field] = weight
    return saved
