"""The ``unigrpo`` command (Typer).

    unigrpo run scenario t2i_reason [--config FILE] [--iterations N] [--seed S] [--out DIR] [--resume]
                                    [--train both|text|image] [--reg mse|kl|none] [--advantage trajectory|turn|batch]
                                    [--rollout-cfg SCALE] [--eval-cfg SCALE]
                                    [--text-adapter full|lora|ln_tuning] [--image-adapter full|lora|ln_tuning]
                                    [--reward "shapes_verifier:1.0,quality:0.2"]
    unigrpo list scenarios|rewards|policies|evaluators|pretrainers
    unigrpo init scenario NAME [--dir DIR]
    unigrpo pretrain shapes --out DIR [--seed S]
    unigrpo eval scenario t2i_reason [--checkpoint DIR] [--eval-cfg SCALE] [--seed S] [--out DIR]
    unigrpo serve reward NAME [--host 127.0.0.1] [--port 8000] [--token-file F] [--max-batch N] [--max-body-mb M]

Scenario, reward, policy and evaluator names may also be ``module:Name`` references, and installed
plugins (entry-point groups ``unigrpo.scenarios``, ``unigrpo.rewards``, ``unigrpo.policies``,
``unigrpo.evaluators``) are found by name.
Bad arguments, unknown scenarios and unreadable checkpoints print one line
(``unigrpo: error: ...``) and exit with code 2, without a traceback.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from unigrpo_env.cli.serve import serve_app
from unigrpo_env.cli.usage import MAX_SEED, UserError, console, finite

app = typer.Typer(
    name="unigrpo",
    help="Gymnasium environments and UniGRPO for RL of interleaved text-and-image generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(serve_app, name="serve")  # the reward service: cli/serve.py


@app.callback()
def _root() -> None:
    """Gymnasium environments and UniGRPO for RL of interleaved text-and-image generation."""


class Listable(str, Enum):
    scenarios = "scenarios"
    rewards = "rewards"
    policies = "policies"
    evaluators = "evaluators"
    pretrainers = "pretrainers"


@app.command("list")
def list_(
    what: Listable = typer.Argument(..., help="What to list: scenarios, rewards, policies, evaluators or pretrainers."),
) -> None:
    """List the registered scenarios, rewards, policies, evaluators or pretrainers: built-in,
    registered in code, and installed plugins (entry points), each loaded to show whether it works;
    a broken one shows its error."""
    from unigrpo_env.agents.parts import EVALUATORS, POLICIES, PRETRAINERS
    from unigrpo_env.registration import REWARDS, SCENARIOS
    from unigrpo_env.registration import gym_ids as registered_gym_ids

    registries = {
        "scenarios": SCENARIOS,
        "rewards": REWARDS,
        "policies": POLICIES,
        "evaluators": EVALUATORS,
        "pretrainers": PRETRAINERS,
    }
    registry = registries[what.value]
    gym_ids = {name: env_id for env_id, name in registered_gym_ids().items()} if what is Listable.scenarios else {}
    table = Table(title=f"registered {what.value}")
    table.add_column("name")
    if what is Listable.scenarios:
        table.add_column("gymnasium id")
    table.add_column("from")
    table.add_column("status", overflow="fold")
    for name in registry.names():
        try:
            registry.get(name)
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - a broken entry is listed with its error
            status = f"[red]error: {escape(' '.join(str(exc).split()))}[/red]"
        row = [name, gym_ids.get(name, "")] if what is Listable.scenarios else [name]
        table.add_row(*row, registry.origin(name), status)
    console.print(table)
    for problem in registry.problems():
        console.print(f"[yellow]warning:[/yellow] {escape(problem)}")


class Runnable(str, Enum):
    scenario = "scenario"


class TrainWhat(str, Enum):
    both = "both"
    text = "text"
    image = "image"


class Adapter(str, Enum):
    full = "full"
    lora = "lora"
    ln_tuning = "ln_tuning"


class Precision(str, Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class Regularizer(str, Enum):
    mse = "mse"
    kl = "kl"
    none = "none"


class Advantage(str, Enum):
    trajectory = "trajectory"
    turn = "turn"
    batch = "batch"


@app.command()
def run(
    kind: Runnable = typer.Argument(..., help="What to run: 'scenario'."),
    name: str = typer.Argument(..., help="The scenario to train on, e.g. t2i_reason."),
    config: Path | None = typer.Option(
        None, "--config", help="A YAML or JSON file of UniGRPOConfig options; flags override it."
    ),
    iterations: int | None = typer.Option(
        None, "--iterations", min=1, help="Training iterations (one rollout of a batch and its update each)."
    ),
    old_steps: int | None = typer.Option(None, "--steps", hidden=True, help="Renamed --iterations."),
    seed: int | None = typer.Option(None, "--seed", min=0, max=MAX_SEED, help="Seed of prompts, sampling and updates."),
    out: Path | None = typer.Option(
        None, "--out", file_okay=False, help="Run folder (default: runs/<scenario>-<time>)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    train: TrainWhat | None = typer.Option(
        None, "--train", help="both (UniGRPO), text (TextGRPO only) or image (FlowGRPO only)."
    ),
    reg: Regularizer | None = typer.Option(
        None, "--reg", help="Regulariser: mse (velocity MSE), kl (latent KL) or none."
    ),
    advantage: Advantage | None = typer.Option(
        None,
        "--advantage",
        help="How turn rewards enter the advantages: trajectory (per group, shared by every turn), turn "
        "(return-to-go per group and turn) or batch (return-to-go over the batch).",
    ),
    rollout_cfg: float | None = typer.Option(
        None, "--rollout-cfg", min=1.0, callback=finite, help="CFG scale in rollouts (1 = CFG-free)."
    ),
    eval_cfg: float | None = typer.Option(
        None,
        "--eval-cfg",
        min=1.0,
        callback=finite,
        help="CFG scale of the held-out evaluations before and after (1 = none).",
    ),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Starting checkpoint (default: the policy's own, e.g. ShapesWorld's shipped one)."
    ),
    policy: str | None = typer.Option(
        None, "--policy", help="The policy kind to train (default: the scenario's; see `unigrpo list policies`)."
    ),
    text_adapter: Adapter | None = typer.Option(
        None,
        "--text-adapter",
        help="Train the language model's every weight (full), LoRA adapters (lora) or its norm layers (ln_tuning), with peft.",
    ),
    image_adapter: Adapter | None = typer.Option(
        None,
        "--image-adapter",
        help="Train the image model's every weight (full), LoRA adapters (lora) or its adaLN modulations (ln_tuning), with peft.",
    ),
    reward: str | None = typer.Option(
        None,
        "--reward",
        help="The training reward: a reward name or a weighted sum such as 'shapes_verifier:1.0,quality:0.2' "
        "(sets the scenario option 'reward'; each term is logged separately).",
    ),
    text_model: str | None = typer.Option(
        None,
        "--text-model",
        help="A chat model's folder or hub id (the policy kind hf: its tokenizer is the world's text codec).",
    ),
    image_model: str | None = typer.Option(
        None,
        "--image-model",
        help="A diffusers SD3 / FLUX / FLUX Kontext pipeline's folder or hub id (the policy kind hf: its VAE and "
        "scheduler are the world's image codec and time grid).",
    ),
    image_size: int | None = typer.Option(
        None,
        "--image-size",
        min=1,
        help="The images' side in pixels (the policy option image_size; default: the pipeline's own).",
    ),
    prompts: Path | None = typer.Option(
        None, "--prompts", help="The prompt file of t2i_prompts or the dialogue file of edit_prompts (text or JSONL)."
    ),
    mixed_precision: Precision | None = typer.Option(None, "--mixed-precision", help="Accelerate's mixed precision."),
    gradient_checkpointing: bool | None = typer.Option(
        None,
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute the trained networks' activations in the backward pass (less memory).",
    ),
) -> None:
    """Train a policy with UniGRPO on a scenario; writes a run folder and prints a before/after table."""
    import time as _time

    from pydantic import ValidationError
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from unigrpo_env.agents.config import RENAMED, UniGRPOConfig
    from unigrpo_env.agents.parts import build_parts
    from unigrpo_env.agents.trainer import Trainer, load_run_config

    if old_steps is not None:
        raise UserError("--" + RENAMED["steps"].replace("renamed ", "renamed --"))
    overrides: dict = {}
    for key, value in {
        "iterations": iterations,
        "seed": seed,
        "rollout_cfg": rollout_cfg,
        "eval_cfg": eval_cfg,
        "policy": policy,
    }.items():
        if value is not None:
            overrides[key] = value
    if train is not None:
        overrides["train"] = train.value
    if reg is not None:
        overrides["regularizer"] = reg.value
    if advantage is not None:
        overrides["advantage"] = advantage.value
    for key, adapter in {"text_adapter": text_adapter, "image_adapter": image_adapter}.items():
        if adapter is not None:
            overrides[key] = adapter.value
    if checkpoint is not None:
        overrides["checkpoint"] = str(checkpoint)
    if resume and out is None:
        raise UserError("--resume needs --out, the run folder to continue")
    try:
        if resume:  # the run's own settings; only its length may change
            settings = load_run_config(out, **({"iterations": iterations} if iterations is not None else {}))
        else:
            settings = UniGRPOConfig.for_scenario(name, config, **overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserError(f"invalid config: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from exc
    if reward is not None and not resume:
        from unigrpo_env.rewards import RewardSpecError, parse_reward_spec

        try:
            parse_reward_spec(reward)
        except RewardSpecError as exc:
            raise UserError(f"--reward: {exc}") from exc
        settings.scenario_options = {**settings.scenario_options, "reward": reward}
    if not resume:
        models = {"text_model": text_model, "image_model": image_model, "image_size": image_size}
        models = {k: v for k, v in models.items() if v is not None}
        if models:  # the models and their world are the policy's
            settings.policy_options = {**settings.policy_options, **models}
        if prompts is not None:  # the tasks are the scenario's
            settings.scenario_options = {**settings.scenario_options, "prompts": str(prompts)}
        if mixed_precision is not None:
            settings.mixed_precision = mixed_precision.value
        if gradient_checkpointing is not None:
            settings.gradient_checkpointing = gradient_checkpointing
    _check_scenario(settings.scenario, settings.scenario_options)
    out = out or Path("runs") / f"{name}-{_time.strftime('%Y%m%d-%H%M%S')}"
    parts = build_parts(settings)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("reward {task.fields[reward]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    task = bar.add_task(
        "UniGRPO" if settings.train == "both" else f"{settings.train}-only GRPO",
        total=settings.iterations,
        reward="  -  ",
    )

    def on_iteration(metrics: dict) -> None:
        bar.update(
            task, completed=int(metrics["iteration"]) + 1, reward=f"{metrics.get('reward_mean', float('nan')):.3f}"
        )

    evaluations: dict[str, Any] = {}

    def on_eval_progress(name: str, done: int, total: int) -> None:
        if name not in evaluations:
            label = "held-out, before" if name == "eval_before" else "held-out, after"
            evaluations[name] = bar.add_task(label, total=total, reward="  -  ")
        bar.update(evaluations[name], completed=done)

    trainer = Trainer(
        settings,
        out,
        policy=parts.policy,
        scenario=parts.scenario,
        evaluator=parts.evaluator,
        resume=resume,
        on_iteration=on_iteration,
        on_status=lambda m: bar.console.print(f"[dim]{m}[/dim]") if not bar.disable else None,
        on_eval_progress=on_eval_progress,
    )
    main_process = trainer.accelerator.is_main_process
    bar.disable = not main_process  # several processes: one progress display and one table, the main's
    bar.update(task, completed=trainer.agent.iteration)
    with bar:
        try:
            summary = trainer.run()
        finally:  # several processes: the process group destroyed before the interpreter exits
            if trainer.accelerator.num_processes > 1:
                trainer.accelerator.end_training()
    if not main_process:
        return
    table = Table(
        title=f"held-out reward, before → after ({settings.iterations} iterations, train={settings.train}, seed {settings.seed})"
    )
    for column in ("category", "reward before", "reward after", "correct before", "correct after"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for category, row in summary["per_category"].items():
        table.add_row(
            category,
            _reward_cell(row["reward_before"], row.get("unscored_before", 0), row.get("tasks", 0)),
            _reward_cell(row["reward_after"], row.get("unscored_after", 0), row.get("tasks", 0)),
            _share(row["correct_before"]),
            _share(row["correct_after"]),
            style="bold" if category == "overall" else None,
        )
    console.print(table)
    for when in ("before", "after"):
        unscored = summary.get(f"heldout_unscored_{when}", 0)
        if unscored:
            console.print(
                f"[bold red]warning:[/bold red] the reward failed for {unscored} of {summary['heldout_tasks']} "
                f"held-out tasks {when} training; the means are over the others"
            )
    console.print(f"run folder: {out} ({summary['wall_seconds'] / 60:.1f} min)")


def _check_scenario(name: str, options: dict) -> None:
    """Build the scenario once, so that a bad name, option or reward is reported in one line
    (exit code 2) before anything is loaded or written."""
    from unigrpo_env.registration import RegistryError, make_scenario

    try:
        make_scenario(name, **options)
    except RegistryError:
        raise
    except (ValueError, TypeError) as exc:
        raise UserError(f"scenario {name!r}: {exc}") from exc


class Initable(str, Enum):
    scenario = "scenario"


@app.command()
def init(
    kind: Initable = typer.Argument(..., help="What to create: 'scenario' (a plugin package)."),
    name: str = typer.Argument(..., help="The new scenario's name, e.g. my_edit (lower-case letters, digits, _)."),
    directory: Path | None = typer.Option(
        None, "--dir", help="Folder to write the package to (default: ./unigrpo-<name>); must be new or empty."
    ),
) -> None:
    """Write an installable scenario plugin package: pyproject.toml with the entry points, a
    scenario and a reward, a test and a README. Install it with pip and it shows in
    `unigrpo list scenarios` and trains with `unigrpo run scenario NAME`."""
    from unigrpo_env.cli.scaffold import ScaffoldError, check_scenario_name, write_scenario_package
    from unigrpo_env.registration import REWARDS, SCENARIOS

    try:
        check_scenario_name(name)
        for registry, taken in ((SCENARIOS, name), (REWARDS, f"{name}_reward")):
            if taken in registry:
                raise ScaffoldError(
                    f"a {registry.kind} named {taken!r} is already registered ({registry.origin(taken)}); choose another name"
                )
        root, files = write_scenario_package(name, directory)
    except ScaffoldError as exc:
        raise UserError(str(exc)) from exc
    console.print(f"wrote the plugin package for scenario [bold]{name}[/bold] to {root}:")
    for path in files:
        console.print(f"  {path.relative_to(root)}")
    console.print("next:")
    for step in (
        f"pip install -e {root}",
        "unigrpo list scenarios",
        f"pytest {root}",
        f"unigrpo run scenario {name} --iterations 2",
    ):
        console.print(f"  {step}")


class Evaluable(str, Enum):
    scenario = "scenario"


@app.command()
def pretrain(
    world: str = typer.Argument(
        ..., help="What to pretrain, a registered pretrainer: 'shapes' (ShapesWorld's language and image models)."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        file_okay=False,
        help="Folder to write the checkpoint to (for shapes: language_model/, flow_model/, pretrain.json).",
    ),
    seed: int = typer.Option(
        0,
        "--seed",
        min=0,
        max=MAX_SEED,
        help="Seed of data, initialisation and batches (the shipped checkpoint uses 0).",
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Torch CPU threads (default: torch's choice)."),
    evaluate_after: bool = typer.Option(
        True, "--eval/--no-eval", help="Evaluate the new checkpoint on the held-out tasks afterwards."
    ),
) -> None:
    """Train a world's base models from scratch, deterministically, on the CPU."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from unigrpo_env.agents.parts import PRETRAINERS

    pretrainer = PRETRAINERS.get(world)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(part: str, step: int, total: int, loss: float) -> None:
            if part not in tasks:
                tasks[part] = bar.add_task(part, total=total, loss=float("nan"))
            bar.update(tasks[part], completed=step, loss=loss)

        summary = pretrainer()(out, seed=seed, num_threads=threads, progress=progress)
    console.print(f"checkpoint written to {out} in {summary['wall_seconds'] / 60:.1f} min")
    if evaluate_after:
        _evaluate_and_print(
            pretrainer.evaluate_on,
            checkpoint=out,
            policy=pretrainer.policy,
            cfg=1.0,
            seed=0,
            out=out / "eval",
            split="heldout",
            temperature=1.0,
            limit=None,
        )


