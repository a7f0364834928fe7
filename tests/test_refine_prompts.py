"""``refine_prompts`` end to end on real model classes: GenEval-style prompts from a file, a tiny
chat model and a tiny FLUX.1 Kontext pipeline as the policy, a tiny random LLaVA as the VLM critic
whose first denied question becomes the next instruction; trained through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from test_chat_policy import chat_folder  # noqa: F401  (the fixture)
from test_edit_prompts import save_tiny_kontext
from tiny_reward_models import save_tiny_llava

import unigrpo_env
from unigrpo_env.scenarios.refine_prompts import instruction_for

PROMPTS = [
    {"prompt": "a photo of a red car", "tag": "color", "include": [{"class": "car", "count": 1, "color": "red"}]},
    {"prompt": "a photo of two cats", "tag": "counting", "include": [{"class": "cat", "count": 2}]},
    {
        "prompt": "a photo of a dog left of a cup",
        "tag": "position",
        "include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
    },
    {"prompt": "a photo of a bird", "tag": "single", "include": [{"class": "bird", "count": 1}]},
    {"prompt": "a photo of a blue bench", "tag": "color", "questions": ["Is the bench blue?"]},
]


def test_a_denied_question_reads_as_an_instruction():
    assert instruction_for("Is there a red car in the image?") == "there should be a red car in the image"
    assert (
        instruction_for("Are there exactly two cats in the image?") == "there should be exactly two cats in the image"
    )
    assert instruction_for("Is the dog to the left of the cup?") == "the dog should be to the left of the cup"
    assert instruction_for("Is the bench blue?") == "make this true: Is the bench blue?"


@pytest.fixture(scope="module")
def models(chat_folder, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("refine_models")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in PROMPTS))
    image, critic = save_tiny_kontext(folder / "kontext"), save_tiny_llava(folder / "critic")
    return {"text": str(chat_folder), "image": image, "prompts": str(prompts), "critic": critic}


def _critic(models) -> dict:
    return {"checkpoint": models["critic"], "device": "cpu", "dtype": "float32"}


def test_the_critic_answers_each_image_and_episodes_play_their_own_turns(models):
    from unigrpo_env.agents.parts import load_policy
    from unigrpo_env.agents.rollout import rollout

    policy = load_policy(
        "hf", None, text_model=models["text"], image_model=models["image"], max_sequence_length=16,
        image_size=16, num_steps=2, max_tokens=4,
    )  # fmt: skip
    envs = unigrpo_env.make_vec(
        "refine_prompts", 3, 1, prompts=models["prompts"], reward="jpeg_compressibility", heldout_fraction=0.4,
        critic_options=_critic(models), world=policy.world,
    )  # fmt: skip
    scenario = envs.scenario
    played = rollout(policy, envs, seed=0)
    trajectory = played.trajectory
    turns = trajectory.turns_played()
    assert bool(((turns >= 1) & (turns <= 3)).all()) and torch.isfinite(played.rewards).all()
    assert int(turns.max()) > 1  # the random critic denied something: fixes were asked for
    for i in range(3):
        episode = trajectory.episode(i)
        for k, turn in enumerate(episode.turns[1:], start=1):  # every fix: a denied question as an instruction
            denied = trajectory.turns[k - 1].feedback[i]["denied"]
            assert turn.prompt == instruction_for(denied)
            assert episode.turns[k - 1].reward == pytest.approx(-0.05)  # the critiqued turn's cost
    # the critic's own verdict on the images decides: recompute the first turn's answers
    first = trajectory.turns[0]
    from unigrpo_env.rewards.vlm_judge import task_questions

    for i, task in enumerate(trajectory.tasks):
        questions = task_questions(task)
        yes = scenario.critic.yes_probabilities(first.image.images[[i] * len(questions)].cpu(), questions)
        assert bool(turns[i] == 1) == bool((yes > 0.5).all())  # it ended at once exactly when the critic said yes


def test_a_refine_prompts_run_through_the_cli(models, tmp_path):
    from unigrpo_env.cli.main import main

    config = tmp_path / "small.yaml"
    critic = json.dumps(_critic(models))
    config.write_text(
        "num_prompts: 2\ngroup_size: 2\neval_limit: 2\nlora_rank: 2\nsde_window_size: null\nadvantage: turn\n"
        f"scenario_options: {{heldout_fraction: 0.4, critic_options: {critic}}}\n"
        "policy_options: {max_sequence_length: 16, image_size: 16, num_steps: 2, max_tokens: 4}\n"
    )
    out = tmp_path / "run"
    args = ["run", "scenario", "refine_prompts", "--text-model", models["text"], "--image-model", models["image"]]
    args += ["--prompts", models["prompts"], "--reward", "jpeg_compressibility", "--iterations", "2"]
    args += ["--config", str(config), "--text-adapter", "lora", "--image-adapter", "lora", "--out", str(out)]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["first_ratio_text_max_dev"] == 0.0 for r in rows)
    assert (out / "checkpoints" / "ckpt-000002" / "adapters" / "image" / "pytorch_lora_weights.safetensors").is_file()
