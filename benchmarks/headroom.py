"""How much a policy could gain from RL on ShapesWorld, and how fast its language model can move.

    python benchmarks/headroom.py passk --split heldout -k 8      # pass@1 against pass@k, per category
    python benchmarks/headroom.py sft --data oracle --lr 3e-4     # fine-tune on the true answers
    python benchmarks/headroom.py sft --data self --lr 3e-4       # fine-tune on its own samples
    python benchmarks/headroom.py gradsnr --batches 8             # how much of one batch's gradient is signal

* ``passk`` samples k reasonings per task (temperature 1) and draws each with the ODE sampler:
  pass@1 is what the policy scores, pass@k how often one of k tries is right — the room that
  sharpening the policy toward its own good samples has.
* ``sft`` takes Adam steps on the mean token log-likelihood of 64 training tasks' answers per step
  and evaluates the held-out description accuracy every ``--every`` steps. With ``--data oracle``
  the answers are the true ones (the best signal the text side could get: an upper bound on
  what RL learns from as many samples); with ``--data self`` they are the model's own samples,
  unfiltered. With ``--norm token`` (one mean over the batch's tokens) the expected gradient is
  zero, so whatever changes is the noise that every on-policy update also carries. With
  ``--norm sequence`` (GRPO's mean per sequence, then over sequences) it is not: a token of a
  sequence of length |y| weighs 1/|y|, and the expected gradient is that of E[1/|y|], toward
  shorter answers.
* ``gradsnr`` computes the agent's policy gradient (its own loss, on-policy, the run's config) on
  ``--batches`` independent batches of training prompts and reports, per parameter group, the mean
  cosine ρ between two batches' gradients. Each batch gradient is the shared direction plus its own
  noise, so ρ ≈ |signal|² / |gradient|²: the fraction of one batch's squared gradient that is
  signal common to other prompts (0 for pure noise). Averaging n batches raises it to
  nρ / (1 + (n − 1)ρ).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict

import numpy as np
import torch

from unigrpo_env.agents.evaluation import _scores
from unigrpo_env.agents.losses import _text_mean
from unigrpo_env.agents.rollout import RolloutSettings, rollout, turn_context
from unigrpo_env.registration import make_scenario, make_vec
from unigrpo_env.scenarios.shapes.evaluation import description_accuracy as description_hits
from unigrpo_env.scenarios.shapes.evaluation import oracle_text_writer, shapes_evaluator
from unigrpo_env.scenarios.shapes.policy import load_shapes_policy


def passk(args: argparse.Namespace) -> None:
    policy = load_shapes_policy(args.checkpoint)
    world = make_scenario("t2i_reason")
    tasks = list(world.tasks(args.split))
    if args.limit:
        tasks = [tasks[i] for i in sorted(np.random.default_rng(0).choice(len(tasks), args.limit, replace=False))]
    generator = torch.Generator().manual_seed(args.seed)
    hits: dict[str, dict[str, list]] = {"description": defaultdict(list), "correct": defaultdict(list)}
    for start in range(0, len(tasks), 32):
        chunk = tasks[start : start + 32]
        envs = make_vec(world, num_prompts=len(chunk), group_size=args.k, split=args.split)
        result = rollout(
            policy,
            envs,
            RolloutSettings(temperature=1.0, noise_level=0.0),
            seed=args.seed + start,
            options={"task_index": [t.index for t in chunk]},
            generator=generator,
        )
        described = np.array(description_hits(result, world)).reshape(len(chunk), args.k)
        correct = np.array([c for _, c in _scores(result)]).reshape(len(chunk), args.k)
        for i, task in enumerate(chunk):
            hits["description"][task.category].append(described[i])
            hits["correct"][task.category].append(correct[i])
    print(f"{args.split}, {len(tasks)} tasks, k = {args.k}, temperature 1, ODE images")
    print(f"| category | description pass@1 | description pass@{args.k} | correct pass@1 | correct pass@{args.k} |")
    print("|---|---|---|---|---|")
    for category in sorted(hits["correct"]) + ["all tasks"]:
        cells = []
        for part in ("description", "correct"):
            rows = [np.stack(v) for c, v in hits[part].items() if category in (c, "all tasks")]
            per_task = np.concatenate(rows).mean(axis=1)
            cells += [f"{per_task.mean():.3f}", f"{(per_task > 0).mean():.3f}"]
        print(f"| {category} | " + " | ".join(cells) + " |")


def sft(args: argparse.Namespace) -> None:
    policy = load_shapes_policy(args.checkpoint)
    world = make_scenario("t2i_reason")
    train = list(world.tasks("train"))
    optimizer = torch.optim.AdamW(policy.text_parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)

    evaluator = shapes_evaluator()

    def description_accuracy() -> float:
        report = evaluator.evaluate(policy, world, limit=args.eval_limit, run_probes=False, seed=args.seed)
        return report.metrics["description_accuracy"]["overall"]

    print(f"step 0: held-out description accuracy {description_accuracy():.3f}", flush=True)
    for step in range(1, args.steps + 1):
        chosen = rng.choice(len(train), args.batch, replace=False)
        envs = make_vec(world, num_prompts=args.batch, group_size=1, split="train")
        obs, _ = envs.reset(seed=step, options={"task_index": [int(train[i].index) for i in chosen]})
        context = turn_context(envs.trajectory, 0)
        if args.data == "oracle":
            answer = oracle_text_writer(context, envs)
        else:
            with torch.no_grad():
                answer = policy.text.sample(
                    context,
                    max_new_tokens=envs.text_codec.max_tokens,
                    temperature=1.0,
                    generator=torch.Generator().manual_seed(step),
                )
        policy.train()
        log_probs = policy.text.log_probs(context, answer.tokens, answer.lengths)
        mask = torch.arange(answer.tokens.shape[1])[None] < answer.lengths[:, None]
        # the text loss's own reductions: GRPO's mean per sequence, or one mean over the tokens (bnpo)
        loss = -_text_mean(log_probs, mask, None, {"sequence": "grpo", "token": "bnpo"}[args.norm])[0]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.text_parameters(), 1.0)
        optimizer.step()
        policy.eval()
        if step % args.every == 0:
            print(
                f"step {step}: loss {float(loss.detach()):.4f}, held-out description accuracy {description_accuracy():.3f}",
                flush=True,
            )


def gradsnr(args: argparse.Namespace) -> None:
    from unigrpo_env.agents.config import UniGRPOConfig
    from unigrpo_env.agents.unigrpo import UniGRPOAgent

    config = UniGRPOConfig.model_validate({**json.loads(args.config), "checkpoint": args.checkpoint, "seed": args.seed})
    agent = UniGRPOAgent(load_shapes_policy(args.checkpoint), config)
    groups = {g["name"]: g["params"] for g in agent.optimizer.param_groups}
    gradients: dict[str, list[torch.Tensor]] = {name: [] for name in groups}
    for b in range(args.batches):
        batch = agent.collect(10_000 + b)  # iterations no run reaches: prompts and noise independent of training
        index = torch.arange(len(batch))
        old = agent._old_log_probs(batch, [index])
        agent.policy.train()
        loss, _ = agent._loss(batch, index, old)
        agent.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        for name, params in groups.items():
            gradients[name].append(
                torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]).clone()
            )
    print(f"{args.batches} batches of {config.num_prompts} × {config.group_size}, config {args.config}")
    print("| group | parameters | ρ = mean pairwise cosine | min | max |")
    print("|---|---|---|---|---|")
    for name, grads in gradients.items():
        cos = [
            float(torch.nn.functional.cosine_similarity(grads[a], grads[b], dim=0))
            for a, b in itertools.combinations(range(len(grads)), 2)
        ]
        print(f"| {name} | {grads[0].numel()} | {np.mean(cos):.4f} | {min(cos):.4f} | {max(cos):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("passk", help="pass@1 against pass@k")
    p.add_argument("--split", default="heldout")
    p.add_argument("-k", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="a random subset of this many tasks")
    s = sub.add_parser("sft", help="how fast the language model moves on true answers or on its own samples")
    s.add_argument("--data", choices=["oracle", "self"], default="oracle")
    s.add_argument("--lr", type=float, default=3e-4)
    s.add_argument(
        "--norm",
        choices=["sequence", "token"],
        default="sequence",
        help="sequence: mean per sequence, then over sequences; token: mean over the batch's tokens",
    )
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--every", type=int, default=25)
    s.add_argument("--eval-limit", type=int, default=140)
    g = sub.add_parser("gradsnr", help="how much of one batch's policy gradient is signal shared with other batches")
    g.add_argument("--batches", type=int, default=8)
    g.add_argument(
        "--config", default="{}", help='UniGRPOConfig overrides as JSON, e.g. \'{"text_adapter": "ln_tuning"}\''
    )
    for q in (p, s, g):
        q.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the shipped one)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    {"passk": passk, "sft": sft, "gradsnr": gradsnr}[args.command](args)


if __name__ == "__main__":
    main()