@app.command("eval")
def eval_(
    kind: Evaluable = typer.Argument(..., help="What to evaluate: 'scenario'."),
    name: str = typer.Argument(..., help="The scenario, e.g. t2i_reason."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Checkpoint folder (default: the policy's own, e.g. ShapesWorld's shipped one)."
    ),
    policy: str | None = typer.Option(
        None, "--policy", help="The policy kind (default: the scenario's; see `unigrpo list policies`)."
    ),
    eval_cfg: float = typer.Option(
        1.0,
        "--eval-cfg",
        min=1.0,
        callback=finite,
        help="Classifier-free guidance scale of the image model (1 = none), as in unigrpo run.",
    ),
    old_cfg: str | None = typer.Option(None, "--cfg", hidden=True, help="Renamed --eval-cfg."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Seed of the text sampling and the initial noise."),
    out: Path | None = typer.Option(None, "--out", file_okay=False, help="Folder for eval.json and grid.png."),
    split: str = typer.Option("heldout", "--split", help="Task split to evaluate."),
    temperature: float = typer.Option(
        1.0, "--temperature", min=0.0, callback=finite, help="Text sampling temperature (0 = greedy)."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Evaluate only the first N tasks."),
    reward: str | None = typer.Option(
        None, "--reward", help="The reward to score with (sets the scenario option 'reward')."
    ),
    text_model: str | None = typer.Option(
        None, "--text-model", help="A chat model's folder or hub id (the policy kind hf)."
    ),
    image_model: str | None = typer.Option(
        None, "--image-model", help="A diffusers pipeline's folder or hub id (the policy kind hf)."
    ),
    prompts: Path | None = typer.Option(
        None, "--prompts", help="The prompt or dialogue file of t2i_prompts or edit_prompts."
    ),
    image_size: int | None = typer.Option(
        None,
        "--image-size",
        min=1,
        help="The images' side in pixels (the policy option image_size; default: the pipeline's own).",
    ),
) -> None:
    """Score a policy on a scenario's held-out tasks: a GenEval-style table per category."""
    if old_cfg is not None:
        raise UserError("--cfg was renamed --eval-cfg (the evaluation's guidance scale, as in unigrpo run)")
    models = {"text_model": text_model, "image_model": image_model, "image_size": image_size}
    models = {k: v for k, v in models.items() if v is not None}
    given = {"prompts": str(prompts) if prompts else None, "reward": reward}
    scenario_options = {k: v for k, v in given.items() if v is not None}
    _evaluate_and_print(
        name,
        checkpoint=checkpoint,
        policy=policy,
        cfg=eval_cfg,
        seed=seed,
        out=out,
        split=split,
        temperature=temperature,
        limit=limit,
        scenario_options=scenario_options,
        policy_options=models,
    )


def _evaluate_and_print(
    name: str,
    *,
    checkpoint,
    policy,
    cfg: float,
    seed: int,
    out,
    split: str,
    temperature: float,
    limit,
    scenario_options: dict | None = None,
    policy_options: dict | None = None,
) -> None:
    from unigrpo_env.agents.parts import build_evaluator, load_policy
    from unigrpo_env.agents.policy import check_policy_fits
    from unigrpo_env.registration import make_scenario

    _check_scenario(name, scenario_options or {})  # unknown or broken scenario -> one line, exit code 2
    scenario = make_scenario(name, **(scenario_options or {}))
    scenario.check_split(split)  # before the policy loads
    evaluator = build_evaluator(None, scenario=name)
    checkpoint_path = None if checkpoint is None else str(checkpoint)
    loaded = load_policy(policy, checkpoint_path, scenario=name, **(policy_options or {}))
    check_policy_fits(loaded, scenario)  # before the progress display starts: one line, exit code 2
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task(f"evaluating {split}", total=None)
        report = evaluator.evaluate(
            loaded,
            scenario,
            split=split,
            cfg_scale=cfg,
            seed=seed,
            temperature=temperature,
            limit=limit,
            checkpoint=None if checkpoint is None else str(checkpoint),
            out_dir=out,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    table = Table(title=f"{name} · {split} · cfg {cfg} · temperature {temperature} · seed {seed}")
    columns = ["category", "tasks", "pipeline correct", "pipeline reward"]
    columns += [f"{report.labels.get(probe, probe)} correct" for probe in report.probes]
    columns += [report.labels.get(metric, metric) for metric in report.metrics]
    for column in columns:
        table.add_column(column, justify="right" if column != "category" else "left")
    for category, scores in report.pipeline.items():
        row = [
            category,
            str(scores.count),
            _share(scores.correct),
            _reward_cell(scores.reward, scores.unscored, scores.count),
        ]
        row += [_share(probe[category].correct) for probe in report.probes.values()]
        row += [_share(metric.get(category, float("nan"))) for metric in report.metrics.values()]
        table.add_row(*row, style="bold" if category == "overall" else None)
    console.print(table)
    console.print(f"{report.seconds:.0f} s" + (f"; eval.json and grid.png in {out}" if out else ""))


def _reward_cell(value: float, unscored: int, count: int) -> str:
    """A mean reward, and how many of the tasks it leaves out because their reward failed."""
    shown = _share(value)
    return f"{shown} ({count - unscored} of {count} scored)" if unscored else shown


def _share(value: float) -> str:
    """A table cell: the value, or "–" where the scenario has no such measure (NaN: a reward without
    a notion of "correct", such as a reward model's score)."""
    return "–" if value != value else f"{value:.3f}"


#: The longest error line printed: a message that quotes a value (a config's YAML alias bomb
#: expands to megabytes) is cut there, saying by how much.
MAX_ERROR_CHARS = 1000


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; usage errors print one line (``unigrpo: error: ...``, at most
    :data:`MAX_ERROR_CHARS` characters) and exit with code 2."""
    from unigrpo_env.agents.adapters import AdapterError
    from unigrpo_env.agents.checkpointing import GradientCheckpointingError
    from unigrpo_env.agents.config import ConfigError
    from unigrpo_env.agents.policy import CheckpointError, PolicyMismatchError
    from unigrpo_env.agents.trainer import RunFolderError
    from unigrpo_env.agents.unigrpo import RewardFailureError
    from unigrpo_env.bounded_json import shorten
    from unigrpo_env.errors import TaskSplitError
    from unigrpo_env.registration import RegistryError

    _quiet_libraries()
    try:
        code = app(args=argv, standalone_mode=False)
    except (
        UserError,
        CheckpointError,
        RegistryError,
        ConfigError,
        RunFolderError,
        RewardFailureError,
        AdapterError,
        GradientCheckpointingError,
        TaskSplitError,
        PolicyMismatchError,
    ) as exc:
        typer.echo(f"unigrpo: error: {shorten(str(exc), MAX_ERROR_CHARS)}", err=True)
        raise SystemExit(2) from None
    except _ABORT_TYPES:
        raise SystemExit(130) from None
    except _USAGE_ERROR_TYPES as exc:  # bad command, option or value
        typer.echo(f"unigrpo: error: {shorten(exc.format_message(), MAX_ERROR_CHARS)}", err=True)
        raise SystemExit(2) from None
    raise SystemExit(code if isinstance(code, int) else 0)


def _quiet_libraries() -> None:
    """Our own progress bars only: silence the loading/saving bars and notices of HF libraries."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _exception_types(name: str) -> tuple[type[BaseException], ...]:
    """Click's exception ``name`` from the click Typer runs on (Typer may vendor its own copy)."""
    found = {c for c in typer.BadParameter.__mro__ if c.__name__ == name}
    try:
        import click

        found.add(getattr(click.exceptions, name))
    except ImportError:
        pass
    if not found:  # Abort is not in BadParameter's ancestry: look beside it
        module = __import__(typer.BadParameter.__module__, fromlist=[name])
        found.add(getattr(module, name))
    return tuple(found)


_USAGE_ERROR_TYPES = _exception_types("ClickException")
_ABORT_TYPES = _exception_types("Abort")


if __name__ == "__main__":
    main()
