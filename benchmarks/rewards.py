"""Images per second of each registered reward model, on models with random weights built in code
and saved to a temporary folder, loaded through the rewards' own path (``get_reward`` with a
``checkpoint`` folder; nothing is downloaded).

Rewards: ``clip_score``, ``pickscore``, ``aesthetic``, ``vlm_judge``, ``geneval_detector``, and
``jpeg_compressibility`` as the baseline without a model. Each scores one batch of ``--batch``
smooth random ``--image-size``² images whose tasks cycle through GenEval's six categories
("a photo of a dog", "a photo of two umbrellas", ... with GenEval's ``include`` metadata, so the
judge asks 1–3 questions per image, 53 for a batch of 32, and the detector queries 1–2 classes):
``--warmup`` untimed calls (default 2), then ``--repeats`` timed calls (default 10); reported are
the median seconds per call and ``batch / median`` images per second. Each reward runs with its
own default ``batch_size`` (episodes, or for the judge (image, question) pairs, per model call)
unless ``--chunk`` is given; the cached models are dropped between rewards.

Service overhead: ``jpeg_compressibility`` in process against the same reward through the reward
service — ``unigrpo serve reward jpeg_compressibility --port P`` started as a subprocess on
127.0.0.1 (``OMP_NUM_THREADS`` = ``--threads``; on a small machine it shares the client's cores),
scored with :class:`~unigrpo_env.rewards.remote.RemoteReward` once ``/health`` answers — on the
same batch, at ``--image-size`` and at each of ``--service-sizes`` (default 512): median seconds
per call both ways (warm-up and repeats as above), their ratio and difference, and the request's
size. Only the no-model reward is served, as ``unigrpo serve reward`` builds a reward with its
default options (a hub checkpoint) and takes none; what the service adds per call (encoding,
HTTP on loopback, decoding) does not depend on the reward. Needs the ``serve`` extra; ``--no-service`` skips it.

Sizes:

* ``--size tiny`` (default, the CPU): the tests' tiny models (``tests/tiny_reward_models.py``):
  a 2-layer CLIP of width 32 on 32×32 inputs, a LLaVA of a 2-layer CLIP tower on 16×16 and a
  2-layer Llama, a 1-layer OWLv2 on 32×32; 64×64 images; float32.
* ``--size real`` (a GPU): the architectures at the default checkpoints' sizes, random weights —
  CLIP ViT-L/14 (``openai/clip-vit-large-patch14``: clip_score, aesthetic, the detector's colours),
  CLIP ViT-H/14 (PickScore's), OWLv2 base/16 at 960×960 (``google/owlv2-base-patch16-ensemble``);
  the judge's default, Qwen2.5-VL-7B, is replaced by a LLaVA-1.5-style model with a CLIP
  ViT-L/14-336 tower (576 image tokens) and a Qwen2.5-0.5B-sized Llama (24 layers, width 896);
  512×512 images; each reward's default dtype on a GPU (the judge bfloat16, the others float32),
  float32 on the CPU. The tokenizers are the tiny models' word-level ones (the prompts' lengths,
  not the vocabulary, set the text cost). ``--rewards`` picks some (a smoke test on the CPU).

Run: ``python benchmarks/rewards.py [--size tiny|real] [--rewards NAME ...] [--batch 32]
[--image-size 64] [--warmup 2] [--repeats 10] [--threads 2] [--chunk N] [--service-sizes 512 ...]
[--no-service] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' tiny model builders

import tiny_reward_models as tiny  # noqa: E402

from unigrpo_env import RewardInputs, Task  # noqa: E402
from unigrpo_env.rewards import get_reward  # noqa: E402

REWARDS = ["jpeg_compressibility", "clip_score", "pickscore", "aesthetic", "vlm_judge", "geneval_detector"]

# GenEval-format tasks, one per category (the judge's questions and the detector's queries
# are derived from ``include``).
TASKS = [
    Task(prompts=("a photo of a dog",), meta={"tag": "single_object", "include": [{"class": "dog", "count": 1}]}),
    Task(
        prompts=("a photo of a cat and an elephant",),
        meta={"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "elephant", "count": 1}]},
    ),
    Task(
        prompts=("a photo of two umbrellas",), meta={"tag": "counting", "include": [{"class": "umbrella", "count": 2}]}
    ),
    Task(
        prompts=("a photo of a pink umbrella",),
        meta={"tag": "colors", "include": [{"class": "umbrella", "count": 1, "color": "pink"}]},
    ),
    Task(
        prompts=("a photo of a wine glass right of a boat",),
        meta={
            "tag": "position",
            "include": [
                {"class": "boat", "count": 1},
                {"class": "wine glass", "count": 1, "position": ["right of", 0]},
            ],
        },
    ),
    Task(
        prompts=("a photo of an orange umbrella and a red sandwich",),
        meta={
            "tag": "color_attr",
            "include": [
                {"class": "umbrella", "count": 1, "color": "orange"},
                {"class": "sandwich", "count": 1, "color": "red"},
            ],
        },
    ),
]


def batch_inputs(n: int, size: int, seed: int = 0) -> RewardInputs:
    """``n`` smooth random ``size``² images (a coarse random grid, upsampled, plus noise) with
    the tasks of :data:`TASKS` in turn."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g) * 255
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    images = (smooth + 8 * torch.randn(smooth.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    tasks = [TASKS[i % len(TASKS)] for i in range(n)]
    return RewardInputs(
        images=images.permute(0, 2, 3, 1).contiguous(),
        tasks=tasks,
        texts=[[""] for _ in tasks],
        earlier_images=torch.zeros((n, 0, size, size, 3), dtype=torch.uint8),
    )


# --- the models ------------------------------------------------------------------------------


def save_tiny(name: str, root: Path) -> dict[str, Any]:
    """The reward options of ``name`` on the tests' tiny models, saved under ``root``."""
    if name in ("clip_score", "pickscore", "aesthetic"):
        if not (root / "clip").exists():
            tiny.save_tiny_clip(root)
            tiny.save_tiny_aesthetic_head(root / "head.safetensors")
        options: dict[str, Any] = {"checkpoint": str(root / "clip")}
        if name == "pickscore":
            options["processor"] = str(root / "processor")
        if name == "aesthetic":
            options["head"] = str(root / "head.safetensors")
        return options
    if name == "vlm_judge":
        return {"checkpoint": tiny.save_tiny_llava(root / "llava")}
    if name == "geneval_detector":
        return {
            "checkpoint": tiny.save_tiny_owl(root / "owlv2"),
            "clip_checkpoint": tiny.save_tiny_colour_clip(root / "colour_clip"),
        }
    return {}


# Real-sized configurations (the checkpoints' config.json values).
CLIP_L14 = dict(
    text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
    vision=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14),
    projection_dim=768,
    hidden_act="quick_gelu",
)
CLIP_H14 = dict(
    text=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24),
    vision=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32, patch_size=14),
    projection_dim=1024,
    hidden_act="gelu",
)
CLIP_VOCAB = 49408


