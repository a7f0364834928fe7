"""ShapesWorld's word-level tokenizer, built with Hugging Face ``tokenizers``.

Every word of every prompt, reasoning chain and description (``tasks.vocabulary()``) gets an id
after the special tokens, then the words that only edit instructions use (``edits.edit_vocabulary()``)
— appended after the riddles' words, so the ids of the riddle and description words (all the image
model reads) do not depend on them; text is split on whitespace. The same tokenizer wraps into a
``transformers`` fast tokenizer for the ShapesWorld language model.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, models, pre_tokenizers

from unigrpo_env.scenarios.shapes.edits import edit_vocabulary
from unigrpo_env.scenarios.shapes.tasks import vocabulary

__all__ = [
    "PAD",
    "UNK",
    "BOS",
    "EOS",
    "THINK",
    "END_OF_THINKING",
    "IMAGE",
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "riddle_vocab_size",
]

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
THINK, END_OF_THINKING = "<think>", "</think>"  # open and close the reasoning, as Bagel and Qwen do
IMAGE = "<image>"  # stands for an earlier turn's image in a multi-turn context
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, THINK, END_OF_THINKING, IMAGE)


@lru_cache(maxsize=1)
def _vocab() -> tuple[str, ...]:
    riddle_words = [w for w in vocabulary() if w not in SPECIAL_TOKENS]
    edit_words = sorted(edit_vocabulary() - set(riddle_words) - set(SPECIAL_TOKENS))
    return (*SPECIAL_TOKENS, *riddle_words, *edit_words)


def riddle_vocab_size() -> int:
    """How many ids the special tokens and the riddles' words take (every description word is
    among them): the image model's vocabulary, which edit-only words do not enter."""
    return len(SPECIAL_TOKENS) + len([w for w in vocabulary() if w not in SPECIAL_TOKENS])


def build_tokenizer() -> Tokenizer:
    """A fresh word-level tokenizer over ShapesWorld's vocabulary (ids are stable: specials
    first, then the riddles' sorted vocabulary, then the edit-only words)."""
    vocab = {word: i for i, word in enumerate(_vocab())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer
