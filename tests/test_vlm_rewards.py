"""The VLM judge and the GenEval-style detector reward on tiny random models built from configs in
code and saved with ``save_pretrained`` (nothing is downloaded; the builders are in
``tiny_reward_models.py``).

* ``vlm_judge`` runs on a tiny random LLaVA (a CLIP vision tower and a Llama, through
  ``AutoModelForImageTextToText``) with a word-level tokenizer and a chat template built here.
  Qwen2.5-VL, the default judge, is not used: its processor cannot be built without torchvision
  (transformers 5 checks its video processor's class, which needs torchvision), and torchvision
  is not among this project's dependencies.
* ``geneval_detector``'s rules are tested on injected detections, one correct and one incorrect
  case per GenEval category; end to end it runs on a tiny random OWLv2 (``Owlv2ForObjectDetection``)
  and OWL-ViT (``OwlViTForObjectDetection``), with a tiny random CLIP for the colours.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_reward_models import save_tiny_colour_clip, save_tiny_llava, save_tiny_owl

from unigrpo_env import RewardInputs, Task
from unigrpo_env.rewards import get_reward, list_rewards
from unigrpo_env.rewards.geneval_detector import (
    box_iou,
    image_boxes,
    nms,
    relative_position,
    select_detections,
    verdicts,
)
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


# ---------------------------------------------------------------------------------------------
# vlm_judge
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    """A tiny random LLaVA: a 2-layer CLIP vision tower on 16×16 inputs (patch 8: 4 image tokens)
    and a 2-layer Llama, with a word-level tokenizer where "Yes" and "No" are single tokens."""
    return save_tiny_llava(tmp_path_factory.mktemp("vlm"))


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
    assert {"vlm_judge", "geneval_detector"} <= set(list_rewards())


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


# ---------------------------------------------------------------------------------------------
# geneval_detector: the rules, on injected detections
# ---------------------------------------------------------------------------------------------


def _det(name: str, box, score: float = 0.9, color: str | None = None) -> dict:
    return {"class": name, "box": [float(v) for v in box], "score": score, "color": color}


def _colors_of(name, found):
    """The injected detections carry their colour."""
    return [d["color"] for d in found]


def _verdicts(tag: str, detections, **kwargs) -> dict[str, bool]:
    meta = GENEVAL_META[tag]
    return verdicts(meta["include"], detections, _colors_of, exact_counts=tag == "counting", **kwargs)


LEFT, RIGHT = (0, 10, 20, 30), (30, 10, 50, 30)  # side by side: RIGHT is right of LEFT


def test_rules_single_object():
    assert _verdicts("single_object", [_det("dog", LEFT)]) == {"object:dog": True}
    assert _verdicts("single_object", [_det("cat", LEFT)]) == {"object:dog": False}
    assert _verdicts("single_object", [_det("dog", LEFT), _det("dog", RIGHT)]) == {"object:dog": True}  # at least one


def test_rules_two_object():
    both = [_det("cat", LEFT), _det("elephant", RIGHT)]
    assert _verdicts("two_object", both) == {"object:cat": True, "object:elephant": True}
    assert _verdicts("two_object", both[:1]) == {"object:cat": True, "object:elephant": False}


def test_rules_counting_is_exact():
    umbrellas = [_det("umbrella", (10 * k, 0, 10 * k + 8, 8)) for k in range(3)]
    assert _verdicts("counting", umbrellas[:2]) == {"count:umbrella": True}
    assert _verdicts("counting", umbrellas) == {"count:umbrella": False}  # three is not two
    assert _verdicts("counting", umbrellas[:1]) == {"count:umbrella": False}
    # GenEval's own counting metadata says the same with exclude {umbrella, 3}: no second check.
    exclude = [{"class": "umbrella", "count": 3}]
    assert _verdicts("counting", umbrellas, exclude=exclude) == {"count:umbrella": False}
    # Without exact counts (another tag), n is a lower bound, and an exclude clause its own check.
    include = GENEVAL_META["counting"]["include"]
    assert verdicts(include, umbrellas, _colors_of) == {"count:umbrella": True}
    assert verdicts(include, umbrellas, _colors_of, exclude=exclude) == {
        "count:umbrella": True,
        "exclude:umbrella": False,
    }


def test_rules_colors():
    assert _verdicts("colors", [_det("umbrella", LEFT, color="pink")]) == {
        "object:umbrella": True,
        "colour:umbrella": True,
    }
    assert _verdicts("colors", [_det("umbrella", LEFT, color="red")]) == {
        "object:umbrella": True,
        "colour:umbrella": False,
    }
    # Only the best detection is coloured (GenEval: the clause's `count` most confident objects).
    two = [_det("umbrella", LEFT, 0.5, "pink"), _det("umbrella", RIGHT, 0.9, "red")]
    assert _verdicts("colors", two)["colour:umbrella"] is False
    asked = []
    ask = lambda name, found: asked.append(name) or [d["color"] for d in found]  # noqa: E731
    verdicts(GENEVAL_META["single_object"]["include"], [_det("dog", LEFT, color="red")], ask)
    verdicts(GENEVAL_META["colors"]["include"], [], ask)
    assert asked == []  # no colour clause, or nothing found: CLIP is not asked (and the check fails)
    assert verdicts(GENEVAL_META["colors"]["include"], [], _colors_of) == {
        "object:umbrella": False,
        "colour:umbrella": False,
    }


def test_rules_position():
    right = [_det("boat", LEFT), _det("wine glass", RIGHT)]
    assert _verdicts("position", right) == {"object:boat": True, "object:wine glass": True, "position:wine glass": True}
    left = [_det("boat", RIGHT), _det("wine glass", LEFT)]
    assert _verdicts("position", left)["position:wine glass"] is False
    # Side by side, the relation needs |dx| > 2 m (w_A + w_B) = 8 px: 7 px is too close, unless m = 0.05.
    near = [_det("boat", (0, 0, 20, 20)), _det("wine glass", (7, 0, 27, 20))]
    assert _verdicts("position", near)["position:wine glass"] is False
    assert _verdicts("position", near, position_margin=0.05)["position:wine glass"] is True
    # The reference missing: the relation cannot hold.
    assert _verdicts("position", right[1:]) == {
        "object:boat": False,
        "object:wine glass": True,
        "position:wine glass": False,
    }


def test_rules_color_attr():
    good = [_det("umbrella", LEFT, color="orange"), _det("sandwich", RIGHT, color="red")]
    assert all(_verdicts("color_attr", good).values()) and len(_verdicts("color_attr", good)) == 4
    swapped = [_det("umbrella", LEFT, color="red"), _det("sandwich", RIGHT, color="orange")]
    assert _verdicts("color_attr", swapped) == {
        "object:umbrella": True,
        "colour:umbrella": False,
        "object:sandwich": True,
        "colour:sandwich": False,
    }


def test_relative_position_is_genevals():
    assert relative_position(RIGHT, LEFT) == {"right of"} and relative_position(LEFT, RIGHT) == {"left of"}
    assert relative_position((0, 40, 10, 50), (0, 0, 10, 10)) == {"below"}  # y grows downwards
    assert relative_position((0, 0, 10, 10), (0, 40, 10, 50)) == {"above"}
    assert relative_position((40, 40, 50, 50), (0, 0, 10, 10)) == {"right of", "below"}  # the diagonal: both
    assert relative_position((1, 0, 11, 10), (0, 0, 10, 10)) == set()  # |d| − 0.1·20 < 0
    assert relative_position((3, 0, 13, 10), (0, 0, 10, 10)) == set()  # (3 − 2) / 3 < 0.5
    assert relative_position((5, 0, 15, 10), (0, 0, 10, 10)) == {"right of"}  # (5 − 2) / 5 > 0.5


def test_selection_thresholds_nms_and_max_objects():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 30, 10], [0, 0, 10, 10.0]])
    # Per box, the scores of classes (dog, cat): box 3 is a cat where dogs 0 and 1 are.
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.1], [0.2, 0.7]])
    found = select_detections(scores, boxes, ["dog", "cat"], threshold=0.3, nms_iou=0.5, max_objects=16)
    assert [(d["class"], d["box"]) for d in found] == [
        ("dog", [0.0, 0.0, 10.0, 10.0]),  # box 1 overlaps it (IoU 9/11): suppressed
        ("dog", [20.0, 0.0, 30.0, 10.0]),
        ("cat", [0.0, 0.0, 10.0, 10.0]),  # another class: not suppressed
    ]
    assert found[0]["score"] == pytest.approx(0.9)
    kept = select_detections(scores, boxes, ["dog", "cat"], threshold=0.3, nms_iou=1.0, max_objects=16)
    assert len(kept) == 4  # nms_iou = 1 keeps every box (GenEval's default)
    assert [d["score"] for d in select_detections(scores, boxes, ["dog", "cat"], 0.65, 1.0, 16)] == pytest.approx(
        [0.9, 0.8, 0.7]
    )  # above 0.65
    assert len(select_detections(scores, boxes, ["dog", "cat"], 0.3, 1.0, 1)) == 2  # the best dog, the cat
    assert box_iou(boxes[:2], boxes[:2])[0, 1] == pytest.approx(90 / 110)
    assert nms(boxes[:3], torch.tensor([0.1, 0.9, 0.5]), 0.5).tolist() == [1, 2]


def test_image_boxes_undo_the_preprocessing():
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    whole = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 0.25, 0.5, 0.5]])  # (cx, cy, w, h) of the input
    padded = image_boxes(whole, HEIGHT, WIDTH, Owlv2ImageProcessorPil(size={"height": 32, "width": 32}))
    # OWLv2 sees the 52 x 52 square (padded below): its whole is the image, its quarter 26 px.
    torch.testing.assert_close(padded, torch.tensor([[0.0, 0.0, 52.0, 40.0], [0.0, 0.0, 26.0, 26.0]]))
    stretched = image_boxes(whole, HEIGHT, WIDTH, OwlViTImageProcessorPil(size={"height": 32, "width": 32}))
    # OWL-ViT resizes the image to its square input: relative coordinates are the image's.
    torch.testing.assert_close(stretched, torch.tensor([[0.0, 0.0, 52.0, 40.0], [0.0, 0.0, 26.0, 20.0]]))


# ---------------------------------------------------------------------------------------------
# geneval_detector: end to end on a tiny random OWL detector and a tiny random CLIP
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector_folders(tmp_path_factory):
    """``owlv2`` and ``owlvit``: tiny random detectors (32×32 inputs, 16 patches); ``clip``: a
    tiny random CLIPModel for the colours."""
    root = tmp_path_factory.mktemp("detector")
    return {
        "owlv2": save_tiny_owl(root / "owlv2", v2=True),
        "owlvit": save_tiny_owl(root / "owlvit", v2=False),
        "clip": save_tiny_colour_clip(root / "clip"),
    }


def _detector(folders, kind="owlv2", **options):
    return get_reward(
        "geneval_detector", checkpoint=folders[kind], clip_checkpoint=folders["clip"], device="cpu", **options
    )


def _detector_tasks() -> list[Task]:
    tasks = [Task(prompts=(tag,), meta=meta) for tag, meta in GENEVAL_META.items()]
    return tasks + [
        Task(prompts=("no metadata",)),
        Task(prompts=("a dog",), meta={"include": [{"class": "dog", "count": 1}]}),
    ]


@pytest.mark.parametrize("kind", ["owlv2", "owlvit"])
def test_detector_end_to_end(kind, detector_folders):
    tasks = _detector_tasks()
    inputs = _inputs(tasks)
    reward = _detector(detector_folders, kind)
    out = reward(inputs)
    n = len(tasks)
    assert out.scores.shape == (n,) and out.scores.dtype == torch.float32
    assert math.isnan(out.scores[6])  # no include: not scored
    scored = torch.cat([out.scores[:6], out.scores[7:]])
    assert set(scored.tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(reward(inputs).scores, out.scores, equal_nan=True, atol=0, rtol=0)  # deterministic
    chunked = _detector(detector_folders, kind, batch_size=2)(inputs)  # other batches: the same verdicts
    torch.testing.assert_close(chunked.scores, out.scores, equal_nan=True, atol=0, rtol=0)
    for key, values in out.components.items():
        torch.testing.assert_close(chunked.components[key], values, equal_nan=True)

    # The scores are the rules applied to the reward's own detections, with CLIP's colours.
    detections = reward.detect(inputs)
    assert detections[6] == [] and any(detections[i] for i in range(n))
    for i, task in enumerate(tasks):
        for d in detections[i]:
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 <= x1 <= WIDTH and 0 <= y0 <= y1 <= HEIGHT and d["score"] > 0.3
            assert d["class"] in {c["class"] for c in task.meta["include"]}
        if not task.meta.get("include"):
            continue
        checks = verdicts(
            task.meta["include"],
            detections[i],
            lambda name, found, i=i: reward.colours(inputs.images[i], name, found),
            exact_counts=task.meta.get("tag") == "counting",
        )
        assert float(out.scores[i]) == float(all(checks.values()))
        assert float(out.components["checks_passed"][i]) == pytest.approx(sum(checks.values()) / len(checks))
    c = out.components
    assert set(c) >= {"correct", "checks_passed", "object", "count", "colour", "position", "correct_counting"}
    assert math.isnan(c["colour"][0]) and math.isfinite(c["colour"][3])  # single_object has no colour check
    assert math.isnan(c["position"][0]) and math.isfinite(c["position"][4])
    assert float(c["correct_counting"][2]) == float(out.scores[2]) and math.isnan(c["correct_counting"][0])


def test_detector_thresholds_and_nms_act(detector_folders):
    inputs = _inputs(_detector_tasks())
    loose = _detector(detector_folders, nms_iou=1.0, threshold=0.0).detect(inputs)
    strict = _detector(detector_folders, nms_iou=0.5, threshold=0.0).detect(inputs)
    assert sum(map(len, strict)) < sum(map(len, loose))  # NMS drops overlapping boxes
    # At threshold 0 with NMS off every box is a detection of its best class, but for the empty
    # ones (clipped away in the padding below the 52 × 40 image): at most the 16 patches' boxes.
    assert all(0 < len(d) <= 16 for d, t in zip(loose, _detector_tasks()) if t.meta.get("include"))
    scores = sorted(d["score"] for image in loose for d in image)
    middle = scores[len(scores) // 2]
    some = _detector(detector_folders, nms_iou=1.0, threshold=middle).detect(inputs)
    assert 0 < sum(map(len, some)) < sum(map(len, loose))
    assert all(d["score"] > middle for image in some for d in image)
    # The counting threshold applies to counting prompts only.
    counting = _detector(detector_folders, nms_iou=1.0, threshold=0.0, counting_threshold=0.999).detect(inputs)
    assert counting[2] == [] and counting[0] == loose[0]


def test_colours_are_clips_zero_shot_argmax(detector_folders):
    from unigrpo_env.rewards.clip_score import clip_pixel_values, image_embeddings, text_embeddings
    from unigrpo_env.rewards.geneval_detector import COLOR_TEMPLATES, COLORS

    reward = _detector(detector_folders)
    image = _images(1)[0]
    found = [_det("umbrella", (2.4, 3.6, 30.2, 25.0)), _det("umbrella", (20, 10, 52, 40))]
    colours = reward.colours(image, "umbrella", found)
    assert len(colours) == 2 and set(colours) <= set(COLORS)
    # By hand: the rounded crops, the mean of each colour's three normalised template embeddings.
    model, processor = reward.clip_model, reward.clip_processor
    with torch.no_grad():
        crops = [image[4:25, 2:30], image[10:40, 20:52]]
        u = image_embeddings(
            model, torch.cat([clip_pixel_values(c[None].contiguous(), processor.image_processor, "cpu") for c in crops])
        )
        prompts = [t.format(color=c, cls="umbrella") for c in COLORS for t in COLOR_TEMPLATES]
        w = text_embeddings(model, processor.tokenizer, prompts, "cpu").view(10, 3, -1).mean(1)
        w = w / w.norm(dim=-1, keepdim=True)
    assert colours == [COLORS[k] for k in (u @ w.T).argmax(-1).tolist()]
    assert prompts[:3] == ["a photo of a red umbrella", "a photo of a red-colored umbrella", "a photo of a red object"]


def test_detector_loading(detector_folders, tmp_path):
    a = _detector(detector_folders)
    b = _detector(detector_folders, threshold=0.5)
    assert a.model is b.model and a.clip_model is b.clip_model  # cached
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    with pytest.raises(ValueError, match="checkpoint") as caught:
        get_reward("geneval_detector", checkpoint=str(tmp_path / "missing"), device="cpu")
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="holds a 'clip' model"):  # a CLIP folder is no detector
        get_reward(
            "geneval_detector",
            checkpoint=detector_folders["clip"],
            clip_checkpoint=detector_folders["clip"],
            device="cpu",
        )
    for bad in ({"threshold": 1.5}, {"nms_iou": 0.0}, {"batch_size": 0}, {"max_objects": 0}, {"query_template": "x"}):
        with pytest.raises(ValueError):
            _detector(detector_folders, **bad)
