"""What ShapesWorld's image model is conditioned on, built from a turn's context.

The language model writes reasoning, then ``answer :`` and the scene description. The image model
draws from the *description* (the tokens after the last ``answer :`` marker, up to ``</think>``;
the whole reasoning when there is no marker), and, from the second turn on, from the previous
image (extra input channels). The unconditional input for classifier-free guidance is the empty
text with the same previous image.
"""

from __future__ import annotations

from typing import Any

import torch

from unigrpo_env.codecs import PixelCodec
from unigrpo_env.scenarios.shapes.tasks import ANSWER_MARKER

__all__ = ["ShapesConditioner"]


class ShapesConditioner:
    """Builds ``{"text_ids": [N, max_text_tokens], "cond_image": [N, 3, H, W] | None}``.

    Args:
        vocab: the tokenizer's vocabulary (token -> id).
        max_text_tokens: the image model's text length; longer descriptions keep their first tokens.
        image_size: the canvas size (for decoding earlier images into the model's scale).
        model_vocab_size: the image model's vocabulary size, if smaller than the tokenizer's: the
            words only edit instructions use come after every description word, and an image
            model trained before they existed reads them as ``unk_id``.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        max_text_tokens: int,
        image_size: int,
        pad_id: int,
        end_id: int,
        model_vocab_size: int | None = None,
        unk_id: int | None = None,
    ):
        self.marker = [vocab[w] for w in ANSWER_MARKER.split()]
        self.model_vocab_size = model_vocab_size
        self.unk_id = unk_id
        if model_vocab_size is not None and (unk_id is None or not 0 <= unk_id < model_vocab_size):
            raise ValueError(f"unk_id must be an id below model_vocab_size={model_vocab_size}, got {unk_id}")
        self.max_text_tokens = int(max_text_tokens)
        self.pad_id = int(pad_id)
        self.end_id = int(end_id)
        self.codec = PixelCodec(image_size)

    def description_ids(self, reasoning: torch.Tensor) -> list[int]:
        ids = reasoning.tolist()
        if ids and ids[-1] == self.end_id:
            ids = ids[:-1]
        m = len(self.marker)
        starts = [i for i in range(len(ids) - m + 1) if ids[i : i + m] == self.marker]
        if starts:
            ids = ids[starts[-1] + m :]
        ids = ids[: self.max_text_tokens]
        if self.model_vocab_size is not None:
            ids = [i if i < self.model_vocab_size else self.unk_id for i in ids]
        return ids

    def __call__(self, context: Any) -> dict[str, Any]:
        n = len(context)
        text_ids = torch.full((n, self.max_text_tokens), self.pad_id, dtype=torch.long)
        for i in range(n):
            ids = self.description_ids(context.reasoning_of(i).cpu())
            if ids:
                text_ids[i, : len(ids)] = torch.tensor(ids)
        images = context.images
        cond_image = self.codec.encode(images[:, -1]) if images.shape[1] > 0 else None
        return {"text_ids": text_ids, "cond_image": cond_image}

    def unconditional(self, condition: dict[str, Any]) -> dict[str, Any]:
        return {"text_ids": torch.full_like(condition["text_ids"], self.pad_id), "cond_image": condition["cond_image"]}
