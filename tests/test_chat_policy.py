"""A chat language model as the text policy, on a tiny random Qwen2 with a BPE tokenizer trained
here and a chat template: the think markers, the prompt built by the template, the environment's
codec over the model's own vocabulary, and on-policy log-probabilities through a real rollout."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import unigrpo_env
from unigrpo_env import PixelCodec, RewardOutput, Scenario, Task, World
from unigrpo_env.agents import RolloutSettings, UnifiedPolicy, rollout
from unigrpo_env.agents.chat_policy import add_think_tokens, chat_text_policy, reasoning_text, text_codec
from unigrpo_env.agents.policy import CheckpointError

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "draw a red circle",
    "the sky is blue, so the answer is a blue square",
    "make it green",
    "answer: a red dot",
] * 20


def chat_tokenizer(template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # every byte in the alphabet: newlines and all
    tok.train_from_iterator(CORPUS, trainer)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_think_markers_are_added_and_the_template_builds_the_prompt(chat_folder):
    policy = chat_text_policy(chat_folder)
    tokenizer = policy.tokenizer
    assert policy.eot_id == tokenizer.convert_tokens_to_ids("</think>") and policy.pad_id == tokenizer.pad_token_id
    assert policy.model.get_input_embeddings().weight.shape[0] == len(tokenizer)  # grown by the two markers
    assert add_think_tokens(tokenizer, policy.model) == []  # already there
    first = policy.prompt_ids(("draw a red circle",), [])
    assert tokenizer.decode(first) == "<|im_start|>user\ndraw a red circle<|im_end|>\n<|im_start|>assistant\n<think>"
    reasoning = tokenizer.encode("a red dot</think>", add_special_tokens=False)
    second = tokenizer.decode(policy.prompt_ids(("draw a red circle", "make it green"), [reasoning]))
    assert "<|im_start|>assistant\n<think>a red dot</think><|im_end|>\n<|im_start|>user\nmake it green" in second
    assert second.endswith("<|im_start|>assistant\n<think>")


def test_a_tokenizer_without_what_is_needed_is_refused():
    with pytest.raises(CheckpointError, match="chat template"):
        chat_text_policy(model=Qwen2ForCausalLM(Qwen2Config(vocab_size=200, hidden_size=16, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)), tokenizer=chat_tokenizer(None))  # fmt: skip
    with pytest.raises(CheckpointError, match="add_think_tokens"):
        text_codec(chat_tokenizer(), 8)
    with pytest.raises(CheckpointError, match="could not load a chat model"):
        chat_text_policy("/nonexistent/chat-model")


class ChatScenario(Scenario):
    """One turn; the environment's codec is the chat model's own tokenizer."""

    name = "chat_toy"

    def __init__(self, tokenizer):
        self.text_codec = text_codec(tokenizer, max_tokens=6)
        self.image_codec = PixelCodec(4)
        self.reward = lambda inputs: RewardOutput(scores=inputs.images.float().mean(dim=(1, 2, 3)) / 255.0)
        self.num_steps, self.shift = 2, 1.0

    def tasks(self, split):
        return [
            Task(prompts=(p,), category="c", split=split, index=i)
            for i, p in enumerate(["draw a red circle", "make it green"])
        ]

    def default_world(self) -> World:
        return World.shifted(self.text_codec, self.image_codec, self.num_steps, self.shift)


class MeanFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def condition(self, context):
        return {}

    def velocity(self, x_t, t, condition, *, cfg_scale=1.0):
        return x_t * self.w

    def save_pretrained(self, path):
        pass


def test_a_rollout_through_the_environment_is_on_policy(chat_folder):
    text = chat_text_policy(chat_folder)
    policy = UnifiedPolicy(text, MeanFlow())
    envs = unigrpo_env.make_vec(ChatScenario(text.tokenizer), num_prompts=2, group_size=2)
    assert envs.text_codec.vocab_size == len(text.tokenizer)
    result = rollout(policy, envs, RolloutSettings(noise_level=0.7), seed=0)
    turn = result.trajectory.turns[0].text
    tokens, recorded = turn.padded()
    assert bool((turn.lengths > 0).all()) and result.rewards.shape == (4,)
    ended = tokens[torch.arange(4), turn.lengths - 1] == text.eot_id
    assert bool((ended | (turn.lengths == 6)).all())  # a segment ends at </think> or at the limit
    recomputed = text.log_probs(result.context(0), tokens, turn.lengths)
    mask = torch.arange(tokens.shape[1])[None] < turn.lengths[:, None]
    assert torch.allclose(recomputed[mask], recorded[mask], atol=1e-5)  # the ratio is 1 on-policy
    drawn_from = reasoning_text(text.tokenizer, answer_marker="answer:")(result.context(0))
    assert len(drawn_from) == 4 and all("</think>" not in t for t in drawn_from)