def save_real_clip(folder: Path, arch: dict[str, Any], image_size: int = 224) -> str:
    """A CLIPModel of ``arch`` (:data:`CLIP_L14` or :data:`CLIP_H14`) on ``image_size``² inputs,
    random weights, with a processor resizing and cropping to it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    act = arch["hidden_act"]
    text = dict(arch["text"], vocab_size=CLIP_VOCAB, max_position_embeddings=77, hidden_act=act,
                bos_token_id=2, eos_token_id=3, pad_token_id=0)  # fmt: skip
    vision = dict(arch["vision"], image_size=image_size, hidden_act=act)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch["projection_dim"])
    ).save_pretrained(folder)
    crop = {"height": image_size, "width": image_size}
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=crop),
        tokenizer=tiny.detector_tokenizer(),
    ).save_pretrained(folder)
    return str(folder)


def save_real_owlv2(folder: Path) -> str:
    """An OWLv2 base/16 (960×960 inputs: 3600 boxes) with random weights, its heads tamed as the
    tiny one's (:func:`tiny_reward_models.save_tiny_owl`)."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    torch.manual_seed(0)
    text = dict(vocab_size=CLIP_VOCAB, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                num_hidden_layers=12, max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=0)  # fmt: skip
    vision = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  image_size=960, patch_size=16)  # fmt: skip
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=512))
    with torch.no_grad():
        for head, scale in ((model.box_head, tiny.BOX_HEAD_SCALE), (model.class_head, 0.05)):
            for p in head.parameters():
                p.mul_(scale)
    model.save_pretrained(folder)
    Owlv2Processor(
        image_processor=Owlv2ImageProcessorPil(size={"height": 960, "width": 960}), tokenizer=tiny.detector_tokenizer()
    ).save_pretrained(folder)
    return str(folder)


