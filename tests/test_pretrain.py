"""``unigrpo pretrain shapes`` on tiny budgets: it writes a checkpoint that loads with
``from_pretrained`` as the policy, deterministically for a seed."""

from __future__ import annotations

import json

import torch

from unigrpo_env.scenarios.shapes.flow_training import FlowTrainingConfig
from unigrpo_env.scenarios.shapes.language_model import LanguageModelConfig
from unigrpo_env.scenarios.shapes.policy import load_shapes_policy
from unigrpo_env.scenarios.shapes.pretrain import PretrainConfig, pretrain_shapes

TINY = PretrainConfig(
    seed=3,
    language_model=LanguageModelConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        steps=3,
        batch_size=4,
        warmup_steps=1,
    ),
    flow_model=FlowTrainingConfig(
        steps=3, batch_size=4, warmup=1, num_layers=1, num_attention_heads=2, attention_head_dim=8, patch_size=8
    ),
)


def test_pretrain_writes_a_loadable_deterministic_checkpoint(tmp_path):
    seen = []
    summary = pretrain_shapes(
        tmp_path / "a", TINY, progress=lambda part, step, total, loss: seen.append((part, step, total))
    )
    assert ("language model", 3, 3) in seen and ("flow model", 3, 3) in seen
    saved = json.loads((tmp_path / "a" / "pretrain.json").read_text())
    assert saved["seed"] == 3 and saved["config"]["flow_model"]["seed"] == 3 and summary["wall_seconds"] > 0
    policy = load_shapes_policy(tmp_path / "a")
    pretrain_shapes(tmp_path / "b", TINY)
    again = load_shapes_policy(tmp_path / "b")
    for (name, a), (_, b) in zip(policy.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs between two runs with the same seed"


def test_language_model_trains_on_dialogues_in_the_chat_format_it_is_prompted_with():
    """A training dialogue is exactly what the policy sees at each turn (``chat_prompt_ids`` with
    the earlier answers as history), followed by that turn's answer, and only answers carry loss."""
    from unigrpo_env.scenarios.shapes.edits import edit_dialogue
    from unigrpo_env.scenarios.shapes.language_model import _batch, _Sequences, chat_prompt_ids, hf_tokenizer
    from unigrpo_env.scenarios.shapes.tasks import task_split

    tokenizer = hf_tokenizer()
    data = _Sequences(tokenizer)
    ids, target = data.dialogue(5, 3, seed=11)
    dialogue = edit_dialogue(task_split("train")[5], 3, 11)
    end = tokenizer.convert_tokens_to_ids("</think>")
    answers = [tokenizer.encode(a, add_special_tokens=False) + [end] for a in dialogue.answers]
    for k in range(3):
        context = chat_prompt_ids(tokenizer, dialogue.prompts[: k + 1], answers[:k])
        assert ids[: len(context)] == context and not target[len(context) - 1]  # <think>: no loss
        assert ids[len(context) : len(context) + len(answers[k])] == answers[k]
        assert all(target[len(context) : len(context) + len(answers[k])])
    assert sum(target) == sum(len(a) for a in answers)
    _, mask, labels = _batch([data.riddle(0, seed=0), (ids, target)], tokenizer.pad_token_id)
    assert int((labels[1] != -100).sum()) == sum(target) and int(mask[1].sum()) == len(ids)


def test_answer_noise_replaces_attribute_words_by_others_of_their_kind_and_nothing_else():
    """``answer_noise`` is the annotation errors of the shipped language model's training answers:
    each attribute word is replaced, with that probability, by another of its kind; the answer's
    other words and its length stay; without noise the answers are the true ones."""
    import random

    from unigrpo_env.scenarios.shapes.language_model import _Sequences, hf_tokenizer
    from unigrpo_env.scenarios.shapes.tasks import task_split

    tokenizer = hf_tokenizer()
    kinds = _Sequences.NOISY_KINDS
    answers = [task.answer for task in task_split("train")[::7]]
    noisy, clean = _Sequences(tokenizer, answer_noise=0.3), _Sequences(tokenizer)
    replaced = attribute_words = 0
    rng = random.Random(0)
    for answer in answers:
        out = noisy.noisy(answer, rng).split()
        words = answer.split()
        assert len(out) == len(words)
        for before, after in zip(words, out):
            kind = next((k for k in kinds if before in k), None)
            if kind is None:
                assert after == before
            else:
                attribute_words += 1
                replaced += after != before
                assert after in kind
    assert abs(replaced / attribute_words - 0.3) < 0.03, (replaced, attribute_words)
    task = task_split("train")[3]
    assert clean.riddle(3, seed=5) == clean.chat([task.prompt], [task.answer])
    assert noisy.riddle(3, seed=5) == noisy.riddle(3, seed=5)  # the same errors for the same seed
