"""What a new user meets first (issue: hardening): readable grid captions, spaces kept and no
caption cut off."""

from __future__ import annotations

import numpy as np
from PIL import Image

from unigrpo_env.agents.visuals import _font, image_grid


def test_captions_keep_their_spaces_and_are_never_cut(tmp_path):
    font = _font()
    assert font.getlength(" ") == font.getlength("a") == 6  # a space is a whole character wide
    long = "[color_attr] make a shape that is not a circle or a triangle in the colour of a cherry -> reward 0.50"
    images = [np.zeros((8, 8, 3), np.uint8)] * 3
    path = image_grid(images, ["short", long, "x"], tmp_path / "grid.png", columns=2, scale=2, width_chars=24)
    lines = 5  # textwrap of the long caption at 24 characters
    with Image.open(path) as grid:
        assert grid.size[1] == 2 * (16 + lines * 11 + 10)  # two rows, each as tall as the longest caption
    very_long = " ".join(["word"] * 200)
    path = image_grid(images[:1], [very_long], tmp_path / "g2.png", max_caption_lines=4, width_chars=24)
    with Image.open(path) as grid:
        assert grid.size[1] == 32 + 4 * 11 + 10


def test_the_evaluations_report_their_progress(tiny_checkpoint, tmp_path):
    """The held-out evaluations before and after training (minutes on a CPU) report progress."""
    from conftest import trainer_for

    from unigrpo_env.agents.config import UniGRPOConfig

    config = UniGRPOConfig(
        num_prompts=2, group_size=2, iterations=1, eval_limit=6, checkpoint=str(tiny_checkpoint),
        scenario_options={"num_steps": 2},
    )  # fmt: skip
    seen: list[tuple[str, int, int]] = []
    trainer = trainer_for(config, tmp_path / "run", on_eval_progress=lambda *event: seen.append(event))
    trainer.evaluator.batch_size = 4  # two batches of tasks per evaluation
    trainer.run()
    assert seen == [("eval_before", 4, 6), ("eval_before", 6, 6), ("eval_after", 4, 6), ("eval_after", 6, 6)]
