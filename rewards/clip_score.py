"""CLIP score: how well an image matches its prompt, as the cosine similarity of CLIP embeddings
(Radford et al., 2021; as a metric, Hessel et al., 2021, "CLIPScore").

For episode i with final image x_i and prompt p_i (the task's last-turn prompt,
``tasks[i].prompts[-1]``)::

    u_i = f_img(x_i) / ‖f_img(x_i)‖₂        f_img = CLIPModel.get_image_features (projected)
    v_i = f_txt(p_i) / ‖f_txt(p_i)‖₂        f_txt = CLIPModel.get_text_features (projected)
    cos_i = u_i · v_i                        in [−1, 1]; component ``cosine``

    R_i = scale · cos_i                      default (scale = 1.0)
    R_i = w · max(cos_i, 0)                  with ``clipscore_weight=w``: the paper's CLIP-S, w = 2.5

This module also holds the plumbing the CLIP-based rewards share (:mod:`.pickscore`,
:mod:`.aesthetic`), :class:`ClipRewardBase`. Their common options:

* ``checkpoint`` — a CLIP model folder (``save_pretrained``) or hub id; ``processor`` — the folder
  or hub id of its ``CLIPProcessor`` (default: the checkpoint's own). A checkpoint that does not
  hold a CLIP model, or a processor that does not load, raises a one-line :class:`ValueError`.
* ``device`` — ``None`` (default) means ``"cuda"`` when ``torch.cuda.is_available()``, else
  ``"cpu"``; any torch device string otherwise.
* ``dtype`` — ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``: the CLIP model's weights.
  Embeddings are normalised, and scores computed, in float32.
* ``batch_size`` — episodes per model call (default 32); a batch is scored chunk by chunk.

Models are loaded once per process by :func:`load_clip`, a call of
:func:`~unigrpo_env.rewards.hf_models.load_model` (the loader of every model-based reward), cached
by (checkpoint, processor, device, dtype), so two rewards on the same CLIP model (``clip_score``
and ``aesthetic`` both default to ``openai/clip-vit-large-patch14``) share one copy. The cached
model is frozen and in eval mode; do not change it in place.

Preprocessing is batched on the device (:func:`clip_pixel_values`): the uint8 images of a chunk
are resized in one ``F.interpolate`` call (bicubic, antialiased, as the processor's PIL resize),
centre-cropped and normalised with the processor's own size, crop and mean/std, instead of a PIL
loop over images. Torch's antialiased bicubic kernel is PIL's, so pixel values agree with the
processor's to within a uint8 rounding step. Prompts go through the processor's tokenizer with
padding and truncation to the text model's ``max_position_embeddings`` (77 for CLIP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from unigrpo_env.reward import RewardInputs, RewardOutput
from unigrpo_env.rewards.hf_models import DTYPES, load_model

__all__ = [
    "ClipScoreReward",
    "ClipRewardBase",
    "load_clip",
    "clip_pixel_values",
    "image_embeddings",
    "text_embeddings",
    "resolve_device",
    "DTYPES",
]

# PIL's resampling filters (as image processors store them) → F.interpolate's modes.
_RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def resolve_device(device: str | None) -> str:
    """``None`` → ``"cuda"`` when CUDA is available, else ``"cpu"``; otherwise ``device`` itself."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return dtype


#: What a CLIP checkpoint should be, for :func:`load_clip`'s error messages.
CLIP_EXPECTED = "a CLIPModel folder saved with save_pretrained or a hub id such as 'openai/clip-vit-large-patch14'"


def load_clip(checkpoint: str, processor: str, device: str, dtype: str) -> tuple[Any, Any]:
    """The ``CLIPModel`` at ``checkpoint`` (frozen, eval mode, on ``device`` in ``dtype``) and the
    ``CLIPProcessor`` at ``processor``: :func:`~unigrpo_env.rewards.hf_models.load_model` with a
    ``'clip'`` model type and a processor with an image processor and a tokenizer, cached there
    (``load_clip.cache_clear`` is ``load_model``'s).

    Raises :class:`ValueError` (one line) if ``checkpoint`` is not a CLIP model folder or hub id,
    lacks some of the model's weights, or ``processor`` is not a processor with an image
    processor and a tokenizer.
    """
    return load_model(
        "CLIPModel",
        checkpoint,
        device,
        dtype,
        CLIP_EXPECTED,
        processor=processor,
        model_types=("clip",),
        processor_parts=("image_processor", "tokenizer"),
    )


