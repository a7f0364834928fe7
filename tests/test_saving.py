"""Saving an adapted policy: the merged checkpoint is peft's own merge, written shard by shard
without a second copy of the model and leaving the model untouched; the adapters are saved as
adapters that ``PeftModel.from_pretrained`` (text) and a diffusers pipeline's
``load_lora_weights`` (image) load and that reproduce the trained policy."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from test_sd3_policy import _policy, tiny_pipeline
from transformers import AutoModelForCausalLM

from unigrpo_env.agents.adapters import attach_adapter, save_adapter, save_merged
from unigrpo_env.scenarios.shapes.flow_model import ShapesFlowTransformer
from unigrpo_env.scenarios.shapes.policy import load_shapes_policy

HERE = Path(__file__).parent


def _trained(part) -> None:
    """An adapter that has trained: every adapter weight moved from its (identity) start."""
    torch.manual_seed(1)
    for name, p in part.model.named_parameters():
        if "lora_" in name or "ln_tuning_layers" in name:
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("side,kind", [("text", "lora"), ("image", "lora"), ("image", "ln_tuning")])
def test_the_merged_checkpoint_is_peft_merge_and_the_model_is_untouched(tiny_checkpoint, tmp_path, side, kind):
    part = getattr(load_shapes_policy(tiny_checkpoint), side)
    attach_adapter(part, side, kind, rank=2, alpha=4.0)
    _trained(part)
    before = {k: v.clone() for k, v in part.model.state_dict().items()}
    expected = copy.deepcopy(part.model).merge_and_unload().state_dict()
    save_merged(part.model, tmp_path, max_shard_size=20_000)  # small shards: several files and an index
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 1 and any(p.name.endswith(".index.json") for p in tmp_path.iterdir()), files
    cls = AutoModelForCausalLM if side == "text" else ShapesFlowTransformer
    loaded = cls.from_pretrained(tmp_path).state_dict()
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected), [
        k for k in expected if not torch.equal(loaded[k], expected[k])
    ][:3]
    after = part.model.state_dict()  # nothing merged in place, nothing unmerged with round-off
    assert isinstance(part.model, PeftModel) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_checkpoints_text_adapter_loads_with_peft(tiny_checkpoint, tmp_path):
    policy = load_shapes_policy(tiny_checkpoint)
    attach_adapter(policy.text, "text", "lora", rank=2, alpha=4.0)
    attach_adapter(policy.image, "image", "lora", rank=2, alpha=4.0)
    _trained(policy.text)
    policy.save_pretrained(tmp_path)
    folder = tmp_path / "adapters" / "text"
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(Path(tiny_checkpoint) / "language_model")
    loaded = PeftModel.from_pretrained(base, folder).eval()
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    with torch.no_grad():
        theirs = loaded(input_ids=ids).logits
        ours = policy.text.model(input_ids=ids).logits
        with loaded.disable_adapter():
            start = loaded(input_ids=ids).logits
    assert torch.allclose(theirs, ours, atol=1e-6)
    assert not torch.allclose(start, ours, atol=1e-3)  # the adapter changes the model
    # the merged language model in the same checkpoint computes the same
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "language_model").eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, ours, atol=1e-5)
    assert (tmp_path / "adapters" / "image" / "adapter_config.json").is_file()


def test_an_sd3_image_lora_loads_with_the_pipelines_load_lora_weights(tmp_path):
    pipe = tiny_pipeline()
    policy = _policy(pipe)
    attach_adapter(policy, "image", "lora", rank=2, alpha=4.0)  # alpha ≠ rank: the scale must travel too
    _trained(policy)
    save_adapter(policy, tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    fresh = tiny_pipeline()  # the same random base weights (seeded)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0, 250.0])
    text = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))

    def run(transformer):
        with torch.no_grad():
            return transformer(
                hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled, return_dict=False
            )[0]

    base_out = run(fresh.transformer)
    fresh.load_lora_weights(tmp_path)
    ours = run(policy.model)
    assert not torch.allclose(base_out, ours, atol=1e-3)  # the adapter changes the network
    assert torch.allclose(run(fresh.transformer), ours, atol=1e-5)


PEAK = textwrap.dedent(
    """
    import copy, json, sys, tempfile, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from unigrpo_env.agents.adapters import attach_adapter, save_model

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    class Part: pass
    torch.manual_seed(0)
    part = Part()
    part.model = LlamaForCausalLM(LlamaConfig(
        vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
        num_key_value_heads=8, tie_word_embeddings=False))
    attach_adapter(part, "text", "lora", rank=8)
    size = sum(p.numel() * p.element_size() for p in part.model.parameters())
    saves = {"merged_in_shards": lambda d: save_model(part.model, d, max_shard_size="8MB"),
             "deep_copy_then_merge": lambda d: copy.deepcopy(part.model).merge_and_unload().save_pretrained(d)}
    with tempfile.TemporaryDirectory() as d:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from the current resident size
        start = rss("VmRSS:")
        saves[sys.argv[1]](d)
        print(json.dumps({"model_bytes": size, "extra_peak_bytes": rss("VmHWM:") - start}))
    """
)


def save_peak_memory() -> dict[str, int]:
    """Peak extra resident memory of saving a LoRA language model of about 170 MB, merged in shards
    and by the former deep copy (each in a fresh process; Linux's VmHWM, reset before the save)."""
    peak: dict[str, int] = {}
    for way in ("merged_in_shards", "deep_copy_then_merge"):  # each in its own process
        done = subprocess.run([sys.executable, "-c", PEAK, way], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        peak["model_bytes"], peak[way] = measured["model_bytes"], measured["extra_peak_bytes"]
    return peak


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-memory reset")
def test_saving_a_lora_model_allocates_no_second_copy_of_its_weights():
    peak = save_peak_memory()
    size = peak["model_bytes"]
    assert peak["deep_copy_then_merge"] > 0.8 * size, peak  # the measurement sees a copy where there is one
    assert peak["merged_in_shards"] < 0.3 * size, peak
