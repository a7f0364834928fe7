"""Rewards: scorers of finished episodes, in a registry, combinable into weighted sums.

The protocol. A reward is any callable ``reward(inputs: RewardInputs) -> RewardOutput`` scoring a
*batch* of finished episodes. :class:`~unigrpo_env.RewardInputs` holds, for N episodes:

* ``images`` — the final images ``[N, H, W, 3]`` uint8;
* ``tasks`` — each episode's :class:`~unigrpo_env.Task`: the prompt of every turn, its category,
  and ``meta``, the scene metadata a scorer needs (ShapesWorld's target scene is
  ``meta["shapes_task"]``, an edit's before-scene ``meta["shapes_edit"]``);
* ``texts`` — each episode's reasoning text, one string per turn;
* ``earlier_images`` — the images of the turns before the last, ``[N, K, H, W, 3]``;
* ``group_ids`` — which episodes share a prompt.

It returns :class:`~unigrpo_env.RewardOutput`: ``scores`` ``[N]`` (NaN where a sample could not
be scored) and named ``components`` ``[N]`` each, logged separately by the agent.

Kinds of scorer:

* per batch — any such callable (a class with ``__call__`` or a function);
* per group — subclass :class:`GroupReward` and implement ``score_group`` (GRPO-style scorers
  that compare a prompt's rollouts); groups are scored concurrently;
* weighted sums — a spec string ``"shapes_verifier:1.0,quality:0.2"`` wherever a reward name is
  accepted (:mod:`.composite`); their terms are scored concurrently;
* slow per-sample scorers — wrap in :class:`ChunkedReward` to score chunks concurrently.

Registry. ``@register_reward("name")`` registers a factory (a class or a function returning a
reward); installed packages add theirs through the entry-point group ``unigrpo.rewards``, and so
do the built-in ones (this package's own entry points); ``get_reward(name_or_spec, **options)``
builds one. Built-in:

==========================  ======================================================================
``jpeg_compressibility``    DDPO's reward: minus the JPEG size of the image in kB (this module)
``shapes_verifier``         ShapesWorld's exact verifier (GenEval-style checks), in [0, 1]
``shapes_scene``            exact scene match: Jaccard index of detected and target objects
``image_quality``           stray pixels, off-palette colour and noise, in [0, 1] (alias ``quality``)
``edit_fidelity``           fraction of the objects an edit must leave alone that are still there
``clip_score``              CLIP image–prompt cosine × ``scale`` (or CLIPScore's 2.5·max(cos, 0))
``pickscore``               PickScore, as its authors score it: exp(logit_scale) · CLIP-H cosine
``aesthetic``               LAION aesthetic predictor v2: an MLP on CLIP ViT-L/14 embeddings
``vlm_judge``               a VLM's P(yes) to yes/no questions about the image, in [0, 1]
``geneval_detector``        GenEval-style correctness (0/1): OWLv2 detections, CLIP colours
==========================  ======================================================================

The ShapesWorld scorers live in the ShapesWorld package (:mod:`unigrpo_env.scenarios.shapes.rewards`,
:mod:`unigrpo_env.scenarios.shapes.edit_fidelity`), which registers them like any plugin.
"""

from typing import Any

from unigrpo_env.registration import REWARDS, register_reward
from unigrpo_env.reward import RewardFunction, RewardInputs, RewardOutput
from unigrpo_env.rewards.composite import (
    RewardComponentError,
    RewardSpecError,
    RewardTerm,
    WeightedSum,
    build_reward,
    parse_reward_spec,
)
from unigrpo_env.rewards.concurrency import ChunkedReward, ScorerPool
from unigrpo_env.rewards.group import GroupReward

__all__ = [
    "RewardFunction",
    "RewardInputs",
    "RewardOutput",
    "register_reward",
    "get_reward",
    "list_rewards",
    "REWARDS",
    "GroupReward",
    "WeightedSum",
    "ChunkedReward",
    "ScorerPool",
    "RewardTerm",
    "RewardSpecError",
    "RewardComponentError",
    "parse_reward_spec",
]


def get_reward(name: str, **options: Any) -> RewardFunction:
    """Build the reward ``name`` with ``options``.

    ``name`` is a registered name, a ``"module:Attribute"`` reference, or a weighted-sum spec
    such as ``"shapes_verifier:1.0,quality:0.2"`` (whose options are keyed by term name, see
    :func:`~unigrpo_env.rewards.composite.build_reward`). Unknown names raise
    :class:`~unigrpo_env.registration.RegistryError`, unreadable specs :class:`RewardSpecError`.
    """
    return build_reward(name, **options)


def list_rewards() -> list[str]:
    """Names of the registered rewards (built-in, registered in code, and installed plugins)."""
    return REWARDS.names()
