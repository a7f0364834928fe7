"""``refine_prompts``: prompts from a file, then a VLM critic's fixes, for real image models.

Turn 1 draws the prompt (as ``t2i_prompts``). After each image a vision-language judge — a
registered reward with ``yes_probabilities(images, questions)``, ``vlm_judge`` by default —
answers the prompt's yes/no questions (``task.meta["questions"]``, else the GenEval-derived ones
of :func:`~unigrpo_env.rewards.vlm_judge.geneval_questions`). Where it says yes (``P(yes) > 0.5``)
to every question, or the prompt has none, the episode ends; else the first question it denies
becomes the next instruction (:func:`instruction_for`: "Is there a red car in the image?" →
"there should be a red car in the image"), and the image model draws again from it and the
previous image (FLUX.1 Kontext, or any image policy that takes the previous image). At most
``max_turns`` turns (default 3); each fix costs ``correction_cost`` as its turn's reward. The
terminal reward is the run's reward (``--reward``) of the episode's last image.

The critic is the scenario's, as its reward is: it loads once (``critic_options`` go to its
factory: ``checkpoint``, ``device``, ``dtype``, ...), and it may be the same model as the reward.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from unigrpo_env.feedback import TurnFeedback, TurnInputs
from unigrpo_env.rewards import get_reward
from unigrpo_env.rewards.vlm_judge import task_questions
from unigrpo_env.scenarios.prompts import T2IPromptsScenario

__all__ = ["RefinePromptsScenario", "instruction_for"]

_FORMS = (
    (re.compile(r"^Is there (an? .+) in the image\?$"), "there should be {} in the image"),
    (re.compile(r"^Are there (exactly .+) in the image\?$"), "there should be {} in the image"),
    (re.compile(r"^Is the (.+?) (to the left of|to the right of|above|below) the (.+)\?$"), None),
)


def instruction_for(question: str) -> str:
    """The instruction that asks for what a denied yes/no question checks (GenEval's question forms
    read as statements; any other question as "make this true: <question>")."""
    for pattern, form in _FORMS:
        match = pattern.match(question.strip())
        if match is None:
            continue
        if form is None:
            subject, relation, other = match.groups()
            return f"the {subject} should be {relation} the {other}"
        return form.format(match.group(1))
    return f"make this true: {question.strip()}"


class RefinePromptsScenario(T2IPromptsScenario):
    """Prompts, then a VLM critic's fixes until it is satisfied (see the module docstring).

    Args:
        prompts: the prompt file (``--prompts``), as ``t2i_prompts``'s.
        critic: a registered reward name whose object has ``yes_probabilities(images, questions)``
            (default ``vlm_judge``); ``critic_options`` go to its factory.
        max_turns: the most turns an episode plays.
        correction_cost: each fix's turn reward is ``−correction_cost``.
        **options: those of :class:`~unigrpo_env.scenarios.prompts.T2IPromptsScenario`.
    """

    name = "refine_prompts"

    def __init__(
        self,
        prompts: str,
        critic: str = "vlm_judge",
        critic_options: dict[str, Any] | None = None,
        max_turns: int = 3,
        correction_cost: float = 0.05,
        **options: Any,
    ):
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be an integer >= 1, got {max_turns!r}")
        if not 0.0 <= float(correction_cost) <= 1.0:
            raise ValueError(f"correction_cost must be in [0, 1], got {correction_cost!r}")
        super().__init__(prompts, **options)
        self.max_turns = max_turns
        self.correction_cost = float(correction_cost)
        self.critic = get_reward(critic, **(critic_options or {}))
        if not callable(getattr(self.critic, "yes_probabilities", None)):
            raise ValueError(
                f"the critic {critic!r} has no yes_probabilities(images, questions): expected a VLM judge such as "
                "'vlm_judge'"
            )

    def respond(self, inputs: TurnInputs) -> TurnFeedback:
        """The critic asks every question of every row in one batch of pairs; a row's first denied
        question becomes its next instruction, a row with none denied (or no question) ends."""
        questions = [task_questions(task) for task in inputs.tasks]
        pairs = [(i, q) for i, qs in enumerate(questions) for q in qs]
        yes = torch.empty(0)
        if pairs:
            index = torch.tensor([i for i, _ in pairs], dtype=torch.long)
            with torch.inference_mode():
                yes = self.critic.yes_probabilities(inputs.images[index], [q for _, q in pairs]).float().cpu()
        denied: dict[int, str] = {}
        for (i, question), p in zip(pairs, yes.tolist()):
            if p <= 0.5 and i not in denied:
                denied[i] = question
        prompts = [instruction_for(denied[i]) if i in denied else None for i in range(len(inputs))]
        rewards = [-self.correction_cost if p is not None else float("nan") for p in prompts]
        info = [{"denied": denied.get(i)} for i in range(len(inputs))]
        return TurnFeedback(next_prompts=prompts, rewards=rewards, info=info)
