"""``t2i_prompts`` end to end on real model classes: a prompt file, a tiny chat model and a tiny SD3
pipeline saved to folders, trained through the CLI's own path (``--text-model``, ``--image-model``,
``--image-size``, ``--prompts``) with LoRA on both sides; the scenario is tasks and a reward, the
policy brings the world; and the prompt files' rules."""

from __future__ import annotations

import json

import pytest
from test_chat_policy import chat_folder  # noqa: F401  (the fixture)
from test_sd3_policy import tiny_pipeline

import unigrpo_env
from unigrpo_env.scenarios.prompts import read_prompt_file

PROMPTS = [
    {"prompt": "draw a red circle", "tag": "single_object", "include": [{"class": "circle", "count": 1}]},
    {"prompt": "draw a blue square", "tag": "colors"},
    {"prompt": "draw a green circle", "tag": "colors"},
    {"prompt": "draw a red square", "tag": "single_object"},
    {"prompt": "draw a blue circle", "tag": "colors"},
]


def test_prompt_files_text_and_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("# a comment\ndraw a red circle\n\ndraw a blue square\n")
    assert read_prompt_file(tmp_path / "p.txt") == [{"prompt": "draw a red circle"}, {"prompt": "draw a blue square"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in PROMPTS))
    assert read_prompt_file(tmp_path / "p.jsonl")[0]["include"] == [{"class": "circle", "count": 1}]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: expected an object with a string 'prompt'"):
        read_prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")


@pytest.fixture(scope="module")
def models(chat_folder, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("models")
    pipe = tiny_pipeline()
    pipe.save_pretrained(folder / "sd3")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in PROMPTS))
    return {"text": str(chat_folder), "image": str(folder / "sd3"), "prompts": str(prompts)}


def test_the_scenario_is_tasks_and_a_reward_and_the_policy_brings_the_world(models):
    scenario = unigrpo_env.make_scenario(
        "t2i_prompts", prompts=models["prompts"], reward="jpeg_compressibility", heldout_fraction=0.4
    )
    train, heldout = scenario.tasks("train"), scenario.tasks("heldout")
    assert len(train) == 3 and len(heldout) == 2 and not {t.prompts for t in train} & {t.prompts for t in heldout}
    assert {t.category for t in train + heldout} == {"single_object", "colors"} and "tag" in train[0].meta
    assert not any(hasattr(scenario, a) for a in ("text_codec", "image_codec", "num_steps", "shift"))
    with pytest.raises(NotImplementedError, match="offers no default world"):
        scenario.default_world()
    with pytest.raises(ValueError, match="needs a reward"):
        unigrpo_env.make_scenario("t2i_prompts", prompts=models["prompts"])
    with pytest.raises(
        ValueError, match=r"policy's world now: image_size -> --image-size .*text_model -> --text-model"
    ):
        unigrpo_env.make_scenario(
            "t2i_prompts", prompts=models["prompts"], reward="jpeg_compressibility", text_model="x", image_size=16
        )
    from unigrpo_env.agents.parts import load_policy

    policy = load_policy("hf", text_model=models["text"], image_model=models["image"], max_sequence_length=16)
    world = policy.world  # the chat tokenizer, the pipeline's own VAE object, its default size and grid
    assert world.text_codec.end_of_thinking == "</think>" and world.text_codec.eot_id == policy.text.eot_id
    assert world.image_codec.vae is policy.image.pipeline.vae and world.image_size == 16  # 8 × 2, the pipeline's
    assert world.latent_shape == (4, 8, 8) and world.num_steps == 10
    smaller = load_policy(
        "hf", text_model=models["text"], image_model=models["image"], image_size=8, num_steps=3, max_tokens=5
    )
    assert smaller.world.latent_shape == (4, 4, 4) and smaller.world.num_steps == 3
    assert smaller.world.text_codec.max_tokens == 5
    from unigrpo_env.agents.policy import PolicyMismatchError

    with pytest.raises(PolicyMismatchError, match="image_size 7"):
        load_policy("hf", text_model=models["text"], image_model=models["image"], image_size=7)
    with pytest.raises(PolicyMismatchError, match="image_size 400 gives latents of shape .4, 200, 200.*at most"):
        load_policy("hf", text_model=models["text"], image_model=models["image"], image_size=400)


