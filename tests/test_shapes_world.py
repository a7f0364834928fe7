"""ShapesWorld: scenes, description language, renderer, riddle tasks, verifier, image quality."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unigrpo_env.scenarios.shapes import (
    BACKGROUND,
    CATEGORIES,
    CELLS,
    COLOURS,
    SHAPES,
    DescriptionError,
    Scene,
    SceneObject,
    ShapesTask,
    answer_text,
    describe,
    detect_objects,
    extract_description,
    image_quality,
    parse_description,
    render,
    task_split,
    verify,
    verify_batch,
    vocabulary,
)
from unigrpo_env.scenarios.shapes.render import shape_mask

TRAIN = task_split("train")
HELDOUT = task_split("heldout")
ALL_TASKS = TRAIN + HELDOUT
PALETTE = {tuple(c) for c in COLOURS.values()} | {BACKGROUND}


def _noisy(image: np.ndarray, std: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, std, image.shape)
    return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)


def _blur(image: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur (edge-replicated)."""
    f = image.astype(np.float64)
    f = np.pad(f, ((1, 1), (0, 0), (0, 0)), mode="edge")
    f = (f[:-2] + 2 * f[1:-1] + f[2:]) / 4
    f = np.pad(f, ((0, 0), (1, 1), (0, 0)), mode="edge")
    f = (f[:, :-2] + 2 * f[:, 1:-1] + f[:, 2:]) / 4
    return np.clip(np.round(f), 0, 255).astype(np.uint8)


def _random_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, 5))
    cells = rng.permutation(list(CELLS.values()))[:n]
    return Scene(
        tuple(SceneObject(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), (int(r), int(c))) for r, c in cells)
    )


def _sample(category: str, per_category: int = 40) -> list[ShapesTask]:
    tasks = [t for t in ALL_TASKS if t.category == category]
    step = max(1, len(tasks) // per_category)
    return tasks[::step]


# ----------------------------------------------------------------------------- scenes


def test_describe_parse_round_trip_over_all_tasks():
    for task in ALL_TASKS:
        assert describe(task.target) == task.description
        assert parse_description(task.description) == task.target
        assert parse_description(task.description, strict=True) == task.target
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = _random_scene(rng)
        assert parse_description(describe(scene), strict=True) == scene


def test_description_is_canonical():
    a = SceneObject("circle", "red", CELLS["right"])
    b = SceneObject("square", "blue", CELLS["top-left"])
    assert Scene((a, b)) == Scene((b, a))
    assert describe(Scene((a, b))) == "blue square at top-left , red circle at right"
    reordered = "red circle at right , blue square at top-left"
    assert parse_description(reordered) == Scene((a, b))
    with pytest.raises(DescriptionError, match="reading order"):
        parse_description(reordered, strict=True)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("red circle", "expected 4 words"),
        ("red circle at top ,", "expected 4 words"),
        ("pink circle at top", "expected a colour"),
        ("red hexagon at top", "expected a shape"),
        ("red circle on top", "expected 'at'"),
        ("red circle at middle", "expected a cell"),
        ("red circle at top , blue square at top", "share one cell"),
        (" , ".join(f"red circle at {c}" for c in ["top", "left", "right", "bottom", "center"]), "1 to 4"),
    ],
)
def test_parse_errors_say_what_was_expected(text, message):
    with pytest.raises(DescriptionError, match=message) as info:
        parse_description(text)
    assert isinstance(info.value, ValueError)


def test_scene_validation():
    with pytest.raises(ValueError, match="shape"):
        SceneObject("hexagon", "red", (0, 0))
    with pytest.raises(ValueError, match="colour"):
        SceneObject("circle", "pink", (0, 0))
    with pytest.raises(ValueError, match="cell"):
        SceneObject("circle", "red", (3, 0))
    with pytest.raises(ValueError, match="1 to 4"):
        Scene(())


# ----------------------------------------------------------------------------- renderer


