"""Reading objects back from an image (possibly a noisy, blurry generated one).

Pipeline:

1. Pixel classes (:func:`classify_pixels`). Each pixel is explained as a blend of the white
   background and one palette colour (:func:`colour_coverage`): it belongs to that colour when
   the colour covers at least half of it, to the background otherwise, and is *off-palette*
   (class ``OFF_PALETTE``) when no blend comes within ``PALETTE_TOLERANCE`` of it. Blur mixes a
   shape with the background along exactly such a line, so the half-coverage contour of a
   blurred shape is where its edge was.
2. Connected components of coloured pixels (:func:`coloured_components`), 4-connectivity, by
   vectorised min-label propagation with pointer jumping (:func:`label_components`, no scipy).
   Components smaller than ``MIN_AREA_FRACTION`` of a cell's area are *stray pixels*, not
   objects. An object's colour is the majority colour of its pixels, so noise that flips a few
   pixels to a neighbouring palette colour (orange to red, say) neither splits the object nor
   changes its colour. (Objects of different colours that touch merge into one component; the
   renderer never draws touching objects.)
3. Shape from the mask's geometry (:func:`classify_shape`), on the mask cropped to its bounding
   box (``H`` rows, ``W`` columns). Features (:func:`shape_features`):

   - row widths ``w(r)`` = span from the first to the last pixel of row ``r`` (this fills holes:
     all three shapes are row-convex);
   - ``taper = mean w(top quarter rows) / mean w(bottom quarter rows)``: an apex-up triangle
     ≈ 0.2-0.35 (also when blurred), a square or circle ≈ 1;
   - ``fill = Σ w(r) / (H·W)``, ``aspect = H / W``;
   - ``iou_s`` = intersection over union of the mask with the ideal shape ``s`` rasterised
     into the same box (square: the full box; circle: the inscribed ellipse; triangle: apex at
     the top middle, base along the bottom). IoU is robust to scattered noise pixels.

   ``taper <= TRIANGLE_TAPER`` -> triangle; otherwise square or circle, whichever IoU is larger.
   A mask matches no shape, and gets ``shape = "unknown"`` (it still counts as an object), when
   ``aspect`` is outside ``[1/MAX_ASPECT, MAX_ASPECT]`` (e.g. two shapes merged), ``fill <
   MIN_FILL``, ``taper > 1/TRIANGLE_TAPER`` (an upside-down triangle) or the chosen shape's IoU
   is below ``MIN_IOU``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import BACKGROUND, COLOURS, GRID

__all__ = [
    "BACKGROUND_CLASS",
    "COLOUR_ORDER",
    "COVERAGE_THRESHOLD",
    "DetectedObject",
    "MIN_AREA_FRACTION",
    "OFF_PALETTE",
    "PALETTE_TOLERANCE",
    "UNKNOWN_SHAPE",
    "check_image",
    "classify_pixels",
    "classify_shape",
    "colour_coverage",
    "coloured_components",
    "detect_objects",
    "label_components",
    "min_object_area",
    "palette_distance",
    "shape_features",
    "snap_to_palette",
]

COLOUR_ORDER: tuple[str, ...] = tuple(COLOURS)
#: Palette used for snapping: the colours in COLOUR_ORDER, then the background.
_PALETTE = np.array([*COLOURS.values(), BACKGROUND], dtype=np.float32)
_BACKGROUND_RGB = np.array(BACKGROUND, dtype=np.float32)
_DIRECTIONS = _PALETTE[:-1] - _BACKGROUND_RGB
_DIRECTION_NORM2 = (_DIRECTIONS**2).sum(axis=-1)
BACKGROUND_CLASS = len(COLOUR_ORDER)
OFF_PALETTE = -1

PALETTE_TOLERANCE = 90.0  # max RGB distance to the palette (or, for detection, to a blend line)
COVERAGE_THRESHOLD = 0.5  # a pixel belongs to a shape when at least half covered by its colour
MIN_AREA_FRACTION = 0.08  # components smaller than this fraction of a cell are stray pixels
UNKNOWN_SHAPE = "unknown"

TRIANGLE_TAPER = 0.6
MIN_IOU = 0.5
MIN_FILL = 0.3
MAX_ASPECT = 1.6


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image.

    Attributes:
        shape: "square", "circle", "triangle" or "unknown".
        colour: palette colour name.
        cell: (row, col) of the grid cell holding the centroid.
        centroid: (y, x) mean pixel-centre coordinates, in pixels.
        area: number of pixels of the component.
        bbox: (y0, x0, y1, x1), inclusive-exclusive pixel bounds.
    """

    shape: str
    colour: str
    cell: tuple[int, int]
    centroid: tuple[float, float]
    area: int
    bbox: tuple[int, int, int, int]


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate an ``(H, W, 3)`` uint8 image; raises ValueError naming what was expected."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 in 0..255, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if min(image.shape[:2]) < GRID:
        raise ValueError(f"image must be at least {GRID}x{GRID} pixels, got {image.shape[:2]}")
    return image


