"""``unigrpo init scenario NAME``: write a scenario plugin package.

The package is a complete, installable starting point::

    <dir>/
      pyproject.toml                    entry points in "unigrpo.scenarios" and "unigrpo.rewards"
      README.md
      src/unigrpo_<name>/__init__.py    the scenario (a ShapesWorld subclass) and its reward
      tests/test_<name>.py              discovery, splits, oracle and reward checks

Once installed (``pip install -e <dir>``) its scenario shows in ``unigrpo list scenarios``,
trains with ``unigrpo run scenario <name>`` on the shipped ShapesWorld policy, and its tests
pass. The scenario subclasses the registered ``t2i_reason`` (ShapesWorld's scenario, taken from
the registry as any plugin would: the shipped policy knows ShapesWorld's tokenizer and canvas
only), with its own subset of the world's riddles, a small held-out split so evaluation is quick,
and its own registered reward, composed of registered scorers.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template

__all__ = ["ScaffoldError", "check_scenario_name", "plugin_files", "write_scenario_package"]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class ScaffoldError(ValueError):
    """A name or folder that cannot be used for a new plugin package."""


def check_scenario_name(name: str) -> str:
    """``name`` if it can name a scenario and a Python package: lower-case letters, digits and
    underscores, starting with a letter, at most 40 characters, not a Python keyword."""
    if not _NAME.match(name or "") or keyword.iskeyword(name) or name.endswith("_"):
        raise ScaffoldError(
            f"invalid scenario name {name!r}: use lower-case letters, digits and underscores, starting with a letter "
            f"(at most 40 characters, e.g. 'my_edit')"
        )
    return name


def _names(name: str) -> dict[str, str]:
    camel = "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)
    return {
        "name": name,
        "package": f"unigrpo_{name}",
        "dist": f"unigrpo-{name.replace('_', '-')}",
        "cls": f"{camel}Scenario",
        "reward_cls": f"{camel}Reward",
        "reward": f"{name}_reward",
    }


def plugin_files(name: str) -> dict[str, str]:
    """The package's files, relative path -> text."""
    values = _names(check_scenario_name(name))
    return {
        "pyproject.toml": Template(_PYPROJECT).substitute(values),
        "README.md": Template(_README).substitute(values),
        f"src/{values['package']}/__init__.py": Template(_MODULE).substitute(values),
        f"tests/test_{name}.py": Template(_TEST).substitute(values),
    }


