"""The arithmetic of docs/multi-gpu.md: every memory and time estimate on that page.

From the counts of ``benchmarks/multi_gpu_counts.py`` and the assumptions below (the machine, the
recipe's open numbers), it prints the page's two tables: memory per GPU and time per iteration
for a Bagel-sized and a FLUX-12B + 7B LM policy, full training or LoRA, DDP or FSDP2, on 8 and 64
GPUs. Nothing here is measured; change an assumption and the tables follow.

Run: ``python benchmarks/multi_gpu_estimate.py``.
"""

G = 1e9
# -- the machine (assumed: H100 SXM 80 GB) --
PEAK, MFU = 989e12, 0.40  # dense bf16 FLOP/s, assumed utilisation
FLOPS = PEAK * MFU  # 396 TFLOP/s
HBM, HBM_EFF = 3.35e12, 0.5  # B/s, assumed fraction reached by the decode loop
NVLINK, IB = 450e9, 50e9  # B/s per GPU: within a node, across nodes
USABLE = 75 * G  # of 80 GB, leaving ~5 GB to the CUDA context and the allocator
# -- the recipe (DESIGN.md: UniGRPO Table 3) and what it leaves open (assumed) --
STEPS, WINDOW, EPOCHS = 25, 3, 2  # denoising steps per rollout, trained (SDE) steps per image, PPO epochs
EPISODES = 384  # 16 prompts x 24 (8 GPUs) or 6 prompts x 64 (64 GPUs)
REASON, PROMPT = 256, 64  # reasoning tokens (the hf policy's max_tokens), prompt + template tokens (assumed)
LORA_R = 32
# -- the models (parameters counted on the meta device) --
LM = dict(total=7.616e9, blocks=6.526e9, root=1.090e9, per_tok=7.071e9, layers=28, h=3584, block=0.2331e9)
FLUX = dict(total=11.901e9, blocks=11.837e9, root=0.064e9, block=0.3398e9)
T5_CLIP_VAE = 4.762e9 + 0.123e9 + 0.084e9
LORA = dict(lm=2523136 * LORA_R, flux=1634304 * LORA_R)  # rank-32 adapters on the default targets


def side(name):
    if name == "flux":  # FLUX.1-dev-sized transformer + Qwen2.5-7B-sized chat model
        img_fwd = 57 * 1.044e12 + 0.016e12 + 57 * 4 * 4608**2 * 3072  # per image per step: linear + attention
        return dict(
            trained=FLUX["total"] + LM["total"],
            img=FLUX["total"],
            img_fwd=img_fwd,
            img_blocks=FLUX["blocks"],
            root=FLUX["root"] + LM["root"],
            big_block=FLUX["block"],
            act_img=(19 * 794.2e6 + 38 * 709.1e6 + 80.3e6),
            act_img_lora=(19 * 626.7e6 + 38 * 541.1e6),
            ckpt_img=57 * 4608 * 3072 * 2 + 80.3e6,
            one_block=794.2e6,
            lora=LORA["lm"] + LORA["flux"],
            frozen_enc=T5_CLIP_VAE,
            ref=FLUX["total"],
            gather_decode=LM["blocks"],
            roll_ep=14 * 3072 * 4608 * 2,
        )
    # Bagel-sized: the LM + a generation expert that duplicates its 28 decoder layers (MoT)
    img_fwd = 2 * LM["blocks"] * 4096 + 4 * 28 * 4096 * (4096 + PROMPT + REASON) * 3584
    # assumed: each decoder layer holds both experts (one FSDP unit), so every step gathers both
    return dict(
        trained=LM["total"] + LM["blocks"],
        img=LM["blocks"],
        img_fwd=img_fwd,
        img_blocks=2 * LM["blocks"],
        gather_decode=2 * LM["blocks"],
        root=LM["root"],
        big_block=LM["block"],
        roll_ep=(3 * 18944 + 2 * 3584) * 4096 * 2,
        act_img=28 * 4096 * 136.35e6 / 320,
        act_img_lora=28 * 4096 * 141.23e6 / 320,
        ckpt_img=28 * 4096 * 3584 * 2,
        one_block=4096 * 136.35e6 / 320,
        lora=2 * LORA["lm"],
        frozen_enc=0.084e9,
        ref=LM["total"] + LM["blocks"],
    )


