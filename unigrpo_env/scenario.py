"""The scenario protocol: what an environment is made from.

A scenario is everything about a task family that is not the policy:

* its **prompts and turns** — :meth:`Scenario.tasks` lists :class:`~unigrpo_env.Task` objects,
  each with the user's prompt for every turn (one prompt: generate once; several: generate,
  then edit, then edit again — the environment runs one text phase and one image phase per
  prompt, and every turn sees the images before it);
* its **world** — the text codec (tokenizer, end-of-thinking token, token limit), the image
  codec (latent shape, decoding to RGB) and the timestep schedule (``num_steps``, ``shift``);
* its **reward** — a scorer of finished batches (:mod:`unigrpo_env.rewards`), usually built
  from a registered name or a weighted-sum spec given as an option;
* its **splits** — named task lists (``"train"`` for rollouts, ``"heldout"`` for evaluation on
  prompts never trained on), listed in ``splits``.

:class:`~unigrpo_env.env.InterleavedEnv` and the batched environment turn any scenario into
Gymnasium environments. Scenarios register themselves with
``@unigrpo_env.scenarios.register_scenario("name")``, or from an installed package through the
entry-point group ``unigrpo.scenarios`` (``unigrpo init scenario NAME`` writes such a package).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from unigrpo_env import flow
from unigrpo_env.codecs import ImageCodec, TextCodec
from unigrpo_env.errors import TaskSplitError
from unigrpo_env.reward import RewardFunction
from unigrpo_env.task import Task
from unigrpo_env.world import World

__all__ = ["Scenario"]


class Scenario(ABC):
    """Base class of scenarios.

    Subclasses set ``name``, build ``text_codec``, ``image_codec``, ``reward``, ``num_steps``
    and ``shift`` in their ``__init__`` — whose keyword arguments are the scenario's options,
    overridable through ``unigrpo_env.make(name, **options)`` and ``scenario_options`` of the
    agent's config — and implement :meth:`tasks`. A minimal single-turn scenario::

        @register_scenario("dots")
        class Dots(Scenario):
            name = "dots"

            def __init__(self, num_steps: int = 10, reward: str = "my_reward"):
                self.text_codec = TextCodec(tokenizer, end_of_thinking="</think>", max_tokens=16)
                self.image_codec = PixelCodec(32)
                self.num_steps, self.shift = num_steps, 1.0
                self.reward = get_reward(reward)

            def tasks(self, split):
                return [Task(prompts=("draw a red dot",), category="dots", split=split, index=0,
                             meta={"rgb": [255, 0, 0]})]

    To train with the shipped ShapesWorld policy, subclass
    :class:`~unigrpo_env.scenarios.shapes.t2i_reason.T2IReasonScenario` instead (same tokenizer,
    canvas and task metadata) and override ``shapes_tasks``.

    Attributes:
        name: the registered name (recorded in trajectories).
        splits: the task splits the scenario offers.
        text_codec: token ids <-> text, end-of-thinking token, token limit.
        image_codec: images <-> latents; its ``latent_shape`` is the shape of every latent.
        reward: ``reward(RewardInputs) -> RewardOutput``, called once per finished batch.
        num_steps: denoising steps per image.
        shift: timestep shift of the schedule (SD3's ``t' = s·t / (1 + (s − 1)·t)``).
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

    text_codec: TextCodec
    image_codec: ImageCodec
    reward: RewardFunction
    num_steps: int
    shift: float

    @abstractmethod
    def tasks(self, split: str) -> Sequence[Task]:
        """The tasks of a split, in a fixed order (``reset(options={"task_index": i})`` picks
        ``tasks(split)[i]``). All tasks of one batch must have the same number of turns."""

    def timesteps(self) -> torch.Tensor:
        """The ``num_steps + 1`` times from 1 (noise) to 0 (data)."""
        return flow.timestep_schedule(self.num_steps, self.shift)

    def default_world(self) -> World:
        """The world an environment of this scenario uses when it is given none: by default the
        scenario's own ``text_codec``, ``image_codec`` and grid (``num_steps`` under ``shift``),
        which ShapesWorld's scenarios have. A scenario without them has no default world: its
        environments need one, from the policy that plays it."""
        missing = [name for name in ("text_codec", "image_codec", "num_steps", "shift") if not hasattr(self, name)]
        if missing:
            raise NotImplementedError(
                f"scenario {self.name!r} offers no default world (it has no {', '.join(missing)}): give its "
                "environment the policy's world (InterleavedEnv(scenario, world), make_vec(..., world=world))"
            )
        return World(self.text_codec, self.image_codec, self.timesteps())

    def check_split(self, split: str) -> Sequence[Task]:
        if split not in self.splits:
            raise TaskSplitError(f"unknown split {split!r} for scenario {self.name!r}; expected one of {self.splits}")
        tasks = self.tasks(split)
        if not tasks:
            raise TaskSplitError(f"split {split!r} of scenario {self.name!r} has no tasks")
        return tasks
