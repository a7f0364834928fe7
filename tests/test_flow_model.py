"""The ShapesWorld flow model (diffusers SD3 MMDiT) and its training / sampling helpers, on a tiny
configuration so the whole file runs in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unigrpo_env.scenarios.shapes import Scene, SceneObject, describe, render
from unigrpo_env.scenarios.shapes.flow_model import ShapesFlowTransformer
from unigrpo_env.scenarios.shapes.flow_training import (
    EDIT_KINDS,
    FlowDataGenerator,
    FlowTrainingConfig,
    build_model,
    edit_scene,
    encode_texts,
    evaluate_edits,
    evaluate_true_descriptions,
    flow_matching_loss,
    random_scene,
    sample_images,
    scene_correct,
    train_flow_model,
)
from unigrpo_env.scenarios.shapes.tokenizer import PAD, build_tokenizer

TINY = dict(
    image_size=16,
    patch_size=4,
    num_layers=1,
    num_attention_heads=2,
    attention_head_dim=16,
    batch_size=8,
    max_text_tokens=24,
)


def tiny_config(**overrides) -> FlowTrainingConfig:
    return FlowTrainingConfig(**{**TINY, "steps": 5, "warmup": 2, "ema_decay": None, **overrides})


def tiny_model(zero_init: bool = False, seed: int = 0) -> ShapesFlowTransformer:
    """Random weights everywhere (zero_init=False), so outputs depend on every input."""
    tok = build_tokenizer()
    torch.manual_seed(seed)
    return ShapesFlowTransformer(
        vocab_size=tok.get_vocab_size(),
        max_text_tokens=24,
        image_size=16,
        patch_size=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=16,
        pad_token_id=tok.token_to_id(PAD),
        zero_init=zero_init,
    ).eval()


def inputs(batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=g)
    t = torch.rand(batch, generator=g)
    ids = encode_texts(["red circle at left , blue square at right", "green triangle at center", ""][:batch])
    cond = torch.rand(batch, 3, 16, 16, generator=g) * 2 - 1
    return x, t, ids, cond


def test_forward_shape_and_save_pretrained_round_trip(tmp_path):
    model = tiny_model()
    x, t, ids, cond = inputs()
    with torch.no_grad():
        out = model(x, t, ids, cond)
        out_none = model(x, t, ids)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out_none.shape == x.shape
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    loaded = ShapesFlowTransformer.from_pretrained(tmp_path).eval()
    assert loaded.config.num_layers == 1 and loaded.config.image_size == 16
    with torch.no_grad():
        assert torch.equal(loaded(x, t, ids, cond), out)
        assert torch.equal(loaded(x, t, ids), out_none)


def test_cond_image_none_is_zeros_and_padding_length_does_not_matter():
    model = tiny_model()
    x, t, ids, _ = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, ids), model(x, t, ids, torch.zeros_like(x)))
        longer = torch.cat([ids, torch.full((3, 5), model.config.pad_token_id)], dim=1)
        assert torch.allclose(model(x, t, ids), model(x, t, longer), atol=1e-6)


def test_gradients_reach_parameters():
    model = tiny_model().train()
    x, t, ids, cond = inputs()
    model(x, t, ids, cond).square().mean().backward()
    named = dict(model.named_parameters())
    for name in (
        "token_embedding.weight",
        "text_position",
        "transformer.pos_embed.proj.weight",
        "transformer.proj_out.weight",
        "transformer.time_text_embed.timestep_embedder.linear_1.weight",
    ):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    with_grad = [n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) >= 0.8 * len(named)
    assert all(torch.isfinite(p.grad).all() for p in named.values() if p.grad is not None)


def test_velocity_depends_on_text_time_and_cond_image():
    model = tiny_model()
    x, t, ids, cond = inputs()
    with torch.no_grad():
        base = model(x, t, ids, cond)
        other_text = encode_texts(["yellow square at top", "purple circle at bottom-right", "red circle at center"])
        assert not torch.allclose(base, model(x, t, other_text, cond))
        assert not torch.allclose(base, model(x, t, ids, -cond))
        assert not torch.allclose(base, model(x, t, ids))
        assert not torch.allclose(base, model(x, 1.0 - t, ids, cond))


def test_too_long_text_raises():
    model = tiny_model()
    x, t, _, _ = inputs(1)
    too_long = torch.full((1, 25), 9, dtype=torch.long)
    with pytest.raises(ValueError, match="max_text_tokens"):
        model(x, t, too_long)
    with pytest.raises(ValueError, match="max_len"):
        encode_texts([" ".join(["red"] * 25)], max_len=24)


@pytest.mark.parametrize("prediction", ["velocity", "sample"])
def test_zero_init_and_parameterisation(prediction):
    """Zero init: the network output starts at 0, i.e. v = 0 (velocity) or x̂_0 = 0, v = x_t / t (sample)."""
    tok = build_tokenizer()
    model = ShapesFlowTransformer(
        vocab_size=tok.get_vocab_size(),
        image_size=16,
        patch_size=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=16,
        pad_token_id=tok.token_to_id(PAD),
        zero_init=True,
        prediction=prediction,
    ).eval()
    x, t, ids, cond = inputs()
    t = torch.tensor([1.0, 0.5, 0.01])
    with torch.no_grad():
        v = model(x, t, ids, cond)
    if prediction == "velocity":
        assert torch.count_nonzero(v) == 0
    else:
        expected = x / t.clamp(min=model.config.min_t).view(-1, 1, 1, 1)
        assert torch.allclose(v, expected)
    with pytest.raises(ValueError, match="prediction"):
        ShapesFlowTransformer(vocab_size=10, prediction="epsilon")


class CountingForward:
    def __init__(self, model):
        self.model, self.batches = model, []
        self.inner = model.forward

    def __call__(self, *args, **kwargs):
        self.batches.append(args[0].shape[0])
        return self.inner(*args, **kwargs)


def test_sampling_calls_and_output():
    model = tiny_model()
    _, _, ids, cond = inputs()
    counter = CountingForward(model)
    model.forward = counter
    images = sample_images(model, ids, num_steps=4, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 16, 16, 3) and images.dtype == torch.uint8
    assert counter.batches == [3] * 4  # one call per step, no unconditional branch
    counter.batches.clear()
    sample_images(model, ids, cond, num_steps=4, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert counter.batches == [6] * 4  # cond and uncond batched into one call
    again = sample_images(model, ids, num_steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, again)


def test_data_generator_is_deterministic_and_has_edits_and_dropout():
    cfg = tiny_config(batch_size=64, edit_fraction=0.5, p_text_drop=0.25, p_cond_drop=0.25)
    a, b = FlowDataGenerator(cfg).sample_batch(), FlowDataGenerator(cfg).sample_batch()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = FlowDataGenerator(cfg, seed=1).sample_batch()
    assert not torch.equal(a.x0, c.x0)
    assert a.text_ids.shape == (64, 24) and a.x0.shape == a.cond_image.shape == (64, 3, 16, 16)
    assert a.x0.min() >= -1 and a.x0.max() <= 1
    pad = build_tokenizer().token_to_id(PAD)
    empty = (a.text_ids == pad).all(dim=1)
    assert 0 < int(empty.sum()) < 64
    has_cond = a.cond_image.flatten(1).abs().sum(dim=1) > 0
    assert bool((has_cond <= a.is_edit).all())  # only edit pairs carry a previous image
    assert 0 < int(has_cond.sum()) < int(a.is_edit.sum()) + 1


def test_edit_scene_changes_exactly_one_thing():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = random_scene(rng)
        edit = edit_scene(rng, scene)
        edited, kind = edit.after, edit.kind
        assert kind in EDIT_KINDS and edited != scene and edit.before == scene
        if kind == "add":
            assert len(edited.objects) == len(scene.objects) + 1
        elif kind == "remove":
            assert len(edited.objects) == len(scene.objects) - 1
        else:
            assert len(edited.objects) == len(scene.objects)
    scene = Scene((SceneObject("circle", "red", (1, 1)),))
    with pytest.raises(ValueError):
        edit_scene(rng, scene, kind="remove")


def test_scene_correct_reads_back_rendered_scenes():
    scene = Scene((SceneObject("circle", "red", (1, 0)), SceneObject("square", "blue", (1, 2))))
    assert scene_correct(render(scene), scene)
    assert not scene_correct(render(scene), Scene(scene.objects[:1]))
    assert describe(scene) == "red circle at left , blue square at right"


def test_training_reduces_loss_and_is_deterministic(tmp_path):
    cfg = tiny_config(steps=30, lr=3e-3, warmup=3, batch_size=16)
    batch = FlowDataGenerator(cfg, seed=123).sample_batch(32)
    g = torch.Generator().manual_seed(5)
    t, noise = torch.rand(32, generator=g), torch.randn(batch.x0.shape, generator=g)
    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg)
    losses = []
    trained = train_flow_model(
        cfg, out_dir=tmp_path, progress=lambda step, total, loss: losses.append((step, total, loss))
    )
    assert [s for s, _, _ in losses] == list(range(1, 31)) and all(total == 30 for _, total, _ in losses)
    with torch.no_grad():
        before = flow_matching_loss(untrained, batch, t, noise).item()
        after = flow_matching_loss(trained, batch, t, noise).item()
    assert after < 0.9 * before
    again = train_flow_model(cfg)
    for (name, p), q in zip(trained.named_parameters(), again.parameters()):
        assert torch.equal(p, q), name
    loaded = ShapesFlowTransformer.from_pretrained(tmp_path)
    for p, q in zip(trained.parameters(), loaded.parameters()):
        assert torch.equal(p, q)


def test_evaluation_reports_categories():
    model = tiny_model()
    result = evaluate_true_descriptions(model, num_steps=1)
    assert set(result["per_category"]) == {
        "single_object",
        "two_objects",
        "counting",
        "colors",
        "position",
        "color_attr",
    }
    assert 0.0 <= result["correct"] <= 1.0 and 0.0 <= result["score"] <= 1.0
    edits = evaluate_edits(model, num_steps=1)
    assert edits["num_edits"] > 0 and 0.0 <= edits["correct"] <= 1.0


def test_one_edit_generator_for_pretraining_and_dialogues():
    """The dialogues' worded edits are the pretraining's scene edits, words drawn after: from the
    same generator state both give the same edited scene."""
    from unigrpo_env.scenarios.shapes.edits import apply_random_edit

    for seed in range(300):
        scene = random_scene(np.random.default_rng(10_000 + seed))
        worded = apply_random_edit(np.random.default_rng(seed), scene)
        edit = edit_scene(np.random.default_rng(seed), scene)
        assert (worded.scene, worded.kind) == (edit.after, edit.kind)
