"""peft adapters in the agent: which parameters train, the reference is the adapter switched off,
merged checkpoints load as plain ones, and a killed run with adapters resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import trainer_for

from unigrpo_env import flow
from unigrpo_env.agents.adapters import AdapterError, WithoutAdapter, attach_adapter, has_adapter
from unigrpo_env.agents.config import UniGRPOConfig
from unigrpo_env.agents.trainer import TRAINED_STATE_FILE
from unigrpo_env.agents.unigrpo import UniGRPOAgent
from unigrpo_env.scenarios.shapes.policy import load_shapes_policy
from unigrpo_env.scenarios.shapes.t2i_reason import T2IReasonScenario

TINY = dict(
    num_prompts=2, group_size=4, minibatches=1, eval_limit=6, scenario_options={"num_steps": 4}, checkpoint_every=2
)


def tiny_config(tiny_checkpoint, **overrides) -> UniGRPOConfig:
    return UniGRPOConfig(**{**TINY, "checkpoint": str(tiny_checkpoint), **overrides})


def _names(params, model):
    ids = {id(p) for p in params}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@pytest.mark.parametrize(
    "text_adapter,image_adapter", [("lora", "lora"), ("ln_tuning", "ln_tuning"), ("ln_tuning", "full")]
)
def test_only_adapter_parameters_train_and_the_first_epoch_is_on_policy(tiny_checkpoint, text_adapter, image_adapter):
    policy = load_shapes_policy(tiny_checkpoint)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    config = tiny_config(
        tiny_checkpoint, text_adapter=text_adapter, image_adapter=image_adapter, lr_text=1e-2, lr_image=1e-2
    )
    agent = UniGRPOAgent(policy, config)
    text_names = _names(policy.text_parameters(), policy.text)
    marker = {"lora": "lora_", "ln_tuning": "ln_tuning_layers"}
    assert text_names and all(marker[text_adapter] in n for n in text_names)
    image_names = _names(policy.image_parameters(), policy.image)
    if image_adapter == "full":
        assert not has_adapter(policy.image) and len(image_names) == len(list(policy.image.parameters()))
    else:
        assert image_names and all(marker[image_adapter] in n for n in image_names)
    assert (
        isinstance(agent.reference, WithoutAdapter)
        if image_adapter != "full"
        else not isinstance(agent.reference, WithoutAdapter)
    )
    # an adapter starts as the identity: the first update is exactly on-policy
    batch = agent.collect(0)
    batch.advantages = torch.linspace(-1, 1, len(batch))
    stats = agent.update(batch)
    assert stats["first_ratio_text_max_dev"] == 0.0 and stats["first_ratio_image_max_dev"] == 0.0
    assert stats["text_log_prob_drift"] < 1e-4 and stats["image_log_prob_drift"] < 1e-4
    # the frozen base weights did not move
    frozen = {n: p for n, p in policy.named_parameters() if not p.requires_grad}
    base_key = {n.replace("base_model.model.", "").replace(".base_layer", ""): n for n in frozen}
    for key, value in before.items():
        name = base_key.get(key)
        if name is not None:
            assert torch.equal(frozen[name].detach(), value), key


def test_the_reference_is_the_starting_model_with_the_adapter_switched_off(tiny_checkpoint, tmp_path):
    start = load_shapes_policy(tiny_checkpoint)
    policy = load_shapes_policy(tiny_checkpoint)
    agent = UniGRPOAgent(policy, tiny_config(tiny_checkpoint, train="image", image_adapter="lora", lora_rank=2))
    batch = agent.collect(0)
    for name, p in policy.image.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter: the network now differs from its start
    image = batch.trajectory.turns[0].image
    condition, x, t = batch.rollout.conditions[0], image.latents[:, 1], float(image.times[1])
    v_start = start.image.velocity(x, t, condition)
    v_reference = agent.reference.velocity(x, t, condition)
    assert torch.allclose(v_reference, v_start, atol=1e-6) and not v_reference.requires_grad
    assert not torch.allclose(policy.image.velocity(x, t, condition), v_start, atol=1e-3)
    # save_pretrained of the adapted policy writes that merged network as an ordinary checkpoint
    policy.save_pretrained(tmp_path / "saved")
    reloaded = load_shapes_policy(tmp_path / "saved")
    assert torch.allclose(reloaded.image.velocity(x, t, condition), policy.image.velocity(x, t, condition), atol=1e-5)
    assert has_adapter(policy.image)  # saving did not touch the live adapter
    # and the text KL's reference, with a text adapter, is the starting language model
    text_agent = UniGRPOAgent(
        load_shapes_policy(tiny_checkpoint),
        tiny_config(tiny_checkpoint, train="text", text_adapter="lora", kl_text=0.1),
    )
    assert isinstance(text_agent.reference_text, WithoutAdapter) and text_agent.reference is None


def test_bad_adapters_give_clear_errors(tiny_checkpoint):
    policy = load_shapes_policy(tiny_checkpoint)
    with pytest.raises(AdapterError, match="cannot attach a lora adapter to the image model"):
        attach_adapter(policy.image, "image", "lora", targets=["no_such_layer"])
    attach_adapter(policy.text, "text", "lora")
    with pytest.raises(AdapterError, match="already has an adapter"):
        attach_adapter(policy.text, "text", "ln_tuning")

    class Bare:
        pass

    with pytest.raises(AdapterError, match="text_adapter='full'"):
        attach_adapter(Bare(), "text", "lora")
    with pytest.raises(ValueError):
        UniGRPOConfig(text_adapter="prefix")


def _rows(path: Path):
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith("time")}
        for line in path.read_text().splitlines()
    ]


@pytest.mark.parametrize("image_adapter", ["lora", "full"])  # "full": one side adapted, the other trained in full
def test_a_killed_run_with_adapters_resumes_exactly_and_its_checkpoint_loads_as_a_plain_one(
    tiny_checkpoint, tmp_path, image_adapter
):
    config = tiny_config(
        tiny_checkpoint,
        scenario_options={"num_steps": 3},
        text_adapter="ln_tuning",
        image_adapter=image_adapter,
        lr_text=1e-2,
        lr_image=1e-2,
    )
    trainer_for(config.model_copy(update={"iterations": 3}), tmp_path / "straight").run()
    trainer_for(config.model_copy(update={"iterations": 2}), tmp_path / "killed").run()
    trainer_for(config.model_copy(update={"iterations": 3}), tmp_path / "killed", resume=True).run()
    assert _rows(tmp_path / "straight" / "metrics.jsonl") == _rows(tmp_path / "killed" / "metrics.jsonl")
    folder = tmp_path / "killed" / "checkpoints" / (tmp_path / "killed" / "checkpoints" / "LATEST").read_text().strip()
    assert (folder / TRAINED_STATE_FILE).is_file()
    plain = load_shapes_policy(folder)  # the merged models load like any checkpoint (unigrpo eval reads them)
    start = load_shapes_policy(tiny_checkpoint)
    moved = [k for k, v in plain.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert any(k.startswith("text.") for k in moved) and any(k.startswith("image.") for k in moved)


def test_cli_adapter_flags_reach_the_run_and_bad_ones_exit_with_code_2(
    tiny_checkpoint, small_run_config, tmp_path, capsys
):
    import subprocess
    import sys

    from unigrpo_env.cli.main import main

    config = small_run_config
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "run",
                "scenario",
                "t2i_reason",
                "--iterations",
                "1",
                "--config",
                str(config),
                "--checkpoint",
                str(tiny_checkpoint),
                "--text-adapter",
                "ln_tuning",
                "--image-adapter",
                "lora",
                "--out",
                str(out),
            ]
        )
    assert exit_info.value.code == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    assert (saved["text_adapter"], saved["image_adapter"]) == ("ln_tuning", "lora")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "unigrpo_env.cli.main",
            "run",
            "scenario",
            "t2i_reason",
            "--iterations",
            "1",
            "--text-adapter",
            "prefix",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "prefix" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_example_configs_are_valid():
    folder = Path(__file__).parent.parent / "examples" / "configs"
    scenario_of = {
        "t2i_reason_full_training.yaml": "t2i_reason",
        "edit_multiturn_full_training.yaml": "edit_multiturn",
        "t2i_reason_kl_matched.yaml": "t2i_reason",
    }
    assert sorted(scenario_of) == sorted(
        path.name for path in folder.glob("*.yaml")
    )  # a new example config gets its scenario here
    configs = {name: UniGRPOConfig.for_scenario(scenario, folder / name) for name, scenario in scenario_of.items()}
    edit = configs["edit_multiturn_full_training.yaml"]
    # edit_multiturn's earlier defaults: the plain config for 80 iterations
    assert edit == UniGRPOConfig(scenario="edit_multiturn", iterations=80)
    assert "t2i_reason_full_training.yaml" in configs
    assert configs["t2i_reason_full_training.yaml"].text_adapter == "full"
    # the recipe with latent KL instead of MSE, at the MSE's average strength over the SDE window
    kl = configs["t2i_reason_kl_matched.yaml"]
    assert kl == UniGRPOConfig.for_scenario("t2i_reason", regularizer="kl", kl_weight=36.0)
    # KL per unit of squared velocity change, c(t), from the SDE step itself, at each step the window visits
    times = T2IReasonScenario().timesteps()  # the scenario's own denoising schedule
    visits = torch.zeros(len(times) - 1)
    for start in range(kl.sde_window_max_start + 1):
        visits[start : start + kl.sde_window_size] += 1
    c = torch.stack(
        [
            flow.latent_kl(
                flow.sde_step(torch.ones(1, 4), torch.zeros(1, 4), times[i], times[i + 1], kl.noise_level)[2],
                flow.sde_step(torch.zeros(1, 4), torch.zeros(1, 4), times[i], times[i + 1], kl.noise_level)[2],
                flow.sde_step_std(times[i], times[i + 1], kl.noise_level),
            )[0]
            for i in range(len(times) - 1)
        ]
    )
    assert abs(3.0 / float((c * visits).sum() / visits.sum()) - kl.kl_weight) < 1.0
