"""Training, sampling and evaluating ShapesWorld's flow-matching image model from scratch.

Data (:class:`FlowDataGenerator`). Every sample is a *random* scene (1 to 4 objects of random
shape, colour and cell), half of them drawn on the canonical layouts the riddle tasks use
(``tasks.LAYOUTS`` and ``constraints.RELATION_CELLS``: center; left/right; top/bottom;
left/center/right; the four corners), with the description ``describe(scene)`` as text and
``render(scene)`` as target. A fraction of the batch are *edit pairs*: the previous image is a
random scene A, the target is A with one edit (recolour, reshape, move to an empty cell, add an
object, remove one, swap two), the text describes the edited scene. The held-out tasks' targets
are never added on purpose (random scenes may coincide with them, as they coincide with the
training tasks' targets). Condition dropout for classifier-free guidance: the text is replaced by
all-pad (the empty text) with probability ``p_text_drop``, the previous image by zeros (none) with
probability ``p_cond_drop``.

Training (:func:`train_flow_model`): rectified flow, ``x_t = (1 − t)·x_0 + t·ε``, the network
regresses ``v = ε − x_0`` with an MSE loss; AdamW with linear warmup and cosine decay, fp32,
an exponential moving average of the weights, everything seeded (``torch.manual_seed`` for the
init, a ``torch.Generator`` for t and ε, a numpy ``Generator`` for the scenes).

Sampling (:func:`sample_images`): Euler ODE from t = 1 to 0 on
:func:`unigrpo_env.flow.timestep_schedule` with :func:`unigrpo_env.flow.ode_step`, classifier-free
guidance through :func:`unigrpo_env.flow.cfg_velocity` (with ``cfg_scale == 1`` one network call
per step and no unconditional branch), decoded like :class:`unigrpo_env.PixelCodec`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from unigrpo_env import flow
from unigrpo_env.agents.evaluation import scores_by_category
from unigrpo_env.codecs import PixelCodec
from unigrpo_env.lr_schedule import warmup_decay

from .constraints import RELATION_CELLS
from .detect import detect_objects
from .edits import EDIT_KINDS, edit_scene
from .flow_model import ShapesFlowTransformer
from .render import render
from .scene import CELLS, COLOURS, MAX_OBJECTS, SHAPES, Scene, SceneObject, describe
from .tasks import CATEGORIES, LAYOUTS, task_split
from .tokenizer import PAD, build_tokenizer, riddle_vocab_size
from .verify import verify

__all__ = [
    "EDIT_KINDS",
    "FlowBatch",
    "FlowDataGenerator",
    "FlowTrainingConfig",
    "build_model",
    "edit_scene",
    "encode_texts",
    "evaluate_edits",
    "evaluate_true_descriptions",
    "random_scene",
    "sample_images",
    "scene_correct",
    "train_flow_model",
]

ProgressFn = Callable[[int, int, float], None]


#: Canonical layouts of the riddle tasks (cell tuples), used for the "layout" half of the scenes.
_LAYOUT_CELLS: tuple[tuple[tuple[int, int], ...], ...] = tuple(
    [tuple(CELLS[name] for name in cells) for cells in LAYOUTS.values()]
    + [tuple(RELATION_CELLS[rel]) for rel in ("above",)]  # top / bottom ("left of" is LAYOUTS[2])
)
_ALL_CELLS: tuple[tuple[int, int], ...] = tuple(CELLS.values())
_COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


class FlowTrainingConfig(BaseModel):
    """Everything that defines one training run of the ShapesWorld flow model.

    The defaults are the shipped checkpoint's: pretraining within about 12 minutes on 2 CPU threads,
    to an image model that draws the held-out tasks' true descriptions well but not perfectly (how
    they were chosen: docs/experiments/shapesworld-models.md, "How the budgets were chosen").
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    # -- optimisation
    steps: int = Field(1600, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0, description="peak learning rate of AdamW")
    warmup: int = Field(100, ge=0, description="linear warmup steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at lr·min_lr_ratio")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float | None = Field(0.995, ge=0, lt=1, description="EMA of the weights; None = off")
    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # -- data
    p_text_drop: float = Field(0.1, ge=0, le=1, description="probability that the text is all pad")
    p_cond_drop: float = Field(0.2, ge=0, le=1, description="probability that an edit pair loses its previous image")
    edit_fraction: float = Field(0.25, ge=0, le=1, description="fraction of edit pairs in a batch")
    layout_fraction: float = Field(0.5, ge=0, le=1, description="fraction of scenes on the tasks' canonical layouts")
    # -- model
    image_size: int = Field(32, ge=12)
    max_text_tokens: int = Field(24, ge=1)
    patch_size: int = Field(4, ge=1)
    num_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    attention_head_dim: int = Field(32, ge=1)
    # x̂_0-prediction: 0.96 held-out correct where v-prediction reached 0.57 (see flow_model.py).
    prediction: Literal["velocity", "sample"] = Field(
        "sample", description="network output: the velocity, or x̂_0 turned into v = (x_t − x̂_0)/max(t, min_t)"
    )
    min_t: float = Field(0.05, gt=0, le=1)
    # -- runtime
    num_threads: int | None = Field(None, ge=1, description="torch threads while training (None: leave as is)")


