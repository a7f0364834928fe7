"""The scenario protocol: what an environment is made from.

A scenario is a task family's side of an environment (the model's side is the
:class:`~unigrpo_env.world.World`, which the policy brings):

* its **prompts and turns** — :meth:`Scenario.tasks` lists :class:`~unigrpo_env.Task` objects,
  each with the user's prompt for every turn (one prompt: generate once; several: generate,
  then edit, then edit again — the environment runs one text phase and one image phase per
  prompt, and every turn sees the images before it);
* its **reward** — a scorer of finished batches (:mod:`unigrpo_env.rewards`), usually built
  from a registered name or a weighted-sum spec given as an option;
* its **splits** — named task lists (``"train"`` for rollouts, ``"heldout"`` for evaluation on
  prompts never trained on), listed in ``splits``;
* how the environment **answers** after each image — :meth:`Scenario.respond`: each row's next
  prompt or the end of its episode, and optionally a reward for the turn (the default: the
  task's next prompt, none after its last; at most ``max_turns`` turns).

:class:`~unigrpo_env.env.InterleavedEnv` and the batched environment turn any scenario and a
world into Gymnasium environments. Scenarios register themselves with
``@unigrpo_env.scenarios.register_scenario("name")``, or from an installed package through the
entry-point group ``unigrpo.scenarios`` (``unigrpo init scenario NAME`` writes such a package).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from unigrpo_env.errors import TaskSplitError
from unigrpo_env.feedback import TurnFeedback, TurnInputs
from unigrpo_env.reward import RewardFunction
from unigrpo_env.task import Task
from unigrpo_env.world import World

__all__ = ["Scenario"]


class Scenario(ABC):
    """Base class of scenarios: a task family's tasks, splits and reward.

    Subclasses set ``name`` and ``reward`` in their ``__init__`` — whose keyword arguments are
    the scenario's options, overridable through ``unigrpo_env.make(name, **options)`` and
    ``scenario_options`` of the agent's config — and implement :meth:`tasks`. The model's side
    (tokenizer, image codec, time grid) is not the scenario's: it is a
    :class:`~unigrpo_env.world.World`, which the policy brings and the environment is given. A
    scenario whose task family fixes a world (a toy world: its tokenizer, canvas and grid) offers
    it as :meth:`default_world`. A minimal single-turn scenario::

        @register_scenario("dots")
        class Dots(Scenario):
            name = "dots"

            def __init__(self, reward: str = "my_reward"):
                self.reward = get_reward(reward)

            def tasks(self, split):
                return [Task(prompts=("draw a red dot",), category="dots", split=split, index=0,
                             meta={"rgb": [255, 0, 0]})]

        envs = make_vec("dots", 4, 8, world=policy.world)  # the policy's tokenizer, codec and grid

    To train with the shipped ShapesWorld policy, subclass
    :class:`~unigrpo_env.scenarios.shapes.t2i_reason.T2IReasonScenario` instead (same tokenizer,
    canvas and task metadata; its default world is ShapesWorld's) and override ``shapes_tasks``.

    Attributes:
        name: the registered name (recorded in trajectories).
        splits: the task splits the scenario offers.
        reward: ``reward(RewardInputs) -> RewardOutput``, called once per finished batch.
        training_defaults: task-specific ``UniGRPOConfig`` values for training on this scenario (the
            model's recipe is the policy kind's; these sit above it).
        default_policy: the registered policy kind that plays this scenario when a run names none
            (``unigrpo.policies`` entry points; None: a run must name one).
        default_evaluator: the registered evaluator of its held-out tasks (``unigrpo.evaluators``).
    """

    name: ClassVar[str] = ""
    splits: ClassVar[tuple[str, ...]] = ("train", "heldout")
    #: Task-specific training settings (``UniGRPOConfig`` field -> value), applied by ``unigrpo run``
    #: and ``UniGRPOConfig.for_scenario`` above the policy kind's recipe and under the config file
    #: and the flags. A subclass's dict replaces its parent's.
    training_defaults: ClassVar[dict[str, Any]] = {}
    default_policy: ClassVar[str | None] = None
    default_evaluator: ClassVar[str] = "default"
    #: The most turns an episode plays (None: as many as :meth:`respond` goes on; the default
    #: ``respond`` stops after the task's last prompt).
    max_turns: int | None = None

    reward: RewardFunction

    def respond(self, inputs: TurnInputs) -> TurnFeedback:
        """The environment's answer after the image of turn ``inputs.turn``, for the rows that drew
        it, batched (:mod:`unigrpo_env.feedback`): each row's next prompt (None ends its
        episode) and, optionally, this turn's reward. Called under the reward's timeout and
        failure guard: a ``respond`` that raises or hangs ends those rows, with NaN rewards and
        the reason in ``info["feedback_error"]``.

        The default is a fixed script: the task's next prompt, None after its last, no turn reward."""
        k = inputs.turn + 1
        return TurnFeedback(next_prompts=[task.prompts[k] if k < task.num_turns else None for task in inputs.tasks])

    @abstractmethod
    def tasks(self, split: str) -> Sequence[Task]:
        """The tasks of a split, in a fixed order (``reset(options={"task_index": i})`` picks
        ``tasks(split)[i]``). A task's prompts are the turns the default :meth:`respond` plays;
        the tasks of one batch may have different numbers of turns."""

    def default_world(self) -> World:
        """The world an environment of this scenario uses when it is given none. A scenario has
        none unless its task family fixes one (ShapesWorld's scenarios override this): its
        environments take the policy's world."""
        legacy = _legacy_world(self)
        if legacy is not None:
            return legacy
        raise NotImplementedError(
            f"scenario {self.name!r} offers no default world: give its environment the policy's world "
            "(InterleavedEnv(scenario, world), make_vec(..., world=world); a run takes the policy's)"
        )

    def check_max_turns(self) -> int | None:
        """``max_turns``, checked: None or an integer >= 1."""
        limit = self.max_turns
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"scenario {self.name!r}: max_turns must be an integer >= 1 or None, got {limit!r}")
        return limit

    def check_split(self, split: str) -> Sequence[Task]:
        if split not in self.splits:
            raise TaskSplitError(f"unknown split {split!r} for scenario {self.name!r}; expected one of {self.splits}")
        tasks = self.tasks(split)
        if not tasks:
            raise TaskSplitError(f"split {split!r} of scenario {self.name!r} has no tasks")
        return tasks


#: The attributes a scenario carried before the world had a class of its own.
_LEGACY_WORLD = ("text_codec", "image_codec", "num_steps", "shift")


def _legacy_world(scenario: Scenario) -> World | None:
    """The one migration of scenarios written before :class:`~unigrpo_env.world.World`: a scenario
    that still carries ``text_codec``, ``image_codec``, ``num_steps`` and ``shift`` but defines no
    ``default_world`` gets a world built from them, with a ``DeprecationWarning``."""
    if not all(hasattr(scenario, name) for name in _LEGACY_WORLD):
        return None
    warnings.warn(
        f"scenario {scenario.name!r} carries text_codec, image_codec, num_steps and shift but defines no "
        "default_world(): return World.shifted(text_codec, image_codec, num_steps, shift) from it (the "
        "attributes alone will stop being read)",
        DeprecationWarning,
        stacklevel=3,
    )
    return World.shifted(scenario.text_codec, scenario.image_codec, scenario.num_steps, scenario.shift)
