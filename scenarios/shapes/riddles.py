"""The riddle phrase book: ways a prompt can name a colour, a shape or a number.

Every phrase knows the attribute it denotes, its wording, and the one-line fact that resolves it
(empty for plain words). Prompts are templated from these phrases so that a tiny word-level
language model can learn the mapping; the reasoning it must write is the list of facts.

=============  ==============================================  ===============================
kind           prompt wording                                  reasoning fact
=============  ==============================================  ===============================
colour plain   "a red circle"                                  (none)
colour ref     "a circle in the colour of grass"               "grass is green ."
colour mix     "... in the colour made by mixing blue and      "blue and yellow make green ."
               yellow"
shape plain    "a circle" / "circles"                          (none)
shape ref      "a shape like a wheel" / "shapes like a wheel"  "a wheel is a circle ."
shape corners  "a shape with no corners"                       "no corners is a circle ."
shape negation "a shape that is not a circle or a square"      "not a circle or a square is a
                                                               triangle ."
count plain    "three circles"                                 (none)
count sum      "one more than two circles"                     "one more than two is three ."
=============  ==============================================  ===============================
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import permutations

from .scene import COLOURS, SHAPES

__all__ = [
    "COLOUR_MIXES",
    "COLOUR_REFERENCES",
    "COUNT_EXPRESSIONS",
    "NUMBER_WORDS",
    "Phrase",
    "SHAPE_REFERENCES",
    "TEMPLATES",
    "colour_phrases",
    "count_phrases",
    "noun_phrase",
    "shape_phrases",
]

COLOUR_REFERENCES: dict[str, tuple[str, ...]] = {
    "red": ("a tomato", "a strawberry", "a fire truck", "a cherry"),
    "green": ("grass", "a leaf", "a frog", "a lime"),
    "blue": ("the sky", "the sea", "a blueberry", "a sapphire"),
    "yellow": ("a banana", "a lemon", "the sun", "a canary"),
    "purple": ("a grape", "an aubergine", "a plum", "lavender"),
    "orange": ("a carrot", "a pumpkin", "a tangerine", "a goldfish"),
}
#: Secondary colours as mixes of two primaries.
COLOUR_MIXES: dict[str, tuple[str, str]] = {
    "green": ("blue", "yellow"),
    "orange": ("red", "yellow"),
    "purple": ("red", "blue"),
}
SHAPE_REFERENCES: dict[str, tuple[str, ...]] = {
    "circle": ("a wheel", "a coin", "a ball", "the full moon", "a plate"),
    "square": ("a box", "a window", "a chessboard", "a stamp", "a tile"),
    "triangle": ("a pyramid", "a slice of pizza", "a tent", "a mountain", "a sail"),
}
SHAPE_CORNERS: dict[str, str] = {"circle": "no", "triangle": "three", "square": "four"}

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
COUNT_EXPRESSIONS: dict[int, tuple[str, ...]] = {
    2: ("two", "one plus one", "one more than one", "one less than three", "three minus one", "half of four"),
    3: ("three", "two plus one", "one plus two", "one more than two", "one less than four", "four minus one"),
    4: ("four", "two plus two", "three plus one", "one more than three", "two times two", "five minus one"),
}

#: Prompt templates; "{}" is the body ("a circle", "a circle and a square", ...).
TEMPLATES: tuple[str, ...] = (
    "draw {}",
    "a picture of {}",
    "show {}",
    "paint {}",
    "an image of {}",
    "please draw {}",
    "sketch {}",
    "make {}",
)

_VOWELS = "aeiou"


@dataclass(frozen=True)
class Phrase:
    """One way to name an attribute.

    Attributes:
        key: identity of the wording (used to define held-out combinations).
        value: the attribute denoted: a colour or shape name, or a count.
        text: the wording (singular for shapes).
        plural: plural wording (shapes only).
        reasoning: the fact that resolves the wording, "" for plain words.
        before_noun: colours only: an adjective ("red circle") rather than a trailing phrase.
    """

    key: str
    value: str | int
    text: str
    reasoning: str = ""
    plural: str = ""
    before_noun: bool = False


@cache
def colour_phrases(colour: str) -> tuple[Phrase, ...]:
    """Every wording of ``colour``: plain, by reference, and (secondary colours) as a mix."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}")
    phrases = [Phrase(f"colour:{colour}", colour, colour, before_noun=True)]
    for ref in COLOUR_REFERENCES[colour]:
        phrases.append(Phrase(f"colour-ref:{ref}", colour, f"in the colour of {ref}", f"{ref} is {colour} ."))
    if colour in COLOUR_MIXES:
        for a, b in permutations(COLOUR_MIXES[colour]):
            text = f"in the colour made by mixing {a} and {b}"
            phrases.append(Phrase(f"colour-mix:{a}+{b}", colour, text, f"{a} and {b} make {colour} ."))
    return tuple(phrases)


@cache
def shape_phrases(shape: str) -> tuple[Phrase, ...]:
    """Every wording of ``shape``: plain, by reference, by corners, and by negation."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    phrases = [Phrase(f"shape:{shape}", shape, shape, plural=f"{shape}s")]
    for ref in SHAPE_REFERENCES[shape]:
        phrases.append(
            Phrase(f"shape-ref:{ref}", shape, f"shape like {ref}", f"{ref} is a {shape} .", f"shapes like {ref}")
        )
    corners = SHAPE_CORNERS[shape]
    phrases.append(
        Phrase(
            f"shape-corners:{corners}",
            shape,
            f"shape with {corners} corners",
            f"{corners} corners is a {shape} .",
            f"shapes with {corners} corners",
        )
    )
    for x, y in permutations([s for s in SHAPES if s != shape]):
        phrases.append(
            Phrase(
                f"shape-not:{x}+{y}",
                shape,
                f"shape that is not a {x} or a {y}",
                f"not a {x} or a {y} is a {shape} .",
                f"shapes that are not {x}s or {y}s",
            )
        )
    return tuple(phrases)


@cache
def count_phrases(count: int) -> tuple[Phrase, ...]:
    """Every wording of ``count`` (2 to 4): the number word and arithmetic riddles."""
    if count not in COUNT_EXPRESSIONS:
        raise ValueError(f"count must be one of {tuple(COUNT_EXPRESSIONS)}, got {count!r}")
    word = NUMBER_WORDS[count]
    return tuple(
        Phrase(f"count:{expr}", count, expr, "" if expr == word else f"{expr} is {word} .")
        for expr in COUNT_EXPRESSIONS[count]
    )


def noun_phrase(shape: Phrase, colour: Phrase | None = None, count: Phrase | None = None) -> str:
    """The prompt's words for one object, or ``count`` objects, e.g. "an orange circle"."""
    noun = shape.plural if count is not None else shape.text
    words = [noun]
    if colour is not None:
        words = [colour.text, noun] if colour.before_noun else [noun, colour.text]
    body = " ".join(words)
    if count is not None:
        return f"{count.text} {body}"
    article = "an" if body[0] in _VOWELS else "a"
    return f"{article} {body}"
