"""``t2i_prompts`` and ``edit_prompts``: real models on prompts and edit dialogues read from files.

The scenarios of a real run: a chat model reasons about a prompt and a latent-space flow model
(Stable Diffusion 3, FLUX) draws it. A scenario here is its tasks and its reward only; the
models' world — the chat tokenizer, the pipeline's VAE and time grid, the image size — is the
policy's (the ``hf`` kind, :mod:`unigrpo_env.agents.hf_policy_loader`; ``--text-model``,
``--image-model``, ``--image-size`` and ``policy_options`` such as ``num_steps``). These scenarios
load no model and have no default world: an environment of them is given one
(``make_vec("t2i_prompts", P, G, world=policy.world, prompts=..., reward=...)``).

The reward is named with ``reward`` (a registered reward or weighted-sum spec; a run gives it with
``--reward``): there is no default, as no reward fits every prompt set.

Prompt files: plain text (one prompt a line; blank lines and ``#`` comments skipped) or JSONL, one
object a line with at least ``"prompt"``; GenEval's metadata fields (``tag``, ``include``, ...)
are kept in ``Task.meta`` and ``tag`` becomes the task's category. The held-out split is a second
file (``heldout``) or a seeded share of the first (``heldout_fraction``).

``edit_prompts`` is the multi-turn form (FLUX.1 Kontext draws each turn from the one before):
each record is a dialogue, ``{"turns": [prompt, edit, edit, ...], ...}`` in JSONL or, in a text
file, one dialogue a line with its turns separated by ``" || "``. The first turn draws from text
alone, every later one from its instruction and the previous turn's image; one episode is the
whole dialogue with one terminal reward, which sees the final image, the earlier images and every
turn's text. Each episode plays its own dialogue's turns (the environment's default answer ends
it after its last), so one file may mix dialogues of different lengths; ``num_turns`` keeps the
dialogues with at least that many and plays their first ``num_turns`` turns.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from unigrpo_env.reward import RewardFunction
from unigrpo_env.rewards import get_reward
from unigrpo_env.scenario import Scenario
from unigrpo_env.task import Task

__all__ = ["read_prompt_file", "read_dialogue_file", "T2IPromptsScenario", "EditPromptsScenario", "MOVED_TO_THE_POLICY"]

#: The separator of turns in a plain-text dialogue file.
TURN_SEPARATOR = " || "


def _read_lines(
    path: str | Path, kind: str, from_text: Callable[[str], dict[str, Any]], valid: Callable[[Any], bool], expected: str
) -> list[dict[str, Any]]:
    """The records of a file of ``kind`` ("prompt", "dialogue"): one a line, JSON objects in a
    ``.jsonl`` file and ``from_text(line)`` in any other; blank lines and ``#`` comments skipped;
    every record ``valid``, else a one-line error naming the line and what was ``expected``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{kind} file {str(path)!r} does not exist")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
        else:
            record = from_text(line)
        if not valid(record):
            raise ValueError(f"{path}:{number}: expected {expected}")
        records.append(record)
    if not records:
        raise ValueError(f"{kind} file {str(path)!r} holds no {kind}s")
    return records


def read_prompt_file(path: str | Path) -> list[dict[str, Any]]:
    """The records of a prompt file: ``{"prompt": ..., **metadata}`` each (see the module docstring)."""
    return _read_lines(
        path,
        "prompt",
        lambda line: {"prompt": line},
        lambda r: isinstance(r, dict) and isinstance(r.get("prompt"), str),
        "an object with a string 'prompt'",
    )


def read_dialogue_file(path: str | Path) -> list[dict[str, Any]]:
    """The records of an edit-dialogue file: ``{"turns": [...], **metadata}`` each (see the module
    docstring); every turn a non-empty string."""

    def valid(record: Any) -> bool:
        turns = record.get("turns") if isinstance(record, dict) else None
        return isinstance(turns, list) and bool(turns) and all(isinstance(t, str) and t.strip() for t in turns)

    return _read_lines(
        path,
        "dialogue",
        lambda line: {"turns": [turn.strip() for turn in line.split(TURN_SEPARATOR.strip())]},
        valid,
        "an object with 'turns', a list of non-empty strings",
    )


#: The options these scenarios had before the models' world moved to the policy, and where each went.
MOVED_TO_THE_POLICY = {
    "text_model": "--text-model (policy_options.text_model)",
    "image_model": "--image-model (policy_options.image_model)",
    "image_size": "--image-size (policy_options.image_size; default: the pipeline's own)",
    "num_steps": "policy_options.num_steps",
    "shift": "nowhere: the pipeline's own scheduler gives the time grid",
    "max_tokens": "policy_options.max_tokens",
}