def write_scenario_package(name: str, directory: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Write the plugin package of scenario ``name`` into ``directory`` (default
    ``./unigrpo-<name>``); refuses a folder that exists and is not empty. Returns the folder and
    the files written."""
    files = plugin_files(name)
    root = Path(directory) if directory is not None else Path(_names(name)["dist"])
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ScaffoldError(f"{str(root)!r} already exists and is not an empty folder; choose another --dir")
    written = []
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return root, written


_PYPROJECT = """\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "${dist}"
version = "0.1.0"
description = "The '${name}' scenario for unigrpo-env (RL of interleaved text-and-image generation)"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["unigrpo-env"]

[project.optional-dependencies]
test = ["pytest>=8"]

# How unigrpo-env finds this package's scenario and reward without importing it: names on the
# left, "module:attribute" on the right. Imported only when the scenario or reward is built.
[project.entry-points."unigrpo.scenarios"]
${name} = "${package}:${cls}"

[project.entry-points."unigrpo.rewards"]
${reward} = "${package}:${reward_cls}"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

_README = """\
# ${dist}

The `${name}` scenario for unigrpo-env, written by `unigrpo init scenario ${name}`.

    pip install -e .                      # registers the entry points
    unigrpo list scenarios                # shows ${name}
    pytest                                # the package's own tests
    unigrpo run scenario ${name} --iterations 2
    unigrpo run scenario ${name} --reward "${reward}:1.0,jpeg_compressibility:0.1"

Everything is in `src/${package}/__init__.py`:

- `${cls}` — the scenario. It is ShapesWorld (the built-in world, so the shipped policy trains
  on it), restricted to the riddle categories in `CATEGORIES`, with a held-out split of
  `HELDOUT_PER_CATEGORY` tasks per category. Change `shapes_tasks` to choose other tasks.
- `${reward_cls}` — the reward, registered as `${reward}`: the verifier's fraction of passed
  checks, plus a share of image quality. Any callable `reward(RewardInputs) -> RewardOutput`
  works; see `unigrpo_env.rewards` for what `RewardInputs` holds.

The entry points in `pyproject.toml` (groups `unigrpo.scenarios` and `unigrpo.rewards`) are how
unigrpo-env finds both after installation; after renaming a class, update them and reinstall.
"""

_MODULE = '''\
"""The '${name}' scenario and its reward: a unigrpo-env plugin.

Written by ``unigrpo init scenario ${name}``. Installed, this package is found through its entry
points (see pyproject.toml): ``unigrpo list scenarios`` shows '${name}', and
``unigrpo run scenario ${name}`` trains the shipped ShapesWorld policy on it.

A scenario has prompts and turns (its tasks), a world (tokenizer, image codec, timestep
schedule), a reward and splits (train / held-out). ${cls} inherits the world from ShapesWorld's
``t2i_reason`` — one turn: a riddle, the policy's reasoning, then an image — and chooses its own
tasks (:meth:`${cls}.shapes_tasks`) and reward (:class:`${reward_cls}`).
"""

from __future__ import annotations

from unigrpo_env import TurnFeedback, TurnInputs
from unigrpo_env.reward import RewardInputs, RewardOutput
from unigrpo_env.rewards import get_reward, register_reward
from unigrpo_env.scenarios import SCENARIOS, register_scenario

__all__ = ["${cls}", "${reward_cls}", "CATEGORIES", "HELDOUT_PER_CATEGORY"]

#: The ShapesWorld riddle categories this scenario uses (of single_object, two_objects,
#: counting, colors, position, color_attr).
CATEGORIES: tuple[str, ...] = ("colors", "color_attr")
#: Held-out tasks per category: a small held-out split keeps evaluation quick.
HELDOUT_PER_CATEGORY = 4


#: ShapesWorld's single-round scenario, the base of this one (taken from the registry, as any
#: registered scenario can be extended).
T2IReasonScenario = SCENARIOS.get("t2i_reason")


@register_reward("${reward}")
class ${reward_cls}:
    """Score in [0, 1]: ``(1 - q)·verifier + q·quality`` with ``q = quality_weight``.

    ``verifier`` is the fraction of the task's checks the image passes (ShapesWorld's exact
    verifier, the registered ``shapes_verifier``), ``quality`` the image-quality score (1 = clean,
    flat colours; the registered ``image_quality``). Components (logged separately): ``correct``
    (all checks pass), ``fraction`` and ``quality``.
    """

    def __init__(self, quality_weight: float = 0.2):
        if not 0.0 <= quality_weight <= 1.0:
            raise ValueError(f"quality_weight must be in [0, 1], got {quality_weight}")
        self.quality_weight = float(quality_weight)
        self.verifier = get_reward("shapes_verifier")
        self.quality = get_reward("image_quality")

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        verdict = self.verifier(inputs)  # inputs.images: [N, H, W, 3] uint8, the final images
        fraction, correct = verdict.components["fraction"], verdict.components["correct"]
        quality = self.quality(inputs).scores
        scores = (1.0 - self.quality_weight) * fraction + self.quality_weight * quality
        return RewardOutput(scores=scores, components={"correct": correct, "fraction": fraction, "quality": quality})


@register_scenario("${name}")
class ${cls}(T2IReasonScenario):
    """ShapesWorld riddles of the categories in :data:`CATEGORIES`, scored by ``${reward}``.

    Options (``unigrpo_env.make("${name}", **options)`` or ``scenario_options`` in a run config)
    are those of ``t2i_reason`` (``reward`` may be any reward name or weighted-sum spec) and
    ``retries``: how many more attempts a wrong image gets (0: one turn, the riddle's).
    """

    name = "${name}"
    default_reward = "${reward}"
    #: What the user says after a wrong image (it needs words the policy's tokenizer knows only
    #: when the policy reads it; ShapesWorld's does not, and draws again from the riddle).
    RETRY = "that is not it : draw it again"

    def __init__(self, retries: int = 0, **options):
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        self.retries = retries
        self.max_turns = 1 + retries
        self.verifier = get_reward("shapes_verifier")  # the registered verifier, as the reward uses it
        super().__init__(**options)

    def respond(self, inputs: TurnInputs) -> TurnFeedback:
        """After each image: accepted by the verifier, the episode ends; wrong, the user asks again
        (until ``retries`` run out: ``max_turns``). The turn's reward is the verifier's score, so
        a later attempt can be credited for its own image."""
        images = inputs.images  # [n, H, W, 3] uint8: the images just drawn
        shown = RewardInputs(
            images=images, tasks=inputs.tasks, texts=[[t] for t in inputs.texts], earlier_images=images[:, None][:, :0]
        )
        verdict = self.verifier(shown).components
        return TurnFeedback(
            next_prompts=[None if correct == 1.0 else self.RETRY for correct in verdict["correct"].tolist()],
            rewards=verdict["fraction"] if self.retries else None,
        )

    def shapes_tasks(self, split: str) -> list:
        """Train: every riddle of :data:`CATEGORIES`; held out: the first
        :data:`HELDOUT_PER_CATEGORY` of each (combinations never seen in training)."""
        tasks = [t for t in super().shapes_tasks(split) if t.category in CATEGORIES]
        if split == "heldout":
            taken = dict.fromkeys(CATEGORIES, 0)
            kept = []
            for task in tasks:
                if taken[task.category] < HELDOUT_PER_CATEGORY:
                    taken[task.category] += 1
                    kept.append(task)
            tasks = kept
        return tasks
'''

_TEST = '''\
"""Tests of the '${name}' plugin; they pass once the package is installed (pip install -e .)."""

import numpy as np
import pytest
import torch

import unigrpo_env
from unigrpo_env import FlowAction, RewardInputs, TextAction, flow
from unigrpo_env.registration import REWARDS, SCENARIOS

from ${package} import CATEGORIES, HELDOUT_PER_CATEGORY, ${reward_cls}


def test_the_installed_entry_points_are_discovered():
    assert "${name}" in SCENARIOS.names() and SCENARIOS.origin("${name}").startswith("plugin")
    assert "${reward}" in REWARDS.names() and REWARDS.origin("${reward}").startswith("plugin")


def test_splits_hold_the_chosen_categories_and_do_not_overlap():
    scenario = unigrpo_env.make_scenario("${name}")
    train, heldout = scenario.tasks("train"), scenario.tasks("heldout")
    assert len(heldout) == HELDOUT_PER_CATEGORY * len(CATEGORIES)
    assert {t.category for t in train} == {t.category for t in heldout} == set(CATEGORIES)
    assert not {t.prompts for t in train} & {t.prompts for t in heldout}


def play_oracle(env, task_index):
    """Write the right description, then follow the straight line to the target image."""
    scenario = env.unwrapped.scenario
    obs, _ = env.reset(seed=task_index, options={"task_index": task_index})
    task = env.unwrapped.task
    obs, reward, terminated, _, info = env.step(TextAction(tokens=scenario.oracle_tokens(task)))
    x0 = scenario.target_latent(task)
    while not terminated:
        x_next = flow.ode_step(flow.straight_line_velocity(obs.x_t, x0, obs.t), obs.x_t, obs.t, obs.t_next)
        obs, reward, terminated, _, info = env.step(FlowAction(x_next=x_next))
    return reward, info


def test_the_oracle_gets_the_full_reward():
    env = unigrpo_env.make("${name}", split="heldout")
    for index in range(len(env.unwrapped.scenario.tasks("heldout"))):
        reward, info = play_oracle(env, index)
        assert reward == pytest.approx(1.0) and info["reward_components"]["correct"] == 1.0


def test_a_wrong_image_gets_another_attempt_with_retries():
    env = unigrpo_env.make("${name}", retries=2, split="heldout")
    obs, _ = env.reset(seed=0)
    terminated = False
    while not terminated:  # a random agent draws wrong images: it uses every attempt
        obs, reward, terminated, _, info = env.step(env.action_space.sample(mask=obs))
    turns = info["trajectory"].turns
    assert len(turns) == 3 and turns[1].prompt == "that is not it : draw it again"
    assert all(turn.reward is not None for turn in turns)
    reward, info = play_oracle(env, 0)  # the right image the first time: one turn
    assert len(info["trajectory"].turns) == 1


def test_a_blank_canvas_scores_low():
    scenario = unigrpo_env.make_scenario("${name}")
    tasks = list(scenario.tasks("heldout"))
    blank = torch.full((len(tasks), 32, 32, 3), 255, dtype=torch.uint8)
    inputs = RewardInputs(images=blank, tasks=tasks, texts=[[""] for _ in tasks], earlier_images=blank[:, None][:, :0])
    out = ${reward_cls}()(inputs)
    assert out.scores.shape == (len(tasks),) and bool((out.scores < 0.5).all())
    assert np.all(out.components["correct"].numpy() == 0.0)
'''
