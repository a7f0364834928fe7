"""JPEG compressibility: DDPO's reward (Black et al., 2023, "Training Diffusion Models with
Reinforcement Learning").

Each final image is saved as a JPEG with PIL at ``quality`` (DDPO uses 95) and scored::

    R = − size_bytes / 1000          (minus the file size in kB)

so flatter, simpler images score higher. DDPO reports it as a reward that is easy to optimise
and easy to hack; here it is a ready second objective for composites and a sanity check that an
agent can push an arbitrary image statistic. Scores are negative; their scale depends on the
image size (a 32×32 ShapesWorld canvas is about 0.7 to 1.2 kB, most of it JPEG headers).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from unigrpo_env.reward import RewardInputs, RewardOutput

__all__ = ["JpegCompressibilityReward", "jpeg_kilobytes"]


def jpeg_kilobytes(image: np.ndarray, quality: int = 95) -> float:
    """Size in kB (1000 bytes) of ``image`` (``[H, W, 3]`` uint8) saved as a JPEG at ``quality``."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3] uint8, got {tuple(image.shape)} {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegCompressibilityReward:
    """``R = −kB`` of each image saved as JPEG at ``quality`` (1..95); component ``kilobytes``."""

    def __init__(self, quality: int = 95):
        if not 1 <= int(quality) <= 95:
            raise ValueError(f"quality must be in 1..95 (PIL's JPEG range), got {quality}")
        self.quality = int(quality)

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        images = inputs.images.cpu().numpy()
        kilobytes = torch.tensor(
            [jpeg_kilobytes(images[i], self.quality) for i in range(images.shape[0])], dtype=torch.float32
        )
        return RewardOutput(scores=-kilobytes, components={"kilobytes": kilobytes})