def _nearest_palette(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest palette entry, its distance) for every pixel."""
    pixels = image.astype(np.float32)[:, :, None, :]
    dist = np.sqrt(((pixels - _PALETTE) ** 2).sum(axis=-1))
    nearest = dist.argmin(axis=-1)
    return nearest, _take(dist, nearest)


def colour_coverage(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Explain each pixel as a blend of the background and one palette colour.

    For colour ``k`` with direction ``d_k = c_k - b`` (``b`` the background) the pixel ``p`` is
    modelled as ``b + α_k·d_k``: ``α_k = clip((p - b)·d_k / |d_k|², 0, 1)`` and the residual is
    ``r_k = |p - b - α_k·d_k|``. Returns ``(k*, α_k*, r_k*)`` for ``k* = argmin_k r_k``.
    Blur mixes a shape with the background along exactly this line, so ``α >= 0.5`` recovers
    the shape's edge even in a blurry image, while noise only perturbs ``α`` by about
    ``σ / |d_k|``.
    """
    offset = check_image(image).astype(np.float32) - _BACKGROUND_RGB
    alpha = np.clip(offset @ _DIRECTIONS.T / _DIRECTION_NORM2, 0.0, 1.0)
    residual = offset[:, :, None, :] - alpha[..., None] * _DIRECTIONS
    residual = np.sqrt((residual**2).sum(axis=-1))
    best = residual.argmin(axis=-1)
    return best, _take(alpha, best), _take(residual, best)


def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[..., index]`` per pixel."""
    return np.take_along_axis(values, index[..., None], axis=-1)[..., 0]


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Per-pixel class: 0..5 = index in COLOUR_ORDER, BACKGROUND_CLASS, or OFF_PALETTE.

    From :func:`colour_coverage`: off-palette if the residual exceeds ``PALETTE_TOLERANCE``,
    else colour ``k*`` if its coverage ``α >= 0.5``, else background.
    """
    best, alpha, residual = colour_coverage(image)
    classes = np.where(alpha >= COVERAGE_THRESHOLD, best, BACKGROUND_CLASS)
    return np.where(residual > PALETTE_TOLERANCE, OFF_PALETTE, classes)


def snap_to_palette(image: np.ndarray) -> np.ndarray:
    """The image with every pixel replaced by its nearest palette entry (no tolerance)."""
    nearest, _ = _nearest_palette(check_image(image))
    return _PALETTE[nearest].astype(np.uint8)


def palette_distance(image: np.ndarray) -> np.ndarray:
    """Euclidean RGB distance of every pixel to its nearest palette entry (or background)."""
    return _nearest_palette(check_image(image))[1]


