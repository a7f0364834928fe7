"""A GenEval-style verifier on real images (Ghosh et al., 2023, "GenEval: An Object-Focused
Framework for Evaluating Text-to-Image Alignment"): an open-vocabulary detector finds the prompt's
objects, CLIP names their colours, and GenEval's rules decide whether the image shows what the
GenEval metadata (``task.meta["include"]``, ``task.meta["tag"]``) asks for.

This is GenEval-*style*, not the official GenEval number: GenEval detects with Mask2Former
(Swin-S, COCO, from mmdetection) and colours the object's mask on a grey background; here the
detector is OWLv2 (or OWL-ViT) from transformers, queried with the task's class names, and colours
are read from box crops. Its thresholds are therefore options, and its scores are comparable only
with themselves.

Pipeline, for one image and its task:

1. Detection. The detector is queried with ``query_template`` (default "a photo of a {cls}", the
   OWL-ViT convention) for each class of the task's ``include`` and ``exclude``. Each predicted
   box gets the class of its highest score (``score = max_c sigmoid(logit_c)``, OWL's own
   post-processing); boxes with ``score > threshold`` (default 0.3, GenEval's; for ``counting``
   prompts ``counting_threshold``, default the same — GenEval's 0.9 suits Mask2Former's scores,
   not OWL's) are kept, the ``max_objects`` (16, GenEval's) best per class, then greedy per-class
   NMS drops a box whose IoU with a better one of its class is ≥ ``nms_iou`` (default 0.5;
   GenEval's default 1.0 keeps all, as Mask2Former's output needs no NMS; OWL's overlapping
   patch boxes do). Boxes are ``[x0, y0, x1, y1]`` in the image's pixels; one clipped to nothing
   (in OWLv2's square padding, outside the image) is no detection.
2. Rules (:func:`verdicts`, a pure function of the detections), per ``include`` clause
   ``{"class": c, "count": n, "color"?, "position"?: [relation, j]}``, with ``found`` = the n
   best detections of c:

   * ``object:c`` (n = 1) — at least one c; ``count:c`` (n > 1, or any n for ``counting``
     prompts) — at least n of c, and for ``counting`` prompts exactly n (GenEval's counting
     metadata adds ``exclude: {c, n + 1}``);
   * ``colour:c`` — at least n of ``found`` have the colour (each crop's CLIP zero-shot colour over
     GenEval's ten colours and its three templates "a photo of a {color} {cls}", "a photo of a
     {color}-colored {cls}", "a photo of a {color} object", embeddings averaged per colour);
   * ``position:c`` — clause j passed all its checks, and every object of ``found`` stands in
     ``relation`` to every object of clause j's ``found``, by :func:`relative_position`;

   plus ``exclude:c`` for each of the metadata's ``exclude`` clauses ``{c, n}``: fewer than n of c.
3. Score. ``R = 1`` when every check holds (GenEval's strict per-prompt correctness), else 0;
   NaN when the task has no ``include``.

Components ``[N]``: ``correct`` (R), ``checks_passed`` (the fraction of checks that hold),
``object``, ``count``, ``colour``, ``position`` (the fraction of that kind's checks that hold, NaN
where the task has none; ``exclude`` too when some task has such clauses), and ``correct_<tag>``
— R for the episodes of GenEval tag ``<tag>`` (``task.meta["tag"]``, else the category), NaN for
the others, so its batch mean is that category's accuracy.

Position (GenEval's ``relative_position``): for boxes A and B with centres a, b and sizes
(w, h)::

    d = a − b
    d' = sign(d) · max(|d| − m · (size_A + size_B), 0)      per axis; m = position_margin (0.1)
    no relation if |d'| < 1e-3 on both axes; else with (dx, dy) = d' / ‖d‖:
    "left of" if dx < −0.5,  "right of" if dx > 0.5,  "above" if dy < −0.5,  "below" if dy > 0.5

(y grows downwards). For objects side by side (d along x only) "right of" holds iff
dx > 2m · (w_A + w_B): the centres must be apart by more than a fifth of the two widths; an offset
along a diagonal can satisfy two relations at once.

Options: ``checkpoint`` (default ``google/owlv2-base-patch16-ensemble``; an OWLv2 or OWL-ViT
folder or hub id), ``clip_checkpoint`` (default ``openai/clip-vit-large-patch14``, GenEval's
ViT-L/14; loaded by :func:`~unigrpo_env.rewards.clip_score.load_clip`, so shared with
``clip_score``) and ``clip_processor``, ``device``, ``dtype`` (both models' weights, default
``"float32"``), ``batch_size`` (images per detector call, default 8), and the thresholds above.
Preprocessing is batched on the device: OWLv2's image processor pads to a square (bottom and
right, black as transformers' does) and resizes, which is done here with
:func:`~unigrpo_env.rewards.clip_score.clip_pixel_values` (an antialiased bilinear
``F.interpolate`` in place of transformers' scipy Gaussian-and-zoom resize, which would need
scipy: the pixels differ slightly from the processor's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from unigrpo_env.reward import RewardInputs, RewardOutput
from unigrpo_env.rewards.clip_score import (
    _check_dtype,
    _resized_shape,
    _size_field,
    clip_pixel_values,
    image_embeddings,
    load_clip,
    resolve_device,
    text_embeddings,
)
from unigrpo_env.rewards.hf_models import load_model
from unigrpo_env.task import Task

__all__ = [
    "GenEvalDetectorReward",
    "COLORS",
    "COLOR_TEMPLATES",
    "verdicts",
    "relative_position",
    "select_detections",
    "box_iou",
    "nms",
    "image_boxes",
    "class_detections",
]

#: GenEval's colours, and its templates for the CLIP zero-shot colour classifier.
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")
#: The check kinds, in the components' order.
KINDS = ("object", "count", "colour", "position", "exclude")

Detection = dict[str, Any]  # {"class": str, "box": [x0, y0, x1, y1], "score": float}


# --- detections ------------------------------------------------------------------------------


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes ``a`` ``[n, 4]`` and ``b`` ``[m, 4]`` (``[x0, y0, x1, y1]``), ``[n, m]``::

    IoU = |A ∩ B| / (|A| + |B| − |A ∩ B|)      (0 where the union is empty)
    """
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: the indices of the boxes kept, best first. Going down
    the boxes by score, a box is kept unless its IoU with a kept one is ≥ ``iou_threshold``
    (GenEval's rule; ``iou_threshold`` ≥ 1 keeps every box)."""
    order = torch.argsort(scores, descending=True, stable=True)
    if iou_threshold >= 1 or len(order) <= 1:
        return order
    iou = box_iou(boxes[order], boxes[order])
    kept: list[int] = []
    for i in range(len(order)):
        if all(float(iou[i, j]) < iou_threshold for j in kept):
            kept.append(i)
    return order[torch.tensor(kept, dtype=torch.long)]


def select_detections(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    classes: Sequence[str],
    threshold: float,
    nms_iou: float,
    max_objects: int,
) -> list[Detection]:
    """Detections from one image's per-box class scores ``[P, K]`` (probabilities, the K
    ``classes``) and boxes ``[P, 4]``: each box takes its best class (``score = max_k``), boxes
    with ``score > threshold`` are kept, the ``max_objects`` best per class, then per-class
    :func:`nms`. Best first within each class. An empty box (one that :func:`image_boxes` clipped
    to nothing, lying in OWLv2's padding) is no detection."""
    if scores.shape[-1] != len(classes):
        raise ValueError(f"got scores for {scores.shape[-1]} classes but {len(classes)} class names")
    best, label = scores.max(dim=-1)
    best = torch.where((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]), best, torch.zeros_like(best))
    detections: list[Detection] = []
    for k, name in enumerate(classes):
        index = torch.nonzero((label == k) & (best > threshold)).flatten()
        index = index[torch.argsort(best[index], descending=True, stable=True)][:max_objects]
        kept = index[nms(boxes[index], best[index], nms_iou)]
        detections += [{"class": name, "box": boxes[i].tolist(), "score": float(best[i])} for i in kept.tolist()]
    return detections


