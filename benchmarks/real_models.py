"""What one UniGRPO iteration costs on real model classes: ``t2i_prompts`` with a chat model and an
SD3 pipeline, here the tests' tiny random ones (built in code, saved to a temporary folder, loaded
through the CLI's own path: ``build_parts`` of a config naming them).

Run: ``python benchmarks/real_models.py [--iterations 6] [--threads 2] [--adapter lora]``.
Prints the per-iteration time split (medians) and the process's peak resident memory. Only the
tiny size exists so far; a mid-size run on a GPU is future work.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny model builders

from test_chat_policy import chat_tokenizer  # noqa: E402
from test_sd3_policy import tiny_pipeline  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from unigrpo_env.agents import UniGRPOAgent, UniGRPOConfig, build_parts  # noqa: E402

PHASES = ["time_rollout", "time_reward", "time_old_log_probs", "time_loss_backward", "time_optimizer"]
PROMPTS = ["draw a red circle", "draw a blue square", "draw a green circle", "draw a red square", "draw a blue circle"]


def save_tiny_models(folder: Path) -> dict[str, str]:
    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(folder / "chat")
    tokenizer.save_pretrained(folder / "chat")
    tiny_pipeline().save_pretrained(folder / "sd3")
    (folder / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    return {
        "text_model": str(folder / "chat"),
        "image_model": str(folder / "sd3"),
        "prompts": str(folder / "prompts.jsonl"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapter", default="lora", choices=["full", "lora"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_tiny_models(Path(tmp))
        models = {"text_model": paths["text_model"], "image_model": paths["image_model"]}
        config = UniGRPOConfig(
            scenario="t2i_prompts", num_prompts=4, group_size=4, lora_rank=4, text_adapter=args.adapter,
            image_adapter=args.adapter, iterations=args.iterations + 1, policy_options={**models, "max_sequence_length": 16},
            scenario_options={**models, "prompts": paths["prompts"], "reward": "jpeg_compressibility", "image_size": 16,
                              "num_steps": 10, "max_tokens": 16, "heldout_fraction": 0.2},
        )  # fmt: skip
        parts = build_parts(config)
        agent = UniGRPOAgent(parts.policy, config, scenario=parts.scenario)
        agent.train_iteration()  # warm-up
        rows = [agent.train_iteration() for _ in range(args.iterations)]
    split = {key[5:]: statistics.median(r[key] for r in rows) for key in PHASES}
    total = sum(split.values())
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, no GPU")
    print(f"t2i_prompts on the tests' tiny Qwen2 + SD3 (16×16 images, 4×8×8 latents, 10 steps, SDE window 3), "
          f"{config.num_prompts}×{config.group_size} episodes, adapters {args.adapter}")  # fmt: skip
    print(f"one iteration, median of {args.iterations}: {total:.3f} s")
    for name, seconds in split.items():
        print(f"  {name:<16} {seconds:7.3f} s  {seconds / total:6.1%}")
    print(f"peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