def label_components(classes: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """4-connected components of equal class among ``foreground`` pixels.

    Returns int labels (the smallest flat pixel index of the component) and -1 elsewhere.
    Each round takes the minimum label over same-class neighbours, then jumps pointers
    (``label = label[label]``, valid because a label is always a pixel of the same component);
    it stops when a round changes nothing.
    """
    h, w = classes.shape
    big = h * w
    labels = np.where(foreground, np.arange(big).reshape(h, w), big)
    link_v = foreground[1:, :] & foreground[:-1, :] & (classes[1:, :] == classes[:-1, :])
    link_h = foreground[:, 1:] & foreground[:, :-1] & (classes[:, 1:] == classes[:, :-1])
    while True:
        new = labels.copy()
        new[1:, :] = np.where(link_v, np.minimum(new[1:, :], labels[:-1, :]), new[1:, :])
        new[:-1, :] = np.where(link_v, np.minimum(new[:-1, :], labels[1:, :]), new[:-1, :])
        new[:, 1:] = np.where(link_h, np.minimum(new[:, 1:], labels[:, :-1]), new[:, 1:])
        new[:, :-1] = np.where(link_h, np.minimum(new[:, :-1], labels[:, 1:]), new[:, :-1])
        flat = new.ravel()
        inside = flat < big
        flat[inside] = flat[flat[inside]]
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(foreground, labels, -1)


def min_object_area(height: int, width: int) -> int:
    """Smallest component that counts as an object: MIN_AREA_FRACTION of a cell, at least 3."""
    return max(3, int(round(MIN_AREA_FRACTION * (height / GRID) * (width / GRID))))


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal shapes rasterised into an ``h`` x ``w`` box (pixel centres mapped to [-1, 1]²)."""
    u = (2 * (np.arange(h) + 0.5) / h - 1)[:, None]
    v = (2 * (np.arange(w) + 0.5) / w - 1)[None, :]
    return {
        "square": np.ones((h, w), dtype=bool),
        "circle": u**2 + v**2 <= 1,
        "triangle": np.abs(v) <= (u + 1) / 2,
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """Geometry of a boolean mask cropped to its bounding box (see the module docstring)."""
    h, w = mask.shape
    widths = np.zeros(h, dtype=np.float64)
    for r in np.flatnonzero(mask.any(axis=1)):
        cols = np.flatnonzero(mask[r])
        widths[r] = cols[-1] - cols[0] + 1
    quarter = max(1, h // 4)
    bottom = widths[-quarter:].mean()
    templates = _templates(h, w)
    return {
        "fill": float(widths.sum() / (h * w)),
        "taper": float(widths[:quarter].mean() / bottom) if bottom > 0 else float("inf"),
        "aspect": h / w,
        **{f"iou_{name}": _iou(mask, template) for name, template in templates.items()},
    }


def classify_shape(mask: np.ndarray) -> str:
    """Shape name of a boolean mask cropped to its bounding box (see the module docstring)."""
    if not mask.any():
        return UNKNOWN_SHAPE
    f = shape_features(mask)
    if not (1 / MAX_ASPECT <= f["aspect"] <= MAX_ASPECT) or f["fill"] < MIN_FILL:
        return UNKNOWN_SHAPE
    if f["taper"] <= TRIANGLE_TAPER:
        return "triangle" if f["iou_triangle"] >= MIN_IOU else UNKNOWN_SHAPE
    if f["taper"] > 1 / TRIANGLE_TAPER:
        return UNKNOWN_SHAPE
    best = "square" if f["iou_square"] >= f["iou_circle"] else "circle"
    return best if f[f"iou_{best}"] >= MIN_IOU else UNKNOWN_SHAPE


def coloured_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of coloured pixels (any palette colour, not background)."""
    coloured = (classes >= 0) & (classes != BACKGROUND_CLASS)
    return label_components(coloured.astype(np.int8), coloured)


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """Objects in ``image``, sorted by cell then centroid (reading order)."""
    classes = classify_pixels(image)
    h, w = classes.shape
    labels = coloured_components(classes)
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    min_area = min_object_area(h, w)
    found = []
    for label, area in zip(ids.tolist(), counts.tolist()):
        if area >= min_area:
            found.append(_describe_component(labels == label, classes, area, h, w))
    return sorted(found, key=lambda o: (o.cell, o.centroid))


def _describe_component(mask: np.ndarray, classes: np.ndarray, area: int, h: int, w: int) -> DetectedObject:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    cy, cx = float(ys.mean()) + 0.5, float(xs.mean()) + 0.5
    row = min(GRID - 1, int(cy / (h / GRID)))
    col = min(GRID - 1, int(cx / (w / GRID)))
    votes = np.bincount(classes[mask], minlength=len(COLOUR_ORDER))
    return DetectedObject(
        shape=classify_shape(mask[y0:y1, x0:x1]),
        colour=COLOUR_ORDER[int(votes.argmax())],
        cell=(row, col),
        centroid=(cy, cx),
        area=int(area),
        bbox=(y0, x0, y1, x1),
    )
