"""Any chat language model as the text half of a unified policy.

A chat model (Qwen, Llama, ...) reasons between think markers, ``<think> … </think>``, as Bagel's
language model does before it draws. This module turns a ``transformers`` causal LM and its own
tokenizer into a :class:`~unigrpo_env.agents.hf_policies.CausalLMTextPolicy`:

* :func:`add_think_tokens` adds the markers as special tokens where the tokenizer lacks them (and
  grows the model's embeddings to match), so ``</think>`` is one token the environment can stop on;
* :func:`chat_prompt_builder` builds a context's ids with the tokenizer's chat template — each
  earlier turn as a user message and the assistant's reasoning, then the current prompt, the
  generation prompt and ``<think>`` — so the model continues with its reasoning;
* :func:`text_codec` is the environment's :class:`~unigrpo_env.TextCodec` over the same tokenizer
  (vocabularies of 150k ids are fine: validation is a range check);
* :func:`reasoning_text` gives the image policies what to draw from: the whole reasoning, or the
  text after a final-answer marker (the rewritten prompt), as Bagel's thinking feeds its image branch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from unigrpo_env.agents.hf_policies import CausalLMTextPolicy, PromptBuilder, PromptText
from unigrpo_env.agents.policy import CheckpointError, TurnContext
from unigrpo_env.codecs import TextCodec

__all__ = ["THINK", "add_think_tokens", "chat_prompt_builder", "text_codec", "reasoning_text", "chat_text_policy"]

#: The default think markers of chat models that reason before they answer.
THINK = ("<think>", "</think>")


def add_think_tokens(tokenizer: Any, model: Any = None, markers: tuple[str, str] = THINK) -> list[str]:
    """Add the think markers the tokenizer lacks as special tokens (grown into ``model``'s
    embeddings, whose new rows start at the mean of the old ones); returns the markers added. A
    tokenizer without a padding token gets its end-of-sequence token as one."""
    vocab = tokenizer.get_vocab()
    missing = [marker for marker in markers if marker not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return missing


def chat_prompt_builder(tokenizer: Any, markers: tuple[str, str] = THINK) -> PromptBuilder:
    """``prompt_ids(prompts, history) -> ids``: the chat template over the turns so far, ending in
    the generation prompt and the opening think marker."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise CheckpointError(
            "the tokenizer has no chat template (tokenizer.chat_template); give one or use a chat model"
        )
    opening = markers[0]

    def prompt_ids(prompts: Sequence[str], history: Sequence[Sequence[int]]) -> list[int]:
        messages: list[dict[str, str]] = []
        for k, prompt in enumerate(prompts):
            messages.append({"role": "user", "content": prompt})
            if k < len(history):  # an earlier turn: its reasoning, markers included
                reasoning = tokenizer.decode(list(history[k]), skip_special_tokens=False)
                messages.append({"role": "assistant", "content": f"{opening}{reasoning}"})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text + opening, add_special_tokens=False)

    return prompt_ids


def text_codec(tokenizer: Any, max_tokens: int, markers: tuple[str, str] = THINK) -> TextCodec:
    """The environment's text codec over a chat tokenizer: ``</think>`` closes the text phase."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if backend.token_to_id(markers[1]) is None:
        raise CheckpointError(
            f"the tokenizer has no {markers[1]!r} token: call add_think_tokens(tokenizer, model) first"
        )
    return TextCodec(tokenizer, end_of_thinking=markers[1], max_tokens=max_tokens, pad_token=tokenizer.pad_token)


def reasoning_text(tokenizer: Any, answer_marker: str | None = None) -> PromptText:
    """What the image is drawn from: each episode's reasoning of the turn, decoded without special
    tokens; with ``answer_marker``, only the text after its last occurrence (all of it if absent)."""

    def texts(context: TurnContext) -> list[str]:
        out = []
        for i in range(len(context)):
            text = tokenizer.decode(context.reasoning_of(i).tolist(), skip_special_tokens=True)
            if answer_marker is not None and answer_marker in text:
                text = text.rsplit(answer_marker, 1)[1]
            out.append(text.strip())
        return out

    return texts


def chat_text_policy(
    path: str | os.PathLike[str] | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    markers: tuple[str, str] = THINK,
    **from_pretrained: Any,
) -> CausalLMTextPolicy:
    """A chat model as the text policy: loaded from ``path`` (a folder or hub id) with
    ``AutoModelForCausalLM`` and ``AutoTokenizer``, or given as ``model`` and ``tokenizer``; the
    think markers added where missing."""
    if path is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained)
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"could not load a chat model from {str(path)!r}: {' '.join(str(exc).split())[:300]}"
            ) from exc
    if model is None or tokenizer is None:
        raise ValueError("give a path, or both a model and its tokenizer")
    add_think_tokens(tokenizer, model, markers)
    eot = tokenizer.convert_tokens_to_ids(markers[1])
    return CausalLMTextPolicy(
        model, chat_prompt_builder(tokenizer, markers), eot_id=eot, pad_id=tokenizer.pad_token_id, tokenizer=tokenizer
    )
