"""ShapesWorld: a tiny built-in world with exact rewards.

Small RGB canvases with a few flat-coloured shapes (:mod:`.scene`, :mod:`.render`), riddle prompts
in GenEval's six categories with train / held-out splits (:mod:`.tasks`, :mod:`.riddles`), a
verifier that reads an image back and scores it per check kind (:mod:`.verify`,
:mod:`.detect`), and an image-quality measure to spot reward hacking (:mod:`.quality`).
"""

from .constraints import CHECK_KINDS, RELATIONS, Constraints, ObjectSpec, RelationSpec
from .detect import DetectedObject
from .quality import QualityResult, image_quality
from .render import render
from .scene import (
    BACKGROUND,
    CELLS,
    COLOURS,
    SHAPES,
    DescriptionError,
    Scene,
    SceneObject,
    canonical_order,
    describe,
    parse_description,
)
from .tasks import (
    ANSWER_MARKER,
    CATEGORIES,
    DEFAULT_COLOUR,
    ShapesTask,
    answer_text,
    extract_description,
    task_split,
    vocabulary,
)
from .verify import VerifierResult, detect_objects, verify, verify_batch

__all__ = [
    "ANSWER_MARKER",
    "BACKGROUND",
    "CATEGORIES",
    "CELLS",
    "CHECK_KINDS",
    "COLOURS",
    "Constraints",
    "DEFAULT_COLOUR",
    "DescriptionError",
    "DetectedObject",
    "ObjectSpec",
    "QualityResult",
    "RELATIONS",
    "RelationSpec",
    "SHAPES",
    "Scene",
    "SceneObject",
    "ShapesTask",
    "VerifierResult",
    "answer_text",
    "canonical_order",
    "describe",
    "detect_objects",
    "extract_description",
    "image_quality",
    "parse_description",
    "render",
    "task_split",
    "verify",
    "verify_batch",
    "vocabulary",
]
