"""ShapesWorld's ``refine``: a critic that reads the drawn scene and asks for one fix in the edit
language, until the verifier accepts or three turns are played."""

from __future__ import annotations

import math

import pytest
import torch

import unigrpo_env
from unigrpo_env import FlowAction, TextAction, flow
from unigrpo_env.scenarios.shapes import render
from unigrpo_env.scenarios.shapes.refine import critique, drawn_scene
from unigrpo_env.scenarios.shapes.scene import Scene
from unigrpo_env.scenarios.shapes.scene import SceneObject as O

TARGET = Scene((O("circle", "red", (1, 1)), O("square", "blue", (0, 0))))


@pytest.mark.parametrize(
    "drawn,fix",
    [
        (Scene((O("circle", "green", (1, 1)), O("square", "blue", (0, 0)))), "make the circle red"),
        (Scene((O("triangle", "red", (1, 1)), O("square", "blue", (0, 0)))), "turn the triangle into a circle"),
        (Scene((O("circle", "red", (1, 1)), O("square", "blue", (2, 2)))), "move the square to top-left"),
        (Scene((O("circle", "red", (1, 1)), O("square", "blue", (0, 0)), O("circle", "red", (2, 0)))), None),
        (Scene((O("circle", "red", (1, 1)),)), "add a blue square at top-left"),
        (TARGET, None),
    ],
)
def test_the_critic_asks_for_one_fix_in_the_edit_language(drawn, fix):
    if fix is None and drawn != TARGET:  # an extra object nowhere in the target: removed
        assert critique(drawn, TARGET) == "remove the circle at bottom-left"
    else:
        assert critique(drawn, TARGET) == fix


def test_the_critic_reads_what_was_drawn():
    assert Scene(drawn_scene(render(TARGET, 32))) == TARGET
    assert drawn_scene(render(TARGET, 32) * 0 + 255) == ()  # a blank canvas: nothing drawn


def test_fixes_are_words_the_shipped_tokenizer_knows():
    scenario = unigrpo_env.make_scenario("refine")
    codec = scenario.text_codec
    unk = codec.tokenizer.token_to_id("<unk>")
    for fix in ("make the circle red", "turn the square into a triangle", "move the triangle to top-left",
                "remove the red square", "add an orange circle at bottom-right"):  # fmt: skip
        assert unk not in codec.encode(fix), fix


def _play(env, seed, oracle: bool):
    obs, _ = env.reset(seed=seed, options={"task_index": seed})
    scenario, task = env.unwrapped.scenario, env.unwrapped.task
    rewards, terminated = [], False
    while not terminated:
        if obs.phase == "text":
            action = TextAction(tokens=scenario.oracle_tokens(task)) if oracle else TextAction(tokens=[2, 3])
            action = action if oracle else env.action_space.sample(mask=obs)
        elif oracle:
            x0 = scenario.target_latent(task)
            action = FlowAction(
                x_next=flow.ode_step(flow.straight_line_velocity(obs.x_t, x0, obs.t), obs.x_t, obs.t, obs.t_next)
            )
        else:
            action = FlowAction(x_next=torch.ones_like(obs.x_t))  # a blank (white) canvas
        obs, reward, terminated, _, info = env.step(action)
        rewards.append(reward)
    return rewards, info


def test_a_right_first_image_ends_the_episode_and_a_wrong_one_is_critiqued():
    env = unigrpo_env.make("refine", split="heldout", num_steps=3)
    rewards, info = _play(env, 0, oracle=True)
    assert len(info["trajectory"].turns) == 1 and rewards[-1] == pytest.approx(1.0)
    assert info["feedback"]["next_prompt"] is None and info["feedback"]["correct"]
    rewards, info = _play(env, 1, oracle=False)  # a blank canvas: wrong three times
    turns = info["trajectory"].turns
    assert len(turns) == 3 and all(t.prompt.startswith("add ") for t in turns[1:])
    assert [t.reward for t in turns] == pytest.approx([-0.05, -0.05, -0.05])  # each fix asked for costs
    assert sum(rewards) == pytest.approx(info["trajectory"].reward - 0.15)


def test_the_refine_evaluator_reports_correctness_after_each_turn(tiny_checkpoint, tmp_path):
    from unigrpo_env.agents.parts import build_evaluator
    from unigrpo_env.scenarios.shapes.policy import load_shapes_policy

    scenario = unigrpo_env.make_scenario("refine", num_steps=3)
    evaluator = build_evaluator(scenario.default_evaluator)
    report = evaluator.evaluate(
        load_shapes_policy(tiny_checkpoint), scenario, limit=6, run_probes=False, out_dir=tmp_path / "eval"
    )
    after = [report.metrics[f"correct_after_turn_{k}"]["overall"] for k in (1, 2, 3)]
    assert all(0.0 <= a <= 1.0 for a in after) and after[0] <= after[1] <= after[2]  # a right image stays right
    assert after[2] == pytest.approx(report.overall("pipeline", "correct"))
    assert 1.0 <= report.metrics["turns"]["overall"] <= 3.0 and not math.isnan(report.overall())
    assert (tmp_path / "eval" / "grid.png").is_file()
