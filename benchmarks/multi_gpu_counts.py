"""The counts behind docs/multi-gpu.md's worked estimate, made on PyTorch's ``meta`` device.

The real classes (transformers' Qwen2, T5 and CLIP; diffusers' FLUX transformer and VAE; peft's
LoRA) at real sizes, with no memory and no weights: parameter counts, FLOPs of one forward pass
(``torch.utils.flop_counter``; attention excluded for the transformers, whose fused kernel the
counter does not see) and the bytes autograd saves for the backward pass (a saved-tensors hook,
each tensor counted once, parameters excluded, attention replaced by what a fused kernel keeps).

Run: ``python benchmarks/multi_gpu_counts.py`` (under a minute on a CPU). The numbers it prints
are the inputs of ``benchmarks/multi_gpu_estimate.py``.
"""

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, Qwen2Config, Qwen2ForCausalLM, T5Config, T5EncoderModel


class Fused(torch.autograd.Function):  # what a fused attention kernel keeps: q, k, v, out, logsumexp
    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], device=q.device))
        return out

    @staticmethod
    def backward(ctx, g):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors[:3])


def sdpa(query, key, value, *args, **kwargs):
    r = query.shape[-3] // key.shape[-3]
    return Fused.apply(query, key.repeat_interleave(r, -3), value.repeat_interleave(r, -3))


ORIGINAL_SDPA, F.scaled_dot_product_attention = F.scaled_dot_product_attention, sdpa


def saved_bytes(model, run):  # activations kept for backward (parameters excluded, each tensor once)
    params, seen, keep = {id(p) for p in model.parameters()}, set(), []

    def pack(t):
        base = t if t._base is None else t._base
        if id(t) not in params and id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            keep.append(base)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(t.numel() * t.element_size() for t in keep)


#: FLUX.1-dev's transformer: 19 double-stream and 38 single-stream blocks, width 3072
FLUX_DEV = dict(
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def flux(double, single, lora=False):
    f = FluxTransformer2DModel(**{**FLUX_DEV, "num_layers": double, "num_single_layers": single}).to(torch.bfloat16)
    if lora:
        f.requires_grad_(False)
        targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
        f = inject_adapter_in_model(LoraConfig(r=32, lora_alpha=64, target_modules=targets), f)
    bf = dict(dtype=torch.bfloat16)

    def run():
        return f(
            hidden_states=torch.randn(1, 4096, 64, **bf),
            timestep=torch.ones(1, **bf),
            guidance=torch.ones(1),
            pooled_projections=torch.randn(1, 768, **bf),
            encoder_hidden_states=torch.randn(1, 512, 4096, **bf),
            txt_ids=torch.zeros(512, 3),
            img_ids=torch.zeros(4096, 3),
            return_dict=False,
        )

    with FlopCounterMode(display=False) as fc:
        run()
    return sum(p.numel() for p in f.parameters()), fc.get_total_flops(), saved_bytes(f, run)


def qwen(layers, lora=False):
    q = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=layers,
            num_attention_heads=28,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        )
    )
    return q


with torch.device("meta"):
    q = qwen(28)
    print(
        "Qwen2.5-7B-sized: total",
        sum(p.numel() for p in q.parameters()),
        "decoder layers",
        sum(p.numel() for p in q.model.layers.parameters()),
    )
    for d, s in [(0, 0), (1, 0), (2, 0), (0, 1), (0, 2)]:
        n, flops, full = flux(d, s)
        lora = flux(d, s, lora=True)[2] / 1e6 if d + s else 0.0
        print(
            f"FLUX {d} double + {s} single blocks: {n} parameters, {flops / 1e12:.3f} TFLOP forward (no attention),"
            f" {full / 1e6:.1f} MB saved; with LoRA {lora:.1f} MB (4096 + 512 tokens)"
        )
    print(
        "FLUX.1-dev-sized (19 + 38 blocks):",
        sum(p.numel() for p in FluxTransformer2DModel(**FLUX_DEV).parameters()),
        "parameters",
    )
    layer = qwen(1).to(torch.bfloat16)

    def x():
        return torch.randn(1, 320, 3584, dtype=torch.bfloat16, requires_grad=True)

    rope = layer.model.rotary_emb(torch.randn(1, 320, 3584), torch.arange(320)[None])
    print(
        "Qwen layer, 320 tokens:",
        saved_bytes(layer, lambda: layer.model.layers[0](x(), position_embeddings=rope, attention_mask=None)) / 1e6,
        "MB saved",
    )
    h = torch.randn(1, 320, 3584, dtype=torch.bfloat16)
    print(
        "head + log-softmax, 256 tokens:",
        saved_bytes(layer, lambda: F.log_softmax(layer.lm_head(h)[:, 64:].float(), -1)) / 1e6,
        "MB",
    )
    layer.requires_grad_(False)
    layer = inject_adapter_in_model(
        LoraConfig(
            r=32,
            lora_alpha=64,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        layer,
    )
    print(
        "Qwen layer with LoRA:",
        saved_bytes(layer, lambda: layer.model.layers[0](x(), position_embeddings=rope, attention_mask=None)) / 1e6,
        "MB saved",
    )
    F.scaled_dot_product_attention = ORIGINAL_SDPA  # the VAE's and T5's FLOPs include their attention
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16,
        layers_per_block=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=4096,
            d_ff=10240,
            d_kv=64,
            num_layers=24,
            num_heads=64,
            feed_forward_proj="gated-gelu",
        )
    )
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        vae.decode(torch.randn(1, 16, 128, 128))
    print(
        "VAE (FLUX/SD3 layout):",
        sum(p.numel() for p in vae.parameters()),
        "parameters, decode 1024 px:",
        fc.get_total_flops() / 1e12,
        "TFLOP",
    )
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        t5(input_ids=torch.zeros(1, 512, dtype=torch.long))
    print(
        "T5-XXL encoder:",
        sum(p.numel() for p in t5.parameters()),
        "parameters, 512 tokens:",
        fc.get_total_flops() / 1e12,
        "TFLOP",
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
        )
    )
    print("CLIP-L text encoder:", sum(p.numel() for p in clip.parameters()), "parameters")

    # LoRA parameters per unit of rank: r·(in + out) of every targeted linear layer (the SDK's DEFAULT_TARGETS)
    def per_rank(model, keep):
        return sum(
            m.in_features + m.out_features
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and keep(name)
        )

    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    big_flux = FluxTransformer2DModel(**FLUX_DEV)
    print(
        "LoRA parameters per rank: LM (all-linear but the head)",
        per_rank(q, lambda n: not n.endswith("lm_head")),
        "FLUX (attention projections)",
        per_rank(big_flux, lambda n: n.split(".", 2)[-1] in targets or any(n.endswith("." + t) for t in targets)),
    )