# ----------------------------------------------------------------------------------- text


def encode_texts(texts: Sequence[str], tokenizer=None, max_len: int | None = None) -> torch.Tensor:
    """Token ids ``[N, L]`` (int64) of ``texts``, right-padded with ``<pad>`` to the longest text
    (or to ``max_len``). Raises ValueError if a text is longer than ``max_len``."""
    tokenizer = tokenizer or _tokenizer()
    pad_id = tokenizer.token_to_id(PAD)
    encoded = [tokenizer.encode(text, add_special_tokens=False).ids for text in texts]
    longest = max((len(ids) for ids in encoded), default=0)
    if max_len is not None and longest > max_len:
        raise ValueError(f"a text has {longest} tokens, more than max_len={max_len}")
    width = max_len if max_len is not None else max(longest, 1)
    out = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    for i, ids in enumerate(encoded):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = build_tokenizer()
    return _TOKENIZER


# ----------------------------------------------------------------------------------- scenes


def random_scene(rng: np.random.Generator, layout_fraction: float = 0.5) -> Scene:
    """A random scene. With probability ``layout_fraction`` its objects sit on one of the tasks'
    canonical layouts (and share one shape, or one colour, half of the time each, as counting
    and single-colour tasks do); otherwise 1..4 objects in random cells, all attributes random."""
    if rng.random() < layout_fraction:
        cells = _LAYOUT_CELLS[rng.integers(len(_LAYOUT_CELLS))]
        n = len(cells)
        shapes = (
            [SHAPES[rng.integers(len(SHAPES))]] * n
            if rng.random() < 0.5
            else [SHAPES[i] for i in rng.integers(len(SHAPES), size=n)]
        )
        colours = (
            [_COLOUR_NAMES[rng.integers(len(_COLOUR_NAMES))]] * n
            if rng.random() < 0.5
            else [_COLOUR_NAMES[i] for i in rng.integers(len(_COLOUR_NAMES), size=n)]
        )
    else:
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        cells = [_ALL_CELLS[i] for i in rng.choice(len(_ALL_CELLS), size=n, replace=False)]
        shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=n)]
        colours = [_COLOUR_NAMES[i] for i in rng.integers(len(_COLOUR_NAMES), size=n)]
    return Scene(tuple(SceneObject(s, c, cell) for s, c, cell in zip(shapes, colours, cells)))


def _other(rng: np.random.Generator, options: Sequence[str], current: str) -> str:
    choices = [o for o in options if o != current]
    return choices[rng.integers(len(choices))]


# ----------------------------------------------------------------------------------- data


class FlowBatch(NamedTuple):
    """One training batch: text ids ``[B, L]``, previous images and targets ``[B, C, H, W]`` in
    PixelCodec scale (the previous image is zeros where there is none), and which rows are edits."""

    text_ids: torch.Tensor
    cond_image: torch.Tensor
    x0: torch.Tensor
    is_edit: torch.Tensor


