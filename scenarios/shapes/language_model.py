"""ShapesWorld's reasoning language model: a tiny Llama from ``transformers``.

It reads a riddle and writes the reasoning and the explicit scene description
(``tasks.answer_text``), then ``</think>``; in an edit dialogue (:mod:`.edits`) it reads each
instruction after its own earlier answers and writes the facts and the description of the whole
edited scene. The chat format, for turn K with earlier turns::

    <bos> prompt_0 <think> reasoning_0 </think> <image> prompt_1 <think> ... prompt_K <think>

and the model continues with ``reasoning_K </think>``. Saved and loaded with
``save_pretrained`` / ``from_pretrained`` like any checkpoint, its tokenizer as a ``transformers``
fast tokenizer beside it.

:func:`train_language_model` trains it from scratch on the train split: riddle → answer pairs and,
for a fraction ``edit_fraction`` of each batch, whole edit dialogues (2 to 4 turns) that start from a
train riddle — the loss on the answers only — deterministically on the CPU.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from unigrpo_env.lr_schedule import warmup_decay
from unigrpo_env.scenarios.shapes.edits import edit_dialogue
from unigrpo_env.scenarios.shapes.scene import CELLS, COLOURS, SHAPES
from unigrpo_env.scenarios.shapes.tasks import answer_text, task_split
from unigrpo_env.scenarios.shapes.tokenizer import (
    BOS,
    END_OF_THINKING,
    EOS,
    IMAGE,
    PAD,
    THINK,
    UNK,
    build_tokenizer,
)

__all__ = [
    "LanguageModelConfig",
    "hf_tokenizer",
    "chat_prompt_ids",
    "build_language_model",
    "train_language_model",
]


def hf_tokenizer() -> PreTrainedTokenizerFast:
    """ShapesWorld's tokenizer as a ``transformers`` fast tokenizer (same ids as the env's codec)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[THINK, END_OF_THINKING, IMAGE],
    )


def chat_prompt_ids(tokenizer, prompts: Sequence[str], history: Sequence[Sequence[int]]) -> list[int]:
    """Token ids of the context before turn ``len(prompts) − 1``'s reasoning (see module docstring).

    ``history[k]`` is the reasoning written at turn k (ending with ``</think>`` when it closed).
    """
    if len(history) != len(prompts) - 1:
        raise ValueError(f"expected {len(prompts) - 1} earlier reasoning segments, got {len(history)}")
    vocab = tokenizer.get_vocab()
    think, end, image = vocab[THINK], vocab[END_OF_THINKING], vocab[IMAGE]
    ids = [vocab[BOS]]
    for k, prompt in enumerate(prompts):
        ids += tokenizer.encode(prompt, add_special_tokens=False) + [think]
        if k < len(history):
            earlier = list(history[k])
            ids += earlier + ([] if earlier and earlier[-1] == end else [end]) + [image]
    return ids


class LanguageModelConfig(BaseModel):
    """Size and training budget of the ShapesWorld language model.

    The defaults are the shipped checkpoint's: a model big enough to learn the riddles' templates,
    trained on answers with annotation errors (``answer_noise``) long enough that its most likely
    answer is usually right while its samples at temperature 1 often carry a wrong colour, shape
    or cell — the room RL post-training finds in a supervised fine-tuned model. How they were
    chosen: docs/experiments/shapesworld-models.md.
    """

    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    # A 4-turn edit dialogue is at most about 230 tokens (3 turns: 180).
    max_position_embeddings: int = 256
    steps: int = Field(default=900, ge=1, description="optimizer steps")
    batch_size: int = 64
    edit_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="fraction of each batch that is edit dialogues"
    )
    edit_turns: tuple[int, ...] = Field(
        default=(2, 3, 4), description="dialogue lengths (turns) to train on, drawn uniformly"
    )
    answer_noise: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="probability that each colour, shape or cell word of a training answer is replaced by another of its kind (annotation errors)",
    )
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    num_threads: int | None = Field(default=None, ge=1, description="torch threads while training (None: leave as is)")