def test_a_run_through_the_cli_trains_both_sides_and_saves_what_loads(models, tmp_path):
    from unigrpo_env import Trajectory
    from unigrpo_env.cli.main import main

    config = tmp_path / "small.yaml"
    config.write_text(
        "num_prompts: 2\ngroup_size: 2\neval_limit: 2\nlora_rank: 2\nsde_window_size: null\n"
        "scenario_options: {heldout_fraction: 0.4}\n"
        "policy_options: {max_sequence_length: 16, num_steps: 2, max_tokens: 4}\n"
    )
    out = tmp_path / "run"
    args = ["run", "scenario", "t2i_prompts", "--text-model", models["text"], "--image-model", models["image"]]
    args += ["--image-size", "16"]
    args += [
        "--prompts",
        models["prompts"],
        "--reward",
        "jpeg_compressibility",
        "--iterations",
        "2",
        "--config",
        str(config),
    ]
    args += ["--text-adapter", "lora", "--image-adapter", "lora", "--out", str(out)]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"] == "t2i_prompts" and summary["iterations"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["first_ratio_text_max_dev"] == 0.0 and r["first_ratio_image_max_dev"] == 0.0 for r in rows)
    final = out / "checkpoints" / "ckpt-000002"
    assert (final / "language_model" / "config.json").is_file() and (final / "flow_model" / "config.json").is_file()
    # unigrpo eval on the trained checkpoint, through the same flags
    with pytest.raises(SystemExit) as evaluated:
        main(
            ["eval", "scenario", "t2i_prompts", "--checkpoint", str(final), "--text-model", models["text"], "--image-model",
             models["image"], "--prompts", models["prompts"], "--reward", "jpeg_compressibility", "--image-size", "16", "--out", str(tmp_path / "eval")]
        )  # fmt: skip
    assert (
        evaluated.value.code == 0
        and json.loads((tmp_path / "eval" / "eval.json").read_text())["scenario"] == "t2i_prompts"
    )
    # the trained checkpoint loads as the policy kind hf, and an episode's trajectory saves and loads
    from unigrpo_env.agents.parts import load_policy

    policy = load_policy(
        "hf", str(final), text_model=models["text"], image_model=models["image"], max_sequence_length=16,
        num_steps=2, max_tokens=4,
    )  # fmt: skip
    assert policy.text.tokenizer.convert_tokens_to_ids("</think>") == policy.text.eot_id
    env = unigrpo_env.make(
        "t2i_prompts", prompts=models["prompts"], reward="jpeg_compressibility", world=policy.world
    )  # the policy's world: its tokenizer, VAE and grid
    from gymnasium.utils.env_checker import check_env

    check_env(env)  # Gymnasium's own checker, on the real tokenizer's action space and the VAE's latents
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(unigrpo_env.TextAction(tokens=[env.text_codec.eot_id]))
    while obs.phase == "image":
        obs, _, _, _, info = env.step(unigrpo_env.FlowAction(x_next=obs.x_t * 0.5))
    saved = info["trajectory"].save(tmp_path / "episode.safetensors")
    assert Trajectory.load(saved) == info["trajectory"]


def test_a_missing_reward_or_model_is_one_line_and_exit_2(models):
    import os
    import subprocess
    import sys

    base = [
        sys.executable,
        "-m",
        "unigrpo_env.cli.main",
        "run",
        "scenario",
        "t2i_prompts",
        "--prompts",
        models["prompts"],
    ]
    for extra, expected in (
        (["--text-model", models["text"], "--image-model", models["image"]], "needs a reward"),
        (
            [
                "--text-model",
                "/nonexistent/model",
                "--image-model",
                models["image"],
                "--reward",
                "jpeg_compressibility",
            ],
            "could not load a chat model from '/nonexistent/model'",
        ),
        (  # a hub id that is not in the cache, without a network
            [
                "--text-model",
                "nosuch-org/nosuch-chat-model",
                "--image-model",
                models["image"],
                "--reward",
                "jpeg_compressibility",
            ],
            "could not load a chat model from 'nosuch-org/nosuch-chat-model'",
        ),
    ):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no network: a hub id is looked up in the cache only
        done = subprocess.run(base + extra, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr[-800:]


def test_a_folder_of_the_wrong_kind_or_a_vae_that_does_not_fit_is_refused(models, tmp_path):
    from diffusers import AutoencoderKL

    from unigrpo_env.agents.parts import load_policy
    from unigrpo_env.agents.policy import CheckpointError

    with pytest.raises(CheckpointError, match="not a diffusers pipeline"):
        load_policy("hf", text_model=models["text"], image_model=models["text"])  # a chat model's folder
    pipe = tiny_pipeline()
    pipe.vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=8, norm_num_groups=4, sample_size=16,
    )  # fmt: skip
    pipe.save_pretrained(tmp_path / "mismatched")
    with pytest.raises(CheckpointError, match="takes 4 input channels, but its VAE's latents need 8"):
        load_policy("hf", text_model=models["text"], image_model=str(tmp_path / "mismatched"))


