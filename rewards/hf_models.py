"""Cached loading of a Hugging Face model and its processor for the model-based rewards that are
not CLIP models (:mod:`.vlm_judge`, :mod:`.geneval_detector`; the CLIP ones use
:func:`~unigrpo_env.rewards.clip_score.load_clip`).

:func:`load_model` loads the model of a checkpoint through one of transformers' auto classes
(``AutoModelForImageTextToText``, ``AutoModelForZeroShotObjectDetection``, ...) once per process
for each (auto class, checkpoint, device, dtype): frozen, in eval mode, on the device, its weights
in the dtype (read in that dtype, so a 7B model in bfloat16 never exists in float32 first). A
checkpoint that does not load — a missing folder, a model the auto class does not know, missing
weights, or a processor that does not load — raises a one-line :class:`ValueError`.
"""

from __future__ import annotations

import functools
from typing import Any

from unigrpo_env.rewards.clip_score import DTYPES, _one_line

__all__ = ["load_model"]


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


@functools.lru_cache(maxsize=8)
def load_model(auto_class: str, checkpoint: str, device: str, dtype: str, expected: str) -> tuple[Any, Any]:
    """The model at ``checkpoint`` loaded by ``transformers.<auto_class>`` (frozen, eval mode, on
    ``device`` in ``dtype``) and the checkpoint's processor (``AutoProcessor``), cached per
    argument tuple. ``expected`` names what the checkpoint should be, for the error messages.

    Raises :class:`ValueError` (one line) if the checkpoint or its processor does not load, holds
    a model the auto class does not load, or lacks some of the model's weights.
    """
    import transformers
    from transformers import AutoConfig, AutoProcessor

    auto = getattr(transformers, auto_class)
    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {checkpoint!r} does not load; expected {expected}: {_one_line(exc)}") from exc
    try:
        model, info = auto.from_pretrained(checkpoint, output_loading_info=True, **{_dtype_keyword(): DTYPES[dtype]})
    except ValueError as exc:  # the auto class does not know this configuration
        raise ValueError(
            f"checkpoint {checkpoint!r} holds a {config.model_type!r} model, which {auto_class} does not load; "
            f"expected {expected}"
        ) from exc
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"checkpoint {checkpoint!r} does not load; expected {expected}: {_one_line(exc)}") from exc
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"checkpoint {checkpoint!r} lacks {len(missing)} of the model's weights (e.g. {missing[0]!r}); "
            f"expected {expected}"
        )
    try:
        processor = AutoProcessor.from_pretrained(checkpoint)
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as exc:
        # (a processor whose parts need a missing package, e.g. Qwen2.5-VL's video processor
        # without torchvision, fails inside transformers with one of these)
        import importlib.util

        hint = ""
        if importlib.util.find_spec("torchvision") is None:
            hint = (
                "; its processor may need torchvision, which is not installed: pip install 'unigrpo-env[vlm]' "
                "(the torchvision build that matches your torch)"
            )
        raise ValueError(f"the processor of checkpoint {checkpoint!r} does not load: {_one_line(exc)}{hint}") from exc
    model = model.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
    return model, processor