load_clip.cache_clear = load_model.cache_clear  # type: ignore[attr-defined]  # one cache: load_model's


def _size_field(size: Any, key: str) -> int | None:
    """``size[key]`` of an image processor's size, a dict or (transformers 5.x) a ``SizeDict``."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def _resized_shape(height: int, width: int, size: Any) -> tuple[int, int]:
    """The (height, width) the processor resizes an image to (transformers'
    ``get_resize_output_image_size`` with ``default_to_square=False``)::

        shortest_edge s:   short → s,  long → int(s · long / short)
        height, width:     exactly (height, width)
    """
    shortest = _size_field(size, "shortest_edge")
    if shortest is not None:
        if height <= width:
            return shortest, int(shortest * width / height)
        return int(shortest * height / width), shortest
    target_h, target_w = _size_field(size, "height"), _size_field(size, "width")
    if target_h is None or target_w is None:
        raise ValueError(f"the image processor's size must have 'shortest_edge' or 'height' and 'width', got {size}")
    return target_h, target_w


def clip_pixel_values(images: torch.Tensor, image_processor: Any, device: str | torch.device) -> torch.Tensor:
    """uint8 images ``[N, H, W, 3]`` → ``pixel_values`` ``[N, 3, h, w]`` float32 on ``device``, as
    ``image_processor`` (a CLIP image processor) computes them, in one batched pass::

        x = resize(x)               shortest edge → size["shortest_edge"] (or → (height, width)):
                                    one F.interpolate call (the processor's filter, bicubic for CLIP,
                                    antialiased), then rounded and clipped to [0, 255] as PIL's uint8
                                    output is; skipped when the size already matches, as PIL does
        x = x[top:top+h, left:left+w]   centre crop: top = (H' − h) // 2, left = (W' − w) // 2
        x = x · rescale_factor      1/255
        x = (x − mean) / std        the processor's image_mean, image_std per channel
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3] uint8, got {tuple(images.shape)} {images.dtype}")
    x = images.to(device).permute(0, 3, 1, 2).float()  # [N, 3, H, W] in [0, 255]
    ip = image_processor
    if getattr(ip, "do_resize", True):
        new_h, new_w = _resized_shape(x.shape[2], x.shape[3], ip.size)
        if (new_h, new_w) != (x.shape[2], x.shape[3]):
            resample = getattr(ip, "resample", None)
            mode = _RESAMPLE_MODES.get(3 if resample is None else int(resample), "bicubic")
            extra = {"antialias": True, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
            x = F.interpolate(x, size=(new_h, new_w), mode=mode, **extra).round_().clamp_(0, 255)
    if getattr(ip, "do_center_crop", False):
        crop_h, crop_w = _size_field(ip.crop_size, "height"), _size_field(ip.crop_size, "width")
        if crop_h > x.shape[2] or crop_w > x.shape[3]:
            raise ValueError(
                f"images of {tuple(x.shape[2:])} after resizing are smaller than the crop {crop_h}×{crop_w}"
            )
        top, left = (x.shape[2] - crop_h) // 2, (x.shape[3] - crop_w) // 2
        x = x[:, :, top : top + crop_h, left : left + crop_w]
    if getattr(ip, "do_rescale", True):
        x = x * float(ip.rescale_factor)
    if getattr(ip, "do_normalize", True):
        mean = torch.tensor(ip.image_mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(ip.image_std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


def _projected(out: Any) -> torch.Tensor:
    """The projected embedding of ``get_image_features`` / ``get_text_features``: the tensor
    itself in transformers 4.x; in 5.x a ``BaseModelOutputWithPooling`` whose ``pooler_output``
    holds it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_embeddings(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """``u = f_img(x) / ‖f_img(x)‖₂``, float32 ``[N, projection_dim]``."""
    features = _projected(model.get_image_features(pixel_values=pixel_values.to(model.dtype))).float()
    return features / features.norm(dim=-1, keepdim=True)


def text_embeddings(model: Any, tokenizer: Any, prompts: Sequence[str], device: str | torch.device) -> torch.Tensor:
    """``v = f_txt(p) / ‖f_txt(p)‖₂``, float32 ``[len(prompts), projection_dim]``; the prompts are
    padded and truncated to the text model's ``max_position_embeddings``."""
    tokens = tokenizer(
        list(prompts),
        padding=True,
        truncation=True,
        max_length=int(model.config.text_config.max_position_embeddings),
        return_tensors="pt",
    )
    out = model.get_text_features(
        input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
    )
    features = _projected(out).float()
    return features / features.norm(dim=-1, keepdim=True)


class ClipRewardBase:
    """A reward on a cached CLIP model, scoring a batch chunk by chunk (see the module docstring
    for the options). Subclasses set :attr:`default_checkpoint` (and :attr:`default_processor`,
    ``None`` = the checkpoint's own) and implement :meth:`score_chunk`; with
    :attr:`needs_prompt`, an episode whose task has no prompt is NaN.
    """

    default_checkpoint: str = "openai/clip-vit-large-patch14"
    default_processor: str | None = None
    needs_prompt: bool = True

    def __init__(
        self,
        checkpoint: str | None = None,
        processor: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 32,
    ):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.checkpoint = str(checkpoint if checkpoint is not None else self.default_checkpoint)
        self.processor_name = str(processor or self.default_processor or self.checkpoint)
        self.device = resolve_device(device)
        self.dtype = _check_dtype(dtype)
        self.batch_size = int(batch_size)
        self.model, self.processor = load_clip(self.checkpoint, self.processor_name, self.device, self.dtype)

    def score_chunk(
        self, pixel_values: torch.Tensor, prompts: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores ``[n]`` and components of one chunk: ``pixel_values`` ``[n, 3, h, w]`` on the
        device, ``prompts`` one per image. Runs under ``torch.inference_mode()``."""
        raise NotImplementedError

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        n = len(inputs)
        prompts = [task.prompts[-1] if task.prompts else None for task in inputs.tasks]
        rows = [i for i in range(n) if prompts[i] is not None or not self.needs_prompt]
        scores = torch.full((n,), math.nan)
        components: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                index = torch.tensor(chunk, dtype=torch.long, device=inputs.images.device)
                pixels = clip_pixel_values(inputs.images[index], self.processor.image_processor, self.device)
                chunk_scores, chunk_components = self.score_chunk(pixels, [prompts[i] or "" for i in chunk])
                scores[chunk] = chunk_scores.float().cpu()
                for name, values in chunk_components.items():
                    components.setdefault(name, torch.full((n,), math.nan))[chunk] = values.float().cpu()
        return RewardOutput(scores=scores, components=components)

    def cosine(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``cos_i = u_i · v_i`` for a chunk; each distinct prompt is encoded once (a GRPO group's
        rollouts share theirs)."""
        distinct = list(dict.fromkeys(prompts))
        text = text_embeddings(self.model, self.processor.tokenizer, distinct, self.device)
        text = text[torch.tensor([distinct.index(p) for p in prompts], device=text.device)]
        return (image_embeddings(self.model, pixel_values) * text).sum(dim=-1)


class ClipScoreReward(ClipRewardBase):
    """``R = scale · cos(image, prompt)`` of CLIP embeddings, or the CLIPScore paper's
    ``R = clipscore_weight · max(cos, 0)`` (its w = 2.5) when ``clipscore_weight`` is given;
    component ``cosine``. Default model ``openai/clip-vit-large-patch14``; the other options are
    the module docstring's.
    """

    default_checkpoint = "openai/clip-vit-large-patch14"

    def __init__(
        self,
        checkpoint: str | None = None,
        processor: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 32,
        scale: float = 1.0,
        clipscore_weight: float | None = None,
    ):
        if clipscore_weight is not None and scale != 1.0:
            raise ValueError("give scale (R = scale·cos) or clipscore_weight (R = w·max(cos, 0)), not both")
        self.scale = float(scale)
        self.clipscore_weight = None if clipscore_weight is None else float(clipscore_weight)
        super().__init__(checkpoint, processor, device, dtype, batch_size)

    def score_chunk(
        self, pixel_values: torch.Tensor, prompts: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cos = self.cosine(pixel_values, prompts)
        if self.clipscore_weight is not None:
            score = self.clipscore_weight * cos.clamp(min=0)  # CLIP-S = w · max(cos, 0)
        else:
            score = self.scale * cos  # R = scale · cos
        return score, {"cosine": cos}
