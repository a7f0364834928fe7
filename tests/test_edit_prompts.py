"""``edit_prompts`` end to end on real model classes: edit dialogues read from a file, a tiny chat
model and a tiny FLUX.1 Kontext pipeline saved to folders, two turns (draw, then edit the drawn
image) trained through the CLI's own path with LoRA on both sides; and the dialogue files' rules."""

from __future__ import annotations

import json

import pytest
import torch
from test_chat_policy import chat_folder  # noqa: F401  (the fixture)
from test_flux_policy import tiny_pipeline

import unigrpo_env
from unigrpo_env.scenarios.prompts import read_dialogue_file

DIALOGUES = [
    {"turns": ["draw a red circle", "make the circle blue"], "tag": "recolor"},
    {"turns": ["draw a blue square", "add a green circle"], "tag": "add"},
    {"turns": ["draw a green circle", "remove the circle", "add a red square"], "tag": "add"},
    {"turns": ["draw a red square", "move the square left"], "tag": "move"},
    {"turns": ["draw a blue circle", "make it red"], "tag": "recolor"},
]


def test_dialogue_files_text_and_jsonl(tmp_path):
    (tmp_path / "d.txt").write_text("# a comment\ndraw a red circle || make it blue\n\ndraw a square\n")
    assert read_dialogue_file(tmp_path / "d.txt") == [
        {"turns": ["draw a red circle", "make it blue"]},
        {"turns": ["draw a square"]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in DIALOGUES))
    assert read_dialogue_file(tmp_path / "d.jsonl")[2]["turns"][2] == "add a red square"
    for bad in ('{"turns": []}', '{"turns": ["ok", ""]}', '{"prompt": "one turn"}', '["a", "b"]'):
        (tmp_path / "bad.jsonl").write_text(bad + "\n")
        with pytest.raises(ValueError, match="bad.jsonl:1: expected an object with 'turns'"):
            read_dialogue_file(tmp_path / "bad.jsonl")


