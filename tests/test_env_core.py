"""The environment's mechanics on a toy multi-turn scenario: phases, the text-to-image switch,
noise and determinism, invalid actions leaving everything unchanged, the batched environment."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import ToyScenario

import unigrpo_env
from unigrpo_env import FlowAction, InterleavedEnv, TextAction
from unigrpo_env import errors as E
from unigrpo_env.flow import ode_step, straight_line_velocity


def finish_text(env, ids=(3, 2)):
    return env.step(TextAction(tokens=list(ids)))


def target_latent(env, rgb):
    img = torch.tensor(rgb, dtype=torch.uint8).expand(env.image_codec.image_size, env.image_codec.image_size, 3)
    return env.image_codec.encode(img.unsqueeze(0))[0]


def play_oracle(env, obs):
    """Follow the straight-line velocity towards the task's colour; return the last step's output."""
    task = env.task
    while True:
        if obs.phase == "text":
            out = env.step(TextAction(tokens=[3, 2]))
        else:
            x0 = target_latent(env, task.meta["rgb"])
            v = straight_line_velocity(obs.x_t, x0, obs.t)
            out = env.step(FlowAction(x_next=ode_step(v, obs.x_t, obs.t, obs.t_next)))
        obs = out[0]
        if out[2]:
            return out


def test_phases_turns_and_terminal_reward(toy_scenario):
    env = InterleavedEnv(toy_scenario)
    obs, info = env.reset(seed=0)
    assert obs.phase == "text" and obs.turn == 0 and obs.num_turns == 2 and obs.tokens_left == 4
    assert info["trajectory"].turns[0].prompt == obs.prompt
    obs, r, term, trunc, _ = env.step(TextAction(tokens=[3]))
    assert (obs.phase, r, term, trunc) == ("text", 0.0, False, False)
    obs, *_ = env.step(TextAction(tokens=[2]))  # end-of-thinking closes the text phase
    assert obs.phase == "image" and obs.t == 1.0 and obs.x_t.shape == (3, 4, 4) and obs.tokens.tolist() == [3, 2]
    rewards = []
    for _ in range(3):
        obs, r, term, *_ = env.step(FlowAction(x_next=torch.zeros(3, 4, 4)))
        rewards.append(r)
    assert obs.phase == "text" and obs.turn == 1 and obs.cond_images.shape == (1, 4, 4, 3)
    assert rewards == [0.0, 0.0, 0.0] and not term
    obs, *_ = env.step(TextAction(tokens=[3, 4, 5, 6]))  # the token limit closes the text phase
    assert obs.phase == "image"
    for _ in range(3):
        obs, r, term, _, info = env.step(FlowAction(x_next=torch.zeros(3, 4, 4)))
    assert term and obs.phase == "done" and 0.0 <= r <= 1.0
    traj = info["trajectory"]
    assert traj.terminated and traj.reward == r and len(traj.turns) == 2
    assert traj.turns[1].text.tokens.tolist() == [3, 4, 5, 6]
    img = traj.turns[1].image
    assert img.num_steps == 3 and img.image.shape == (4, 4, 3)
    assert torch.equal(img.x_t[1:], img.x_next[:-1])
    assert img.t.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3]) and img.t_next[-1] == 0.0


def test_oracle_gets_full_reward(toy_scenario):
    env = InterleavedEnv(toy_scenario)
    for index in range(3):
        obs, _ = env.reset(seed=index, options={"task_index": index})
        _, reward, term, _, info = play_oracle(env, obs)
        assert term and reward == pytest.approx(1.0)


def test_seeded_reset_is_deterministic_and_noise_is_seeded(toy_scenario):
    env = InterleavedEnv(toy_scenario)

    def run(seed):
        obs, _ = env.reset(seed=seed)
        obs, *_ = finish_text(env)
        return obs.x_t, env.task

    x_a, task_a = run(7)
    x_b, task_b = run(7)
    x_c, _ = run(8)
    assert torch.equal(x_a, x_b) and task_a == task_b
    assert not torch.equal(x_a, x_c)


def test_step_before_reset_and_after_end(toy_scenario):
    env = InterleavedEnv(toy_scenario)
    with pytest.raises(E.EpisodeEndedError):
        env.step(TextAction(tokens=[3]))
    obs, _ = env.reset(seed=0)
    play_oracle(env, obs)
    with pytest.raises(E.EpisodeEndedError, match="reset"):
        env.step(TextAction(tokens=[3]))


def _state(env):
    """A copy of what the env holds (the trajectory is a view of its record: copy it, so that a
    change to the record would show)."""
    return copy.deepcopy(env.trajectory), env.phase, repr(env.action_space)


INVALID_TEXT = [
    (TextAction(tokens=[99]), E.TokenOutOfVocabularyError),
    (TextAction(tokens=[-1]), E.TokenOutOfVocabularyError),
    (TextAction(tokens=[3, 3, 3, 3, 3]), E.TokenBudgetError),
    (TextAction(tokens=[2, 3]), E.TokenBudgetError),
    (TextAction(tokens=torch.tensor([3.0, 4.0])), E.ActionDTypeError),
    (TextAction(tokens=[[3, 4]]), E.ActionShapeError),
    (TextAction(tokens=torch.zeros(0, dtype=torch.long)), E.ActionShapeError),
    (TextAction(tokens=[3], log_probs=[float("nan")]), E.NonFiniteActionError),
    (TextAction(tokens=[3], log_probs=[0.5]), E.InvalidActionError),
    (FlowAction(x_next=torch.zeros(3, 4, 4)), E.WrongPhaseError),
    ("red", E.InvalidActionError),
]


@pytest.mark.parametrize("bad,error", INVALID_TEXT, ids=lambda v: getattr(v, "__name__", None))
def test_invalid_text_action_leaves_env_unchanged(toy_scenario, bad, error):
    env = InterleavedEnv(toy_scenario)
    env.reset(seed=3)
    env.step(TextAction(tokens=[3]))
    before = _state(env)
    with pytest.raises(error):
        env.step(bad)
    assert _state(env)[0] == before[0] and _state(env)[1:] == before[1:]
    # a valid action after the error gives exactly what it gives without the error
    after_error = env.step(TextAction(tokens=[4, 2]))
    reference = InterleavedEnv(ToyScenario())
    reference.reset(seed=3)
    reference.step(TextAction(tokens=[3]))
    expected = reference.step(TextAction(tokens=[4, 2]))
    assert after_error[0] == expected[0] and after_error[4]["trajectory"] == expected[4]["trajectory"]


INVALID_FLOW = [
    (FlowAction(x_next=torch.zeros(3, 4, 5)), E.ActionShapeError),
    (FlowAction(x_next=torch.zeros(1, 3, 4, 4)), E.ActionShapeError),
    (FlowAction(x_next=torch.zeros(3, 4, 4, dtype=torch.float64)), E.ActionDTypeError),
    (FlowAction(x_next=torch.zeros(3, 4, 4).index_fill_(0, torch.tensor([1]), float("nan"))), E.NonFiniteActionError),
    (FlowAction(x_next=torch.full((3, 4, 4), float("inf"))), E.NonFiniteActionError),
    (FlowAction(x_next=torch.zeros(3, 4, 4), log_prob=float("nan")), E.NonFiniteActionError),
    (FlowAction(x_next=torch.zeros(3, 4, 4), log_prob=[0.0, 1.0]), E.ActionShapeError),
    (FlowAction(x_next=torch.zeros(3, 4, 4, device="meta")), E.ActionDeviceError),
    (TextAction(tokens=[3]), E.WrongPhaseError),
]


@pytest.mark.parametrize("bad,error", INVALID_FLOW, ids=lambda v: getattr(v, "__name__", None))
def test_invalid_flow_action_leaves_env_unchanged(toy_scenario, bad, error):
    def prepare(env):
        env.reset(seed=5)
        env.step(TextAction(tokens=[3, 2]))
        env.step(FlowAction(x_next=torch.ones(3, 4, 4) * 0.5, log_prob=-1.0))

    env = InterleavedEnv(toy_scenario)
    prepare(env)
    before = _state(env)
    with pytest.raises(error):
        env.step(bad)
    assert _state(env)[0] == before[0] and _state(env)[1:] == before[1:]
    good = FlowAction(x_next=torch.full((3, 4, 4), 0.25), log_prob=-2.0)
    after_error = env.step(good)
    reference = InterleavedEnv(ToyScenario())
    prepare(reference)
    expected = reference.step(good)
    assert after_error[0] == expected[0] and after_error[4]["trajectory"] == expected[4]["trajectory"]


def test_env_does_not_alias_the_callers_tensors(toy_scenario):
    env = InterleavedEnv(toy_scenario)
    env.reset(seed=0)
    env.step(TextAction(tokens=[3, 2]))
    x = torch.zeros(3, 4, 4)
    obs, *_ = env.step(FlowAction(x_next=x))
    x.fill_(7.0)
    obs.x_t.fill_(9.0)
    assert float(env.trajectory.turns[0].image.x_next.abs().max()) == 0.0
    next_obs, *_ = env.step(FlowAction(x_next=x.clone()))  # the env's own latent was not changed through obs
    assert float(env.trajectory.turns[0].image.x_t[1].abs().max()) == 0.0


def test_log_probs_and_stochastic_flags_are_recorded(toy_scenario):
    env = InterleavedEnv(toy_scenario)
    env.reset(seed=0)
    env.step(TextAction(tokens=[3], log_probs=[-0.5]))
    env.step(TextAction(tokens=[2]))
    env.step(FlowAction(x_next=torch.zeros(3, 4, 4), log_prob=-3.0))
    env.step(FlowAction(x_next=torch.zeros(3, 4, 4)))
    traj = env.trajectory
    lp = traj.turns[0].text.log_probs
    assert lp[0] == -0.5 and math.isnan(lp[1]) and not traj.turns[0].text.has_log_probs
    image = traj.turns[0].image
    assert image.stochastic.tolist() == [True, False] and image.log_prob[0] == -3.0 and math.isnan(image.log_prob[1])


def test_broken_reward_gives_nan_and_an_error_not_a_crash(toy_scenario):
    def broken(inputs):
        raise RuntimeError("scorer offline")

    toy_scenario.reward = broken
    env = InterleavedEnv(toy_scenario)
    obs, _ = env.reset(seed=0, options={"task_index": 0})
    *_, info = play_oracle(env, obs)
    assert math.isnan(info["trajectory"].reward) and "scorer offline" in info["reward_error"]


def test_render_returns_latest_image(toy_scenario):
    env = InterleavedEnv(toy_scenario, render_mode="rgb_array")
    obs, _ = env.reset(seed=0, options={"task_index": 2})
    assert env.render().shape == (4, 4, 3) and (env.render() == 255).all()
    play_oracle(env, obs)
    frame = env.render()
    assert frame.dtype == np.uint8 and frame[0, 0].tolist() == [0, 0, 255]


def test_random_agent_finishes_episodes(toy_scenario):
    env = InterleavedEnv(toy_scenario)
    env.action_space.seed(0)
    for seed in range(5):
        obs, _ = env.reset(seed=seed)
        for _ in range(100):
            obs, _, terminated, _, _ = env.step(env.action_space.sample(mask=obs))  # the observation masks the sample
            if terminated:
                break
        assert terminated


def test_single_action_space_is_a_static_description(toy_scenario):
    """As the vector env's: the env never changes its space; the observation masks a sample."""
    env = InterleavedEnv(toy_scenario)
    space = env.action_space
    described = repr(space)
    unmasked = space.sample()  # before any reset (Gymnasium's check_env): a segment valid at every start
    obs, _ = env.reset(seed=0)
    assert isinstance(unmasked, TextAction) and space.contains(unmasked)
    env.step(unmasked)
    obs, *_ = env.step(TextAction(tokens=[2]))  # end of thinking: the image phase
    assert obs.phase == "image" and env.action_space is space and repr(space) == described
    assert isinstance(space.sample(mask=obs), FlowAction) and space.contains(space.sample(mask=obs))
    assert space.contains(TextAction(tokens=[3]))  # of the space, though not valid in this state
    with pytest.raises(E.WrongPhaseError):
        env.step(TextAction(tokens=[3]))
    with pytest.raises(ValueError, match="mask=obs"):
        space.sample(mask="image")


