"""``t2i_prompts`` and ``edit_prompts``: real models on prompts and edit dialogues read from files.

The scenario of a real run: a chat model reasons about a prompt and a latent-space flow model
(Stable Diffusion 3, FLUX) draws it. Its world is the models' own:

* the text codec is the chat model's tokenizer (``text_model``, a folder or hub id), with the
  think markers added as the policy adds them, so token ids agree;
* the image codec is the pipeline's VAE (``image_model``'s ``vae`` subfolder), latents
  ``[C, image_size / f, image_size / f]``;
* the reward is named with ``reward`` (a registered reward or weighted-sum spec; a run gives it
  with ``--reward``): there is no default, as no reward fits every prompt set.

Prompt files: plain text (one prompt a line; blank lines and ``#`` comments skipped) or JSONL, one
object a line with at least ``"prompt"``; GenEval's metadata fields (``tag``, ``include``, ...)
are kept in ``Task.meta`` and ``tag`` becomes the task's category. The held-out split is a second
file (``heldout``) or a seeded share of the first (``heldout_fraction``).

``edit_prompts`` is the multi-turn form (FLUX.1 Kontext draws each turn from the one before):
each record is a dialogue, ``{"turns": [prompt, edit, edit, ...], ...}`` in JSONL or, in a text
file, one dialogue a line with its turns separated by ``" || "``. The first turn draws from text
alone, every later one from its instruction and the previous turn's image; one episode is the
whole dialogue with one terminal reward, which sees the final image, the earlier images and every
turn's text. All episodes of a batch have the same number of turns: ``num_turns`` keeps the
dialogues with at least that many and plays their first ``num_turns`` turns.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from unigrpo_env.codecs import THINK, TextCodec, add_think_tokens
from unigrpo_env.reward import RewardFunction
from unigrpo_env.rewards import get_reward
from unigrpo_env.scenario import Scenario
from unigrpo_env.task import Task
from unigrpo_env.vae_codec import VAECodec

__all__ = ["read_prompt_file", "read_dialogue_file", "T2IPromptsScenario", "EditPromptsScenario"]

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


class T2IPromptsScenario(Scenario):
    """Prompts from a file -> a chat model's reasoning -> a latent flow model's image.

    Args:
        prompts: the prompt file (train, or train and held out with ``heldout_fraction``).
        text_model: the chat model's folder or hub id (its tokenizer is the text codec).
        image_model: the diffusers pipeline's folder or hub id (its ``vae`` is the image codec).
        reward: the reward's name or weighted-sum spec; ``reward_options`` go to its factory.
        heldout: a second prompt file for the held-out split.
        heldout_fraction: without ``heldout``, the share of ``prompts`` held out (seeded by ``split_seed``).
        image_size: the images' side in pixels.
        num_steps: denoising steps per image; ``shift``: the time grid's shift (SD3: 3).
        max_tokens: the reasoning's token limit.
    """

    name = "t2i_prompts"
    default_policy = "hf"

    def __init__(
        self,
        prompts: str,
        text_model: str,
        image_model: str,
        reward: str | RewardFunction | None = None,
        reward_options: dict[str, Any] | None = None,
        heldout: str | None = None,
        heldout_fraction: float = 0.1,
        split_seed: int = 0,
        image_size: int = 512,
        num_steps: int = 10,
        shift: float = 3.0,
        max_tokens: int = 256,
    ):
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
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(text_model)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"could not load the tokenizer of text_model {text_model!r}: {' '.join(str(exc).split())[:200]}"
            ) from exc
        add_think_tokens(tokenizer)  # as the policy adds them: the same ids
        self.text_codec = TextCodec(
            tokenizer, end_of_thinking=THINK[1], max_tokens=max_tokens, pad_token=tokenizer.pad_token
        )
        try:
            self.image_codec = VAECodec.from_pretrained(image_model, image_size, subfolder="vae", sample=False)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"could not load the VAE of image_model {image_model!r}: {' '.join(str(exc).split())[:200]}"
            ) from exc
        self.num_steps, self.shift = int(num_steps), float(shift)
        self.reward = get_reward(reward, **(reward_options or {})) if isinstance(reward, str) else reward
        self.timesteps()  # validate num_steps and shift now

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
        num_turns: the turns of every episode; None: the file's dialogues must all have the same
            number. Longer dialogues are played up to ``num_turns``, shorter ones left out.
        **options: those of :class:`T2IPromptsScenario` (``max_tokens`` is per turn).
    """

    name = "edit_prompts"

    def __init__(self, prompts: str, text_model: str, image_model: str, num_turns: int | None = None, **options: Any):
        if num_turns is not None and (isinstance(num_turns, bool) or int(num_turns) != num_turns or num_turns < 1):
            raise ValueError(f"num_turns must be a positive integer, got {num_turns!r}")
        self.num_turns = None if num_turns is None else int(num_turns)
        super().__init__(prompts, text_model, image_model, **options)

    def read_records(self, path: str) -> list[dict[str, Any]]:
        records = read_dialogue_file(path)
        lengths = sorted({len(r["turns"]) for r in records})
        if self.num_turns is None:
            if len(lengths) > 1:
                kept = ", ".join(f"{k} keeps {sum(len(r['turns']) >= k for r in records)}" for k in lengths)
                raise ValueError(
                    f"{path!r} has dialogues of {' and '.join(map(str, lengths))} turns and a batch plays one number "
                    f"of turns: choose num_turns ({kept})"
                )
            return records
        records = [r for r in records if len(r["turns"]) >= self.num_turns]
        if not records:
            raise ValueError(f"{path!r} has no dialogue of {self.num_turns} or more turns (it has {lengths})")
        return records

    def turns(self, record: dict[str, Any]) -> tuple[str, ...]:
        return tuple(record["turns"][: self.num_turns])
