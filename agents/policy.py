"""The policy protocol: what the UniGRPO agent needs from a unified model, and nothing more.

A unified model (Bagel-style) has two halves acting in the two phases of an episode:

* a :class:`TextPolicy` writes the reasoning: it samples a whole segment per episode with
  per-token log-probabilities, and recomputes log-probabilities of given tokens *with gradients*
  (for the GRPO ratio);
* a :class:`FlowPolicy` predicts the velocity ``v_θ(x_t, t, c)`` with gradients; its condition
  ``c`` (the turn's reasoning, earlier images) is prepared once per image by :meth:`FlowPolicy.condition`,
  then every denoising step is one network call — two with classifier-free guidance, batched.

:class:`UnifiedPolicy` holds both and exposes their parameters as separate groups, for separate
learning rates and for training one side only. Any model can be adapted: the agent only sees
these protocols (see :mod:`unigrpo_env.agents.hf_policies` for ``transformers`` and ``diffusers``
adapters).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from unigrpo_env.agents.adapters import has_adapter, save_adapter

__all__ = [
    "TurnContext",
    "TextSample",
    "TextPolicy",
    "FlowPolicy",
    "UnifiedPolicy",
    "CheckpointError",
    "PolicyMismatchError",
    "check_policy_fits",
    "world_of",
]


class CheckpointError(ValueError):
    """A policy checkpoint that is missing, incomplete or unreadable (raised by policy loaders)."""


class PolicyMismatchError(ValueError):
    """A policy that cannot play a scenario as it is set up (e.g. latents of another size)."""


class TurnContext(BaseModel):
    """What N episodes condition on at one turn, batched.

    Attributes:
        prompts: each episode's user prompts, from the first turn to the current one.
        history: each episode's reasoning token ids of the earlier turns (one 1-D tensor per turn).
        images: finished images of the earlier turns, ``[N, K, H, W, 3]`` uint8 (K = turn index).
        reasoning: the current turn's reasoning ``[N, L]`` (padded) with ``reasoning_lengths``
            ``[N]`` — empty while the text phase has not run yet; what the flow policy draws from.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    prompts: list[tuple[str, ...]]
    history: list[list[torch.Tensor]]
    images: torch.Tensor
    reasoning: torch.Tensor
    reasoning_lengths: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def turn(self) -> int:
        return len(self.prompts[0]) - 1 if self.prompts else 0

    def reasoning_of(self, i: int) -> torch.Tensor:
        """Episode ``i``'s reasoning tokens of the current turn (unpadded)."""
        return self.reasoning[i, : int(self.reasoning_lengths[i])]

    def with_reasoning(self, tokens: torch.Tensor, lengths: torch.Tensor) -> TurnContext:
        """The same context once the current turn's reasoning is written."""
        return self.model_copy(update={"reasoning": tokens, "reasoning_lengths": lengths})

    def select(self, index: torch.Tensor | list[int]) -> TurnContext:
        """The sub-batch of episodes ``index`` (for minibatches)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        rows = idx.tolist()
        return TurnContext(
            prompts=[self.prompts[i] for i in rows],
            history=[self.history[i] for i in rows],
            images=self.images[idx],
            reasoning=self.reasoning[idx.to(self.reasoning.device)],
            reasoning_lengths=self.reasoning_lengths[idx.to(self.reasoning_lengths.device)],
        )


class TextSample(BaseModel):
    """A sampled reasoning segment per episode: ``tokens`` ``[N, L]`` (padded after ``lengths``),
    ``lengths`` ``[N]``, and the sampling policy's ``log_probs`` ``[N, L]`` (0 beyond lengths)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    tokens: torch.Tensor
    lengths: torch.Tensor
    log_probs: torch.Tensor