def build_language_model(config: LanguageModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A fresh, randomly initialised tiny Llama over ShapesWorld's vocabulary."""
    torch.manual_seed(config.seed)
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(END_OF_THINKING),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(llama)


class _Sequences:
    """Training sequences in the chat format: token ids with a loss mask on the answers.

    A riddle is ``<bos> prompt <think> answer </think>``; a dialogue continues with ``<image>``
    and the next instruction for each turn. Dialogues are drawn fresh from a train riddle and a
    seed each time, so the language model sees many different edits of every riddle.
    """

    def __init__(self, tokenizer, answer_noise: float = 0.0):
        vocab = tokenizer.get_vocab()
        self.answer_noise = answer_noise
        self.tokenizer = tokenizer
        self.bos, self.think, self.end, self.image = vocab[BOS], vocab[THINK], vocab[END_OF_THINKING], vocab[IMAGE]
        self.tasks = task_split("train")

    def _words(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    #: The kinds of words an annotation error replaces (by another word of the same kind). Cell
    #: words include the relations' "left" / "right" / "top" / "bottom" ("left of puts ...").
    NOISY_KINDS: tuple[tuple[str, ...], ...] = (tuple(COLOURS), tuple(SHAPES), tuple(CELLS))
    #: Each such word's replacements: the other words of its kind.
    _ALTERNATIVES: dict[str, tuple[str, ...]] = {
        word: tuple(other for other in kind if other != word) for kind in NOISY_KINDS for word in kind
    }

    def noisy(self, answer: str, rng: random.Random) -> str:
        """``answer`` with each colour, shape or cell word replaced, with probability ``answer_noise``,
        by another word of its kind drawn uniformly: the errors of an imperfect annotator."""
        if self.answer_noise == 0:
            return answer
        words = answer.split()
        for i, word in enumerate(words):
            others = self._ALTERNATIVES.get(word)
            if others is not None and rng.random() < self.answer_noise:
                words[i] = rng.choice(others)
        return " ".join(words)

    def chat(self, prompts, answers, noise_seed: int | None = None) -> tuple[list[int], list[bool]]:
        rng = random.Random(noise_seed)
        ids, target = [self.bos], [False]
        for k, (prompt, answer) in enumerate(zip(prompts, answers)):
            context = ([self.image] if k else []) + self._words(prompt) + [self.think]
            reply = self._words(self.noisy(answer, rng)) + [self.end]
            ids += context + reply
            target += [False] * len(context) + [True] * len(reply)
        return ids, target

    def riddle(self, index: int, seed: int) -> tuple[list[int], list[bool]]:
        task = self.tasks[index]
        return self.chat([task.prompt], [answer_text(task)], noise_seed=seed)

    def dialogue(self, index: int, num_turns: int, seed: int) -> tuple[list[int], list[bool]]:
        dialogue = edit_dialogue(self.tasks[index], num_turns, seed)
        return self.chat(dialogue.prompts, dialogue.answers, noise_seed=seed + 1)


def _batch(
    sequences: list[tuple[list[int], list[bool]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels (−100 outside the answers)."""
    width = max(len(ids) for ids, _ in sequences)
    ids_out = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, target) in enumerate(sequences):
        seq = torch.tensor(ids)
        ids_out[row, : len(ids)] = seq
        mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.where(torch.tensor(target), seq, torch.full_like(seq, -100))
    return ids_out, mask, labels


def train_language_model(
    config: LanguageModelConfig,
    out_dir: str | Path | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict]:
    """Train the language model from scratch on the train split; save it (and its tokenizer) to
    ``out_dir`` if given. Returns the model, the tokenizer and training statistics."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    tokenizer = hf_tokenizer()
    model = build_language_model(config, tokenizer)
    data = _Sequences(tokenizer, config.answer_noise)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_decay(step, config.warmup_steps, config.steps, "cosine", min_ratio=0.1)
    )
    model.train()
    start, loss_value = time.perf_counter(), float("nan")
    for step in range(config.steps):
        indices = torch.randint(len(data.tasks), (config.batch_size,), generator=generator).tolist()
        is_dialogue = (torch.rand(config.batch_size, generator=generator) < config.edit_fraction).tolist()
        turns = torch.randint(len(config.edit_turns), (config.batch_size,), generator=generator).tolist()
        seeds = torch.randint(2**62, (config.batch_size,), generator=generator).tolist()
        sequences = [
            data.dialogue(i, config.edit_turns[k], seed) if dialogue else data.riddle(i, seed)
            for i, dialogue, k, seed in zip(indices, is_dialogue, turns, seeds)
        ]
        ids, mask, labels = _batch(sequences, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
        if progress is not None:
            progress(step + 1, config.steps, loss_value)
    model.eval()
    stats = {
        "final_loss": loss_value,
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if out_dir is not None:
        out = Path(out_dir)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return model, tokenizer, stats
