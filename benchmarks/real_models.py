"""What one UniGRPO iteration costs on real model classes: ``t2i_prompts`` with a chat model and an
SD3 pipeline with random weights (built in code, saved to a temporary folder, loaded through the
CLI's own path: ``build_parts`` of a config naming them; nothing is downloaded).

Sizes:

* ``--size tiny`` (default, the CPU): the tests' tiny Qwen2 and SD3 — the per-iteration time split
  (medians) and the process's peak resident memory;
* ``--size medium`` (a GPU): an SD3-medium-sized MMDiT (24 joint blocks of 24 heads × 64, patch 2,
  16 latent channels, 4096-wide text sequence, about 2 B parameters) and SD3's VAE at its real
  width, with a Qwen2.5-0.5B-sized chat model (24 layers, width 896), 512×512 images, in bf16
  (Accelerate's autocast over bf16 weights, the flow math in float32) — images per second of the
  rollout and of the training pass, and the peak GPU memory, with and without gradient
  checkpointing (``--gradient-checkpointing both``). The text encoders are small (one layer, at
  the widths SD3 concatenates): a prompt's embedding is computed once and cached, so their size
  does not enter the step cost. ``--layers`` overrides the MMDiT's depth (a smoke test on the CPU).

``--engine ddp`` or ``--engine fsdp`` trains through that engine (Accelerate's DDP, or its FSDP2
plugin with the networks' blocks as units); run it under ``torchrun``, e.g. one GPU with DDP
against FSDP::

    torchrun --nproc_per_node 1 benchmarks/real_models.py --size medium --engine ddp --json ddp.json
    torchrun --nproc_per_node 1 benchmarks/real_models.py --size medium --engine fsdp --json fsdp.json

(on the CPU, where Accelerate declines FSDP, ``fsdp`` is forced as in ``tests/forced_fsdp.py``).

Run: ``python benchmarks/real_models.py [--size tiny|medium] [--iterations 6] [--threads 2]
[--adapter lora] [--gradient-checkpointing off|on|both] [--engine none|ddp|fsdp]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny model builders

from test_chat_policy import chat_tokenizer  # noqa: E402
from test_sd3_policy import WORDS, _tokenizer, tiny_pipeline  # noqa: E402
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


def medium_pipeline(layers: int = 24) -> Any:
    """An SD3-medium-sized StableDiffusion3Pipeline with random weights (see the module docstring)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    # SD3 concatenates CLIP-L's and CLIP-G's hidden states (768 + 1280) and pads them to T5's 4096,
    # and their pooled projections (768 + 1280 = 2048) are the transformer's pooled input
    clip = dict(vocab_size=len(WORDS), intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                max_position_embeddings=77, bos_token_id=2, eos_token_id=3, pad_token_id=0)  # fmt: skip
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, projection_dim=768, **clip))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, projection_dim=1280, **clip))
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=4096, d_ff=64, d_kv=64, num_layers=1, num_heads=4))
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        out_channels=16, pos_embed_max_size=192,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2, norm_num_groups=32,
        sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_l, tokenizer=_tokenizer(), text_encoder_2=clip_g, tokenizer_2=_tokenizer(),
        text_encoder_3=t5, tokenizer_3=_tokenizer(),
    )  # fmt: skip