def test_vector_info_is_arrays_with_gymnasiums_masks(toy_scenario):
    """Every value of the vector env's info is an array over the episodes beside its ``_key``
    mask, so Gymnasium's DictInfoToList gives one dict per episode."""
    from gymnasium.wrappers.vector import DictInfoToList

    envs = DictInfoToList(unigrpo_env.make_vec(toy_scenario, num_prompts=2, group_size=2))
    obs, infos = envs.reset(seed=0)
    assert [info["group_id"] for info in infos] == [0, 0, 1, 1] and all("category" in info for info in infos)
    raw = envs.unwrapped
    while True:
        action = raw.action_space.sample(mask=obs)
        obs, rewards, terminated, _, infos = envs.step(action)
        if terminated.all():
            break
    assert len(infos) == 4 and all(set(info["reward_components"]) >= {"colour"} for info in infos)
    assert [info["reward_components"]["colour"] for info in infos] == raw.trajectory.reward_components[
        "colour"
    ].tolist()
    vector_info = raw._info()
    for key in vector_info:
        if not key.startswith("_"):
            mask = vector_info[f"_{key}"]
            assert mask.dtype == np.bool_ and mask.shape == (4,) and mask.all()


# -- batched environment -------------------------------------------------------------------------


def test_vector_env_groups_share_prompts_and_latents_are_one_tensor(toy_scenario):
    envs = unigrpo_env.make_vec(toy_scenario, num_prompts=2, group_size=3)
    obs, info = envs.reset(seed=0)
    assert envs.num_envs == 6 and info["group_id"].tolist() == [0, 0, 0, 1, 1, 1]
    prompts = [p[0] for p in obs.prompts]
    assert prompts[0] == prompts[1] == prompts[2] and prompts[3] == prompts[4] == prompts[5]
    # token by token: episodes 0..2 stop after one token, the others write to the limit
    obs, *_ = envs.step(TextAction(tokens=[[2], [2], [2], [3], [3], [3]]))
    assert obs.text_open.tolist() == [False] * 3 + [True] * 3 and obs.phase == "text"
    with pytest.raises(E.TokenBudgetError, match="already closed"):
        envs.step(TextAction(tokens=[[3]] * 6))
    obs, *_ = envs.step(TextAction(tokens=[[0, 0, 0]] * 3 + [[4, 5, 6]] * 3, lengths=[0, 0, 0, 3, 3, 3]))
    assert obs.phase == "image" and obs.x_t.shape == (6, 3, 4, 4)
    assert obs.token_counts.tolist() == [1, 1, 1, 4, 4, 4]
    for _ in range(6):
        obs, rewards, term, trunc, info = envs.step(FlowAction(x_next=torch.zeros(6, 3, 4, 4)))
        if obs.phase == "text":
            obs, *_ = envs.step([TextAction(tokens=[2])] * 6)  # a list of per-episode actions
    assert term.all() and not trunc.any() and rewards.shape == (6,) and "colour" in info["reward_components"]
    trajs = envs.trajectories()
    assert [t.turns[0].text.tokens.tolist() for t in trajs[:4]] == [[2], [2], [2], [3, 4, 5, 6]]
    assert trajs[0].reward == pytest.approx(float(rewards[0]))
    with pytest.raises(E.EpisodeEndedError):
        envs.step(FlowAction(x_next=torch.zeros(6, 3, 4, 4)))


