"""``unigrpo pretrain shapes``: make ShapesWorld's base checkpoint from scratch.

Trains the reasoning language model (:mod:`.language_model`) and the flow-matching image model
(:mod:`.flow_training`), deterministically on the CPU, and writes::

    OUT/language_model/   the tiny Llama and its tokenizer (transformers save_pretrained)
    OUT/flow_model/       the flow transformer (diffusers save_pretrained)
    OUT/pretrain.json     the configuration, versions and training statistics

The shipped checkpoint (``scenarios/shapes/checkpoint``) is this command's output with seed 0.
:class:`ShapesPretrainer` is registered as the pretrainer ``shapes`` (the package's entry points),
which is how the CLI finds it.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from unigrpo_env.scenarios.shapes.flow_training import FlowTrainingConfig, train_flow_model
from unigrpo_env.scenarios.shapes.language_model import LanguageModelConfig, train_language_model

__all__ = ["PretrainConfig", "pretrain_shapes", "ShapesPretrainer"]

Progress = Callable[[str, int, int, float], None]


class PretrainConfig(BaseModel):
    """Both models' configurations; ``seed`` and ``num_threads`` override theirs."""

    seed: int = 0
    num_threads: int | None = Field(default=None, ge=1)
    language_model: LanguageModelConfig = Field(default_factory=LanguageModelConfig)
    flow_model: FlowTrainingConfig = Field(default_factory=FlowTrainingConfig)


def pretrain_shapes(
    out_dir: str | Path, config: PretrainConfig | None = None, progress: Progress | None = None
) -> dict:
    """Train both models into ``out_dir``; ``progress(part, step, total, loss)`` reports each step."""
    config = config or PretrainConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm_config = config.language_model.model_copy(update={"seed": config.seed, "num_threads": config.num_threads})
    flow_config = config.flow_model.model_copy(update={"seed": config.seed, "num_threads": config.num_threads})

    def report(part: str):
        return None if progress is None else (lambda step, total, loss: progress(part, step, total, loss))

    start = time.perf_counter()
    _, _, lm_stats = train_language_model(lm_config, out / "language_model", report("language model"))
    flow_start = time.perf_counter()
    train_flow_model(flow_config, out / "flow_model", report("flow model"))
    summary = {
        "seed": config.seed,
        "config": {"language_model": lm_config.model_dump(), "flow_model": flow_config.model_dump()},
        "language_model": lm_stats,
        "flow_model": {"seconds": time.perf_counter() - flow_start},
        "wall_seconds": time.perf_counter() - start,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2))
    return summary


class ShapesPretrainer:
    """The pretrainer ``shapes``: ``unigrpo pretrain shapes --out DIR`` calls it."""

    #: The policy kind that loads what it writes, and the scenario its checkpoint is evaluated on.
    policy = "shapes"
    evaluate_on = "t2i_reason"

    def __call__(
        self, out_dir: str | Path, *, seed: int = 0, num_threads: int | None = None, progress: Progress | None = None
    ) -> dict:
        return pretrain_shapes(out_dir, PretrainConfig(seed=seed, num_threads=num_threads), progress)
