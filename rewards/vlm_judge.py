"""A vision-language model as the judge: the probability that it answers "yes" to questions about
the final image (VQA-style scoring, as in TIFA (Hu et al., 2023), Davidsonian Scene Graph
(Cho et al., 2024) and VQAScore (Lin et al., 2024), which score an image by the answer token's
probability).

For episode i with final image x_i and questions q_i1 … q_iK (see *Questions* below)::

    prompt_ik = chat_template([user: <image> + template.format(question=q_ik)], add_generation_prompt=True)
    z = logits of the token after prompt_ik          the model's next-token logits, last position
    p_ik = softmax([z_yes, z_no])[0]                 P("yes") renormalised over the two answers
         = 1 / (1 + exp(z_no − z_yes))
    R_i = (1/K) Σ_k p_ik                             in [0, 1]; NaN when K = 0

where ``z_yes``, ``z_no`` are the logits of the single tokens of the ``yes`` and ``no`` words
(default ``"Yes"`` / ``"No"``; each must be one token of the model's tokenizer, else a
:class:`ValueError`). Components, ``[N]`` each: ``yes_probability`` (R_i), ``yes_probability_min``
(min_k p_ik, the weakest answer), ``all_yes`` (1 when every p_ik > 0.5: the judge says yes to
every question, the analogue of GenEval's strict per-prompt correctness), and
``yes_probability_<tag>`` — R_i for the episodes whose GenEval tag (``task.meta["tag"]``, else the
task's category) is ``<tag>``, NaN for the others, so its batch mean is the per-tag mean.

Questions. ``task.meta["questions"]``, a list of strings, when the task has it (an empty list
means none: NaN); else derived from GenEval's metadata ``task.meta["include"]`` by
:func:`geneval_questions`; a task with neither is NaN.

Options:

* ``checkpoint`` — a model folder or hub id that ``AutoModelForImageTextToText`` and
  ``AutoProcessor`` load, whose processor has a chat template (default
  ``Qwen/Qwen2.5-VL-7B-Instruct``; its processor needs torchvision, for its video processor, as
  transformers 5 loads it). A checkpoint that does not load is a one-line :class:`ValueError`.
* ``device`` — ``None`` (default): ``"cuda"`` when available, else ``"cpu"``.
* ``dtype`` — the weights' dtype, ``"bfloat16"`` (default: a 7B judge in float32 would take
  28 GB), ``"float16"`` or ``"float32"``; the softmax is computed in float32.
* ``batch_size`` — (image, question) pairs per model call (default 8): all pairs of a batch are
  laid out in order and scored chunk by chunk, each chunk one forward pass.
* ``template`` — the user's text, with ``{question}`` (default ``"{question} Answer yes or no."``).
* ``yes``, ``no`` — the answer words.

Batching. A chunk's prompts are padded on the left (the tokenizer's ``padding_side`` is set to
``"left"``) so that the last position of every row is its prompt's last token, and the model is
asked for the last position's logits only (``logits_to_keep=1``). The model loads once per
process per (checkpoint, device, dtype) (:func:`~unigrpo_env.rewards.hf_models.load_model`); it is
frozen, in eval mode, and scored under ``torch.inference_mode()``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from unigrpo_env.reward import RewardInputs, RewardOutput
from unigrpo_env.rewards.clip_score import _check_dtype, resolve_device
from unigrpo_env.rewards.hf_models import load_model
from unigrpo_env.task import Task

__all__ = ["VLMJudgeReward", "geneval_questions", "plural", "task_questions"]

DEFAULT_TEMPLATE = "{question} Answer yes or no."

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
# GenEval's relations as they read in a question.
_RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
# COCO class names (GenEval's objects) whose plural is not the regular one.
_IRREGULAR_PLURALS = {
    "person": "people",
    "sheep": "sheep",
    "mouse": "mice",
    "knife": "knives",
    "skis": "skis",
    "scissors": "scissors",
}


def plural(noun: str) -> str:
    """The English plural of a (COCO class) noun; the last word of a compound takes it
    ("wine glass" → "wine glasses", "teddy bear" → "teddy bears")::

        irregular (person, sheep, mouse, knife, ...)  → its own plural
        ends in s, x, z, ch, sh                       → + "es"   (bus → buses)
        consonant + y                                 → y → "ies"  (butterfly → butterflies)
        otherwise                                     → + "s"
    """
    head, _, last = noun.rpartition(" ")
    prefix = f"{head} " if head else ""
    if last in _IRREGULAR_PLURALS:
        return prefix + _IRREGULAR_PLURALS[last]
    if last.endswith(("s", "x", "z", "ch", "sh")):
        return f"{prefix}{last}es"
    if len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        return f"{prefix}{last[:-1]}ies"
    return f"{prefix}{last}s"


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def geneval_questions(meta: Mapping[str, Any]) -> list[str]:
    """Yes/no questions for GenEval metadata: ``meta["include"]``, a list of
    ``{"class", "count", optional "color", optional "position": [relation, index]}``. Per object::

        count 1:       "Is there a[n] {color} {class} in the image?"       ({color} only when given)
        count n > 1:   "Are there exactly {n in words} {color} {plural(class)} in the image?"
        position:      "Is the {class} {relation} the {class of include[index]}?"
                       (relation "left of" / "right of" read "to the left of" / "to the right of")

    so "a photo of a wine glass right of a boat" asks whether there is a boat, whether there is a
    wine glass, and whether the wine glass is to the right of the boat. No ``include`` → ``[]``.
    """
    include = list(meta.get("include") or [])
    questions = []
    for obj in include:
        name = str(obj["class"])
        count = int(obj.get("count", 1))
        color = obj.get("color")
        colored = f"{color} " if color else ""
        if count == 1:
            phrase = f"{colored}{name}"
            questions.append(f"Is there {_article(phrase)} {phrase} in the image?")
        else:
            number = _NUMBER_WORDS[count] if count < len(_NUMBER_WORDS) else str(count)
            questions.append(f"Are there exactly {number} {colored}{plural(name)} in the image?")
        if obj.get("position"):
            relation, index = obj["position"]
            other = include[int(index)]["class"]
            questions.append(f"Is the {name} {_RELATION_PHRASES.get(relation, relation)} the {other}?")
    return questions


def task_questions(task: Task) -> list[str]:
    """``task.meta["questions"]`` when present (even empty), else :func:`geneval_questions`."""
    if "questions" in task.meta:
        questions = task.meta["questions"]
        if isinstance(questions, str) or not isinstance(questions, Sequence):
            raise ValueError(f"task.meta['questions'] must be a list of strings, got {type(questions).__name__}")
        return [str(q) for q in questions]
    return geneval_questions(task.meta)


def _tag(task: Task) -> str:
    return str(task.meta.get("tag") or task.category or "")


class VLMJudgeReward:
    """``R = mean_k P(yes | image, question_k)`` from a vision-language model's next-token
    logits, renormalised over the yes/no tokens (see the module docstring for the formula, the
    questions, the components and the options)."""

    default_checkpoint = "Qwen/Qwen2.5-VL-7B-Instruct"

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str | None = None,
        dtype: str = "bfloat16",
        batch_size: int = 8,
        template: str = DEFAULT_TEMPLATE,
        yes: str = "Yes",
        no: str = "No",
    ):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if "{question}" not in template:
            raise ValueError(f"template must contain '{{question}}', got {template!r}")
        self.checkpoint = str(checkpoint if checkpoint is not None else self.default_checkpoint)
        self.device = resolve_device(device)
        self.dtype = _check_dtype(dtype)
        self.batch_size = int(batch_size)
        self.template = str(template)
        self.model, self.processor = load_model(
            "AutoModelForImageTextToText",
            self.checkpoint,
            self.device,
            self.dtype,
            "a vision-language model folder or hub id such as 'Qwen/Qwen2.5-VL-7B-Instruct'",
        )
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None or not getattr(self.processor, "chat_template", None):
            raise ValueError(
                f"the processor of checkpoint {self.checkpoint!r} is a {type(self.processor).__name__} without "
                "a tokenizer and a chat template; expected a vision-language model's processor"
            )
        self.tokenizer.padding_side = "left"  # the last position of every row is its prompt's last token
        self.yes_id, self.no_id = self._answer_token(yes), self._answer_token(no)
        if self.yes_id == self.no_id:
            raise ValueError(f"the yes and no words {yes!r} and {no!r} are the same token")
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._prompts: dict[str, str] = {}

    def _answer_token(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(
                f"the answer word {word!r} is {len(ids)} tokens {pieces} for this model's tokenizer; "
                "give yes= and no= words that are single tokens"
            )
        return int(ids[0])

    def prompt(self, question: str) -> str:
        """The chat-formatted prompt of one question (the image first, then the template's text),
        ending with the assistant's turn (``add_generation_prompt=True``)."""
        if question not in self._prompts:
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": self.template.format(question=question)}],
                }
            ]
            self._prompts[question] = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        return self._prompts[question]

    def yes_probabilities(self, images: torch.Tensor, questions: Sequence[str]) -> torch.Tensor:
        """``p_k = softmax([z_yes, z_no])[0]`` for each (image, question) pair, in one forward pass:
        ``images`` ``[n, H, W, 3]`` uint8, one question each; float32 ``[n]`` on the CPU."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3] uint8, got {tuple(images.shape)} {images.dtype}")
        arrays = list(images.cpu().numpy())
        batch = self.processor(
            text=[self.prompt(q) for q in questions], images=arrays, padding=True, return_tensors="pt"
        )
        model_inputs = {
            key: value.to(self.device, dtype=self.model.dtype if value.is_floating_point() else value.dtype)
            for key, value in batch.items()
            if isinstance(value, torch.Tensor)
        }
        if self._keeps_logits:
            model_inputs["logits_to_keep"] = 1  # only the last position's logits
        logits = self.model(**model_inputs).logits[:, -1, :].float()  # z: [n, vocab]
        answers = logits[:, [self.yes_id, self.no_id]]  # [z_yes, z_no]
        return answers.softmax(dim=-1)[:, 0].cpu()  # P(yes) over {yes, no}

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        n = len(inputs)
        questions = [task_questions(task) for task in inputs.tasks]
        pairs = [(i, q) for i in range(n) for q in questions[i]]
        p = torch.empty(len(pairs))
        with torch.inference_mode():
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start : start + self.batch_size]
                index = torch.tensor([i for i, _ in chunk], dtype=torch.long, device=inputs.images.device)
                p[start : start + len(chunk)] = self.yes_probabilities(inputs.images[index], [q for _, q in chunk])

        owner = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        scores = torch.full((n,), math.nan)
        minimum = torch.full((n,), math.nan)
        all_yes = torch.full((n,), math.nan)
        for i in range(n):
            mine = p[owner == i]
            if len(mine):
                scores[i] = mine.mean()  # R_i = (1/K) Σ_k p_ik
                minimum[i] = mine.min()
                all_yes[i] = float(bool((mine > 0.5).all()))
        components = {"yes_probability": scores.clone(), "yes_probability_min": minimum, "all_yes": all_yes}
        tags = [_tag(task) for task in inputs.tasks]
        for tag in sorted({t for t in tags if t}):
            mask = torch.tensor([t == tag for t in tags])
            components[f"yes_probability_{tag}"] = torch.where(mask, scores, torch.tensor(math.nan))
        return RewardOutput(scores=scores, components=components)