def image_boxes(pred_boxes: torch.Tensor, height: int, width: int, image_processor: Any) -> torch.Tensor:
    """OWL's boxes ``[..., 4]`` (``(cx, cy, w, h)`` relative to the model's input) → ``[x0, y0,
    x1, y1]`` in the pixels of the ``height × width`` image, undoing the preprocessing::

        padded to a square (OWLv2, do_pad): side s = max(H, W); the input is the s × s image
                                            resized, so x = x_rel · s, y = y_rel · s
        resized (OWL-ViT) to (h', w') and centre-cropped to (ch, cw) at (top, left):
                                            x = (x_rel · cw + left) · W / w'   (y alike)

    then clipped to the image.
    """
    cx, cy, w, h = pred_boxes.unbind(-1)
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    if getattr(image_processor, "do_pad", False):
        side = float(max(height, width))
        xs, ys, left, top, sx, sy = side, side, 0.0, 0.0, 1.0, 1.0
    else:
        rh, rw = _resized_shape(height, width, image_processor.size) if image_processor.do_resize else (height, width)
        ch, cw = rh, rw
        if getattr(image_processor, "do_center_crop", False):
            ch = _size_field(image_processor.crop_size, "height")
            cw = _size_field(image_processor.crop_size, "width")
        xs, ys, left, top = float(cw), float(ch), float((rw - cw) // 2), float((rh - ch) // 2)
        sx, sy = width / rw, height / rh
    corners = torch.stack(
        [(x0 * xs + left) * sx, (y0 * ys + top) * sy, (x1 * xs + left) * sx, (y1 * ys + top) * sy], dim=-1
    )
    limit = torch.tensor([width, height, width, height], dtype=corners.dtype, device=corners.device)
    return torch.minimum(corners.clamp(min=0), limit)


def owl_pixel_values(images: torch.Tensor, image_processor: Any, device: str | torch.device) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` → the detector's ``pixel_values`` on ``device``: padded to a
    square with black at the bottom and right when the processor pads (OWLv2), then resized,
    cropped and normalised by :func:`~unigrpo_env.rewards.clip_score.clip_pixel_values`."""
    if getattr(image_processor, "do_pad", False):
        n, height, width, _ = images.shape
        side = max(height, width)
        images = F.pad(images.permute(0, 3, 1, 2), (0, side - width, 0, side - height)).permute(0, 2, 3, 1)
    return clip_pixel_values(images.contiguous(), image_processor, device)


def class_detections(detections: Sequence[Detection], name: str) -> list[Detection]:
    """The detections of class ``name``, best first."""
    return sorted((d for d in detections if d["class"] == name), key=lambda d: -float(d["score"]))


# --- the rules -------------------------------------------------------------------------------


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = 0.1) -> set[str]:
    """The relations of box A to box B among "left of", "right of", "above", "below" (GenEval's
    rule, see the module docstring; ``margin`` is its POSITION_THRESHOLD, 0.1)."""
    a = torch.tensor(box_a, dtype=torch.float64).view(2, 2)  # [[x0, y0], [x1, y1]]
    b = torch.tensor(box_b, dtype=torch.float64).view(2, 2)
    offset = a.mean(0) - b.mean(0)  # d = centre_A − centre_B
    size = (a[1] - a[0]).abs() + (b[1] - b[0]).abs()  # size_A + size_B per axis
    revised = (offset.abs() - margin * size).clamp(min=0) * offset.sign()
    if bool((revised.abs() < 1e-3).all()):
        return set()
    dx, dy = (revised / offset.norm()).tolist()
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def verdicts(
    include: Sequence[Mapping[str, Any]],
    detections: Sequence[Detection],
    colors_of: Callable[[str, list[Detection]], list[str]],
    *,
    exact_counts: bool = False,
    exclude: Sequence[Mapping[str, Any]] = (),
    position_margin: float = 0.1,
) -> dict[str, bool]:
    """GenEval's checks on one image's ``detections`` (``{"class", "box", "score"}`` each):
    ``{"<kind>:<class>": holds}`` for the ``include`` clauses (and ``exclude`` clauses), with the
    rules of the module docstring. ``colors_of(class, found)`` names the colour of each
    detection of ``found`` (the reward asks CLIP); it is called only for clauses with a colour
    whose objects were found. ``exact_counts`` (GenEval's counting prompts): counts must be met
    exactly. A name met twice gets ``#<clause index>`` appended."""
    checks: dict[str, bool] = {}

    def record(kind: str, name: str, index: int, value: bool) -> None:
        key = f"{kind}:{name}"
        checks[key if key not in checks else f"{key}#{index}"] = bool(value)

    found: list[list[Detection]] = []
    matched: list[bool] = []
    for i, clause in enumerate(include):
        name, count = str(clause["class"]), int(clause.get("count", 1))
        every = class_detections(detections, name)
        mine = every[:count]
        enough = len(mine) >= count and (not exact_counts or len(every) == count)
        record("count" if exact_counts or count > 1 else "object", name, i, enough)
        ok = enough
        if clause.get("color"):
            colour_ok = len(mine) >= count and list(colors_of(name, mine)).count(clause["color"]) >= count
            record("colour", name, i, colour_ok)
            ok = ok and colour_ok
        if clause.get("position"):
            relation, target = clause["position"]
            target = int(target)
            if not 0 <= target < i:
                raise ValueError(f"include[{i}]'s position refers to clause {target}; it must be an earlier clause")
            position_ok = (
                len(mine) >= count
                and matched[target]
                and all(
                    relation in relative_position(obj["box"], other["box"], position_margin)
                    for obj in mine
                    for other in found[target]
                )
            )
            record("position", name, i, position_ok)
            ok = ok and position_ok
        found.append(mine)
        matched.append(ok)
    counted = {str(c["class"]): int(c.get("count", 1)) for c in include} if exact_counts else {}
    for i, clause in enumerate(exclude):
        name, count = str(clause["class"]), int(clause["count"])
        if counted.get(name) == count - 1:
            continue  # the exact count already says it (GenEval's counting metadata)
        record("exclude", name, i, len(class_detections(detections, name)) < count)
    return checks


def _tag(task: Task) -> str:
    return str(task.meta.get("tag") or task.category or "")


# --- the reward ------------------------------------------------------------------------------


class GenEvalDetectorReward:
    """GenEval's strict correctness of each image (1 when every check holds, else 0; NaN with
    no ``include``), from an OWL detector and CLIP colours (see the module docstring)."""

    default_checkpoint = "google/owlv2-base-patch16-ensemble"
    default_clip_checkpoint = "openai/clip-vit-large-patch14"

    def __init__(
        self,
        checkpoint: str | None = None,
        clip_checkpoint: str | None = None,
        clip_processor: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 8,
        threshold: float = 0.3,
        counting_threshold: float | None = None,
        nms_iou: float = 0.5,
        max_objects: int = 16,
        position_margin: float = 0.1,
        query_template: str = "a photo of a {cls}",
    ):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(max_objects) < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        for label, value in (("threshold", threshold), ("counting_threshold", counting_threshold)):
            if value is not None and not 0 <= float(value) < 1:
                raise ValueError(f"{label} must be in [0, 1), got {value}")
        if not 0 < float(nms_iou) <= 1:
            raise ValueError(f"nms_iou must be in (0, 1] (1 keeps every box), got {nms_iou}")
        if "{cls}" not in query_template:
            raise ValueError(f"query_template must contain '{{cls}}', got {query_template!r}")
        self.checkpoint = str(checkpoint if checkpoint is not None else self.default_checkpoint)
        self.clip_checkpoint = str(clip_checkpoint if clip_checkpoint is not None else self.default_clip_checkpoint)
        self.device = resolve_device(device)
        self.dtype = _check_dtype(dtype)
        self.batch_size = int(batch_size)
        self.threshold = float(threshold)
        self.counting_threshold = self.threshold if counting_threshold is None else float(counting_threshold)
        self.nms_iou = float(nms_iou)
        self.max_objects = int(max_objects)
        self.position_margin = float(position_margin)
        self.query_template = str(query_template)

        expected = "an OWLv2 or OWL-ViT folder or hub id such as 'google/owlv2-base-patch16-ensemble'"
        self.model, self.processor = load_model(
            "AutoModelForZeroShotObjectDetection",
            self.checkpoint,
            self.device,
            self.dtype,
            expected,
            model_types=("owlv2", "owlvit"),
        )
        self.clip_model, self.clip_processor = load_clip(
            self.clip_checkpoint, str(clip_processor or self.clip_checkpoint), self.device, self.dtype
        )
        self._colour_classifiers: dict[str, torch.Tensor] = {}

    # detection

    def _queries(self, task: Task) -> list[str]:
        clauses = list(task.meta.get("include") or []) + list(task.meta.get("exclude") or [])
        return list(dict.fromkeys(str(c["class"]) for c in clauses))

    def detect_chunk(
        self, images: torch.Tensor, classes: list[list[str]], thresholds: list[float]
    ) -> list[list[Detection]]:
        """One detector call on ``images`` ``[n, H, W, 3]`` uint8, image i queried for
        ``classes[i]`` (non-empty) and thresholded at ``thresholds[i]``."""
        n, height, width, _ = images.shape
        pixels = owl_pixel_values(images, self.processor.image_processor, self.device).to(self.model.dtype)
        width_k = max(len(c) for c in classes)  # every image gets K queries; the padding repeats its first
        texts = [
            self.query_template.format(cls=c) for names in classes for c in names + [names[0]] * (width_k - len(names))
        ]
        tokens = self.processor.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=int(self.model.config.text_config.max_position_embeddings),
            return_tensors="pt",
        )
        out = self.model(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            pixel_values=pixels,
        )
        probabilities = out.logits.float().sigmoid()  # [n, P, K]: sigmoid(logit) per box and query
        boxes = image_boxes(out.pred_boxes.float(), height, width, self.processor.image_processor)  # [n, P, 4]
        return [
            select_detections(
                probabilities[i, :, : len(classes[i])].cpu(),
                boxes[i].cpu(),
                classes[i],
                thresholds[i],
                self.nms_iou,
                self.max_objects,
            )
            for i in range(n)
        ]

    def detect(self, inputs: RewardInputs) -> list[list[Detection]]:
        """Each episode's detections of its task's classes (``[]`` for a task without any)."""
        classes = [self._queries(task) for task in inputs.tasks]
        thresholds = [self.counting_threshold if _tag(t) == "counting" else self.threshold for t in inputs.tasks]
        rows = [i for i in range(len(inputs)) if classes[i]]
        detections: list[list[Detection]] = [[] for _ in range(len(inputs))]
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                index = torch.tensor(chunk, dtype=torch.long, device=inputs.images.device)
                results = self.detect_chunk(
                    inputs.images[index], [classes[i] for i in chunk], [thresholds[i] for i in chunk]
                )
                for i, result in zip(chunk, results):
                    detections[i] = result
        return detections

    # colours

    def colour_classifier(self, name: str) -> torch.Tensor:
        """``[10, d]``: per GenEval colour, the mean of the templates' normalised CLIP text
        embeddings, renormalised (clip_benchmark's zero-shot classifier, as GenEval builds it)."""
        if name not in self._colour_classifiers:
            prompts = [t.format(color=c, cls=name) for c in COLORS for t in COLOR_TEMPLATES]
            text = text_embeddings(self.clip_model, self.clip_processor.tokenizer, prompts, self.device)
            mean = text.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)
            self._colour_classifiers[name] = mean / mean.norm(dim=-1, keepdim=True)
        return self._colour_classifiers[name]

    def colours(self, image: torch.Tensor, name: str, found: Sequence[Detection]) -> list[str]:
        """The colour of each detection's box crop of ``image`` ``[H, W, 3]`` uint8:
        ``argmax_c u · w_c`` (u the crop's normalised CLIP embedding, w_c the classifier's row)."""
        if not found:
            return []
        height, width = image.shape[:2]
        crops = []
        for d in found:
            x0, y0, x1, y1 = (round(float(v)) for v in d["box"])  # PIL's crop rounds the box
            x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
            x1, y1 = max(min(x1, width), x0 + 1), max(min(y1, height), y0 + 1)
            crops.append(
                clip_pixel_values(
                    image[None, y0:y1, x0:x1].contiguous(), self.clip_processor.image_processor, self.device
                )
            )
        u = image_embeddings(self.clip_model, torch.cat(crops))
        return [COLORS[k] for k in (u @ self.colour_classifier(name).T).argmax(dim=-1).tolist()]

    # scoring

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        n = len(inputs)
        detections = self.detect(inputs)
        correct = torch.full((n,), math.nan)
        passed = torch.full((n,), math.nan)
        kinds = {kind: torch.full((n,), math.nan) for kind in KINDS}
        with torch.inference_mode():
            for i, task in enumerate(inputs.tasks):
                include = list(task.meta.get("include") or [])
                if not include:
                    continue
                image = inputs.images[i]
                checks = verdicts(
                    include,
                    detections[i],
                    lambda name, found, image=image: self.colours(image, name, found),
                    exact_counts=_tag(task) == "counting",
                    exclude=list(task.meta.get("exclude") or []),
                    position_margin=self.position_margin,
                )
                values = list(checks.values())
                correct[i] = float(all(values))  # GenEval: every check holds
                passed[i] = sum(values) / len(values)
                for kind in KINDS:
                    mine = [ok for key, ok in checks.items() if key.split(":", 1)[0] == kind]
                    if mine:
                        kinds[kind][i] = sum(mine) / len(mine)
        components = {"correct": correct.clone(), "checks_passed": passed}
        components.update({k: v for k, v in kinds.items() if k != "exclude" or not v.isnan().all()})
        tags = [_tag(task) for task in inputs.tasks]
        for tag in sorted({t for t in tags if t}):
            mask = torch.tensor([t == tag for t in tags])
            components[f"correct_{tag}"] = torch.where(mask, correct, torch.tensor(math.nan))
        return RewardOutput(scores=correct, components=components)
