"""The Hugging Face reward models (clip_score, pickscore, aesthetic) on a tiny random CLIPModel
built from configs in code, with a tokenizer built locally with ``tokenizers`` and saved with
``save_pretrained`` (nothing is downloaded; the builders are in ``tiny_reward_models.py``): each reward equals its formula computed by hand from
the model's own ``get_image_features`` / ``get_text_features``, is deterministic, and does not
depend on how a batch is chunked."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_reward_models import save_tiny_aesthetic_head, save_tiny_clip
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

from unigrpo_env import RewardInputs, Task
from unigrpo_env.rewards import get_reward, list_rewards
from unigrpo_env.rewards.aesthetic import AestheticHead
from unigrpo_env.rewards.clip_score import clip_pixel_values

PROMPTS = [("draw a red circle",), ("draw a blue square",), ("draw a red circle", "a green square"), ("a blue",)]
N, HEIGHT, WIDTH = 5, 40, 52  # not square and larger than the 32×32 input: resize and crop both act

# The device resize (torch's antialiased bicubic, rounded to uint8 levels) and the processor's
# PIL resize (fixed-point weights) round some pixels to neighbouring uint8 levels. Measured here:
# about 20% of values one level of 255 apart, never more, and the cosine 4e-4 from the PIL path's,
# so the bound on the score is 1e-3. On the reward's own pixels the formula holds to 1e-5.
PIXEL_TOL = 1.0 / 255 / min(CLIPImageProcessor().image_std) + 1e-5
PIL_SCORE_TOL = 1e-3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``clip``: a tiny CLIPModel and its processor; ``processor``: the processor alone."""
    root = tmp_path_factory.mktemp("hf_rewards")
    return {**save_tiny_clip(root), "root": root}


@pytest.fixture(scope="module")
def loaded(folders):
    return CLIPModel.from_pretrained(folders["clip"]).eval(), CLIPProcessor.from_pretrained(folders["clip"])


@pytest.fixture(scope="module")
def head_file(folders):
    return save_tiny_aesthetic_head(folders["root"] / "head.safetensors", input_size=16, seed=1)


def _inputs(tasks=None) -> RewardInputs:
    """Smooth random images (a coarse random grid, upsampled, plus a little noise)."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(N, 3, 5, 6, generator=g) * 255
    smooth = torch.nn.functional.interpolate(coarse, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    images = (smooth + 8 * torch.randn(smooth.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    tasks = tasks or [Task(prompts=PROMPTS[i % len(PROMPTS)]) for i in range(N)]
    return RewardInputs(
        images=images.permute(0, 2, 3, 1).contiguous(),
        tasks=tasks,
        texts=[[""] * len(t.prompts) for t in tasks],
        earlier_images=torch.zeros((N, 0, HEIGHT, WIDTH, 3), dtype=torch.uint8),
    )


def _features(model, pixel_values, prompts, tokenizer):
    """Normalised image and text embeddings, by hand from the model's own feature methods."""
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixel_values)
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    image = image if isinstance(image, torch.Tensor) else image.pooler_output  # a tensor in 4.x, an output in 5.x
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    return image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)


def _pil_pixels(processor, inputs) -> torch.Tensor:
    images = [Image.fromarray(np.ascontiguousarray(x)) for x in inputs.images.numpy()]
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def _reward(name, folders, head_file, **options):
    if name == "pickscore":
        options.setdefault("processor", folders["processor"])
    if name == "aesthetic":
        options.setdefault("head", head_file)
    return get_reward(name, checkpoint=folders["clip"], device="cpu", **options)


def test_the_rewards_are_registered():
    assert {"clip_score", "pickscore", "aesthetic"} <= set(list_rewards())


def test_device_preprocessing_matches_the_processor(loaded):
    _, processor = loaded
    inputs = _inputs()
    ours = clip_pixel_values(inputs.images, processor.image_processor, "cpu")
    theirs = _pil_pixels(processor, inputs)
    assert ours.shape == theirs.shape == (N, 3, 32, 32)
    assert (ours - theirs).abs().max() <= PIXEL_TOL  # at most one uint8 level apart


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "aesthetic"])
def test_shape_determinism_and_chunking(name, folders, head_file):
    inputs = _inputs()
    whole = _reward(name, folders, head_file)(inputs)
    again = _reward(name, folders, head_file)(inputs)
    chunked = _reward(name, folders, head_file, batch_size=2)(inputs)
    assert whole.scores.shape == (N,) and whole.scores.dtype == torch.float32
    assert torch.isfinite(whole.scores).all()
    assert torch.equal(whole.scores, again.scores)
    torch.testing.assert_close(chunked.scores, whole.scores, atol=1e-6, rtol=1e-6)  # float32 sums in other orders
    for key, values in whole.components.items():
        torch.testing.assert_close(chunked.components[key], values, atol=1e-6, rtol=1e-6)


def test_clip_score_is_the_cosine_of_the_models_features(folders, loaded, head_file):
    model, processor = loaded
    inputs = _inputs()
    out = _reward("clip_score", folders, head_file)(inputs)
    prompts = [t.prompts[-1] for t in inputs.tasks]  # the last turn's prompt
    # The same pixels as the reward's: the formula, exactly.
    image, text = _features(
        model, clip_pixel_values(inputs.images, processor.image_processor, "cpu"), prompts, processor.tokenizer
    )
    torch.testing.assert_close(out.scores, (image * text).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.components["cosine"], out.scores)
    # The processor's own PIL preprocessing: within the resize tolerance.
    image, text = _features(model, _pil_pixels(processor, inputs), prompts, processor.tokenizer)
    assert (out.scores - (image * text).sum(-1)).abs().max() < PIL_SCORE_TOL

    cos = out.components["cosine"]
    paper = _reward("clip_score", folders, head_file, clipscore_weight=2.5)(inputs)
    torch.testing.assert_close(paper.scores, 2.5 * cos.clamp(min=0))  # CLIP-S = 2.5 · max(cos, 0)
    scaled = _reward("clip_score", folders, head_file, scale=3.0)(inputs)
    torch.testing.assert_close(scaled.scores, 3.0 * cos)
    with pytest.raises(ValueError, match="not both"):
        _reward("clip_score", folders, head_file, scale=2.0, clipscore_weight=2.5)