def test_vector_env_matches_single_env_episode_by_episode(toy_scenario):
    """A batch of one, stepped with the same actions as the single environment, gives the same trajectory."""
    envs = unigrpo_env.make_vec(ToyScenario(), num_prompts=1, group_size=1)
    env = InterleavedEnv(toy_scenario)
    envs.reset(seed=11)
    env.reset(seed=11)
    for action in [TextAction(tokens=[3, 2])] + [FlowAction(x_next=torch.full((3, 4, 4), 0.1 * k)) for k in range(3)]:
        batched = (
            TextAction(tokens=action.tokens.unsqueeze(0))
            if isinstance(action, TextAction)
            else FlowAction(x_next=action.x_next.unsqueeze(0))
        )
        envs.step(batched)
        env.step(action)
    assert envs.trajectory.episode(0) == env.trajectory


def test_vector_env_random_agent_and_seeding(toy_scenario):
    envs = unigrpo_env.make_vec(toy_scenario, num_prompts=2, group_size=2)

    def rollout(seed):
        obs, _ = envs.reset(seed=seed)
        envs.action_space.seed(seed)
        for _ in range(200):
            obs, _, term, _, _ = envs.step(envs.action_space.sample(mask=obs))  # the observation masks the sample
            if term.all():
                return envs.trajectories()
        raise AssertionError("random agent did not finish")

    assert rollout(1) == rollout(1)
    assert rollout(1) != rollout(2)