def save_medium_models(folder: Path, layers: int) -> dict[str, str]:
    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(folder / "chat")
    tokenizer.save_pretrained(folder / "chat")
    medium_pipeline(layers).save_pretrained(folder / "sd3")
    (folder / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    return {
        "text_model": str(folder / "chat"),
        "image_model": str(folder / "sd3"),
        "prompts": str(folder / "prompts.jsonl"),
    }


def measure(paths: dict[str, str], args: argparse.Namespace, checkpointing: bool) -> dict[str, Any]:
    """``args.iterations`` iterations after one warm-up: the medians of the phases, images per
    second, and the peak GPU memory (where there is a GPU)."""
    medium = args.size == "medium"
    models = {"text_model": paths["text_model"], "image_model": paths["image_model"]}
    config = UniGRPOConfig(
        scenario="t2i_prompts", num_prompts=args.prompts, group_size=args.group_size, lora_rank=4 if not medium else 32,
        text_adapter=args.adapter, image_adapter=args.adapter, iterations=args.iterations + 1,
        mixed_precision="bf16" if medium else "no", gradient_checkpointing=checkpointing,
        policy_options={**models, "max_sequence_length": 16, "dtype": "bfloat16" if medium else "float32",
                        "image_size": 512 if medium else 16, "num_steps": 10, "max_tokens": 16 if not medium else 64},
        scenario_options={"prompts": paths["prompts"], "reward": "jpeg_compressibility", "heldout_fraction": 0.2},
    )  # fmt: skip
    parts = build_parts(config)
    accelerator = None
    if args.engine == "fsdp":
        from forced_fsdp import fsdp_accelerator

        accelerator = fsdp_accelerator(mixed_precision=config.mixed_precision)
    agent = UniGRPOAgent(parts.policy, config, scenario=parts.scenario, accelerator=accelerator)
    agent.train_iteration()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows = [agent.train_iteration() for _ in range(args.iterations)]
    split = {key[5:]: statistics.median(r[key] for r in rows) for key in PHASES}
    images = config.num_prompts * config.group_size
    train_seconds = split["old_log_probs"] + split["loss_backward"] + split["optimizer"]
    result: dict[str, Any] = {
        "engine": f"{agent.accelerator.distributed_type.value} × {agent.accelerator.num_processes}",
        "is_main": agent.accelerator.is_main_process,
        "gradient_checkpointing": checkpointing,
        "split": split,
        "iteration_seconds": sum(split.values()),
        "rollout_images_per_second": images / split["rollout"],
        "training_images_per_second": images / train_seconds,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "parameters_image": sum(p.numel() for p in parts.policy.image.parameters()),
        "parameters_text": sum(p.numel() for p in parts.policy.text.parameters()),
    }
    del agent, parts
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "medium"])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapter", default="lora", choices=["full", "lora"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--gradient-checkpointing", default="off", choices=["off", "on", "both"])
    parser.add_argument("--layers", type=int, default=24, help="the medium MMDiT's depth (24: SD3 medium)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    parser.add_argument("--engine", default="none", choices=["none", "ddp", "fsdp"], help="run under torchrun")
    args = parser.parse_args()
    if args.engine != "none" and "LOCAL_RANK" not in os.environ:
        raise SystemExit(f"--engine {args.engine} runs under torchrun: torchrun --nproc_per_node N {sys.argv[0]} ...")
    torch.set_num_threads(args.threads)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_medium_models(Path(tmp), args.layers) if args.size == "medium" else save_tiny_models(Path(tmp))
        results = [measure(paths, args, checkpointing) for checkpointing in settings]
    if not results[0]["is_main"]:
        return
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {gpu}")
    shape = "512×512 images, 16×64×64 latents" if args.size == "medium" else "16×16 images, 4×8×8 latents"
    print(f"t2i_prompts, size {args.size} ({shape}, 10 steps, SDE window 3), {args.prompts}×{args.group_size} "
          f"episodes, adapters {args.adapter}; image side {results[0]['parameters_image'] / 1e6:.1f} M parameters, "
          f"text side {results[0]['parameters_text'] / 1e6:.1f} M")  # fmt: skip
    for result in results:
        total = result["iteration_seconds"]
        print(f"engine {result['engine']}, gradient checkpointing {'on' if result['gradient_checkpointing'] else 'off'}: "
              f"one iteration, median of {args.iterations}: {total:.3f} s")  # fmt: skip
        for name, seconds in result["split"].items():
            print(f"  {name:<16} {seconds:7.3f} s  {seconds / total:6.1%}")
        print(f"  images per second: rollout {result['rollout_images_per_second']:.2f}, "
              f"training {result['training_images_per_second']:.2f}")  # fmt: skip
        if result["peak_gpu_gib"] is not None:
            print(f"  peak GPU memory: {result['peak_gpu_gib']:.2f} GiB")
    print(f"peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.json is not None:
        args.json.write_text(
            json.dumps({"machine": gpu, "args": vars(args) | {"json": None}, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