def save_tiny_kontext(folder) -> str:
    """A tiny random FLUX.1 Kontext pipeline saved to ``folder``; returns its path."""
    from diffusers import FluxKontextPipeline

    FluxKontextPipeline(**tiny_pipeline(guidance_embeds=True).components).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(chat_folder, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("models")
    dialogues = folder / "dialogues.jsonl"
    dialogues.write_text("\n".join(json.dumps(r) for r in DIALOGUES))
    return {"text": str(chat_folder), "image": save_tiny_kontext(folder / "kontext"), "prompts": str(dialogues)}


def test_dialogues_play_their_own_turns_or_num_turns(models):
    options = {"reward": "jpeg_compressibility", "prompts": models["prompts"], "heldout_fraction": 0.4}
    mixed = unigrpo_env.make_scenario("edit_prompts", **options)  # 2- and 3-turn dialogues in one file
    assert sorted(len(t.prompts) for t in mixed.tasks("train") + mixed.tasks("heldout")) == [2, 2, 2, 2, 3]
    two = unigrpo_env.make_scenario("edit_prompts", num_turns=2, **options)
    tasks = two.tasks("train") + two.tasks("heldout")
    assert len(tasks) == 5 and all(len(t.prompts) == 2 for t in tasks)
    assert {t.prompts for t in tasks} >= {("draw a green circle", "remove the circle")}  # the 3-turn one, played to 2
    assert {t.category for t in tasks} == {"recolor", "add", "move"} and "turns" in tasks[0].meta
    with pytest.raises(ValueError, match="no dialogue of 4 or more turns"):
        unigrpo_env.make_scenario("edit_prompts", num_turns=4, **options)
    with pytest.raises(ValueError, match="num_turns must be a positive integer"):
        unigrpo_env.make_scenario("edit_prompts", num_turns=0, **options)


def test_a_two_turn_kontext_run_through_the_cli_trains_both_sides_and_saves_what_loads(models, tmp_path):
    from unigrpo_env import Trajectory
    from unigrpo_env.cli.main import main

    config = tmp_path / "small.yaml"
    config.write_text(
        "num_prompts: 2\ngroup_size: 2\neval_limit: 2\nlora_rank: 2\nsde_window_size: null\n"
        "scenario_options: {heldout_fraction: 0.4, num_turns: 2}\n"
        "policy_options: {max_sequence_length: 16, image_size: 16, num_steps: 2, max_tokens: 4}\n"
    )
    out = tmp_path / "run"
    args = ["run", "scenario", "edit_prompts", "--text-model", models["text"], "--image-model", models["image"]]
    args += ["--prompts", models["prompts"], "--reward", "jpeg_compressibility", "--iterations", "2"]
    args += ["--config", str(config), "--text-adapter", "lora", "--image-adapter", "lora", "--out", str(out)]
    args += ["--gradient-checkpointing"]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    assert json.loads((out / "config.json").read_text())["gradient_checkpointing"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["first_ratio_text_max_dev"] == 0.0 for r in rows)
    assert all(r["first_ratio_image_max_dev"] == 0.0 for r in rows)
    final = out / "checkpoints" / "ckpt-000002"
    assert (final / "language_model" / "config.json").is_file() and (final / "flow_model" / "config.json").is_file()

    # the trained Kontext policy plays a 2-turn episode: its second image is drawn from the first
    from unigrpo_env.agents.parts import load_policy

    policy = load_policy(
        "hf", str(final), text_model=models["text"], image_model=models["image"], max_sequence_length=16,
        image_size=16, num_steps=2, max_tokens=4,
    )  # fmt: skip
    assert policy.world.image_codec.vae is policy.image.pipeline.vae  # one VAE: the env decodes with the policy's
    env = unigrpo_env.make(
        "edit_prompts", prompts=models["prompts"], reward="jpeg_compressibility", num_turns=2, heldout_fraction=0.4,
        world=policy.world,
    )  # fmt: skip
    obs, _ = env.reset(seed=0)
    for turn in range(2):
        obs, *_ = env.step(unigrpo_env.TextAction(tokens=[env.text_codec.eot_id]))
        assert obs.turn == turn and obs.cond_images.shape[0] == turn  # the earlier turns' images
        while obs.phase == "image":
            obs, reward, terminated, _, info = env.step(unigrpo_env.FlowAction(x_next=obs.x_t * 0.5))
    assert terminated and reward is not None
    trajectory = info["trajectory"]
    assert len(trajectory.turns) == 2
    saved = trajectory.save(tmp_path / "episode.safetensors")
    assert Trajectory.load(saved) == trajectory
    # and a batched rollout of the trained policy: the second turn is drawn from the first's image
    from unigrpo_env.agents.rollout import rollout

    envs = unigrpo_env.make_vec(
        "edit_prompts", 1, 2, prompts=models["prompts"], reward="jpeg_compressibility", num_turns=2,
        heldout_fraction=0.4, world=policy.world,
    )  # fmt: skip
    played = rollout(policy, envs, seed=0)
    first, second = played.conditions
    assert first["image_latents"] is None and second["image_latents"].shape == (2, 4, 8, 8)
    encoded = policy.image.conditioner.codec(16).encode(played.trajectory.turn_images(1)[:, -1])
    assert torch.equal(second["image_latents"], encoded) and torch.isfinite(played.rewards).all()
    # dialogues of different lengths in one batch: each episode plays its own turns
    mixed = unigrpo_env.make_vec(
        "edit_prompts", 2, 1, prompts=models["prompts"], reward="jpeg_compressibility", heldout_fraction=0.4,
        world=policy.world,
    )  # fmt: skip
    tasks = mixed.scenario.tasks("train") + mixed.scenario.tasks("heldout")
    three, two = next(t for t in tasks if len(t.prompts) == 3), next(t for t in tasks if len(t.prompts) == 2)
    played = rollout(policy, mixed, seed=0, options={"tasks": [three, two]})
    assert played.trajectory.turns_played().tolist() == [3, 2] and torch.isfinite(played.rewards).all()
    assert [t.prompt for t in played.trajectory.episode(1).turns] == list(two.prompts)
