"""Gymnasium spaces over the typed actions and observations.

* :class:`TextActionSpace` — segments of token ids; ``sample()`` returns a valid
  :class:`~unigrpo_env.TextAction`, ``contains()`` validates one.
* :class:`FlowActionSpace` — next latents of a fixed shape; ``sample()`` returns a
  :class:`~unigrpo_env.FlowAction` with a standard-normal ``x_next``.
* :class:`InterleavedActionSpace` — the environment's ``action_space``: both of the above, a
  static description as Gymnasium's spaces are. Which of the two is valid at a step depends on
  the state, so — like Gymnasium's action masks — ``sample`` takes the current observation as its
  ``mask``: ``env.step(env.action_space.sample(mask=obs))`` is always valid (a random agent
  finishes episodes).
* :class:`ObservationSpace` — membership of an :class:`~unigrpo_env.Observation`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from unigrpo_env.actions import FlowAction, TextAction
from unigrpo_env.observation import Observation

__all__ = ["TextActionSpace", "FlowActionSpace", "InterleavedActionSpace", "ObservationSpace"]


class TextActionSpace(spaces.Space[TextAction]):
    """Segments of 1 to ``max_length`` token ids in ``[0, vocab_size)`` for one episode, where
    the end-of-thinking token may only come last.

    ``max_length`` is the most tokens a text phase accepts (the codec's limit); in a given state
    the phase accepts ``obs.tokens_left`` more (:meth:`sample_segment`).
    """

    def __init__(self, vocab_size: int, eot_id: int, max_length: int, seed: int | np.random.Generator | None = None):
        super().__init__(shape=None, dtype=None, seed=seed)
        self.vocab_size = int(vocab_size)
        self.eot_id = int(eot_id)
        self.max_length = int(max_length)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> TextAction:
        """A random segment of ``1 … max(1, max_length // 2)`` uniform token ids, never the
        end-of-thinking token (valid at the start of any text phase)."""
        if mask is not None or probability is not None:
            raise NotImplementedError("TextActionSpace.sample does not take a mask or probability")
        return TextAction(tokens=self.sample_segment(self.max_length))

    def sample_segment(self, max_length: int) -> torch.Tensor:
        """The token ids of a random segment for a phase that accepts ``max_length`` more tokens:
        ``1 … max(1, max_length // 2)`` of them, so the token limit closes a random agent's text
        phase after a few steps."""
        length = int(self.np_random.integers(1, max(1, max_length // 2) + 1))
        ids = self.np_random.integers(0, self.vocab_size - 1, size=length)
        ids = ids + (ids >= self.eot_id)  # uniform over the vocabulary without the end-of-thinking id
        return torch.from_numpy(ids.astype(np.int64))

    def contains(self, x: Any) -> bool:
        if not isinstance(x, TextAction) or x.tokens.dim() != 1:
            return False
        tokens = x.tokens
        if tokens.is_floating_point() or tokens.dtype == torch.bool or not 1 <= tokens.numel() <= self.max_length:
            return False
        if bool(((tokens < 0) | (tokens >= self.vocab_size)).any()):
            return False
        if bool((tokens[:-1] == self.eot_id).any()):
            return False
        return x.log_probs is None or bool(torch.isfinite(x.log_probs).all())

    def __repr__(self) -> str:
        return f"TextActionSpace(vocab_size={self.vocab_size}, max_length={self.max_length})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TextActionSpace) and (other.vocab_size, other.eot_id, other.max_length) == (
            self.vocab_size,
            self.eot_id,
            self.max_length,
        )


class FlowActionSpace(spaces.Space[FlowAction]):
    """Next latents ``x_next`` of shape ``latent_shape``, float32, finite."""

    def __init__(self, latent_shape: tuple[int, ...], seed: int | np.random.Generator | None = None):
        super().__init__(shape=tuple(latent_shape), dtype=np.float32, seed=seed)
        self.latent_shape = tuple(int(d) for d in latent_shape)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> FlowAction:
        """A random latent, ``x_next ~ N(0, I)`` (what a policy that ignores the state would do)."""
        if mask is not None or probability is not None:
            raise NotImplementedError("FlowActionSpace.sample does not take a mask or probability")
        x = self.np_random.standard_normal(self.latent_shape).astype(np.float32)
        return FlowAction(x_next=torch.from_numpy(x))

    def contains(self, x: Any) -> bool:
        if not isinstance(x, FlowAction):
            return False
        latent = x.x_next
        return (
            tuple(latent.shape) == self.latent_shape
            and latent.dtype == torch.float32
            and bool(torch.isfinite(latent).all())
        )

    def __repr__(self) -> str:
        return f"FlowActionSpace(latent_shape={self.latent_shape})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlowActionSpace) and other.latent_shape == self.latent_shape


class InterleavedActionSpace(spaces.Space[Any]):
    """The action space of an interleaved environment: a segment of ``text`` in a text phase, a
    next latent of ``image`` in an image phase. Static: the environment never changes it.

    ``sample(mask=obs)`` with the current :class:`~unigrpo_env.Observation` gives an action valid
    in that state (a segment that fits the tokens left, or a latent); ``sample()`` without a mask
    gives a text segment, valid at the start of every episode (Gymnasium's ``check_env`` samples
    before it resets). ``contains`` says whether an action is one of either kind; whether it is
    valid now is the environment's check in ``step``."""

    def __init__(self, text: TextActionSpace, image: FlowActionSpace, seed: int | None = None):
        self.text = text
        self.image = image
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def seed(self, seed: int | None = None) -> tuple[int, int, int]:
        """Seed this space and its two sub-spaces (deterministically derived from ``seed``)."""
        own = super().seed(seed)
        sub = self.np_random.integers(0, 2**31 - 1, size=2)
        return (int(own), int(self.text.seed(int(sub[0]))), int(self.image.seed(int(sub[1]))))

    def sample(self, mask: Observation | None = None, probability: Any = None) -> TextAction | FlowAction:
        if probability is not None or not (mask is None or isinstance(mask, Observation)):
            raise ValueError(
                "the valid action depends on the phase: pass the current observation as the mask, "
                "env.action_space.sample(mask=obs)"
            )
        if mask is None:
            return self.text.sample()
        if mask.phase == "image":
            return self.image.sample()
        if mask.phase != "text":
            raise ValueError("the episode has ended: reset() before sampling another action")
        return TextAction(tokens=self.text.sample_segment(mask.tokens_left))

    def contains(self, x: Any) -> bool:
        return self.text.contains(x) or self.image.contains(x)

    def __repr__(self) -> str:
        return f"InterleavedActionSpace(text={self.text!r}, image={self.image!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, InterleavedActionSpace) and other.text == self.text and other.image == self.image


class ObservationSpace(spaces.Space[Observation]):
    """Observations of one episode of a scenario: shapes, dtypes and ranges are checked."""

    def __init__(
        self,
        vocab_size: int,
        max_tokens: int,
        latent_shape: tuple[int, ...],
        image_size: int,
        seed: int | None = None,
    ):
        super().__init__(shape=None, dtype=None, seed=seed)
        self.vocab_size = int(vocab_size)
        self.max_tokens = int(max_tokens)
        self.latent_shape = tuple(latent_shape)
        self.image_size = int(image_size)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> Observation:
        """A random text-phase observation (for tests of agents; not a reachable state in general)."""
        length = int(self.np_random.integers(0, self.max_tokens + 1))
        tokens = torch.from_numpy(self.np_random.integers(0, self.vocab_size, size=length).astype(np.int64))
        return Observation(
            phase="text",
            turn=0,
            num_turns=1,
            prompt="",
            prompts=("",),
            tokens=tokens,
            tokens_left=self.max_tokens - length,
            num_steps=1,
            cond_images=torch.zeros((0, self.image_size, self.image_size, 3), dtype=torch.uint8),
        )

    def contains(self, x: Any) -> bool:
        if not isinstance(x, Observation):
            return False
        tokens = x.tokens
        ok = (
            tokens.dim() == 1
            and tokens.dtype == torch.long
            and tokens.numel() + x.tokens_left <= self.max_tokens
            and bool(((tokens >= 0) & (tokens < self.vocab_size)).all())
            and 0 <= x.turn < x.num_turns
            and x.cond_images.dtype == torch.uint8
            and tuple(x.cond_images.shape[1:]) == (self.image_size, self.image_size, 3)
        )
        if not ok:
            return False
        if x.phase == "image":
            return (
                x.x_t is not None
                and tuple(x.x_t.shape) == self.latent_shape
                and x.t is not None
                and x.t_next is not None
                and 0.0 <= x.t_next < x.t <= 1.0
            )
        return True

    def __repr__(self) -> str:
        return f"ObservationSpace(max_tokens={self.max_tokens}, latent_shape={self.latent_shape})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObservationSpace) and (
            other.vocab_size,
            other.max_tokens,
            other.latent_shape,
            other.image_size,
        ) == (self.vocab_size, self.max_tokens, self.latent_shape, self.image_size)
