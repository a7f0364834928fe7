"""Cached loading of a Hugging Face model and its processor: the one loader of every model-based
reward (:mod:`.clip_score`, :mod:`.pickscore` and :mod:`.aesthetic` through
:func:`~unigrpo_env.rewards.clip_score.load_clip`; :mod:`.vlm_judge`; :mod:`.geneval_detector`).

:func:`load_model` loads the model of a checkpoint (a folder saved with ``save_pretrained`` or a
hub id) through a transformers class — an auto class such as ``AutoModelForImageTextToText`` or
``AutoModelForZeroShotObjectDetection``, or a concrete one such as ``CLIPModel`` — and its
processor (``AutoProcessor``; from the checkpoint, or from a separate folder or hub id). Once per
process for each argument tuple: frozen, in eval mode, on the device, its weights in the dtype
(read in that dtype, so a 7B model in bfloat16 never exists in float32 first). Two rewards on the
same model (``clip_score`` and ``aesthetic`` both default to ``openai/clip-vit-large-patch14``)
share one copy; do not change it in place.

A checkpoint that does not load raises a one-line :class:`ValueError` naming the checkpoint and
what was expected: a missing folder, or a hub id that is not in the local cache when there is no
network; a model of another type than the expected ones (checked from its configuration before
any weight is read, since a concrete class such as ``CLIPModel`` would load another model's
folder with random weights); a model the class does not load; missing weights; or a processor
that does not load or lacks a part the reward needs.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["load_model", "DTYPES"]

#: The ``dtype`` option's values.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _one_line(exc: BaseException, limit: int = 200) -> str:
    return " ".join(str(exc).split())[:limit]


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


@functools.lru_cache(maxsize=16)
def load_model(
    model_class: str,
    checkpoint: str,
    device: str,
    dtype: str,
    expected: str,
    *,
    processor: str | None = None,
    model_types: tuple[str, ...] = (),
    processor_parts: tuple[str, ...] = (),
) -> tuple[Any, Any]:
    """The model at ``checkpoint`` loaded by ``transformers.<model_class>`` (frozen, eval mode, on
    ``device`` in ``dtype``, one of :data:`DTYPES`) and the processor at ``processor`` (default:
    the checkpoint's own), loaded by ``AutoProcessor``; cached per argument tuple.

    Args:
        model_class: a transformers class name, an auto class or a concrete model class.
        checkpoint: a model folder saved with ``save_pretrained``, or a hub id.
        expected: what the checkpoint should be, for the error messages (e.g. ``"a CLIPModel
            folder ... or a hub id such as 'openai/clip-vit-large-patch14'"``).
        processor: the processor's folder or hub id, when it is not the checkpoint's.
        model_types: the configuration's ``model_type`` values accepted (empty: any the class loads).
        processor_parts: attributes the processor must have (e.g. ``("image_processor", "tokenizer")``).

    Raises :class:`ValueError` (one line) if the checkpoint does not load, holds a model of
    another type or one the class does not load, lacks some of the model's weights, or the
    processor does not load or lacks one of ``processor_parts``.
    """
    import transformers
    from transformers import AutoConfig, AutoProcessor

    cls = getattr(transformers, model_class)
    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as exc:  # a missing folder; a hub id not cached, with no network
        raise ValueError(f"checkpoint {checkpoint!r} does not load; expected {expected}: {_one_line(exc)}") from exc
    if model_types and config.model_type not in model_types:
        wanted = " or ".join(repr(t) for t in model_types)
        raise ValueError(
            f"checkpoint {checkpoint!r} holds a {config.model_type!r} model, not {wanted}; expected {expected}"
        )
    try:
        model, info = cls.from_pretrained(checkpoint, output_loading_info=True, **{_dtype_keyword(): DTYPES[dtype]})
    except ValueError as exc:  # an auto class that does not know this configuration
        raise ValueError(
            f"checkpoint {checkpoint!r} holds a {config.model_type!r} model, which {model_class} does not load; "
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
    source = checkpoint if processor is None else processor
    what = f"the processor of checkpoint {checkpoint!r}" if source == checkpoint else f"processor {source!r}"
    parts = f" with {' and '.join(processor_parts)}" if processor_parts else ""
    try:
        loaded = AutoProcessor.from_pretrained(source)
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
        raise ValueError(
            f"{what} does not load; expected a processor folder or hub id{parts}: {_one_line(exc)}{hint}"
        ) from exc
    lacking = [part for part in processor_parts if getattr(loaded, part, None) is None]
    if lacking:
        raise ValueError(
            f"{what} is a {type(loaded).__name__} without {' and '.join(lacking)}; expected a processor{parts}"
        )
    model = model.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)
    return model, loaded
