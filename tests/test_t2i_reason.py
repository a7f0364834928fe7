"""t2i_reason on ShapesWorld through the public API: Gymnasium's checker on every registered id,
random and oracle agents, one changed attribute, determinism, save/load, the README example."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import gymnasium as gym
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import unigrpo_env
from unigrpo_env import FlowAction, TextAction, Trajectory, flow
from unigrpo_env._tensor_eq import tensors_equal
from unigrpo_env.registration import gym_ids
from unigrpo_env.scenarios.shapes import CATEGORIES, ShapesTask, render
from unigrpo_env.trajectory import TrajectoryFileError


def _builds_without_options(name: str) -> bool:
    try:
        unigrpo_env.make_scenario(name)
    except (TypeError, ValueError):  # e.g. t2i_prompts: needs its prompt file and models
        return False
    return True


#: The Gymnasium id of every registered scenario that builds without options.
GYM_IDS = {env_id: name for env_id, name in gym_ids().items() if _builds_without_options(name)}

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("env_id", sorted(GYM_IDS))
def test_check_env_passes_for_every_registered_environment(env_id):
    env = gym.make(env_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert not [str(w.message) for w in caught]


@pytest.mark.parametrize("env_id", sorted(GYM_IDS))
def test_random_agent_finishes_episodes(env_id):
    env = gym.make(env_id)
    env.action_space.seed(0)
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        for _ in range(500):
            obs, reward, terminated, truncated, info = env.step(env.action_space.sample(mask=obs))
            if terminated:
                break
        assert terminated and not truncated and 0.0 <= reward <= 1.0
        assert info["trajectory"].terminated


def oracle_rollout(envs, targets: torch.Tensor):
    """Drive every episode of a batched env onto ``targets`` [N, 3, H, W] (after the oracle's text)."""
    scenario = envs.scenario
    tokens = [TextAction(tokens=scenario.oracle_tokens(task)) for task in envs.tasks]
    obs, *_ = envs.step(tokens)
    assert obs.phase == "image"
    terminated = None
    while terminated is None or not terminated.all():
        v = flow.straight_line_velocity(obs.x_t, targets, obs.t)
        obs, rewards, terminated, _, info = envs.step(FlowAction(x_next=flow.ode_step(v, obs.x_t, obs.t, obs.t_next)))
    return rewards, info


def test_oracle_gets_full_reward_on_every_heldout_task_of_every_category():
    scenario = unigrpo_env.make_scenario("t2i_reason")
    tasks = scenario.tasks("heldout")
    assert {t.category for t in tasks} == set(CATEGORIES)
    envs = unigrpo_env.make_vec(scenario, num_prompts=len(tasks), group_size=1, split="heldout")
    envs.reset(seed=0, options={"task_index": list(range(len(tasks)))})
    targets = torch.stack([scenario.target_latent(task) for task in envs.tasks])
    rewards, info = oracle_rollout(envs, targets)
    assert rewards.tolist() == [1.0] * len(tasks)
    assert info["reward_components"]["correct"].tolist() == [1.0] * len(tasks)


def _changed_scenes(task: ShapesTask):
    """(check kind that must drop, scene with one attribute changed) for the task's category."""
    scene = task.target
    first = scene.objects[0]
    other_shape = next(
        s for s in ("square", "circle", "triangle") if s != first.shape and all(o.shape != s for o in scene.objects)
    )
    changes = [("object", scene.replace_object(0, shape=other_shape))]
    if task.category in ("colors", "color_attr"):
        other_colour = next(c for c in ("red", "green", "blue", "yellow") if all(o.colour != c for o in scene.objects))
        changes.append(("colour", scene.replace_object(0, colour=other_colour)))
    if task.category == "position":
        a, b = scene.objects
        changes.append(
            (
                "position",
                type(scene)(objects=(a.__class__(a.shape, a.colour, b.cell), b.__class__(b.shape, b.colour, a.cell))),
            )
        )
    return changes


def test_one_changed_attribute_loses_reward_in_its_category_only():
    scenario = unigrpo_env.make_scenario("t2i_reason")
    chosen = {}
    for i, task in enumerate(scenario.tasks("heldout")):
        chosen.setdefault(task.category, i)
    cases = []
    for _category, index in sorted(chosen.items()):
        task = scenario.tasks("heldout")[index]
        for kind, scene in _changed_scenes(ShapesTask.from_dict(task.meta["shapes_task"])):
            cases.append((index, kind, scene))
    envs = unigrpo_env.make_vec(scenario, num_prompts=len(cases), group_size=1, split="heldout")
    envs.reset(seed=0, options={"task_index": [c[0] for c in cases]})
    targets = torch.stack(
        [scenario.image_codec.encode(torch.from_numpy(render(scene)).unsqueeze(0))[0] for _, _, scene in cases]
    )
    rewards, info = oracle_rollout(envs, targets)
    components = info["reward_components"]
    for i, (_, kind, _) in enumerate(cases):
        assert rewards[i] < 1.0, f"case {i} ({kind}) kept the full reward"
        assert components[kind][i] < 1.0
        unchanged = [k for k in ("count", "position") if k != kind and not torch.isnan(torch.tensor(components[k][i]))]
        for k in unchanged:
            assert components[k][i] == 1.0, f"changing {kind} also changed {k}"


def sde_episode(env, seed: int):
    """A seeded stochastic episode: random text, then SDE steps with a fixed 'velocity' x_t."""
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    generator = torch.Generator().manual_seed(seed)
    terminated = False
    while not terminated:
        if obs.phase == "text":
            action = env.action_space.sample(mask=obs)
        else:
            x_next, log_prob, _, _ = flow.sde_step(
                -obs.x_t.unsqueeze(0), obs.x_t.unsqueeze(0), obs.t, obs.t_next, 0.7, generator=generator
            )
            action = FlowAction(x_next=x_next[0], log_prob=log_prob[0])
        obs, _, terminated, _, info = env.step(action)
    return info["trajectory"]


def test_seeded_episodes_are_identical_and_save_load_round_trips(tmp_path):
    env = unigrpo_env.make("t2i_reason")
    first, second, other = sde_episode(env, 3), sde_episode(env, 3), sde_episode(env, 4)
    assert first == second and first != other
    assert first.turns[0].image.stochastic.all() and not torch.isnan(first.turns[0].image.log_prob).any()
    path = first.save(tmp_path / "episode.safetensors")
    loaded = Trajectory.load(path)
    assert loaded == first
    assert loaded.task == first.task and loaded.reward == first.reward
    for a, b in zip(loaded.turns[0].segments, first.turns[0].segments):
        for name, tensor in b._tensors().items():
            assert tensors_equal(getattr(a, name), tensor)  # same dtype, shape, values; NaN == NaN


def test_trajectory_files_are_not_pickles(tmp_path):
    env = unigrpo_env.make("t2i_reason")
    path = sde_episode(env, 0).save(tmp_path / "t.safetensors")
    raw = path.read_bytes()
    assert b"\x80\x04" not in raw[:16] and b"unigrpo-trajectory/2" in raw
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04not a trajectory")
    with pytest.raises(TrajectoryFileError, match="not a readable safetensors file"):  # nothing unpickled
        Trajectory.load(tmp_path / "bad.safetensors")


def test_readme_env_step_and_batched_examples_run(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## `env.step()` in your own code", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "episode.safetensors").exists()
    # the batched example follows it in the README, in the same session (names imported above)
    batched = readme.split("## Batched environments", 1)[1]
    code = re.search(r"```python\n(.*?)```", batched, re.S).group(1)
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["batch"].rewards.shape == (32,) and bool((namespace["batch"].rewards == 1.0).all())
    assert namespace["info"]["_reward_components"].all()  # Gymnasium's vector info, as the README says


def test_make_rejects_unknown_scenarios_and_options():
    with pytest.raises(KeyError, match="unknown scenario 'nope'.*t2i_reason"):
        unigrpo_env.make("nope")
    with pytest.raises(ValueError, match="unknown option.*num_stepz"):
        unigrpo_env.make("t2i_reason", num_stepz=3)
    with pytest.raises(unigrpo_env.TaskSplitError, match="unknown split"):
        unigrpo_env.make("t2i_reason", split="validation")
    env = unigrpo_env.make("t2i_reason", num_steps=4, max_tokens=50, split="heldout")
    obs, _ = env.reset(seed=0)
    assert obs.num_steps == 4 and obs.tokens_left == 50 and env.unwrapped.task.split == "heldout"


def test_readme_responding_scenario_example_runs(capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Environments that respond", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {"__name__": "readme_respond"}
    exec(compile(code, "README.md", "exec"), namespace)
    trajectory = namespace["info"]["trajectory"]
    assert len(trajectory.turns) == 3 and all(turn.reward is not None for turn in trajectory.turns)
    assert trajectory.turns[1].prompt == "that is not it : draw it again" and namespace["terminated"]
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 2)[:2] for line in printed[:3]] == [["1", "that"], ["2", "that"], ["2", "None"]]