class FlowDataGenerator:
    """Endless, deterministic stream of :class:`FlowBatch` (see the module docstring).

    The same ``seed`` (default ``config.seed``) gives the same batches. Texts are padded to
    ``config.max_text_tokens``.
    """

    def __init__(self, config: FlowTrainingConfig, seed: int | None = None, tokenizer=None):
        self.config = config
        self.rng = np.random.default_rng(config.seed if seed is None else seed)
        self.tokenizer = tokenizer or _tokenizer()
        self.pad_id = self.tokenizer.token_to_id(PAD)
        self.codec = PixelCodec(config.image_size)

    def __iter__(self) -> Iterator[FlowBatch]:
        while True:
            yield self.sample_batch()

    def _images(self, scenes: Sequence[Scene]) -> torch.Tensor:
        pixels = np.stack([render(s, self.config.image_size) for s in scenes])
        return self.codec.encode(torch.from_numpy(pixels))

    def sample_batch(self, batch_size: int | None = None) -> FlowBatch:
        cfg, rng = self.config, self.rng
        size = cfg.batch_size if batch_size is None else int(batch_size)
        is_edit = rng.random(size) < cfg.edit_fraction
        drop_text = rng.random(size) < cfg.p_text_drop
        drop_cond = rng.random(size) < cfg.p_cond_drop
        targets, previous = [], []
        for edit in is_edit:
            scene = random_scene(rng, cfg.layout_fraction)
            if edit:
                previous.append(scene)
                scene = edit_scene(rng, scene).after
            targets.append(scene)
        texts = ["" if drop else describe(s) for s, drop in zip(targets, drop_text)]
        text_ids = encode_texts(texts, self.tokenizer, cfg.max_text_tokens)
        x0 = self._images(targets)
        cond = torch.zeros_like(x0)
        keep = torch.from_numpy(is_edit & ~drop_cond)
        if previous:
            prev_images = self._images(previous)
            edit_rows = torch.from_numpy(np.flatnonzero(is_edit))
            cond[edit_rows] = prev_images
            cond[~keep] = 0.0
        return FlowBatch(text_ids, cond, x0, torch.from_numpy(is_edit))


# ----------------------------------------------------------------------------------- training


def _flush_denormal_enabled() -> bool:
    """Whether the CPU currently flushes denormals (probed: a denormal times 1 becomes 0)."""
    return bool((torch.tensor([1e-40], dtype=torch.float32) * 1.0).item() == 0.0)


@contextlib.contextmanager
def flush_denormal():
    """Flush denormal floats to zero on the CPU inside the block, then restore the previous mode.

    Measured: without it, Adam's second moments (and activations) of the zero-initialised
    modulation layers fall into the denormal range and a training step on 2 threads slows from
    0.3 s to 3-9 s at random moments."""
    before = _flush_denormal_enabled()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def build_model(config: FlowTrainingConfig, tokenizer=None) -> ShapesFlowTransformer:
    """A freshly initialised model of ``config``'s size (seed the RNG first for a fixed init)."""
    tokenizer = tokenizer or _tokenizer()
    return ShapesFlowTransformer(
        vocab_size=riddle_vocab_size(),  # descriptions only; edit-only words read as <unk>
        max_text_tokens=config.max_text_tokens,
        image_size=config.image_size,
        channels=3,
        patch_size=config.patch_size,
        num_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        pad_token_id=tokenizer.token_to_id(PAD),
        prediction=config.prediction,
        min_t=config.min_t,
    )


def _sample_t(config: FlowTrainingConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    if config.time_sampling == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(n, generator=generator))