@runtime_checkable
class TextPolicy(Protocol):
    """The text half: ``π_θ(y_k | c, y_<k)``."""

    def sample(
        self,
        context: TurnContext,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> TextSample:
        """Sample each episode's segment until its end-of-thinking token or ``max_new_tokens``."""
        ...

    def log_probs(
        self, context: TurnContext, tokens: torch.Tensor, lengths: torch.Tensor, *, temperature: float = 1.0
    ) -> torch.Tensor:
        """``log π_θ(tokens | context)`` per token ``[N, L]`` with gradients (0 beyond ``lengths``)."""
        ...

    def save_pretrained(self, path: str) -> None:
        """Write the weights (and what loading them needs) to a folder."""
        ...

    def parameters(self) -> Iterator[nn.Parameter]: ...


@runtime_checkable
class FlowPolicy(Protocol):
    """The image half: the velocity ``v_θ(x_t, t, c)`` of a flow-matching model."""

    def condition(self, context: TurnContext) -> Any:
        """Prepare the condition of the current turn's image (once per image, not per step)."""
        ...

    def velocity(
        self, x_t: torch.Tensor, t: torch.Tensor | float, condition: Any, *, cfg_scale: float = 1.0
    ) -> torch.Tensor:
        """``v_θ`` ``[N, C, H, W]`` with gradients. ``cfg_scale == 1``: one network call, no
        unconditional branch; otherwise ``v_u + s·(v_c − v_u)`` from one batched call."""
        ...

    def save_pretrained(self, path: str) -> None:
        """Write the weights (and what loading them needs) to a folder."""
        ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    # Optional, not part of the runtime check: ``check_latent_shape(shape)`` raises ``ValueError``,
    # saying what the model draws, if it cannot draw latents of ``shape`` ``(C, H, W)``;
    # :func:`check_policy_fits` calls it before any rollout.


class UnifiedPolicy(nn.Module):
    """A text policy and a flow policy, trained together by UniGRPO.

    The two halves are registered as sub-modules, so ``state_dict``, ``to(device)`` and
    Accelerate's wrapping see the whole model; :meth:`text_parameters` and
    :meth:`image_parameters` give the two parameter groups (a model whose halves share a
    backbone overrides them).
    """

    def __init__(self, text: TextPolicy, image: FlowPolicy, world: Any = None):
        super().__init__()
        for name, part in (("text", text), ("image", image)):
            if not isinstance(part, nn.Module):
                raise TypeError(f"the {name} policy must be a torch.nn.Module, got {type(part).__name__}")
        if not isinstance(text, TextPolicy):
            raise TypeError(
                f"{type(text).__name__} does not implement the TextPolicy protocol (sample, log_probs, save_pretrained)"
            )
        if not isinstance(image, FlowPolicy):
            raise TypeError(
                f"{type(image).__name__} does not implement the FlowPolicy protocol (condition, velocity, save_pretrained)"
            )
        self.text = text
        self.image = image
        #: The model's side of the environment (a :class:`unigrpo_env.World`: its tokenizer, image
        #: codec and time grid), where the policy kind supplies it; None: the scenario's default.
        self.world = world

    def save_pretrained(self, path: str | Path) -> None:
        """Save both halves in the checkpoint layout: ``language_model/`` and ``flow_model/`` (an
        adapted half with its adapter merged), and each adapter as an adapter in
        ``adapters/text/`` / ``adapters/image/`` (:func:`~unigrpo_env.agents.adapters.save_adapter`)."""
        path = Path(path)
        self.text.save_pretrained(str(path / "language_model"))
        self.image.save_pretrained(str(path / "flow_model"))
        for side in ("text", "image"):
            part = getattr(self, side)
            if has_adapter(part):
                save_adapter(part, path / "adapters" / side)

    def text_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.text.parameters() if p.requires_grad]

    def image_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.image.parameters() if p.requires_grad]


def world_of(policy: UnifiedPolicy, scenario: Any) -> Any:
    """The world ``policy`` plays ``scenario`` in: the policy's own (``policy.world``, where its
    kind supplies one), else the scenario's ``default_world()``."""
    world = getattr(policy, "world", None)
    return scenario.default_world() if world is None else world


def check_policy_fits(policy: UnifiedPolicy, scenario: Any, world: Any = None) -> None:
    """Raise :class:`PolicyMismatchError` if ``policy`` cannot play ``scenario`` in ``world``
    (None: :func:`world_of`): its text policy's end-of-thinking id (``eot_id``, where it has one)
    is not the world's, or its flow policy's ``check_latent_shape`` (where it has one) refuses
    the world's latent shape. Called by the agent and the evaluator before any rollout, so a run
    with a mismatched image size stops with one line before its run folder is written, not with
    a shape error from inside the network."""
    world = world_of(policy, scenario) if world is None else world
    name = getattr(scenario, "name", "?")
    eot = getattr(policy.text, "eot_id", None)
    if eot is not None and int(eot) != int(world.text_codec.eot_id):
        raise PolicyMismatchError(
            f"the policy's end-of-thinking id is {int(eot)}, the environment's ({world.text_codec.end_of_thinking!r}) "
            f"{int(world.text_codec.eot_id)}: they use different tokenizers (scenario {name!r})"
        )
    check = getattr(policy.image, "check_latent_shape", None)
    if check is None:
        return
    shape = world.latent_shape
    try:
        check(shape)
    except ValueError as exc:
        raise PolicyMismatchError(
            f"the policy cannot draw the latents of scenario {name!r} (shape {shape}, image size "
            f"{world.image_size}): {exc}"
        ) from None
