"""The VLM judge and the GenEval-style detector reward on tiny random models built from configs in
code and saved with ``save_pretrained`` (nothing is downloaded).

* ``vlm_judge`` runs on a tiny random LLaVA (a CLIP vision tower and a Llama, through
  ``AutoModelForImageTextToText``) with a word-level tokenizer and a chat template built here.
  Qwen2.5-VL, the default judge, is not used: its processor cannot be built without torchvision
  (transformers 5 checks its video processor's class, which needs torchvision), and torchvision
  is not among this project's dependencies.
* ``geneval_detector``'s rules are tested on injected detections, one correct and one incorrect
  case per GenEval category; end to end it runs on a tiny random OWLv2 (``Owlv2ForObjectDetection``)
  and a tiny random CLIP for the colours.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from unigrpo_env import RewardInputs, Task
from unigrpo_env.rewards import get_reward, list_rewards
from unigrpo_env.rewards.vlm_judge import geneval_questions, plural, task_questions

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "prompts" / "geneval_style.jsonl"
N, HEIGHT, WIDTH = 4, 40, 52

# GenEval-format tasks: one per category (and the metadata the questions are derived from).
GENEVAL_META = {
    "single_object": {"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
    "two_object": {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "elephant", "count": 1}]},
    "counting": {"tag": "counting", "include": [{"class": "umbrella", "count": 2}]},
    "colors": {"tag": "colors", "include": [{"class": "umbrella", "count": 1, "color": "pink"}]},
    "position": {
        "tag": "position",
        "include": [{"class": "boat", "count": 1}, {"class": "wine glass", "count": 1, "position": ["right of", 0]}],
    },
    "color_attr": {
        "tag": "color_attr",
        "include": [
            {"class": "umbrella", "count": 1, "color": "orange"},
            {"class": "sandwich", "count": 1, "color": "red"},
        ],
    },
}


def _images(n: int = N, seed: int = 0) -> torch.Tensor:
    """Smooth random images ``[n, H, W, 3]`` uint8 (a coarse random grid, upsampled, plus noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 5, 6, generator=g) * 255
    smooth = torch.nn.functional.interpolate(coarse, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    images = (smooth + 8 * torch.randn(smooth.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous()


def _inputs(tasks: list[Task], images: torch.Tensor | None = None) -> RewardInputs:
    images = _images(len(tasks)) if images is None else images
    return RewardInputs(
        images=images,
        tasks=tasks,
        texts=[[""] * len(t.prompts) for t in tasks],
        earlier_images=torch.zeros((len(tasks), 0, *images.shape[1:]), dtype=torch.uint8),
    )


def _word_tokenizer(words: list[str], special: list[str], **kwargs) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(dict.fromkeys(special + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if "post" in kwargs:
        tok.post_processor = kwargs.pop("post")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


# ---------------------------------------------------------------------------------------------
# vlm_judge
# ---------------------------------------------------------------------------------------------

VLM_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
VLM_WORDS = (
    "Yes No USER ASSISTANT : Is Are there exactly two a an the in image ? Answer yes or no . dog cat elephant "
    "umbrella umbrellas pink orange red boat wine glass sandwich to right of left is big"
).split()
# A LLaVA-style template: "USER: <image> {text}\nASSISTANT:".
VLM_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: {% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image> {% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    """A tiny random LLaVA: a 2-layer CLIP vision tower on 16×16 inputs (patch 8: 4 image tokens)
    and a 2-layer Llama, with a word-level tokenizer where "Yes" and "No" are single tokens."""
    tokenizer = _word_tokenizer(
        VLM_WORDS,
        VLM_SPECIAL,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    vocab = tokenizer.get_vocab()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which "default" drops
        chat_template=VLM_TEMPLATE,
    )
    text = dict(
        model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
        eos_token_id=3,
    )  # fmt: skip
    vision = dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, image_size=16, patch_size=8, projection_dim=16,
    )  # fmt: skip
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=vocab["<image>"],
        image_seq_length=4,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # a larger lm_head, so that P(yes) differs visibly between pairs
        model.lm_head.weight.mul_(20)
    root = tmp_path_factory.mktemp("vlm")
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return str(root)


def _judge(folder, **options):
    return get_reward("vlm_judge", checkpoint=folder, device="cpu", dtype="float32", **options)


def _judge_tasks() -> list[Task]:
    return [
        Task(prompts=("a photo of a dog",), meta=GENEVAL_META["single_object"]),  # 1 question
        Task(prompts=("two umbrellas",), category="counting", meta={"include": [{"class": "umbrella", "count": 2}]}),
        Task(prompts=("a boat",), meta=GENEVAL_META["position"]),  # 3 questions
        Task(prompts=("x",), meta={"tag": "colors", "questions": ["Is the umbrella pink?", "Is it big?"]}),
    ]


def test_the_rewards_are_registered():
    assert "vlm_judge" in set(list_rewards())


def test_geneval_questions_per_category():
    q = {tag: geneval_questions(meta) for tag, meta in GENEVAL_META.items()}
    assert q["single_object"] == ["Is there a dog in the image?"]
    assert q["two_object"] == ["Is there a cat in the image?", "Is there an elephant in the image?"]
    assert q["counting"] == ["Are there exactly two umbrellas in the image?"]
    assert q["colors"] == ["Is there a pink umbrella in the image?"]
    assert q["position"] == [
        "Is there a boat in the image?",
        "Is there a wine glass in the image?",
        "Is the wine glass to the right of the boat?",
    ]
    assert q["color_attr"] == ["Is there an orange umbrella in the image?", "Is there a red sandwich in the image?"]
    assert geneval_questions({"include": [{"class": "bus", "count": 3, "color": "red"}]}) == [
        "Are there exactly three red buses in the image?"
    ]
    assert geneval_questions({}) == [] and geneval_questions({"tag": "x", "include": []}) == []


def test_plurals_match_the_example_prompts():
    """Every counting prompt of the project's GenEval-format file spells its class's plural."""
    records = [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]
    counting = [r for r in records if r["tag"] == "counting"]
    assert counting
    for r in counting:
        assert r["prompt"].endswith(" " + plural(r["include"][0]["class"])), r["prompt"]
    assert plural("person") == "people" and plural("wine glass") == "wine glasses" and plural("knife") == "knives"


def test_questions_from_meta_are_preferred():
    meta = dict(GENEVAL_META["single_object"], questions=["Is it a dog?"])
    assert task_questions(Task(prompts=("a",), meta=meta)) == ["Is it a dog?"]
    assert task_questions(Task(prompts=("a",), meta=dict(meta, questions=[]))) == []  # given, empty: none
    assert task_questions(Task(prompts=("a",), meta=GENEVAL_META["single_object"])) == ["Is there a dog in the image?"]
    with pytest.raises(ValueError, match="list of strings"):
        task_questions(Task(prompts=("a",), meta={"questions": "Is it a dog?"}))


def test_yes_probability_is_the_softmax_of_the_two_answer_logits(vlm_folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(vlm_folder).eval()
    processor = AutoProcessor.from_pretrained(vlm_folder)
    images = _images(1)
    question = "Is there a pink umbrella in the image?"
    # By hand: the chat template with the generation prompt, one unpadded pair, the full logits.
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{question} Answer yes or no."}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "USER: <image> Is there a pink umbrella in the image? Answer yes or no.\nASSISTANT:"
    batch = processor(text=[text], images=[images[0].numpy()], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
    yes, no = processor.tokenizer.convert_tokens_to_ids(["Yes", "No"])
    expected = math.exp(logits[yes]) / (math.exp(logits[yes]) + math.exp(logits[no]))

    judge = _judge(vlm_folder)
    task = Task(prompts=("a pink umbrella",), meta={"questions": [question]})
    out = judge(_inputs([task], images))
    assert out.scores.shape == (1,) and out.scores.dtype == torch.float32
    assert abs(float(out.scores[0]) - expected) < 1e-5
    assert abs(float(judge.yes_probabilities(images, [question])[0]) - expected) < 1e-5
    # Another template is another prompt, hence (in general) another probability.
    other = _judge(vlm_folder, template="Answer yes or no. {question}")
    assert (
        other.prompt(question) == "USER: <image> Answer yes or no. Is there a pink umbrella in the image?\nASSISTANT:"
    )


def test_scores_are_the_mean_over_questions_deterministic_and_chunk_free(vlm_folder):
    tasks = _judge_tasks()
    inputs = _inputs(tasks)
    judge = _judge(vlm_folder)  # all 7 pairs in one call
    out = judge(inputs)
    assert out.scores.shape == (N,) and torch.isfinite(out.scores).all()
    assert ((out.scores > 0) & (out.scores < 1)).all()
    assert torch.equal(judge(inputs).scores, out.scores)  # deterministic
    for batch_size in (1, 2):  # chunks of 1-2 pairs: other paddings, the same probabilities
        chunked = _judge(vlm_folder, batch_size=batch_size)(inputs)
        torch.testing.assert_close(chunked.scores, out.scores, atol=1e-5, rtol=0)
        for key, values in out.components.items():
            torch.testing.assert_close(chunked.components[key], values, atol=1e-5, rtol=0, equal_nan=True)

    # R_i = the mean of its questions' P(yes), pair by pair.
    for i, task in enumerate(tasks):
        questions = task_questions(task)
        p = judge.yes_probabilities(inputs.images[[i] * len(questions)], questions)
        assert abs(float(out.scores[i]) - float(p.mean())) < 1e-5
        assert abs(float(out.components["yes_probability_min"][i]) - float(p.min())) < 1e-5
        assert float(out.components["all_yes"][i]) == float(bool((p > 0.5).all()))
    assert len(set(out.scores.tolist())) == N  # the pairs are told apart

    c = out.components
    torch.testing.assert_close(c["yes_probability"], out.scores)
    # Per tag: the score where the episode's tag (meta "tag", else its category) is that tag.
    assert set(c) >= {"yes_probability_single_object", "yes_probability_counting", "yes_probability_position"}
    assert float(c["yes_probability_counting"][1]) == float(out.scores[1])
    assert math.isnan(c["yes_probability_counting"][0]) and math.isnan(c["yes_probability_colors"][2])


def test_a_task_without_questions_is_nan(vlm_folder):
    tasks = [
        Task(prompts=("a",), meta={"questions": []}),
        Task(prompts=("b",)),  # neither questions nor include
        Task(prompts=("c",), meta=GENEVAL_META["colors"]),
    ]
    out = _judge(vlm_folder, batch_size=2)(_inputs(tasks))
    assert math.isnan(out.scores[0]) and math.isnan(out.scores[1]) and math.isfinite(out.scores[2])
    assert math.isnan(out.components["all_yes"][0])
    empty = _judge(vlm_folder)(_inputs(tasks[:2]))
    assert empty.scores.isnan().all()


def test_the_model_is_loaded_once(vlm_folder):
    a, b = _judge(vlm_folder), _judge(vlm_folder, batch_size=3, template="Q: {question}")
    assert a.model is b.model  # cached per (checkpoint, device, dtype)
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())


def test_bad_judge_options_are_refused(vlm_folder, tmp_path):
    with pytest.raises(ValueError, match="single tokens"):
        _judge(vlm_folder, yes="yes please")
    with pytest.raises(ValueError, match="same token"):
        _judge(vlm_folder, yes="No")
    with pytest.raises(ValueError, match="question"):
        _judge(vlm_folder, template="Answer yes or no.")
    with pytest.raises(ValueError, match="batch_size"):
        _judge(vlm_folder, batch_size=0)
    with pytest.raises(ValueError, match="checkpoint") as caught:
        _judge(str(tmp_path / "missing"))
    assert "\n" not in str(caught.value)


def test_a_folder_of_another_model_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(vocab_size=11, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1)
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a 'bert' model") as caught:
        _judge(str(tmp_path))
    assert "\n" not in str(caught.value)