def moved_to_the_policy(scenario: str, given: dict[str, Any]) -> str:
    """The one-line error for options of ``scenario`` that are the policy's now, or unknown."""
    moved = [f"{k} -> {MOVED_TO_THE_POLICY[k]}" for k in sorted(given) if k in MOVED_TO_THE_POLICY]
    unknown = sorted(k for k in given if k not in MOVED_TO_THE_POLICY)
    parts = []
    if moved:
        parts.append(f"these options of {scenario} are the policy's world now: {'; '.join(moved)}")
    if unknown:
        parts.append(f"unknown option(s) {unknown} for scenario {scenario!r}")
    return "; ".join(parts)


class T2IPromptsScenario(Scenario):
    """Prompts from a file -> a chat model's reasoning -> a latent flow model's image: the tasks
    and the reward; the models and their world are the policy's (see the module docstring).

    Args:
        prompts: the prompt file (train, or train and held out with ``heldout_fraction``).
        reward: the reward's name or weighted-sum spec; ``reward_options`` go to its factory.
        heldout: a second prompt file for the held-out split.
        heldout_fraction: without ``heldout``, the share of ``prompts`` held out (seeded by ``split_seed``).
    """

    name = "t2i_prompts"
    default_policy = "hf"

    def __init__(
        self,
        prompts: str,
        reward: str | RewardFunction | None = None,
        reward_options: dict[str, Any] | None = None,
        heldout: str | None = None,
        heldout_fraction: float = 0.1,
        split_seed: int = 0,
        **moved: Any,
    ):
        if moved:
            raise ValueError(moved_to_the_policy(self.name, moved))
        if reward is None:
            raise ValueError("t2i_prompts needs a reward: give one with --reward (a registered name or a weighted sum)")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.records = {"train": self.read_records(prompts)}
        if heldout is not None:
            self.records["heldout"] = self.read_records(heldout)
        else:
            order = np.random.default_rng(split_seed).permutation(len(self.records["train"]))
            cut = max(1, int(round(heldout_fraction * len(order))))
            if cut >= len(order):
                raise ValueError(f"{prompts!r} has too few prompts ({len(order)}) to hold some out")
            every = self.records["train"]
            self.records = {
                "train": [every[i] for i in sorted(order[cut:])],
                "heldout": [every[i] for i in sorted(order[:cut])],
            }
        self.reward = get_reward(reward, **(reward_options or {})) if isinstance(reward, str) else reward

    @cached_property
    def _tasks(self) -> dict[str, list[Task]]:
        return {
            split: [
                Task(prompts=self.turns(r), category=str(r.get("tag", "")), split=split, index=i, meta=dict(r))
                for i, r in enumerate(records)
            ]
            for split, records in self.records.items()
        }

    def read_records(self, path: str) -> list[dict[str, Any]]:
        """The records of one prompt file."""
        return read_prompt_file(path)

    def turns(self, record: dict[str, Any]) -> tuple[str, ...]:
        """The prompt of every turn of a record's episode."""
        return (record["prompt"],)

    def tasks(self, split: str) -> list[Task]:
        return self._tasks[split]


class EditPromptsScenario(T2IPromptsScenario):
    """Edit dialogues from a file -> at each turn a chat model's reasoning -> an image drawn from
    it and (after the first turn) from the previous image: FLUX.1 Kontext's edits, trained as one
    trajectory per dialogue. See the module docstring for the file and ``num_turns``.

    Args:
        prompts: the dialogue file (``--prompts``).
        num_turns: the turns of every episode; None: each dialogue's own. Longer dialogues are
            played up to ``num_turns``, shorter ones left out.
        **options: those of :class:`T2IPromptsScenario`.
    """

    name = "edit_prompts"

    def __init__(self, prompts: str, num_turns: int | None = None, **options: Any):
        if num_turns is not None and (isinstance(num_turns, bool) or int(num_turns) != num_turns or num_turns < 1):
            raise ValueError(f"num_turns must be a positive integer, got {num_turns!r}")
        self.num_turns = None if num_turns is None else int(num_turns)
        super().__init__(prompts, **options)

    def read_records(self, path: str) -> list[dict[str, Any]]:
        records = read_dialogue_file(path)
        lengths = sorted({len(r["turns"]) for r in records})
        if self.num_turns is None:  # each dialogue plays its own turns
            return records
        records = [r for r in records if len(r["turns"]) >= self.num_turns]
        if not records:
            raise ValueError(f"{path!r} has no dialogue of {self.num_turns} or more turns (it has {lengths})")
        return records

    def turns(self, record: dict[str, Any]) -> tuple[str, ...]:
        return tuple(record["turns"][: self.num_turns])