def test_the_shipped_prompt_files_are_valid_and_regenerate_exactly(tmp_path):
    import runpy
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "examples" / "prompts"
    runpy.run_path(str(folder / "make_prompts.py"))["main"](tmp_path)
    for name in ("geneval_style.jsonl", "edit_dialogues.jsonl"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), f"{name}: rerun make_prompts.py"

    tags = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    relations = {"left of", "right of", "above", "below"}

    def well_formed(include, tag=None):
        assert isinstance(include, list) and include
        for entry in include:
            assert isinstance(entry["class"], str) and entry["class"] and isinstance(entry["count"], int)
            assert entry["count"] >= (2 if tag == "counting" else 1)
            assert set(entry) <= {"class", "count", "color", "position"}
            if tag in ("colors", "color_attr"):
                assert isinstance(entry["color"], str) and entry["color"]
            if "position" in entry:
                relation, index = entry["position"]
                assert relation in relations and 0 <= index < len(include) and include[index] is not entry
        if tag == "position":
            assert any("position" in entry for entry in include)

    records = read_prompt_file(folder / "geneval_style.jsonl")
    assert len(records) >= 250 and len({r["prompt"] for r in records}) == len(records)
    assert {r["tag"] for r in records} == tags
    assert all(sum(r["tag"] == tag for r in records) >= 40 for tag in tags)
    for record in records:
        assert record["prompt"].startswith("a photo of ")
        well_formed(record["include"], record["tag"])

    dialogues = [json.loads(line) for line in (folder / "edit_dialogues.jsonl").read_text().splitlines()]
    assert len(dialogues) >= 30
    for dialogue in dialogues:
        turns = dialogue["turns"]
        assert 2 <= len(turns) <= 3 and all(isinstance(t, str) and t.strip() for t in turns)
        assert dialogue["tag"] in {"recolor", "add", "remove", "replace", "move", "background", "style"}
        if "include" in dialogue:
            well_formed(dialogue["include"])


def test_the_pipelines_frozen_networks_load_in_their_own_dtype(models):
    """``frozen_dtype``: the text encoders and the VAE in bf16 beside a transformer trained in fp32;
    the conditions they make reach the transformer in its dtype."""
    import torch

    from unigrpo_env.agents.parts import load_policy
    from unigrpo_env.agents.policy import CheckpointError

    policy = load_policy(
        "hf", text_model=models["text"], image_model=models["image"], frozen_dtype="bfloat16", max_sequence_length=16
    )
    pipeline = policy.image.conditioner.pipeline
    dtypes = {
        name: next(m.parameters()).dtype for name, m in pipeline.components.items() if isinstance(m, torch.nn.Module)
    }
    assert dtypes.pop("transformer") == torch.float32 and set(dtypes.values()) == {torch.bfloat16}
    assert {"text_encoder", "text_encoder_3", "vae"} <= set(dtypes)
    assert next(policy.text.model.parameters()).dtype == torch.float32  # the chat model is trained: dtype's
    embeds, pooled = policy.image.conditioner.encode(["draw a red circle", "draw a blue square"])
    assert embeds.dtype == torch.bfloat16
    v = policy.image.predict(
        torch.randn(2, 4, 8, 8), torch.full((2,), 0.5), {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    )
    assert v.dtype == torch.float32 and v.shape == (2, 4, 8, 8) and torch.isfinite(v).all()
    with pytest.raises(CheckpointError, match="frozen_dtype must name a floating-point torch dtype"):
        load_policy("hf", text_model=models["text"], image_model=models["image"], frozen_dtype="int8")


def test_the_prompt_scenarios_load_no_model():
    # the models' world is the policy's: the scenarios' module imports no model library
    from pathlib import Path

    import unigrpo_env.scenarios.prompts as prompts

    source = Path(prompts.__file__).read_text()
    for name in ("transformers", "diffusers", "VAECodec", "AutoTokenizer", "from_pretrained", "add_think_tokens"):
        assert name not in source, name