def test_vector_action_space_is_a_static_description(toy_scenario):
    envs = unigrpo_env.make_vec(toy_scenario, num_prompts=1, group_size=2)
    space = envs.action_space
    obs, _ = envs.reset(seed=0)
    with pytest.raises(ValueError, match="mask=obs"):
        space.sample()
    described = repr(space)
    obs, *_ = envs.step(TextAction(tokens=[[3, 2], [3, 2]]))
    assert obs.phase == "image" and envs.action_space is space and repr(space) == described
    assert space.contains(space.sample(mask=obs)) and space.contains(TextAction(tokens=[[3], [4]]))


def test_invalid_batched_action_leaves_vector_env_unchanged(toy_scenario):
    envs = unigrpo_env.make_vec(toy_scenario, num_prompts=1, group_size=2)
    envs.reset(seed=0)
    envs.step(TextAction(tokens=[[3, 2], [3, 2]]))
    before = copy.deepcopy(envs.trajectories())
    bad_x = torch.zeros(2, 3, 4, 4)
    bad_x[1, 0, 0, 0] = float("nan")
    for bad, error in [
        (FlowAction(x_next=bad_x), E.NonFiniteActionError),
        (FlowAction(x_next=torch.zeros(3, 3, 4, 4)), E.ActionShapeError),
        ([FlowAction(x_next=torch.zeros(3, 4, 4))], E.ActionShapeError),
        (TextAction(tokens=[[3], [3]]), E.WrongPhaseError),
    ]:
        with pytest.raises(error):
            envs.step(bad)
        assert envs.trajectories() == before


def test_info_trajectory_is_a_view_and_costs_the_same_at_every_step():
    """``info["trajectory"]`` is built at every step: as a view of the env's record it copies no
    latent, so a step costs the same at the end of a long image phase as at its start."""
    import statistics
    import time

    env = InterleavedEnv(ToyScenario(num_turns=1, num_steps=300, image_size=16))
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(TextAction(tokens=[3, 2]))
    seconds = []
    for _ in range(300):
        action = FlowAction(x_next=ode_step(-obs.x_t[None], obs.x_t[None], obs.t, obs.t_next)[0])
        start = time.perf_counter()
        obs, _, terminated, _, info = env.step(action)
        seconds.append(time.perf_counter() - start)
    image = info["trajectory"].turns[0].image
    assert terminated and image.num_steps == 300
    # one buffer behind every step's x_t and x_next: nothing was copied into the trajectory
    assert image.x_t.untyped_storage().data_ptr() == image.x_next.untyped_storage().data_ptr()
    early, late = statistics.median(seconds[10:60]), statistics.median(seconds[240:290])
    assert late < 2.0 * early, (early, late)