def save_real_llava(folder: Path) -> str:
    """A LLaVA-1.5-style judge with random weights: a CLIP ViT-L/14-336 tower (576 image tokens,
    features of the second-to-last layer) and a Qwen2.5-0.5B-sized Llama (24 layers, width 896,
    14 heads, 2 key-value heads, vocabulary 151936), with the tiny LLaVA's tokenizer and template."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tiny.vlm_tokenizer()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tiny.VLM_TEMPLATE,
    )
    text = dict(model_type="llama", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
    vision = dict(CLIP_L14["vision"], model_type="clip_vision_model", image_size=336, projection_dim=768,
                  hidden_act="quick_gelu")  # fmt: skip
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.get_vocab()["<image>"],
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def save_real(name: str, root: Path) -> dict[str, Any]:
    """The reward options of ``name`` on real-sized random models, saved under ``root``."""
    if name in ("clip_score", "aesthetic", "geneval_detector") and not (root / "clip_l14").exists():
        save_real_clip(root / "clip_l14", CLIP_L14)
    if name in ("clip_score", "aesthetic"):
        options: dict[str, Any] = {"checkpoint": str(root / "clip_l14")}
        if name == "aesthetic":
            options["head"] = tiny.save_tiny_aesthetic_head(root / "head.safetensors", input_size=768)
        return options
    if name == "pickscore":
        folder = save_real_clip(root / "clip_h14", CLIP_H14)
        return {"checkpoint": folder, "processor": folder}  # the default processor is a hub id
    if name == "vlm_judge":
        return {"checkpoint": save_real_llava(root / "llava")}
    if name == "geneval_detector":
        return {"checkpoint": save_real_owlv2(root / "owlv2"), "clip_checkpoint": str(root / "clip_l14")}
    return {}


# --- measuring -------------------------------------------------------------------------------


def parameters(reward: Any) -> int:
    """The parameters of the models a reward holds (its model, the detector's CLIP, the head)."""
    modules = [getattr(reward, key, None) for key in ("model", "clip_model", "head")]
    return sum(p.numel() for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters())


def timed_calls(reward: Any, inputs: RewardInputs, warmup: int, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``reward(inputs)`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        reward(inputs)
    seconds = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        reward(inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds


def free_models() -> None:
    """Drop the cached models, so that one reward's models are not resident while the next runs."""
    from unigrpo_env.rewards.aesthetic import _load_head
    from unigrpo_env.rewards.clip_score import load_clip
    from unigrpo_env.rewards.hf_models import load_model

    for cache in (load_clip, load_model, _load_head):
        cache.cache_clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(name: str, options: dict[str, Any], inputs: RewardInputs, args: argparse.Namespace) -> dict[str, Any]:
    if name != "jpeg_compressibility":
        options = dict(options, device=args.device)
        if args.dtype != "default":
            options["dtype"] = args.dtype
        elif not torch.cuda.is_available() or (args.device or "").startswith("cpu"):
            options["dtype"] = "float32"  # the judge's default bfloat16 is slow on a CPU
        if args.chunk is not None:
            options["batch_size"] = args.chunk
    reward = get_reward(name, **options)
    seconds = timed_calls(reward, inputs, args.warmup, args.repeats)
    median = statistics.median(seconds)
    result = {
        "reward": name,
        "parameters": parameters(reward),
        "dtype": getattr(reward, "dtype", "–"),
        "batch_size": getattr(reward, "batch_size", None),
        "seconds": seconds,
        "median_seconds": median,
        "images_per_second": len(inputs) / median,
    }
    del reward
    free_models()
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_service(name: str, threads: int, log: Any, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """``unigrpo serve reward NAME`` on a free port of 127.0.0.1, once its ``/health`` answers."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "unigrpo_env.cli.main", "serve", "reward", name, "--port", str(port)]
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{' '.join(command[2:])} exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_service(server)
    raise RuntimeError(f"the reward service at {url} did not answer /health within {timeout:.0f} s")


def stop_service(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)


def measure_service(args: argparse.Namespace, sizes: list[int]) -> list[dict[str, Any]]:
    """``jpeg_compressibility`` in process and through the service, on the same batch per size."""
    from unigrpo_env.rewards.remote import RemoteReward
    from unigrpo_env.rewards.wire import encode_request

    name = "jpeg_compressibility"
    local = get_reward(name)
    rows = []
    with tempfile.TemporaryFile() as log:
        server, url = start_service(name, args.threads, log)
        remote = RemoteReward(url)
        try:
            for size in sizes:
                inputs = batch_inputs(args.batch, size)
                if not torch.equal(remote(inputs).scores, local(inputs).scores):
                    raise RuntimeError("the service's scores differ from the reward's in process")
                in_process = statistics.median(timed_calls(local, inputs, args.warmup, args.repeats))
                served = statistics.median(timed_calls(remote, inputs, args.warmup, args.repeats))
                rows.append({
                    "reward": name, "image_size": size, "request_bytes": len(encode_request(inputs)),
                    "in_process_seconds": in_process, "service_seconds": served, "ratio": served / in_process,
                })  # fmt: skip
        finally:
            remote.close()
            stop_service(server)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "real"])
    parser.add_argument("--rewards", nargs="+", default=REWARDS, choices=REWARDS)
    parser.add_argument("--batch", type=int, default=32, help="images per reward call")
    parser.add_argument("--image-size", type=int, default=None, help="image side (default: 64 tiny, 512 real)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None, help="the rewards' device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="default", choices=["default", "float32", "bfloat16", "float16"])
    parser.add_argument("--chunk", type=int, default=None, help="every reward's batch_size (default: its own)")
    parser.add_argument("--service-sizes", type=int, nargs="*", default=[512], help="more image sides for the service")
    parser.add_argument("--no-service", action="store_true", help="skip the service overhead")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image_size = args.image_size or (64 if args.size == "tiny" else 512)
    inputs = batch_inputs(args.batch, image_size)
    questions = sum(
        len(t.meta["include"]) + sum(bool(c.get("position")) for c in t.meta["include"]) for t in inputs.tasks
    )

    import transformers

    transformers.logging.set_verbosity_error()  # the PIL image processors' torchvision notice
    transformers.logging.disable_progress_bar()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {gpu}"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rewards:
            save = save_tiny if args.size == "tiny" else save_real
            options = save(name, Path(tmp))
            results.append(measure(name, options, inputs, args))
            print(f"  {name}: {results[-1]['median_seconds']:.4f} s per call", file=sys.stderr, flush=True)
    service: list[dict[str, Any]] = []
    if not args.no_service:
        service = measure_service(args, list(dict.fromkeys([image_size, *args.service_sizes])))

    print(f"machine: {machine}")
    print(f"size {args.size}: a batch of {args.batch} images of {image_size}×{image_size} ({questions} judge questions), "
          f"median of {args.repeats} calls after {args.warmup} warm-up calls")  # fmt: skip
    print(f"| {'reward':<20} | parameters | dtype    | batch_size | s per call | images/s |")
    print(f"|{'-' * 22}|-----------:|----------|-----------:|-----------:|---------:|")
    for r in results:
        params = f"{r['parameters'] / 1e6:.2f} M" if r["parameters"] else "–"
        chunk = r["batch_size"] if r["batch_size"] is not None else "–"
        print(f"| {r['reward']:<20} | {params:>10} | {r['dtype']:<8} | {chunk:>10} | {r['median_seconds']:>10.4f} | "
              f"{r['images_per_second']:>8.1f} |")  # fmt: skip
    if service:
        print(f"service overhead: {service[0]['reward']}, a batch of {args.batch}, in process against "
              "RemoteReward → unigrpo serve reward on 127.0.0.1")  # fmt: skip
        print("| images    | request  | in process, s | service, s | ratio | added, ms |")
        print("|-----------|---------:|--------------:|-----------:|------:|----------:|")
        for r in service:
            size = f"{r['image_size']}×{r['image_size']}"
            added = 1000 * (r["service_seconds"] - r["in_process_seconds"])
            print(f"| {size:<9} | {r['request_bytes'] / 1e6:5.2f} MB | {r['in_process_seconds']:>13.4f} | "
                  f"{r['service_seconds']:>10.4f} | {r['ratio']:>5.2f} | {added:>9.1f} |")  # fmt: skip
    if args.json is not None:
        record = {"machine": machine, "args": vars(args) | {"json": None}, "image_size": image_size, "results": results,
                  "service": service}  # fmt: skip
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
