"""The trainer on parts defined here and nowhere else — a scenario, a reward and a unified policy of
this file's own — through its public constructor: no ShapesWorld anywhere (checked in a fresh
process, where nothing else has imported it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

from unigrpo_env import PixelCodec, RewardInputs, RewardOutput, Scenario, Task, TextCodec, World
from unigrpo_env.agents import Evaluator, TextSample, Trainer, UnifiedPolicy, UniGRPOConfig

WORDS = ["<pad>", "<unk>", "</think>", "paint", "it", "red", "green", "blue"]
COLOURS = {"red": [255, 0, 0], "green": [0, 255, 0], "blue": [0, 0, 255]}


class PaintScenario(Scenario):
    """Paint a canvas one colour: tasks and a reward (the world is the policy's)."""

    name = "paint"

    def __init__(self):
        self.reward = ColourReward()

    def tasks(self, split: str) -> list[Task]:
        return [
            Task(prompts=(f"paint it {c}",), category=c, split=split, index=i, meta={"rgb": rgb})
            for i, (c, rgb) in enumerate(COLOURS.items())
        ]


class ColourReward:
    """1 minus the mean distance of the image's pixels to the task's colour, in [0, 1]."""

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        target = torch.tensor([task.meta["rgb"] for task in inputs.tasks], dtype=torch.float32)[:, None, None]
        score = 1.0 - (inputs.images.float() - target).abs().mean(dim=(1, 2, 3)) / 255.0
        return RewardOutput(scores=score, components={"colour": score})


class ContextFreeText(nn.Module):
    """``π(y_k) = softmax(logits)``, the same for every context; a segment ends at ``</think>``."""

    def __init__(self, vocab_size: int, eot_id: int, pad_id: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(vocab_size))
        self.eot_id, self.pad_id = eot_id, pad_id

    def _log_softmax(self, temperature: float) -> torch.Tensor:
        return F.log_softmax(self.logits / (temperature or 1.0), dim=-1)

    @torch.no_grad()
    def sample(self, context, *, max_new_tokens: int, temperature: float = 1.0, generator=None) -> TextSample:
        n, logp = len(context), self._log_softmax(temperature)
        tokens = torch.multinomial(logp.exp().expand(n, -1), max_new_tokens, replacement=True, generator=generator)
        ended = (tokens == self.eot_id).long().cumsum(1)
        real = (ended == 0) | ((ended == 1) & (tokens == self.eot_id))  # up to and with the first </think>
        lengths = real.long().cumprod(1).sum(1)
        mask = torch.arange(max_new_tokens)[None] < lengths[:, None]
        tokens = torch.where(mask, tokens, torch.full_like(tokens, self.pad_id))
        return TextSample(tokens=tokens, lengths=lengths, log_probs=logp[tokens] * mask)

    def log_probs(self, context, tokens, lengths, *, temperature: float = 1.0) -> torch.Tensor:
        mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]
        return self._log_softmax(temperature)[tokens] * mask

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({"logits": self.logits.detach().contiguous()}, str(Path(path) / "model.safetensors"))


class OneColourFlow(nn.Module):
    """``v = (x_t − x_colour) / t``: the straight line to a canvas of one learnt colour."""

    def __init__(self):
        super().__init__()
        self.colour = nn.Parameter(torch.zeros(3))

    def condition(self, context) -> dict:
        return {}

    def velocity(self, x_t, t, condition, *, cfg_scale: float = 1.0) -> torch.Tensor:
        return (x_t - self.colour[None, :, None, None]) / float(t)

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({"colour": self.colour.detach().contiguous()}, str(Path(path) / "model.safetensors"))


def paint_world() -> World:
    """The policy's world: its word tokenizer (at most three reasoning tokens), a 4×4 pixel canvas,
    two denoising steps."""
    tokenizer = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(WORDS[:3])
    return World.shifted(TextCodec(tokenizer, end_of_thinking="</think>", max_tokens=3), PixelCodec(4), 2)


def paint_policy(scenario: PaintScenario) -> UnifiedPolicy:
    world = paint_world()
    codec = world.text_codec
    return UnifiedPolicy(ContextFreeText(codec.vocab_size, codec.eot_id, codec.pad_id), OneColourFlow(), world=world)


def train(out_dir: Path) -> dict:
    scenario = PaintScenario()
    policy = paint_policy(scenario)
    config = UniGRPOConfig(
        scenario="paint", iterations=2, num_prompts=3, group_size=2, checkpoint_every=1, lr_text=0.1, lr_image=0.1
    )
    trainer = Trainer(config, out_dir, policy=policy, scenario=scenario, reward=ColourReward(), evaluator=Evaluator())
    start = {name: p.detach().clone() for name, p in policy.named_parameters()}
    summary = trainer.run()
    moved = {name: bool((p.detach() - start[name]).abs().max() > 0) for name, p in policy.named_parameters()}
    return {"summary": summary, "moved": moved}


def test_the_trainer_runs_on_parts_defined_in_this_file(tmp_path):
    result = train(tmp_path / "run")
    assert result["moved"] == {"text.logits": True, "image.colour": True}  # both sides learnt
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in rows] == [0, 1] and all(row["first_ratio_image_max_dev"] == 0.0 for row in rows)
    summary = result["summary"]
    assert summary["scenario"] == "paint" and summary["iterations"] == 2
    assert set(summary["per_category"]) == {"red", "green", "blue", "overall"}
    assert 0.0 <= summary["heldout_reward_after"] <= 1.0
    final = tmp_path / "run" / "checkpoints" / "ckpt-000002"
    assert (final / "flow_model" / "model.safetensors").is_file() and (final / "trained_state.safetensors").is_file()


def test_nothing_of_shapesworld_is_imported(tmp_path):
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import test_own_parts as t; "
        "t.train(Path(sys.argv[2])); "
        "loaded = sorted(m for m in sys.modules if m.startswith('unigrpo_env.scenarios.shapes')); "
        "assert not loaded, loaded; print('no ShapesWorld')"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "no ShapesWorld" in done.stdout, done.stderr[-2000:]
