"""Exceptions raised by the environments.

Every invalid action raises a subclass of :class:`InvalidActionError` *before* the environment
changes anything, so the caller can catch it and retry with a valid action. Each subclass names
one way an action can be wrong, so callers (and tests) can tell them apart.
"""

from __future__ import annotations

__all__ = [
    "InvalidActionError",
    "WrongPhaseError",
    "ActionShapeError",
    "ActionDTypeError",
    "ActionDeviceError",
    "NonFiniteActionError",
    "TokenOutOfVocabularyError",
    "TokenBudgetError",
    "EpisodeEndedError",
    "TaskSplitError",
]


class InvalidActionError(ValueError):
    """An action that the environment refused; the environment is unchanged."""


class WrongPhaseError(InvalidActionError):
    """A text action during the image phase, or a flow action during the text phase."""


class ActionShapeError(InvalidActionError):
    """A tensor of the wrong shape (latent shape, batch size, segment length...)."""


class ActionDTypeError(InvalidActionError):
    """A tensor of the wrong dtype (token ids must be integers, latents float32...)."""


class ActionDeviceError(InvalidActionError):
    """A tensor on another device than the environment's."""


class NonFiniteActionError(InvalidActionError):
    """NaN or infinite values in a latent or in log-probabilities."""


class TokenOutOfVocabularyError(InvalidActionError):
    """A token id outside ``[0, vocab_size)``."""


class TokenBudgetError(InvalidActionError):
    """A text segment that does not fit the phase: too long for the tokens left, tokens after
    the end-of-thinking token, or text for an episode whose text phase is already closed."""


class EpisodeEndedError(InvalidActionError, RuntimeError):
    """A step after the episode ended; call ``reset()`` first."""


class TaskSplitError(ValueError):
    """An unknown task split or task index was asked for."""