def flow_matching_loss(
    model: ShapesFlowTransformer, batch: FlowBatch, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Rectified-flow loss: MSE between ``model(x_t, t, ...)`` and ``v = ε − x_0``."""
    x0 = batch.x0
    tt = t.view(-1, 1, 1, 1)
    x_t = (1.0 - tt) * x0 + tt * noise
    v = model(x_t, t, batch.text_ids, batch.cond_image)
    return torch.mean((v - (noise - x0)) ** 2)


def train_flow_model(
    config: FlowTrainingConfig | None = None,
    out_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
) -> ShapesFlowTransformer:
    """Train a :class:`ShapesFlowTransformer` from scratch; deterministic given ``config.seed``.

    ``progress(step, total, loss)`` is called after every optimizer step (step counts from 1).
    With ``out_dir`` the final model (the EMA weights when ``ema_decay`` is set) is saved there
    with ``save_pretrained``. Returns the model in eval mode.
    """
    config = config or FlowTrainingConfig()
    old_threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        with flush_denormal():
            return _train(config, out_dir, progress)
    finally:
        torch.set_num_threads(old_threads)


def _train(config: FlowTrainingConfig, out_dir, progress) -> ShapesFlowTransformer:
    torch.manual_seed(config.seed)
    model = build_model(config)
    model.train()
    data = FlowDataGenerator(config)
    gen = torch.Generator().manual_seed(config.seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.99),
    )
    ema = [p.detach().clone() for p in params] if config.ema_decay is not None else None
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warmup_decay(step, config.warmup, config.steps, "cosine", config.min_lr_ratio)
        batch = data.sample_batch()
        t = _sample_t(config, batch.x0.shape[0], gen)
        noise = torch.randn(batch.x0.shape, generator=gen)
        loss = flow_matching_loss(model, batch, t, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        if ema is not None:
            # Warm-started decay (as in many EMA implementations) so early averages aren't stale.
            decay_now = min(config.ema_decay, (1.0 + step) / (10.0 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay_now)
        if progress is not None:
            progress(step + 1, config.steps, float(loss.detach()))
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    model.eval()
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
    return model


# ----------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_images(
    model: ShapesFlowTransformer,
    text_ids: torch.Tensor,
    cond_image: torch.Tensor | None = None,
    num_steps: int = 10,
    shift: float = 1.0,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw images with the Euler ODE from t = 1 to 0; returns ``[B, H, W, 3]`` uint8.

    ``x_1`` is ``noise`` if given, else ``N(0, I)`` from ``generator``. With ``cfg_scale != 1`` the
    unconditional branch is the empty text (all pad) with the same previous image, batched with
    the conditional one into one call of ``2B``; ``cfg_scale == 1`` makes exactly one call of
    ``B`` per step.
    """
    cfg = model.config
    batch = text_ids.shape[0]
    shape = (batch, cfg.channels, cfg.image_size, cfg.image_size)
    device = next(model.parameters()).device
    if noise is None:
        x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    else:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        x = noise.to(device=device, dtype=torch.float32)
    text_ids = text_ids.to(device)
    if cond_image is not None:
        cond_image = cond_image.to(device=device, dtype=torch.float32)
    guided = float(cfg_scale) != 1.0
    if guided:
        empty = torch.full_like(text_ids, int(cfg.pad_token_id))
        both_text = torch.cat([text_ids, empty])
        both_cond = None if cond_image is None else torch.cat([cond_image, cond_image])
    times = flow.timestep_schedule(num_steps, shift)
    with flush_denormal():
        for i in range(num_steps):
            t, t_next = float(times[i]), float(times[i + 1])
            t_vec = torch.full((batch,), t, device=device)
            if guided:
                v_both = model(torch.cat([x, x]), torch.cat([t_vec, t_vec]), both_text, both_cond)
                v = flow.cfg_velocity(v_both[:batch], v_both[batch:], cfg_scale)
            else:
                v = model(x, t_vec, text_ids, cond_image)
            x = flow.ode_step(v, x, t, t_next)
    return PixelCodec(cfg.image_size, cfg.channels).decode(x).cpu()


# ----------------------------------------------------------------------------------- evaluation


def scene_correct(image: np.ndarray, scene: Scene) -> bool:
    """Whether the detector reads back exactly ``scene`` (same shapes, colours and cells)."""
    found = sorted((d.shape, d.colour, tuple(d.cell)) for d in detect_objects(image))
    wanted = sorted((o.shape, o.colour, o.cell) for o in scene.objects)
    return found == wanted


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _sample_all(
    model, text_ids, cond, num_steps: int, shift: float, cfg_scale: float, seed: int, batch_size: int
) -> np.ndarray:
    """One image per row of ``text_ids`` (and of ``cond``, if given), in batches, seeded once."""
    gen = torch.Generator().manual_seed(seed)
    return torch.cat(
        [
            sample_images(model, text_ids[s], None if cond is None else cond[s], num_steps, shift, cfg_scale, gen)
            for s in _chunks(len(text_ids), batch_size)
        ]
    ).numpy()


def evaluate_true_descriptions(
    model: ShapesFlowTransformer,
    split: str = "heldout",
    num_steps: int = 10,
    cfg_scale: float = 1.0,
    seed: int = 0,
    shift: float = 1.0,
    batch_size: int = 256,
) -> dict:
    """Draw one image per task of ``split`` from its true description; GenEval-style scores.

    Returns ``{"correct": ..., "score": ..., "per_category": {category: {"correct", "score", "n"}},
    "num_tasks": ..., "seconds": ...}``: ``correct`` is the fraction of images the verifier
    accepts, ``score`` its mean dense score, each averaged per category then over categories.
    """
    start = time.perf_counter()
    model.eval()
    tasks = task_split(split)
    text_ids = encode_texts([t.description for t in tasks], max_len=model.config.max_text_tokens)
    images = _sample_all(model, text_ids, None, num_steps, shift, cfg_scale, seed, batch_size)
    results = [verify(img, task) for img, task in zip(images, tasks)]
    # the same per-category means as the RL evaluation's (the verifier's score is the reward)
    scores = scores_by_category(
        [t.category for t in tasks], [r.score for r in results], [float(r.correct) for r in results]
    )
    per_category = {
        c: {"correct": scores[c].correct, "score": scores[c].reward, "n": scores[c].count}
        for c in CATEGORIES
        if c in scores
    }
    return {
        "correct": scores["overall"].correct,
        "score": scores["overall"].reward,
        "per_category": per_category,
        "num_tasks": len(tasks),
        "seconds": time.perf_counter() - start,
    }


def evaluate_edits(
    model: ShapesFlowTransformer,
    split: str = "heldout",
    num_steps: int = 10,
    cfg_scale: float = 1.0,
    seed: int = 0,
    shift: float = 1.0,
    batch_size: int = 256,
    use_cond_image: bool = True,
) -> dict:
    """Edits of the tasks' target scenes: previous image = ``render(task.target)``, text = the
    description of the target with one random edit (seeded); an output is correct when the
    detector reads back exactly the edited scene. Returns the overall and per-edit-kind rates.
    With ``use_cond_image=False`` the previous image is withheld (text only), for comparison."""
    model.eval()
    rng = np.random.default_rng(seed)
    tasks = task_split(split)
    before = [t.target for t in tasks]
    edited = [(e.after, e.kind) for e in (edit_scene(rng, s) for s in before)]
    size = model.config.image_size
    codec = PixelCodec(size)
    cond = codec.encode(torch.from_numpy(np.stack([render(s, size) for s in before]))) if use_cond_image else None
    text_ids = encode_texts([describe(s) for s, _ in edited], max_len=model.config.max_text_tokens)
    images = _sample_all(model, text_ids, cond, num_steps, shift, cfg_scale, seed, batch_size)
    ok = [scene_correct(img, s) for img, (s, _) in zip(images, edited)]
    per_kind = {}
    for kind in EDIT_KINDS:
        rows = [o for o, (_, k) in zip(ok, edited) if k == kind]
        if rows:
            per_kind[kind] = {"correct": float(np.mean(rows)), "n": len(rows)}
    return {"correct": float(np.mean(ok)), "per_kind": per_kind, "num_edits": len(ok)}