@pytest.mark.parametrize("size", [32, 48])
def test_render_is_flat_palette_and_deterministic(size):
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = _random_scene(rng)
        image = render(scene, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert {tuple(p) for p in image.reshape(-1, 3).tolist()} <= PALETTE
        assert np.array_equal(image, render(scene, size))
        for obj in scene.objects:
            assert (image[shape_mask(obj.shape, obj.cell, size)] == COLOURS[obj.colour]).all()


@pytest.mark.parametrize("size", [32, 48])
def test_rendered_shapes_are_symmetric_and_never_touch(size):
    masks = [shape_mask(s, c, size) for s in SHAPES for c in CELLS.values()]
    for mask in masks:
        ys, xs = np.nonzero(mask)
        crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert np.array_equal(crop, crop[:, ::-1])
    square_cells = [shape_mask("square", c, size) for c in CELLS.values()]  # squares are the largest
    grown = [m | np.roll(m, 1, 0) | np.roll(m, -1, 0) | np.roll(m, 1, 1) | np.roll(m, -1, 1) for m in square_cells]
    for i, a in enumerate(grown):
        for j, b in enumerate(square_cells):
            if i != j:
                assert not (a & b).any()


# ----------------------------------------------------------------------------- tasks


def test_every_category_has_train_and_heldout_tasks():
    for category in CATEGORIES:
        n_train = sum(t.category == category for t in TRAIN)
        n_heldout = sum(t.category == category for t in HELDOUT)
        assert n_train >= 150, category
        assert 20 <= n_heldout <= 60, category


def test_splits_are_deterministic_disjoint_and_unknown_split_raises():
    assert task_split("train") == TRAIN and task_split("heldout") == HELDOUT
    assert {t.prompt for t in TRAIN}.isdisjoint({t.prompt for t in HELDOUT})
    with pytest.raises(ValueError, match="split"):
        task_split("test")


def test_heldout_combinations_are_unseen_but_their_parts_are_seen():
    train_combos = {(t.category, t.combo) for t in TRAIN}
    train_phrases = {key for t in TRAIN for key in t.combo}
    train_words = {w for t in TRAIN for text in (t.prompt, answer_text(t)) for w in text.split()}
    train_values = {(o.shape, o.colour) for t in TRAIN for o in t.target.objects}
    for task in HELDOUT:
        assert (task.category, task.combo) not in train_combos
        assert set(task.combo) <= train_phrases
        assert set(task.prompt.split()) | set(answer_text(task).split()) <= train_words
        assert {(o.shape, o.colour) for o in task.target.objects} <= train_values


def test_tasks_are_consistent():
    for task in ALL_TASKS:
        assert task.category in CATEGORIES
        assert task.description == describe(task.target)
        specs = task.constraints.objects
        assert task.constraints.total_count == len(task.target.objects)
        assert sorted(s.shape for s in specs for _ in range(s.count)) == sorted(o.shape for o in task.target.objects)
        for spec in specs:
            if spec.colour is not None:
                assert all(o.colour == spec.colour for o in task.target.objects if o.shape == spec.shape)


def test_task_json_round_trip():
    for task in ALL_TASKS:
        again = ShapesTask.from_dict(json.loads(json.dumps(task.to_dict())))
        assert again == task


def test_answer_text_and_extract_description():
    task = next(t for t in TRAIN if t.category == "colors" and "grass" in t.prompt)
    text = answer_text(task)
    assert text == task.answer
    assert text.startswith(task.reasoning) and "grass is green ." in text
    assert text.endswith("answer : " + task.description)
    for t in ALL_TASKS:
        assert extract_description(answer_text(t)) == t.description
    assert extract_description("grass is green . no marker here") is None
    assert extract_description("answer : x answer :  red   circle at top ") == "red circle at top"


def test_riddles_need_reasoning():
    prompts = " ".join(t.prompt for t in TRAIN)
    for phrase in ("the colour of grass", "shape like a wheel", "one more than two", "left of", "that is not a"):
        assert phrase in prompts
    reasoned = sum(bool(t.reasoning) for t in ALL_TASKS)
    assert reasoned / len(ALL_TASKS) > 0.8


def test_vocabulary_covers_every_word():
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    words = set(vocab)
    for task in ALL_TASKS:
        for text in (task.prompt, task.reasoning, answer_text(task), task.description):
            assert set(text.split()) <= words, text
    assert set(COLOURS) | set(SHAPES) | set(CELLS) | {"at", ",", "answer", ":"} <= words


# ----------------------------------------------------------------------------- verifier


def test_detect_objects_reads_back_rendered_scenes():
    rng = np.random.default_rng(2)
    for size in (32, 48):
        for _ in range(100):
            scene = _random_scene(rng)
            found = detect_objects(render(scene, size))
            assert [(d.shape, d.colour, d.cell) for d in found] == [(o.shape, o.colour, o.cell) for o in scene.objects]
            assert all(d.area == shape_mask(o.shape, o.cell, size).sum() for d, o in zip(found, scene.objects))


def test_oracle_gets_full_score_on_every_task():
    images = np.stack([render(t.target) for t in ALL_TASKS])
    for task, result in zip(ALL_TASKS, verify_batch(images, ALL_TASKS)):
        assert result.correct and result.score == 1.0, task.prompt
        assert set(result.checks) == set(task.constraints.check_kinds())
        assert all(v == 1.0 for v in result.checks.values())


def test_oracle_at_size_48():
    for category in CATEGORIES:
        for task in _sample(category, 10):
            assert verify(render(task.target, 48), task).correct


def test_check_kinds_per_category():
    expected = {
        "single_object": {"object", "count"},
        "two_objects": {"object", "count"},
        "counting": {"object", "count"},
        "colors": {"object", "count", "colour"},
        "position": {"object", "count", "position"},
        "color_attr": {"object", "count", "colour", "binding"},
    }
    for task in ALL_TASKS:
        assert set(task.constraints.check_kinds()) == expected[task.category]


def _dropped(task: ShapesTask, scene: Scene) -> set[str]:
    result = verify(render(scene), task)
    assert set(result.checks) == set(task.constraints.check_kinds())
    dropped = {kind for kind, value in result.checks.items() if value < 1.0}
    if dropped:
        assert result.score < 1.0 and not result.correct
    else:
        assert result.score == 1.0 and result.correct
    return dropped


def _required_shapes(task: ShapesTask) -> set[str]:
    return {spec.shape for spec in task.constraints.objects}


def _required_colours(task: ShapesTask) -> set[str]:
    return {spec.colour for spec in task.constraints.objects if spec.colour is not None}


@pytest.mark.parametrize("category", CATEGORIES)
def test_recolouring_lowers_only_colour_checks(category):
    for task in _sample(category):
        obj = task.target.objects[0]
        new = next(c for c in COLOURS if c not in _required_colours(task) | {obj.colour})
        dropped = _dropped(task, task.target.replace_object(0, colour=new))
        expected = {"colour", "binding"} & set(task.constraints.check_kinds())
        assert dropped == expected, task.prompt


def test_swapping_colours_lowers_only_binding():
    for task in _sample("color_attr"):
        a, b = task.target.objects
        swapped = task.target.replace_object(0, colour=b.colour).replace_object(1, colour=a.colour)
        assert _dropped(task, swapped) == {"binding"}, task.prompt


@pytest.mark.parametrize("category", CATEGORIES)
def test_reshaping_lowers_only_object(category):
    for task in _sample(category):
        new = next(s for s in SHAPES if s not in _required_shapes(task))
        assert _dropped(task, task.target.replace_object(0, shape=new)) == {"object"}, task.prompt


@pytest.mark.parametrize("category", CATEGORIES)
def test_an_extra_object_lowers_only_count(category):
    for task in _sample(category):
        if len(task.target.objects) == 4:
            continue
        free = next(c for c in CELLS.values() if c not in {o.cell for o in task.target.objects})
        obj = task.target.objects[0]
        extra = Scene(task.target.objects + (SceneObject(obj.shape, obj.colour, free),))
        assert _dropped(task, extra) == {"count"}, task.prompt


def test_a_missing_object_lowers_only_count_when_counting():
    for task in _sample("counting"):
        assert _dropped(task, Scene(task.target.objects[1:])) == {"count"}, task.prompt


def test_swapping_places_lowers_only_position():
    for task in _sample("position"):
        a, b = task.target.objects
        flipped = Scene((SceneObject(a.shape, a.colour, b.cell), SceneObject(b.shape, b.colour, a.cell)))
        assert _dropped(task, flipped) == {"position"}, task.prompt


def test_wrong_scene_is_scored_densely():
    task = next(t for t in TRAIN if t.category == "color_attr")
    blank = np.full((32, 32, 3), 255, dtype=np.uint8)
    result = verify(blank, task)
    assert not result.correct and 0.0 <= result.score < 0.5
    assert result.objects == ()


@pytest.mark.parametrize("size", [32, 48])
def test_verifier_is_robust_to_noise_and_blur(size):
    tasks = HELDOUT + TRAIN[::10]
    for i, task in enumerate(tasks):
        clean = render(task.target, size)
        noisy = _noisy(clean, 20.0, seed=i)
        assert verify(noisy, task).correct, task.prompt
        assert verify(_blur(noisy), task).correct, task.prompt


def test_verifier_rejects_bad_images():
    task = TRAIN[0]
    with pytest.raises(ValueError, match="uint8"):
        verify(render(task.target).astype(np.float32), task)
    with pytest.raises(ValueError, match="shape"):
        verify(np.zeros((32, 32), dtype=np.uint8), task)
    with pytest.raises(ValueError, match="tasks"):
        verify_batch(np.stack([render(task.target)] * 2), [task])


# ----------------------------------------------------------------------------- image quality


def test_quality_of_clean_image_is_one():
    for task in ALL_TASKS[::50]:
        q = image_quality(render(task.target))
        assert q.score == 1.0
        assert q.stray_pixel_fraction == q.off_palette_fraction == q.noise == 0.0


def test_quality_falls_monotonically_with_noise():
    for task in ALL_TASKS[::200]:
        clean = render(task.target)
        results = [image_quality(_noisy(clean, std, seed=3)) for std in (8.0, 20.0, 40.0)]
        scores = [1.0] + [q.score for q in results]
        assert all(a > b for a, b in zip(scores, scores[1:])), scores
        noise = [q.noise for q in results]
        assert all(a < b for a, b in zip(noise, noise[1:]))
        assert all(0.0 <= v <= 1.0 for q in results for v in vars(q).values())


def test_quality_sees_stray_and_off_palette_pixels():
    image = render(TRAIN[0].target)
    spotted = image.copy()
    spotted[0, 0] = COLOURS["red"]
    spotted[31, 31] = (0, 0, 0)
    q = image_quality(spotted)
    assert q.stray_pixel_fraction == pytest.approx(1 / 1024)
    assert q.off_palette_fraction == pytest.approx(1 / 1024)
    assert q.score < 1.0
    assert verify(spotted, TRAIN[0]).correct  # stray pixels are not objects
