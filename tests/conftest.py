"""Shared fixtures: a small toy scenario (independent of ShapesWorld) with a configurable number
of turns, so the environment's mechanics are tested on multi-turn episodes too."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from unigrpo_env import PixelCodec, RewardInputs, RewardOutput, Scenario, Task, TextCodec, World

TOY_WORDS = ["<pad>", "<unk>", "</think>", "red", "green", "blue", "draw", "it", "again", "a", "dot"]


def toy_tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(TOY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<unk>", "</think>"])
    return tok


class MeanColourReward:
    """Scores how close the final image's mean colour is to the task's target (in [0, 1])."""

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        target = torch.tensor([t.meta["rgb"] for t in inputs.tasks], dtype=torch.float32)
        mean = inputs.images.float().mean(dim=(1, 2))
        score = 1.0 - (mean - target).abs().mean(dim=1) / 255.0
        return RewardOutput(scores=score, components={"colour": score})


class ToyScenario(Scenario):
    name = "toy"

    def __init__(self, num_turns: int = 2, num_steps: int = 3, max_tokens: int = 4, image_size: int = 4):
        self.text_codec = TextCodec(toy_tokenizer(), end_of_thinking="</think>", max_tokens=max_tokens)
        self.image_codec = PixelCodec(image_size)
        self.reward = MeanColourReward()
        self.num_steps = num_steps
        self.shift = 1.0
        colours = {"red": [255, 0, 0], "green": [0, 255, 0], "blue": [0, 0, 255]}
        self._tasks = {
            split: [
                Task(
                    prompts=(f"draw a {c} dot",) + ("draw it again",) * (num_turns - 1),
                    category=c,
                    split=split,
                    index=i,
                    meta={"rgb": rgb},
                )
                for i, (c, rgb) in enumerate(colours.items())
            ]
            for split in ("train", "heldout")
        }

    def tasks(self, split: str):
        return self._tasks[split]

    def default_world(self) -> World:
        return World.shifted(self.text_codec, self.image_codec, self.num_steps, self.shift)


@pytest.fixture
def toy_scenario() -> ToyScenario:
    return ToyScenario()


def write_tiny_checkpoint(root) -> None:
    """A tiny, randomly initialised ShapesWorld checkpoint in the shipped layout (the real classes)."""
    from unigrpo_env.scenarios.shapes.flow_model import ShapesFlowTransformer
    from unigrpo_env.scenarios.shapes.language_model import LanguageModelConfig, build_language_model, hf_tokenizer

    tokenizer = hf_tokenizer()
    lm = build_language_model(
        LanguageModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2), tokenizer
    )
    lm.save_pretrained(root / "language_model")
    tokenizer.save_pretrained(root / "language_model")
    torch.manual_seed(0)
    flow = ShapesFlowTransformer(
        vocab_size=len(tokenizer),
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        patch_size=8,
        pad_token_id=tokenizer.pad_token_id,
        zero_init=False,
    )
    flow.save_pretrained(root / "flow_model")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint")
    write_tiny_checkpoint(root)
    return root


@pytest.fixture
def small_run_config(tmp_path):
    """A config file for one-iteration CLI runs on the tiny checkpoint (2 prompts × 4, 3 steps per image)."""
    path = tmp_path / "small.yaml"
    path.write_text("num_prompts: 2\ngroup_size: 4\nminibatches: 1\neval_limit: 6\nscenario_options:\n  num_steps: 3\n")
    return path


def trainer_for(config, out_dir, **options):
    """A Trainer with the parts ``config`` names (as the CLI builds them)."""
    from unigrpo_env.agents.parts import build_parts
    from unigrpo_env.agents.trainer import Trainer

    parts = build_parts(config)
    return Trainer(config, out_dir, policy=parts.policy, scenario=parts.scenario, evaluator=parts.evaluator, **options)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state per process, fixed by its first Accelerator: start a test that
    needs its own (bf16, fp16) from scratch and leave none behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
