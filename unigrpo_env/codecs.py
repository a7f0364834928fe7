"""Codecs: how the environment turns text into token ids and latents into images.

* :class:`TextCodec` wraps a Hugging Face ``tokenizers`` tokenizer (or the fast tokenizer of
  ``transformers``) and knows the text phase's two rules: the end-of-thinking token closes it,
  and so does the token limit.
* :class:`ImageCodec` maps RGB images to the latents the flow model denoises and back;
  :class:`PixelCodec` is the identity codec of pixel-space models (ShapesWorld), scaling
  ``[0, 255]`` to ``[-1, 1]``; :class:`~unigrpo_env.vae_codec.VAECodec`, the codec of latent-space
  models, implements the same two methods over a diffusers ``AutoencoderKL``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

__all__ = ["TextCodec", "ImageCodec", "PixelCodec"]


class TextCodec:
    """Token ids <-> text, plus the text phase's end-of-thinking token and token limit.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` or a ``transformers`` fast tokenizer.
        end_of_thinking: the token that closes the text phase (e.g. ``"</think>"``).
        max_tokens: the most tokens one turn's text phase accepts (the limit closes it too).
        pad_token: the padding token of batched observations.
    """

    def __init__(self, tokenizer: Any, end_of_thinking: str, max_tokens: int, pad_token: str = "<pad>"):
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not hasattr(backend, "token_to_id"):
            raise TypeError(
                f"expected a tokenizers.Tokenizer or a transformers fast tokenizer, got {type(tokenizer)!r}"
            )
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.tokenizer = backend
        self.end_of_thinking = end_of_thinking
        self.max_tokens = int(max_tokens)
        self.eot_id = self._id(end_of_thinking)
        self.pad_id = self._id(pad_token)
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))

    def _id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no token {token!r}")
        return int(token_id)

    def encode(self, text: str, *, end_of_thinking: bool = False) -> list[int]:
        """Token ids of ``text`` (no special tokens added unless ``end_of_thinking``)."""
        ids = list(self.tokenizer.encode(text, add_special_tokens=False).ids)
        return ids + [self.eot_id] if end_of_thinking else ids

    def decode(self, ids: Any) -> str:
        """Text of ``ids`` with special tokens (end-of-thinking, padding) left out."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class ImageCodec(ABC):
    """RGB images ``[N, H, W, 3]`` uint8 <-> latents ``[N, *latent_shape]`` float32."""

    latent_shape: tuple[int, ...]
    image_size: int

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: str | torch.device) -> ImageCodec:
        """Run on ``device`` from now on (a codec with a network moves it; this one has none);
        returns the codec. An environment puts its scenario's codec on its own device."""
        return self


class PixelCodec(ImageCodec):
    """Pixel space: the latent is the image itself, channels first, scaled to ``[-1, 1]``.

    ``encode(img) = img / 127.5 − 1``; ``decode(x) = round((clamp(x, −1, 1) + 1) · 127.5)``.
    """

    def __init__(self, image_size: int, channels: int = 3):
        self.image_size = int(image_size)
        self.latent_shape = (channels, self.image_size, self.image_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pixels = ((latents.detach().to(torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5).round()
        return pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