def test_pickscore_is_the_logit_scaled_cosine(folders, loaded, head_file):
    model, processor = loaded
    inputs = _inputs()
    out = _reward("pickscore", folders, head_file)(inputs)  # model and processor from separate folders
    prompts = [t.prompts[-1] for t in inputs.tasks]
    image, text = _features(
        model, clip_pixel_values(inputs.images, processor.image_processor, "cpu"), prompts, processor.tokenizer
    )
    expected = model.logit_scale.detach().exp() * (image * text).sum(-1)
    torch.testing.assert_close(out.scores, expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.scores, model.logit_scale.detach().exp() * out.components["cosine"])


def test_aesthetic_is_the_head_on_the_normalised_embedding(folders, loaded, head_file):
    model, processor = loaded
    head = AestheticHead.from_safetensors(head_file)  # saved, loaded back
    torch.manual_seed(1)
    reference = AestheticHead(16).state_dict()  # the head the fixture saved
    assert head.input_size == 16 and set(head.state_dict()) == set(reference)
    assert all(torch.equal(head.state_dict()[k], v) for k, v in reference.items())
    assert sorted(head.state_dict())[:2] == ["layers.0.bias", "layers.0.weight"]  # the public predictor's keys

    inputs = _inputs()
    out = _reward("aesthetic", folders, head_file)(inputs)
    image, _ = _features(
        model, clip_pixel_values(inputs.images, processor.image_processor, "cpu"), ["a"], processor.tokenizer
    )
    with torch.no_grad():
        expected = head(image).squeeze(-1)
    torch.testing.assert_close(out.scores, expected, atol=1e-5, rtol=1e-6)
    # The head named by a folder holding head_filename gives the same scores.
    by_folder = _reward("aesthetic", folders, head_file, head=str(folders["root"]), head_filename="head.safetensors")
    torch.testing.assert_close(by_folder(inputs).scores, out.scores)


def test_a_head_of_the_wrong_size_is_refused(folders, head_file):
    path = folders["root"] / "head_8.safetensors"
    AestheticHead(8).save_safetensors(path)
    with pytest.raises(ValueError, match="projection_dim is 16"):
        _reward("aesthetic", folders, head_file, head=str(path))


def test_a_task_without_a_prompt_is_nan(folders, head_file):
    tasks = [Task(prompts=("draw a red circle",))] * (N - 1) + [Task(prompts=())]
    inputs = _inputs(tasks)
    out = _reward("clip_score", folders, head_file, batch_size=2)(inputs)
    assert math.isnan(out.scores[-1]) and math.isnan(out.components["cosine"][-1])
    assert torch.isfinite(out.scores[:-1]).all()
    assert torch.isfinite(_reward("aesthetic", folders, head_file)(inputs).scores).all()  # needs no prompt


def test_models_are_loaded_once(folders, head_file):
    a = _reward("clip_score", folders, head_file)
    b = _reward("aesthetic", folders, head_file, batch_size=3)
    assert a.model is b.model  # one cached CLIPModel per (checkpoint, processor, device, dtype)
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "aesthetic"])
def test_a_missing_checkpoint_is_a_one_line_value_error(name, folders, head_file, tmp_path):
    with pytest.raises(ValueError, match="checkpoint") as caught:
        get_reward(name, checkpoint=str(tmp_path / "missing"), device="cpu")
    assert "\n" not in str(caught.value) and "expected" in str(caught.value)


def test_a_folder_of_another_model_is_refused(folders, tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(vocab_size=11, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1)
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'bert' model, not 'clip'; expected a CLIPModel folder"):
        get_reward("clip_score", checkpoint=str(tmp_path), device="cpu")


def test_a_hub_id_not_cached_without_network_is_a_one_line_value_error(folders, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="checkpoint 'unigrpo-test/no-such-clip' does not load; expected") as caught:
        get_reward("clip_score", checkpoint="unigrpo-test/no-such-clip", device="cpu")
    assert "\n" not in str(caught.value)


def test_a_processor_without_a_tokenizer_or_that_does_not_load_is_refused(folders, tmp_path):
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"processor .* is a CLIPImageProcessor\w* without image_processor and tokenizer; expected a processor",
    ):
        get_reward("clip_score", checkpoint=folders["clip"], processor=str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match=r"processor .*missing.* does not load; expected a processor") as caught:
        get_reward("pickscore", checkpoint=folders["clip"], processor=str(tmp_path / "missing"), device="cpu")
    assert "\n" not in str(caught.value)


def test_bad_options_are_refused(folders, head_file):
    with pytest.raises(ValueError, match="dtype"):
        _reward("clip_score", folders, head_file, dtype="float64")
    with pytest.raises(ValueError, match="batch_size"):
        _reward("clip_score", folders, head_file, batch_size=0)


def test_half_precision_scores_are_close_to_float32(folders, head_file):
    inputs = _inputs()
    full = _reward("clip_score", folders, head_file)(inputs).scores
    half = _reward("clip_score", folders, head_file, dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    scores = half(inputs).scores
    assert scores.dtype == torch.float32 and (scores - full).abs().max() < 0.05  # bfloat16 keeps ~3 digits
