"""Writes the two example prompt files next to this script, the same bytes on every run.

``geneval_style.jsonl``: prompts in GenEval's six categories, one JSON object a line with
GenEval's metadata fields. ``tag`` is the category; ``include`` lists the objects the image must
show, ``{"class": name, "count": n}`` each, with ``"color"`` for ``colors`` and ``color_attr``
and, for ``position``, ``"position": [relation, i]`` on the second object: it stands ``relation``
(``left of``, ``right of``, ``above``, ``below``) to ``include[i]``. So "a photo of a dog right of
a cat" includes ``[{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position":
["right of", 0]}]``. The prompts are our own, from the classes and colours below:

* ``single_object``: "a photo of a bench", every class once;
* ``two_object``: "a photo of a cup and a dog";
* ``counting``: "a photo of three apples" (two to four, the number as a word);
* ``colors``: "a photo of a blue umbrella";
* ``position``: "a photo of a dog right of a cat";
* ``color_attr``: "a photo of a red car and a green bench".

``edit_dialogues.jsonl``: multi-turn edits, ``{"turns": [...], "tag": ..., "include": [...]}``:
a text-to-image prompt then one or two edit instructions on the image before; ``tag`` is the
last edit's kind and ``include`` the final scene, in the format above.

Run: ``python examples/prompts/make_prompts.py``
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CLASSES = [
    "dog", "cat", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "bird",
    "bicycle", "car", "motorcycle", "bus", "truck", "boat", "airplane", "train",
    "bench", "umbrella", "kite", "backpack", "suitcase", "skateboard", "traffic light", "fire hydrant",
    "cup", "bowl", "bottle", "wine glass", "fork", "knife", "spoon",
    "apple", "banana", "sandwich", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "clock", "vase", "book", "laptop", "teddy bear",
]  # fmt: skip
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
RELATIONS = ["left of", "right of", "above", "below"]
NUMBERS = {2: "two", 3: "three", 4: "four"}
PER_CATEGORY = 50

# Edit dialogues: settings (where, and the classes that belong there), and the edits' words.
SETTINGS = {
    "on a street": ["car", "bus", "bicycle", "motorcycle", "truck", "dog", "bench", "umbrella", "fire hydrant"],
    "on a kitchen table": ["cup", "bowl", "bottle", "wine glass", "apple", "banana", "cake", "vase", "book"],
    "in a park": ["dog", "cat", "bench", "kite", "bicycle", "umbrella", "backpack", "bird"],
    "in a living room": ["couch", "chair", "cat", "dog", "clock", "vase", "laptop", "teddy bear", "potted plant"],
    "on a beach": ["umbrella", "boat", "dog", "bird", "chair", "kite", "backpack", "suitcase"],
    "in a meadow": ["horse", "cow", "sheep", "bird", "dog", "bicycle", "kite"],
}
BACKGROUNDS = ["a snowy forest", "a sandy beach", "a city street at night", "a mountain lake", "a desert",
               "a field of sunflowers", "a rainy street", "a brick wall"]  # fmt: skip
STYLES = ["make it night time", "make it a rainy day", "make it sunset", "make it look like a watercolor painting",
          "turn it into a pencil sketch", "make it look like an oil painting", "make it black and white"]  # fmt: skip
MOVE_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
EDIT_TAGS = ["recolor", "add", "remove", "replace", "move", "background", "style"]
DIALOGUES = 42  # six for each tag, half of them two turns long and half three


def a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def plural(name: str) -> str:
    irregular = {"sheep": "sheep", "knife": "knives"}
    if name in irregular:
        return irregular[name]
    return name + ("es" if name.endswith(("s", "sh", "ch", "x")) else "s")


def obj(name: str, count: int = 1, **extra) -> dict:
    return {"class": name, "count": count, **extra}


def draw_geneval(rng: random.Random, tag: str) -> tuple[str, list[dict]]:
    """One prompt of the category ``tag`` and its ``include``."""
    first, second = rng.sample(CLASSES, 2)
    color1, color2 = rng.sample(COLORS, 2)
    if tag == "two_object":
        return f"a photo of {a(first)} and {a(second)}", [obj(first), obj(second)]
    if tag == "counting":
        count = rng.choice(sorted(NUMBERS))
        return f"a photo of {NUMBERS[count]} {plural(first)}", [obj(first, count)]
    if tag == "colors":
        return f"a photo of {a(color1)} {first}", [obj(first, color=color1)]
    if tag == "position":
        relation = rng.choice(RELATIONS)
        return f"a photo of {a(second)} {relation} {a(first)}", [obj(first), obj(second, position=[relation, 0])]
    if tag == "color_attr":
        prompt = f"a photo of {a(color1)} {first} and {a(color2)} {second}"
        return prompt, [obj(first, color=color1), obj(second, color=color2)]
    raise ValueError(tag)


def geneval_records(rng: random.Random) -> list[dict]:
    records = [{"prompt": f"a photo of {a(name)}", "tag": "single_object", "include": [obj(name)]} for name in CLASSES]
    for tag in ["two_object", "counting", "colors", "position", "color_attr"]:
        seen: set = set()
        while len(seen) < PER_CATEGORY:
            prompt, include = draw_geneval(rng, tag)
            # one of "a cat and a dog" and "a dog and a cat"; "left of" and "right of" differ
            key = prompt if tag == "position" else json.dumps(sorted(include, key=json.dumps))
            if key not in seen:
                seen.add(key)
                records.append({"prompt": prompt, "tag": tag, "include": include})
    return records


def needs(tag: str) -> int:
    """How many objects the scene must hold for an edit of this kind."""
    return 2 if tag in ("remove", "move") else 1


def apply_edit(rng: random.Random, tag: str, scene: list[dict], fresh: list[str]) -> str:
    """Changes ``scene`` (the final image's ``include``) by one edit of kind ``tag``; its instruction.

    New objects come out of ``fresh``, the setting's classes the dialogue has not named yet."""
    names = [entry["class"] for entry in scene]
    target = rng.randrange(len(scene))
    name = names[target]
    if tag == "recolor":
        color = rng.choice([c for c in COLORS if c != scene[target].get("color")])
        scene[target]["color"] = color
        return f"make the {name} {color}"
    if tag == "add":
        new = fresh.pop(rng.randrange(len(fresh)))
        relation = rng.choice([None, *RELATIONS])
        if relation is None:
            scene.append(obj(new))
            return f"add {a(new)} next to the {name}"
        scene.append(obj(new, position=[relation, target]))
        return f"add {a(new)} {MOVE_WORDS[relation]} the {name}"
    if tag == "remove":
        del scene[target]
        for entry in scene:  # the others' positions: relative to the removed one is gone, later indices shift
            if "position" in entry:
                index = entry["position"][1]
                if index == target:
                    del entry["position"]
                elif index > target:
                    entry["position"][1] = index - 1
        return f"remove the {name}"
    if tag == "replace":
        new = fresh.pop(rng.randrange(len(fresh)))
        scene[target] = obj(new, **({"position": scene[target]["position"]} if "position" in scene[target] else {}))
        return f"replace the {name} with {a(new)}"
    if tag == "move":
        other = rng.choice([i for i in range(len(scene)) if i != target])
        relation = rng.choice(RELATIONS)
        scene[target]["position"] = [relation, other]
        if scene[other].get("position", [None, None])[1] == target:
            del scene[other]["position"]  # the relation now belongs to the moved object
        return f"move the {name} {MOVE_WORDS[relation]} the {names[other]}"
    if tag == "background":
        return f"change the background to {rng.choice(BACKGROUNDS)}"
    if tag == "style":
        return rng.choice(STYLES)
    raise ValueError(tag)


def draw_dialogue(rng: random.Random, last: str, turns: int) -> dict:
    place = rng.choice(sorted(SETTINGS))
    count = 2 if last in ("remove", "move") else rng.choice([1, 2])
    first, second = rng.sample(SETTINGS[place], 2)
    fresh = [name for name in SETTINGS[place] if name not in (first, second)]
    color = rng.choice(COLORS)
    scene = [obj(first, color=color)]
    prompt = f"a photo of {a(color)} {first}"
    if count == 2:
        scene.append(obj(second))
        prompt += f" and {a(second)}"
    texts = [f"{prompt} {place}"]
    if turns == 3:  # an edit before the last that leaves the scene fit for the last one
        after = {"add": len(scene) + 1, "remove": len(scene) - 1}
        fits = [t for t in EDIT_TAGS if len(scene) >= needs(t) and after.get(t, len(scene)) >= needs(last)]
        texts.append(apply_edit(rng, rng.choice(fits), scene, fresh))
    texts.append(apply_edit(rng, last, scene, fresh))
    return {"turns": texts, "tag": last, "include": scene}


def dialogue_records(rng: random.Random) -> list[dict]:
    records, seen = [], set()
    for i in range(DIALOGUES):
        last, turns = EDIT_TAGS[i % len(EDIT_TAGS)], 2 + i % 2
        record = draw_dialogue(rng, last, turns)
        while tuple(record["turns"]) in seen:
            record = draw_dialogue(rng, last, turns)
        seen.add(tuple(record["turns"]))
        records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def main(out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    write_jsonl(out_dir / "geneval_style.jsonl", geneval_records(rng))
    write_jsonl(out_dir / "edit_dialogues.jsonl", dialogue_records(rng))


if __name__ == "__main__":
    main(Path(__file__).resolve().parent)
