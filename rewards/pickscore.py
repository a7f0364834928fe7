"""PickScore (Kirstain et al., 2023, "Pick-a-Pic: An Open Dataset of User Preferences for
Text-to-Image Generation"): a CLIP-H model fine-tuned on human preferences between images of the
same prompt, scored as its authors compute it.

For episode i with final image x_i and prompt p_i (the task's last-turn prompt)::

    u_i = f_img(x_i) / ‖f_img(x_i)‖₂        CLIPModel.get_image_features
    v_i = f_txt(p_i) / ‖f_txt(p_i)‖₂        CLIPModel.get_text_features
    R_i = exp(logit_scale) · (u_i · v_i)     the model's own learned logit_scale (≈ 100 for PickScore_v1)

so scores are the model's logits, about 18–23 for PickScore_v1 on ordinary images; component
``cosine`` is ``u_i · v_i``. The authors load the model from ``yuvalkirstain/PickScore_v1`` and
the processor from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the CLIP-H it was fine-tuned
from), hence the separate ``checkpoint`` and ``processor`` options; ``device``, ``dtype`` and
``batch_size`` are those of :mod:`.clip_score`.
"""

from __future__ import annotations

import torch

from unigrpo_env.rewards.clip_score import ClipRewardBase

__all__ = ["PickScoreReward"]


class PickScoreReward(ClipRewardBase):
    """``R = exp(logit_scale) · cos(image, prompt)`` of the PickScore model; component ``cosine``."""

    default_checkpoint = "yuvalkirstain/PickScore_v1"
    default_processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    def __init__(
        self,
        checkpoint: str | None = None,
        processor: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 32,
    ):
        super().__init__(checkpoint, processor, device, dtype, batch_size)

    def score_chunk(
        self, pixel_values: torch.Tensor, prompts: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cos = self.cosine(pixel_values, prompts)
        return self.model.logit_scale.float().exp() * cos, {"cosine": cos}  # R = exp(logit_scale) · cos
