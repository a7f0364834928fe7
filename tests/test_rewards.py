"""Rewards: weighted-sum specs (parsing, weights, NaN, per-term logging), group-level scorers,
the scorer thread pool (concurrency and determinism), and the built-ins jpeg_compressibility,
edit_fidelity and the quality alias on hand-made images."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import MeanColourReward, ToyScenario

import unigrpo_env
from unigrpo_env import FlowAction, RewardInputs, RewardOutput, Task, TextAction, flow
from unigrpo_env.registration import RegistryError
from unigrpo_env.rewards import (
    ChunkedReward,
    GroupReward,
    RewardComponentError,
    RewardSpecError,
    WeightedSum,
    get_reward,
    list_rewards,
    parse_reward_spec,
)
from unigrpo_env.rewards.concurrency import ScorerPool, merge_outputs
from unigrpo_env.rewards.jpeg import JpegCompressibilityReward
from unigrpo_env.scenarios.shapes import Scene, SceneObject, render
from unigrpo_env.scenarios.shapes.edit_fidelity import EditFidelityReward, edit_meta
from unigrpo_env.scenarios.shapes.rewards import ImageQualityReward, ShapesVerifierReward


def inputs_of(images, tasks=None, group_ids=None) -> RewardInputs:
    images = torch.as_tensor(np.asarray(images), dtype=torch.uint8)
    n = images.shape[0]
    tasks = tasks or [Task(prompts=("p",), index=i) for i in range(n)]
    return RewardInputs(
        images=images,
        tasks=list(tasks),
        texts=[[f"text {i}"] for i in range(n)],
        earlier_images=images[:, None][:, :0],
        group_ids=group_ids,
    )


def blank(n=1, size=32):
    return np.full((n, size, size, 3), 255, dtype=np.uint8)


class Constant:
    """Scores ``values`` (a list, NaN allowed) after ``delay`` seconds; one component."""

    def __init__(self, values, delay=0.0):
        self.values, self.delay = values, delay
        self.threads: list[str] = []

    def __call__(self, inputs):
        self.threads.append(threading.current_thread().name)
        time.sleep(self.delay)
        scores = torch.tensor(self.values[: len(inputs)], dtype=torch.float32)
        return RewardOutput(scores=scores, components={"doubled": 2 * scores})


# -- specs ------------------------------------------------------------------------------------------


def test_spec_parsing():
    terms = parse_reward_spec(" shapes_verifier:1.0 , quality : 0.2,jpeg_compressibility:-1e-1,edit_fidelity")
    assert [(t.name, t.weight, t.weighted) for t in terms] == [
        ("shapes_verifier", 1.0, True),
        ("quality", 0.2, True),
        ("jpeg_compressibility", -0.1, True),
        ("edit_fidelity", 1.0, False),
    ]
    # a module:Attribute reference is told apart from name:weight by its last part
    assert [(t.name, t.weight, t.weighted) for t in parse_reward_spec("my_pkg.rewards:Judge:0.5,pkg:Other")] == [
        ("my_pkg.rewards:Judge", 0.5, True),
        ("pkg:Other", 1.0, False),
    ]


@pytest.mark.parametrize(
    "spec,message",
    [
        ("", "non-empty"),
        ("quality,,shapes_verifier", "empty term"),
        ("quality:nan", "finite"),
        ("quality:inf", "finite"),
        ("quality,quality:2", "twice"),
        ("two words:1", "bad term"),
        ("quality:", "bad term"),
    ],
)
def test_bad_specs_raise_spec_errors(spec, message):
    with pytest.raises(RewardSpecError, match=message):
        get_reward(spec)


def test_one_name_is_the_reward_itself_and_unknown_names_are_registry_errors():
    assert isinstance(get_reward("quality"), ImageQualityReward)
    assert isinstance(get_reward("shapes_verifier", score="correct"), ShapesVerifierReward)
    assert isinstance(get_reward("quality:0.5"), WeightedSum)  # a weight makes it a (scaled) sum
    assert WeightedSum.from_spec("quality").weights == {"quality": 1.0}
    with pytest.raises(RegistryError, match="unknown reward 'nope'"):
        get_reward("quality:1,nope:2")
    assert {"shapes_verifier", "image_quality", "quality", "edit_fidelity", "jpeg_compressibility"} <= set(
        list_rewards()
    )


def test_composite_options_are_keyed_by_term():
    reward = get_reward("shapes_verifier,quality:0.2", shapes_verifier={"score": "correct"})
    assert reward.weights == {"shapes_verifier": 1.0, "quality": 0.2}
    assert reward.terms[0][1].score == "correct"
    with pytest.raises(RewardSpecError, match="match no term"):
        get_reward("shapes_verifier,quality:0.2", score="correct")
    with pytest.raises(RewardSpecError, match="must be a mapping"):
        get_reward("shapes_verifier,quality:0.2", quality=3)
    with pytest.raises(RewardSpecError, match="could not build reward 'quality'"):
        get_reward("shapes_verifier,quality:0.2", quality={"bogus": 1})


# -- weighted sums ----------------------------------------------------------------------------------


def test_weighted_sum_weights_components_and_nan():
    a = Constant([1.0, 2.0, math.nan, 4.0])
    b = Constant([10.0, 20.0, 30.0, math.nan])
    watched = Constant([math.nan, math.nan, math.nan, math.nan])
    out = WeightedSum([("a", a, 0.5), ("b", b, -0.1), ("watched", watched, 0.0)])(inputs_of(blank(4)))
    expected = [0.5 * 1 - 0.1 * 10, 0.5 * 2 - 0.1 * 20]
    assert out.scores[:2].tolist() == pytest.approx(expected)
    assert math.isnan(out.scores[2]) and math.isnan(out.scores[3])  # NaN in a weighted term is contagious
    assert sorted(out.components) == ["a", "a/doubled", "b", "b/doubled", "watched", "watched/doubled"]
    assert out.components["b"].tolist()[:3] == [10.0, 20.0, 30.0]  # each term's own, unweighted score
    assert out.components["a/doubled"].tolist()[:2] == [2.0, 4.0]


def test_a_failing_term_is_named_and_the_environment_reports_it():
    def broken(inputs):
        raise ConnectionError("judge unreachable")

    reward = WeightedSum([("colour", MeanColourReward(), 1.0), ("judge", broken, 0.5)])
    with pytest.raises(RewardComponentError, match="reward term 'judge' failed: ConnectionError: judge unreachable"):
        reward(inputs_of(blank(2, 4), tasks=[Task(prompts=("p",), meta={"rgb": [255, 255, 255]})] * 2))
    scenario = ToyScenario(num_turns=1)
    scenario.reward = reward
    envs = unigrpo_env.make_vec(scenario, num_prompts=1, group_size=2)
    envs.reset(seed=0)
    envs.step(TextAction(tokens=torch.tensor([[3, 2], [3, 2]])))
    for _ in range(scenario.num_steps):
        _, rewards, terminated, _, info = envs.step(FlowAction(x_next=torch.zeros(2, 3, 4, 4)))
    assert terminated.all() and np.isnan(rewards).all() and all("judge unreachable" in e for e in info["reward_error"])


def test_terms_run_concurrently_and_results_are_deterministic():
    # the slowest term comes first, so completion order differs from spec order
    terms = [(f"t{i}", Constant([float(i), 1.0 + i], delay=0.1 * (4 - i)), 1.0 + i) for i in range(4)]
    reward = WeightedSum(terms)
    inputs = inputs_of(blank(2))
    started = time.perf_counter()
    first = reward(inputs)
    wall = time.perf_counter() - started
    assert wall < 0.7  # about the slowest term (0.4 s), well under the sum of all four (1.0 s)
    assert len({t[1].threads[0] for t in terms}) > 1  # they ran on different threads
    second = reward(inputs)
    expected = sum((1.0 + i) * torch.tensor([float(i), 1.0 + i]) for i in range(4))
    assert torch.equal(first.scores, second.scores) and torch.allclose(first.scores, expected)
    assert (
        list(first.components) == list(second.components) == [k for i in range(4) for k in (f"t{i}", f"t{i}/doubled")]
    )
    sequential = WeightedSum(terms, max_workers=1)(inputs)
    assert torch.equal(sequential.scores, first.scores)


def test_scorer_pool_keeps_order_and_raises_after_all_calls_finish():
    pool = ScorerPool()
    done = []

    def work(i):
        time.sleep(0.05 * (3 - i))
        if i == 1:
            raise ValueError("item 1")
        done.append(i)
        return i * i

    assert pool.map(lambda i: (time.sleep(0.02 * (3 - i)), i)[1], range(4)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="item 1"):
        pool.map(work, range(4))
    assert sorted(done) == [0, 2, 3]  # every other call finished before the error surfaced
    with pytest.raises(ValueError, match="max_workers"):
        ScorerPool(0)


# -- group-level and chunked scoring ----------------------------------------------------------------


class GroupCentred(GroupReward):
    """Each episode's mean brightness minus its group's mean; records what each group saw."""

    def __init__(self, delay=0.0):
        self.delay = delay
        self.seen: list[tuple[list[int], list[int]]] = []

    def score_group(self, inputs):
        time.sleep(self.delay)
        self.seen.append(
            ([t.index for t in inputs.tasks], None if inputs.group_ids is None else inputs.group_ids.tolist())
        )
        brightness = inputs.images.float().mean(dim=(1, 2, 3))
        out = {"brightness": brightness}
        if inputs.tasks[0].index == 0:
            out["first_group_only"] = torch.ones(len(inputs))
        return RewardOutput(scores=brightness - brightness.mean(), components=out)


def test_group_rewards_see_one_group_and_come_back_in_batch_order():
    values = [10, 20, 30, 40, 50, 60]
    images = np.stack([np.full((4, 4, 3), v, dtype=np.uint8) for v in values])
    group_ids = torch.tensor([0, 1, 0, 1, 2, 2])  # interleaved groups
    reward = GroupCentred(delay=0.3)
    started = time.perf_counter()
    out = reward(inputs_of(images, group_ids=group_ids))
    assert time.perf_counter() - started < 0.75  # three groups of 0.3 s each, concurrently
    assert sorted(reward.seen) == [([0, 2], [0, 0]), ([1, 3], [1, 1]), ([4, 5], [2, 2])]
    assert out.scores.tolist() == pytest.approx([-10, -10, 10, 10, -5, 5])
    assert out.components["brightness"].tolist() == pytest.approx(values)
    first = out.components["first_group_only"]  # a component one group lacks is NaN elsewhere
    assert first[[0, 2]].tolist() == [1.0, 1.0] and torch.isnan(first[[1, 3, 4, 5]]).all()
    whole = GroupCentred()(inputs_of(images))  # no group ids: the batch is one group
    assert whole.scores.tolist() == pytest.approx([v - 35 for v in values])


def test_a_group_reward_inside_a_weighted_sum_in_the_batched_environment():
    scenario = ToyScenario(num_turns=1)
    scenario.reward = WeightedSum([("centred", GroupCentred(), 1.0), ("colour", MeanColourReward(), 2.0)])
    envs = unigrpo_env.make_vec(scenario, num_prompts=2, group_size=3)
    envs.reset(seed=0)
    envs.step(TextAction(tokens=torch.full((6, 1), 2)))
    for _ in range(scenario.num_steps):
        _, rewards, terminated, _, info = envs.step(FlowAction(x_next=torch.randn(6, 3, 4, 4)))
    centred = info["reward_components"]["centred"].reshape(2, 3)
    assert terminated.all() and np.allclose(centred.sum(axis=1), 0.0, atol=1e-3)  # centred within each group
    assert np.allclose(
        rewards, info["reward_components"]["centred"] + 2 * info["reward_components"]["colour"], atol=1e-5
    )


def test_chunked_reward_equals_the_whole_batch_and_overlaps_chunks():
    images = np.random.default_rng(0).integers(0, 256, size=(7, 32, 32, 3), dtype=np.uint8)
    inputs = inputs_of(images)
    direct = ImageQualityReward()(inputs)
    chunked = ChunkedReward(ImageQualityReward(), chunk_size=3)(inputs)
    assert torch.equal(chunked.scores, direct.scores)
    assert all(torch.equal(chunked.components[k], direct.components[k]) for k in direct.components)
    slow = ChunkedReward(Constant([0.0] * 8, delay=0.25), chunk_size=2)
    started = time.perf_counter()
    slow(inputs_of(blank(8, 4)))
    assert time.perf_counter() - started < 0.7  # four chunks of 0.25 s, concurrently
    with pytest.raises(ValueError, match="values of scores"):
        merge_outputs(3, [([0, 1], RewardOutput(scores=torch.zeros(3)))])


# -- built-ins on hand-made images ------------------------------------------------------------------


def test_jpeg_compressibility_prefers_flat_images():
    rng = np.random.default_rng(0)
    scene = render(Scene((SceneObject("circle", "red", (1, 1)),)))
    noise = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    images = np.stack([blank(1)[0], scene, noise])
    out = get_reward("jpeg_compressibility")(inputs_of(images))
    kb = out.components["kilobytes"]
    assert torch.equal(out.scores, -kb) and bool((kb > 0.3).all())
    assert out.scores[0] > out.scores[1] > out.scores[2]  # blank, then one shape, then noise
    low = JpegCompressibilityReward(quality=10)(inputs_of(noise[None]))
    assert low.components["kilobytes"][0] < kb[2]  # lower quality, smaller file
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibilityReward(quality=0)


def test_quality_is_an_alias_of_image_quality():
    noisy = np.clip(blank(1).astype(int) + np.random.default_rng(1).normal(0, 40, (1, 32, 32, 3)), 0, 255).astype(
        np.uint8
    )
    images = np.concatenate([blank(1), noisy])
    a, b = get_reward("quality")(inputs_of(images)), get_reward("image_quality")(inputs_of(images))
    assert torch.equal(a.scores, b.scores) and a.scores[0] == 1.0 and a.scores[1] < 0.9


def edit_task(before: Scene, after: Scene, index=0) -> Task:
    return Task(prompts=("draw", "edit"), index=index, meta={"shapes_edit": edit_meta(before, after)})


def test_edit_fidelity_counts_the_untouched_objects_still_there():
    red_circle, blue_square, green_triangle = (
        SceneObject("circle", "red", (1, 0)),
        SceneObject("square", "blue", (1, 2)),
        SceneObject("triangle", "green", (0, 1)),
    )
    before = Scene((red_circle, blue_square, green_triangle))
    # canonical (reading) order of cells: 0 = triangle (0, 1), 1 = circle (1, 0), 2 = square (1, 2)
    after = before.replace_object(2, colour="yellow")  # recolour the square: the triangle and circle stay
    task = edit_task(before, after)
    assert task.meta["shapes_edit"]["untouched"] == [0, 1]
    moved = Scene((SceneObject("circle", "red", (2, 0)), SceneObject("square", "yellow", (1, 2)), green_triangle))
    wrong_colour = after.replace_object(1, colour="orange")  # circle recoloured as well
    images = np.stack([render(after), render(before), render(moved), render(wrong_colour), blank(1)[0]])
    out = get_reward("edit_fidelity")(inputs_of(images, tasks=[task] * 5))
    assert out.scores.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.0])  # fidelity ignores whether the edit was made
    assert out.components["kept"].tolist() == [2, 2, 1, 1, 0] and out.components["untouched"].tolist() == [2] * 5
    everything = edit_task(Scene((red_circle,)), Scene((blue_square,)))  # nothing to keep
    assert EditFidelityReward()(inputs_of(blank(1), tasks=[everything])).scores.tolist() == [1.0]


def test_edit_fidelity_needs_edit_metadata():
    with pytest.raises(ValueError, match="needs edit tasks"):
        EditFidelityReward()(inputs_of(blank(1)))
    bad = Task(
        prompts=("p",),
        meta={"shapes_edit": {"before": [{"shape": "circle", "colour": "red", "cell": [0, 0]}], "untouched": [3]}},
    )
    with pytest.raises(ValueError, match="distinct indices"):
        EditFidelityReward()(inputs_of(blank(1), tasks=[bad]))
    odd = Task(
        prompts=("p",),
        meta={"shapes_edit": {"before": [{"shape": "hexagon", "colour": "red", "cell": [0, 0]}], "untouched": [0]}},
    )
    with pytest.raises(ValueError, match="malformed"):
        EditFidelityReward()(inputs_of(blank(1), tasks=[odd]))


# -- composites in scenarios, the agent and the CLI -------------------------------------------------


def test_t2i_reason_takes_a_weighted_sum_and_the_oracle_scores_its_weights():
    env = unigrpo_env.make(
        "t2i_reason", split="heldout", reward="shapes_verifier:1.0,quality:0.2,jpeg_compressibility:0"
    )
    scenario = env.unwrapped.scenario
    obs, _ = env.reset(seed=0, options={"task_index": 0})
    task = env.unwrapped.task
    x0 = scenario.target_latent(task)
    obs, reward, terminated, _, info = env.step(TextAction(tokens=scenario.oracle_tokens(task)))
    while not terminated:
        x_next = flow.ode_step(flow.straight_line_velocity(obs.x_t, x0, obs.t), obs.x_t, obs.t, obs.t_next)
        obs, reward, terminated, _, info = env.step(FlowAction(x_next=x_next))
    components = info["reward_components"]
    assert reward == pytest.approx(1.2) and components["shapes_verifier"] == 1.0 and components["quality"] == 1.0
    assert components["shapes_verifier/correct"] == 1.0 and components["jpeg_compressibility/kilobytes"] > 0
    with pytest.raises(ValueError, match="reward function without reward_options"):
        unigrpo_env.make_scenario("t2i_reason", reward=ImageQualityReward(), reward_options={"x": 1})
    assert isinstance(unigrpo_env.make_scenario("t2i_reason", reward=ImageQualityReward()).reward, ImageQualityReward)


def test_the_agent_logs_each_term_separately(tiny_checkpoint):
    from unigrpo_env.agents.config import UniGRPOConfig
    from unigrpo_env.agents.unigrpo import UniGRPOAgent
    from unigrpo_env.scenarios.shapes.policy import load_shapes_policy

    config = UniGRPOConfig(
        num_prompts=2,
        group_size=4,
        minibatches=1,
        checkpoint=str(tiny_checkpoint),
        scenario_options={"num_steps": 3, "reward": "shapes_verifier:1.0,quality:0.2"},
    )
    stats = UniGRPOAgent(load_shapes_policy(tiny_checkpoint), config).train_iteration()
    for key in ("reward/shapes_verifier", "reward/quality", "reward/shapes_verifier/correct", "reward/quality/noise"):
        assert key in stats and math.isfinite(stats[key])
    assert stats["reward_mean"] == pytest.approx(
        stats["reward/shapes_verifier"] + 0.2 * stats["reward/quality"], abs=1e-5
    )


@pytest.mark.parametrize(
    "spec,message",
    [("shapes_verifier:1.0,,quality", "empty term"), ("shapes_verifier:1.0,nope:0.2", "unknown reward 'nope'")],
)
def test_cli_bad_reward_spec_is_one_line_and_exit_code_2(spec, message):
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
            "--reward",
            spec,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert (
        done.returncode == 2 and len(lines) == 1 and lines[0].startswith("unigrpo: error:") and message in lines[0]
    ), done.stderr


def test_cli_run_with_a_weighted_sum_logs_each_term(tiny_checkpoint, small_run_config, tmp_path, capsys):
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
                "--reward",
                "shapes_verifier:1.0,quality:0.2",
                "--out",
                str(out),
            ]
        )
    assert exit_info.value.code == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    assert saved["scenario_options"] == {
        "num_steps": 3,
        "reward": "shapes_verifier:1.0,quality:0.2",
    }  # merged, not replaced
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"reward/shapes_verifier", "reward/quality", "reward/shapes_verifier/correct"} <= set(metrics)
    assert metrics["reward_mean"] == pytest.approx(
        metrics["reward/shapes_verifier"] + 0.2 * metrics["reward/quality"], abs=1e-5
    )