TXT_FWD = 2 * LM["per_tok"] * (PROMPT + REASON)
ACT_TXT, ACT_TXT_LORA = 28 * 136.35e6 + 158.0e6, 28 * 141.23e6 + 158.0e6
CKPT_TXT = 28 * (PROMPT + REASON) * 3584 * 2 + 158.0e6 + 136.35e6


def memory(m, lora, engine, n):
    s = side(m)
    if lora:  # frozen bf16 base; fp32 adapters (peft), their grads, Adam moments (+ a DDP bucket copy)
        states = 2 * s["trained"] + s["lora"] * 20 if engine == "ddp" else (2 * s["trained"] + 16 * s["lora"]) / n
        ref = 0.0  # the adapter switched off
    else:  # fp32 weights, grads, Adam m and v; DDP: + bucket copy (4) + autocast's bf16 weight copies (2)
        states = 22 * s["trained"] if engine == "ddp" else 16 * s["trained"] / n
        ref = (4 if engine == "ddp" else 2) * s["ref"]  # a whole frozen copy on every GPU
    gathered = 0.0 if engine == "ddp" else 2 * 2 * (s["root"] + 2 * s["big_block"])  # bf16 units + their grads
    enc = 2 * s["frozen_enc"]
    act = (s["act_img_lora"] if lora else s["act_img"]) * WINDOW + (ACT_TXT_LORA if lora else ACT_TXT)
    ckpt = s["ckpt_img"] * WINDOW + CKPT_TXT + s["one_block"]
    fixed = states + ref + gathered + enc
    # a rollout calls each network on all of a process's episodes at once: one block's widest no-grad
    # intermediates per episode (rough) + the LM's KV cache (2 x 4 KV heads x 128 x 2 B x 28 layers per token)
    e = EPISODES // n
    per_roll = s["roll_ep"] + (PROMPT + REASON) * 57344
    rollout = fixed + e * per_roll
    roll_fit = int((USABLE - fixed) // per_roll) if fixed < USABLE else 0
    return dict(
        states=states,
        ref=ref,
        gathered=gathered,
        enc=enc,
        fixed=fixed,
        act=act,
        ckpt=ckpt,
        rollout=rollout,
        roll_fit=roll_fit,
        fit=int((USABLE - fixed) // act) if fixed < USABLE else -1,
        fit_ckpt=int((USABLE - fixed - s["one_block"]) // (ckpt - s["one_block"])) if fixed < USABLE else -1,
    )


def step_time(m, lora, engine, n, ckpt=True):
    """Seconds of one iteration per GPU (all GPUs work in parallel on their share of the batch)."""
    s, e = side(m), EPISODES // n
    mem = memory(m, lora, engine, n)
    b = max(1, min(e, mem["fit_ckpt"] if ckpt else mem["fit"]))  # episodes per minibatch that fit
    mb = -(-e // b)  # minibatches per PPO epoch
    link, frac = (NVLINK if n <= 8 else IB), (n - 1) / n
    f_ep = TXT_FWD + WINDOW * s["img_fwd"]  # one forward of an episode's training pass
    mult = (2 if lora else 3) + (1 if ckpt else 0)  # fwd + bwd (LoRA: no weight grads) (+ recompute)
    train = e * (EPOCHS * mult * f_ep + WINDOW * s["img_fwd"] + (mb - 1) / mb * f_ep) / FLOPS  # + reference + old
    rollout_img = e * STEPS * s["img_fwd"] / FLOPS
    decode = REASON * 2 * LM["per_tok"] / (HBM * HBM_EFF)  # every token step reads the LM's bf16 weights
    t5 = e * 4.845e12 / FLOPS if m == "flux" else 0.0  # if the text encoders were on the GPU
    vae = e * 10.47e12 / FLOPS  # 1024-px VAE decode, if on the GPU
    P = s["trained"]
    if engine == "ddp":  # one all-reduce per optimizer step (fp32 grads)
        comm_train = EPOCHS * mb * 2 * frac * 4 * (s["lora"] if lora else P) / link
        comm_decode = comm_rollout = 0.0
    else:  # FSDP: bf16 gathers (+ bf16 reduce-scatter)
        comm_train = (EPOCHS * mb * (2 if lora else 3) + (mb - 1)) * frac * 2 * P / link
        if lora:  # the reference = the sharded network, adapter off
            comm_train += mb * frac * 2 * s["img"] / link
        comm_decode = REASON * frac * 2 * s["gather_decode"] / link  # each token step gathers every LM block
        comm_rollout = STEPS * frac * 2 * s["img_blocks"] / link  # each denoising step gathers every image block
    # block-wise gathers overlap compute (FSDP prefetches the next block); the decode loop has too little to hide them
    exposed = max(0.0, comm_train - train) + comm_decode + max(0.0, comm_rollout - rollout_img)
    total = decode + rollout_img + t5 + vae + train + exposed
    return dict(
        e=e,
        b=b,
        mb=mb,
        decode=decode,
        rollout_img=rollout_img,
        t5=t5,
        vae=vae,
        train=train,
        comm_train=comm_train,
        comm_decode=comm_decode,
        comm_rollout=comm_rollout,
        exposed=exposed,
        total=total,
    )


if __name__ == "__main__":
    NAMES = {"bagel": "Bagel-sized", "flux": "FLUX-12B + 7B LM"}
    print(
        "| policy | training | engine, GPUs | weights, grads, optimizer | gathered units | reference | text encoders + VAE | fixed | rollout peak | activations / episode, no ckpt | with ckpt | episodes per minibatch (ckpt) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for m in ("bagel", "flux"):
        for lora in (False, True):
            for engine, n in (("ddp", 8), ("fsdp", 8), ("fsdp", 64)):
                r = memory(m, lora, engine, n)
                fit = "does not fit" if r["fit_ckpt"] < 1 else str(r["fit_ckpt"])
                if r["fit_ckpt"] >= 1 and r["rollout"] > USABLE:
                    fit += f" (the rollout only in calls of ≤ {r['roll_fit']} episodes)"
                print(
                    f"| {NAMES[m]} | {'LoRA r=32' if lora else 'full'} | {engine.upper()}, {n} | {r['states'] / G:.1f} | {r['gathered'] / G:.1f} |"
                    f" {r['ref'] / G:.1f} | {r['enc'] / G:.1f} | **{r['fixed'] / G:.1f}** | {r['rollout'] / G:.0f} | {r['act'] / G:.0f} | {r['ckpt'] / G:.1f} | {fit} |"
                )
                if r["fit_ckpt"] >= 1:
                    rows.append((m, lora, engine, n))
            if lora:
                for n in (64,):
                    rows.append((m, lora, "ddp", n))
    print()
    print(
        "| policy | training | engine, GPUs | episodes / GPU | minibatch | text decode | image rollout | T5 + VAE | training | communication (total → exposed) | **iteration** | episodes / s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for m, lora, engine, n in rows:
        t = step_time(m, lora, engine, n)
        comm = t["comm_train"] + t["comm_decode"] + t["comm_rollout"]
        print(
            f"| {NAMES[m]} | {'LoRA' if lora else 'full'} | {engine.upper()}, {n} | {t['e']} | {t['b']} × {t['mb']} | {t['decode']:.1f} |"
            f" {t['rollout_img']:.0f} | {t['t5'] + t['vae']:.1f} | {t['train']:.0f} | {comm:.1f} → {t['exposed']:.1f} |"
            f" **{t['total']:.0f} s** | {EPISODES / t['total']:.2f} |"
        )
