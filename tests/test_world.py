"""The world: the model's side of an environment (its text codec, image codec and time grid),
given to the environment beside the scenario (issue: the model's world belongs to the policy)."""

from __future__ import annotations

import pytest
import torch
from conftest import MeanColourReward, ToyScenario, toy_tokenizer

import unigrpo_env
from unigrpo_env import FlowAction, PixelCodec, Scenario, Task, TextAction, TextCodec, World, flow


def toy_world(num_steps: int = 5, shift: float = 3.0, image_size: int = 4) -> World:
    codec = TextCodec(toy_tokenizer(), end_of_thinking="</think>", max_tokens=6)
    return World.shifted(codec, PixelCodec(image_size), num_steps, shift)


class TasksOnly(Scenario):
    """A scenario that is only tasks and a reward: no tokenizer, no codec, no grid."""

    name = "tasks_only"

    def __init__(self):
        self.reward = MeanColourReward()

    def tasks(self, split):
        return [Task(prompts=("draw a red dot",), category="red", split=split, index=0, meta={"rgb": [255, 0, 0]})]


def test_a_world_checks_its_grid_and_codecs():
    world = toy_world()
    assert world.num_steps == 5 and world.latent_shape == (3, 4, 4) and world.image_size == 4
    assert torch.equal(world.timesteps(), flow.timestep_schedule(5, 3.0))
    world.timesteps()[0] = 7.0  # a copy
    assert world.timesteps()[0] == 1.0
    codec, pixels = world.text_codec, world.image_codec
    for bad in ([1.0], [1.0, 0.5], [0.9, 0.0], [1.0, 0.5, 0.5, 0.0], [1.0, float("nan"), 0.0], [1.0, 1.2, 0.0]):
        with pytest.raises(ValueError, match="timesteps"):
            World(codec, pixels, torch.tensor(bad))
    with pytest.raises(TypeError, match="image_codec must be a unigrpo_env.ImageCodec"):
        World(codec, object(), torch.tensor([1.0, 0.0]))
    with pytest.raises(TypeError, match="text_codec must be a unigrpo_env.TextCodec"):
        World(toy_tokenizer(), pixels, torch.tensor([1.0, 0.0]))


def test_the_environments_run_on_the_world_they_are_given():
    scenario = ToyScenario(num_turns=1, num_steps=3, image_size=4)
    assert scenario.default_world().num_steps == 3  # the scenario's own codecs and grid
    world = toy_world(num_steps=5, shift=3.0, image_size=8)
    env = unigrpo_env.InterleavedEnv(scenario, world)
    assert env.world is world and env.observation_space.latent_shape == (3, 8, 8)
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(TextAction(tokens=[3, 2]))
    grid, seen = world.timesteps().tolist(), []
    terminated = False
    while not terminated:
        seen.append(obs.t)
        assert tuple(obs.x_t.shape) == (3, 8, 8)
        obs, reward, terminated, _, info = env.step(FlowAction(x_next=obs.x_t * 0.5))
    assert seen == pytest.approx(grid[:-1]) and len(seen) == 5
    trajectory = info["trajectory"]
    assert trajectory.turns[0].image.t.tolist() == pytest.approx(grid[:-1])
    envs = unigrpo_env.make_vec(scenario, 1, 2, world=world)
    assert envs.world is world and envs.single_observation_space.latent_shape == (3, 8, 8)
    assert unigrpo_env.make(scenario, world=world).world is world


def test_a_scenario_of_tasks_and_a_reward_plays_in_a_given_world():
    scenario = TasksOnly()
    with pytest.raises(NotImplementedError, match="offers no default world"):
        unigrpo_env.InterleavedEnv(scenario)
    envs = unigrpo_env.make_vec(scenario, 1, 2, world=toy_world(num_steps=2))
    obs, _ = envs.reset(seed=0)
    obs, *_ = envs.step(TextAction(tokens=[[3, 2], [4, 2]]))
    done = False
    while not done:
        obs, rewards, dones, _, _ = envs.step(FlowAction(x_next=obs.x_t * 0.0 + 1.0))  # all red-ish: pixels 255
        done = bool(dones.all())
    assert rewards.tolist() == pytest.approx([1 / 3, 1 / 3])  # white against red: 1 - (0 + 255 + 255) / 3 / 255


def test_the_policy_and_the_world_must_agree_on_end_of_thinking():
    from types import SimpleNamespace

    from unigrpo_env.agents.policy import PolicyMismatchError, check_policy_fits, world_of

    scenario, world = ToyScenario(), toy_world()
    policy = SimpleNamespace(text=SimpleNamespace(eot_id=2), image=SimpleNamespace(), world=None)
    assert world_of(policy, scenario).num_steps == 3  # no world of its own: the scenario's
    check_policy_fits(policy, scenario, world)  # "</think>" is id 2 in both
    policy.world = world
    assert world_of(policy, scenario) is world
    policy.text.eot_id = 5
    with pytest.raises(PolicyMismatchError, match="end-of-thinking id is 5, the environment's .'</think>'. 2"):
        check_policy_fits(policy, scenario)


def test_the_scenario_base_class_holds_no_world():
    # a scenario is tasks, splits and a reward; the codecs and the grid are the world's
    for name in ("text_codec", "image_codec", "num_steps", "shift", "timesteps"):
        assert not hasattr(Scenario, name) and name not in Scenario.__annotations__, name
    assert set(Scenario.__annotations__) >= {"reward"}


def test_a_scenario_written_before_the_world_still_plays_with_a_deprecation_warning():
    class Old(TasksOnly):  # the old style: the world's parts as the scenario's attributes
        name = "old"

        def __init__(self):
            super().__init__()
            world = toy_world(num_steps=4, shift=1.0)
            self.text_codec, self.image_codec, self.num_steps, self.shift = (
                world.text_codec, world.image_codec, 4, 1.0,
            )  # fmt: skip

    with pytest.warns(DeprecationWarning, match="defines no default_world"):
        env = unigrpo_env.InterleavedEnv(Old())
    assert env.world.num_steps == 4 and torch.equal(env.world.timesteps(), flow.timestep_schedule(4, 1.0))
