"""edit_multiturn: the edit dialogues, the scene-match reward, and the multi-turn environment
(oracle, save/load of a 3-turn trajectory, an invalid action in turn 2). Gymnasium's checker and
the random agent run on its id in test_t2i_reason.py (parametrised over every registered id)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import unigrpo_env
from unigrpo_env import FlowAction, TextAction, Trajectory, flow
from unigrpo_env.errors import InvalidActionError
from unigrpo_env.reward import RewardInputs
from unigrpo_env.scenarios.shapes import Scene, SceneObject, describe, parse_description, render
from unigrpo_env.scenarios.shapes.edits import EDIT_KINDS, EditDialogue, apply_random_edit, dialogue_split, reference
from unigrpo_env.scenarios.shapes.rewards import SceneMatchReward, scene_meta
from unigrpo_env.scenarios.shapes.tasks import extract_description
from unigrpo_env.task import Task

# ------------------------------------------------------------------------------- dialogues


def test_dialogues_are_deterministic_follow_the_riddle_split_and_cover_every_edit_kind():
    train, heldout = dialogue_split("train"), dialogue_split("heldout")
    assert dialogue_split("heldout") == heldout and dialogue_split("heldout", variant=1) != heldout
    assert {d.first.prompt for d in train}.isdisjoint(d.first.prompt for d in heldout)
    assert {k for d in heldout for k in d.kinds} == set(EDIT_KINDS)
    assert all(d.num_turns == 3 for d in heldout)
    assert all(d.num_turns == 4 for d in dialogue_split("heldout", num_turns=4))
    d = heldout[7]
    assert EditDialogue.from_dict(d.to_dict()) == d


def test_each_edit_changes_what_its_kind_says_and_its_answer_describes_the_result():
    rng = np.random.default_rng(0)
    scene = Scene((SceneObject("circle", "red", (1, 0)), SceneObject("square", "blue", (1, 2))))
    for kind in EDIT_KINDS:
        for _ in range(20):
            edit = apply_random_edit(rng, scene, kind)
            before, after = set(scene.objects), set(edit.scene.objects)
            if kind == "add":
                assert before < after and len(after) == 3
            elif kind == "remove":
                assert after < before and len(after) == 1
            elif kind in ("recolour", "reshape", "move"):
                (old,), (new,) = before - after, after - before
                changed = {
                    "recolour": old.colour != new.colour,
                    "reshape": old.shape != new.shape,
                    "move": old.cell != new.cell,
                }
                assert [k for k, v in changed.items() if v] == [kind]
            else:  # swap
                assert {o.cell for o in after} == {o.cell for o in before} and after != before
            assert parse_description(extract_description(edit.answer), strict=True) == edit.scene
    with pytest.raises(ValueError, match="does not apply"):
        apply_random_edit(rng, Scene((SceneObject("circle", "red", (1, 1)),)), "remove")


def test_references_name_one_object():
    scene = Scene(
        (
            SceneObject("circle", "red", (0, 0)),
            SceneObject("circle", "blue", (0, 1)),
            SceneObject("square", "blue", (1, 1)),
            SceneObject("circle", "blue", (2, 2)),
        )
    )
    names = [reference(scene, o) for o in scene.objects]
    assert names == ["the red circle", "the circle at top", "the square", "the circle at bottom-right"]


# ------------------------------------------------------------------------- scene reward


def _scene_inputs(images, scenes):
    tasks = [Task(prompts=("x",), index=i, meta={"shapes_scene": scene_meta(s)}) for i, s in enumerate(scenes)]
    n = len(tasks)
    return RewardInputs(
        images=torch.from_numpy(np.stack(images)),
        tasks=tasks,
        texts=[[""]] * n,
        earlier_images=torch.zeros((n, 0, 32, 32, 3), dtype=torch.uint8),
    )


def test_scene_match_is_one_only_for_the_exact_scene():
    target = Scene((SceneObject("circle", "red", (1, 0)), SceneObject("square", "blue", (1, 2))))
    wrong_colour = target.replace_object(0, colour="green")
    extra = Scene(target.objects + (SceneObject("triangle", "yellow", (0, 0)),))
    out = SceneMatchReward()(_scene_inputs([render(s) for s in (target, wrong_colour, extra)], [target] * 3))
    assert out.scores.tolist() == pytest.approx([1.0, 1 / 3, 2 / 3])
    assert out.components["correct"].tolist() == [1.0, 0.0, 0.0]
    assert out.components["extra"].tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="shapes_scene"):
        SceneMatchReward()(
            RewardInputs(
                images=torch.zeros((1, 32, 32, 3), dtype=torch.uint8),
                tasks=[Task(prompts=("x",))],
                texts=[[""]],
                earlier_images=torch.zeros((1, 0, 32, 32, 3), dtype=torch.uint8),
            )
        )


# ---------------------------------------------------------------------------- environment


def _oracle_turns(envs, scenario):
    """Play every turn with the oracle's text and the straight-line velocity onto each turn's target."""
    tasks = envs.tasks
    for turn in range(tasks[0].num_turns):
        obs, *_ = envs.step([TextAction(tokens=scenario.oracle_tokens(t, turn)) for t in tasks])
        targets = torch.stack([scenario.target_latent(t, turn) for t in tasks])
        while obs.phase == "image":
            v = flow.straight_line_velocity(obs.x_t, targets, obs.t)
            obs, rewards, terminated, _, info = envs.step(
                FlowAction(x_next=flow.ode_step(v, obs.x_t, obs.t, obs.t_next))
            )
    assert terminated.all()
    return rewards, info


@pytest.mark.parametrize("num_turns", [1, 3])
def test_oracle_gets_the_full_reward_on_heldout_dialogues(num_turns):
    scenario = unigrpo_env.make_scenario("edit_multiturn", num_turns=num_turns)
    tasks = scenario.tasks("heldout")
    chosen = [next(t.index for t in tasks if t.category == c) for c in sorted({t.category for t in tasks})]
    envs = unigrpo_env.make_vec(scenario, num_prompts=len(chosen), group_size=1, split="heldout")
    envs.reset(seed=0, options={"task_index": chosen})
    rewards, info = _oracle_turns(envs, scenario)
    assert rewards.tolist() == pytest.approx([1.0] * len(chosen))
    assert info["reward_components"]["shapes_scene/correct"].tolist() == [1.0] * len(chosen)
    assert info["reward_components"]["edit_fidelity"].tolist() == [1.0] * len(chosen)
    if num_turns == 3:
        turns = envs.trajectory.turns
        assert len(turns) == 3
        for k in range(3):  # every turn's image is that turn's scene
            expected = torch.stack([torch.from_numpy(render(scenario.target_scene(t, k))) for t in envs.tasks])
            assert (turns[k].image.images.int() - expected.int()).abs().max() <= 1


def test_edit_reward_drops_when_an_untouched_object_is_lost():
    scenario = unigrpo_env.make_scenario("edit_multiturn")
    task = next(t for t in scenario.tasks("heldout") if t.meta["shapes_edit"]["untouched"])
    final = scenario.target_scene(task, 2)
    kept = task.meta["shapes_edit"]["untouched"][0]
    lost = SceneObject(
        **{**task.meta["shapes_edit"]["before"][kept], "cell": tuple(task.meta["shapes_edit"]["before"][kept]["cell"])}
    )
    damaged = (
        Scene(tuple(o for o in final.objects if o != lost))
        if len(final.objects) > 1
        else final.replace_object(0, colour="green" if lost.colour != "green" else "red")
    )
    image = torch.from_numpy(np.stack([render(final), render(damaged)]))
    out = scenario.reward(
        RewardInputs(
            images=image,
            tasks=[task, task],
            texts=[["", "", ""]] * 2,
            earlier_images=torch.zeros((2, 2, 32, 32, 3), dtype=torch.uint8),
        )
    )
    assert out.scores[0] == pytest.approx(1.0) and out.scores[1] < 0.8
    assert out.components["edit_fidelity"][1] < 1.0


def _play_turns(env, scenario, task, turns: int, seed: int):
    """Play ``turns`` turns of one env with oracle text and seeded SDE steps; returns the last obs."""
    generator = torch.Generator().manual_seed(seed)
    for turn in range(turns):
        obs, *_ = env.step(TextAction(tokens=scenario.oracle_tokens(task, turn)))
        while obs.phase == "image":
            v = flow.straight_line_velocity(obs.x_t[None], scenario.target_latent(task, turn)[None], obs.t)
            x_next, log_prob, _, _ = flow.sde_step(v, obs.x_t[None], obs.t, obs.t_next, 0.5, generator=generator)
            obs, reward, terminated, _, info = env.step(FlowAction(x_next=x_next[0], log_prob=log_prob[0]))
    return obs, info


def test_three_turn_trajectory_saves_and_loads_exactly(tmp_path):
    env = unigrpo_env.make("edit_multiturn")
    env.reset(seed=5)
    scenario, task = env.scenario, env.task
    obs, info = _play_turns(env, scenario, task, 3, seed=5)
    trajectory = info["trajectory"]
    assert obs.phase == "done" and trajectory.terminated and len(trajectory.turns) == 3
    assert [t.prompt for t in trajectory.turns] == list(task.prompts)
    loaded = Trajectory.load(trajectory.save(tmp_path / "edit.safetensors"))
    assert loaded == trajectory and loaded.task == task and loaded.reward == trajectory.reward
    assert [len(t.segments) for t in loaded.turns] == [2, 2, 2]


def test_invalid_action_in_turn_two_leaves_turns_one_and_two_intact():
    env = unigrpo_env.make("edit_multiturn", render_mode="rgb_array")
    env.reset(seed=2)
    scenario, task = env.scenario, env.task
    obs, info = _play_turns(env, scenario, task, 1, seed=2)
    obs, _, _, _, info = env.step(TextAction(tokens=scenario.oracle_tokens(task, 1)))
    assert obs.turn == 1 and obs.phase == "image"
    before = copy.deepcopy(info["trajectory"])  # a view of the env's record: copy it so a change would show
    x_t, drawn = obs.x_t.clone(), env.render()  # render() decodes the env's own current latent
    bad = [
        TextAction(tokens=[3]),  # text in the image phase
        FlowAction(x_next=torch.full_like(x_t, float("nan"))),  # NaN latent
        FlowAction(x_next=torch.zeros(3, 8, 8)),  # wrong shape
    ]
    for action in bad:
        with pytest.raises(InvalidActionError):
            env.step(action)
        assert env.trajectory == before
        assert np.array_equal(env.render(), drawn)
    assert len(before.turns) == 2 and len(before.turns[0].segments) == 2 and len(before.turns[1].segments) == 2
    # the episode goes on from where it was and finishes with the full reward
    target = scenario.target_latent(task, 1)
    while obs.phase == "image":
        v = flow.straight_line_velocity(obs.x_t[None], target[None], obs.t)
        obs, *_ = env.step(FlowAction(x_next=flow.ode_step(v, obs.x_t[None], obs.t, obs.t_next)[0]))
    obs, _, _, _, _ = env.step(TextAction(tokens=scenario.oracle_tokens(task, 2)))
    target = scenario.target_latent(task, 2)
    while obs.phase == "image":
        v = flow.straight_line_velocity(obs.x_t[None], target[None], obs.t)
        obs, reward, terminated, _, info = env.step(
            FlowAction(x_next=flow.ode_step(v, obs.x_t[None], obs.t, obs.t_next)[0])
        )
    assert terminated and reward == pytest.approx(1.0)


def test_options_and_categories():
    scenario = unigrpo_env.make_scenario("edit_multiturn", num_turns=2)
    assert all(t.num_turns == 2 for t in scenario.tasks("train"))
    assert {t.category for t in scenario.tasks("heldout")} == set(EDIT_KINDS)
    with pytest.raises(ValueError, match="num_turns"):
        unigrpo_env.make_scenario("edit_multiturn", num_turns=0)
    with pytest.raises(ValueError, match="unknown option"):
        unigrpo_env.make_scenario("edit_multiturn", num_turn=2)
    assert describe(scenario.target_scene(scenario.tasks("heldout")[0], 1)) in scenario.oracle_answer(
        scenario.tasks("heldout")[0], 1
    )


def test_the_shipped_image_model_reads_edit_only_words_as_unknown():
    from unigrpo_env.agents.policy import TurnContext
    from unigrpo_env.scenarios.shapes.policy import load_shapes_policy
    from unigrpo_env.scenarios.shapes.tokenizer import build_tokenizer, riddle_vocab_size

    policy = load_shapes_policy()
    vocab = build_tokenizer().get_vocab()
    assert policy.image.model.config.vocab_size == riddle_vocab_size() < len(vocab)
    assert max(vocab[w] for w in ("red", "circle", "at", "left", ",")) < riddle_vocab_size() <= vocab["swap"]
    words = "answer : red circle at left , swap".split()
    reasoning = torch.tensor([[vocab[w] for w in words]])
    context = TurnContext(
        prompts=[("x",)],
        history=[[]],
        images=torch.zeros((1, 0, 32, 32, 3), dtype=torch.uint8),
        reasoning=reasoning,
        reasoning_lengths=torch.tensor([len(words)]),
    )
    ids = policy.image.condition(context)["text_ids"][0].tolist()
    assert ids[:6] == [vocab[w] for w in words[2:7]] + [vocab["<unk>"]]
    policy.image.velocity(torch.zeros(1, 3, 32, 32), 0.5, policy.image.condition(context))  # in range: no error
