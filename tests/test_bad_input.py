"""Bad input at the command line (issue: hardening from an outside probe): each case below used to
end in a traceback and exit code 1, or to be accepted; each is now one line, exit code 2, and
leaves no run folder behind, because the value is refused before anything is written."""

from __future__ import annotations

import json
import math

import pytest
import typer

from unigrpo_env.cli.main import MAX_ERROR_CHARS, app, main

ALIAS_BOMB = """\
scenario_options:
  reward_options:
    x0: &a ["xxxxxxxxxx"]
    x1: &b1 [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    x2: &b2 [*b1, *b1, *b1, *b1, *b1, *b1, *b1, *b1, *b1]
    x3: &b3 [*b2, *b2, *b2, *b2, *b2, *b2, *b2, *b2, *b2]
  reward: [*b3, *b3, *b3, *b3, *b3, *b3, *b3, *b3, *b3]
"""
BIG_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"b{i}: &b{i} [{', '.join(['*' + ('a' if i == 1 else f'b{i - 1}')] * 10)}]\n" for i in range(1, 7)
)


def files(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("iterations: 2 # caf\xe9\n".encode("latin-1"))
    (tmp_path / "inf_alpha.yaml").write_text("text_adapter: lora\nlora_alpha: .inf\n")
    (tmp_path / "nan_option.yaml").write_text("scenario_options: {shift: .nan}\n")
    (tmp_path / "inf.json").write_text('{"lr_image": Infinity}')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    (tmp_path / "big_bomb.yaml").write_text(BIG_BOMB)
    broken = tmp_path / "broken-run"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    listed = tmp_path / "list-run"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]")


HUGE = "99999999999999999999999"
CASES = [
    # the probe's nine
    (["run", "scenario", "t2i_reason", "--config", "{tmp}/latin1.yaml"], "is not UTF-8 text"),
    (["run", "scenario", "t2i_reason", "--seed", HUGE], "--seed"),
    (["eval", "scenario", "t2i_reason", "--seed", HUGE], "--seed"),
    (["run", "scenario", "t2i_reason", "--eval-cfg", "inf"], "--eval-cfg': expected a finite number"),
    (["run", "scenario", "t2i_reason", "--config", "{tmp}/inf_alpha.yaml"], "lora_alpha is inf"),
    (["run", "scenario", "t2i_reason", "--resume", "--out", "{tmp}/broken-run"], "is not JSON"),
    (["eval", "scenario", "t2i_reason", "--split", "nope"], "unknown split 'nope'"),
    (["eval", "scenario", "t2i_reason", "--image-size", "64"], "draws 32-pixel images only"),
    (["run", "scenario", "t2i_reason", "--config", "{tmp}/canvas64.yaml"], "draws 3×32×32 latents"),
    (["serve", "reward", "jpeg_compressibility", "--max-body-mb", "inf"], "--max-body-mb': expected a finite"),
    # non-finite numbers everywhere a number is read
    (["eval", "scenario", "t2i_reason", "--temperature", "inf"], "--temperature': expected a finite number"),
    (["eval", "scenario", "t2i_reason", "--eval-cfg", "nan"], "--eval-cfg"),
    (["run", "scenario", "t2i_reason", "--rollout-cfg", "inf"], "--rollout-cfg': expected a finite number"),
    (["run", "scenario", "t2i_reason", "--config", "{tmp}/nan_option.yaml"], "shift is nan"),
    (["run", "scenario", "t2i_reason", "--config", "{tmp}/inf.json"], "Infinity is not a JSON number"),
    (["run", "scenario", "t2i_reason", "--seed", "-1"], "--seed"),
    # bounded input: depth, alias bombs, a run folder's config that is JSON but no mapping
    (["run", "scenario", "t2i_reason", "--config", "{tmp}/deep.json"], "nests deeper than"),
    (["run", "scenario", "t2i_reason", "--config", "{tmp}/bomb.yaml"], "reward must be a reward name"),
    (["run", "scenario", "t2i_reason", "--config", "{tmp}/big_bomb.yaml"], "more than 100000 values"),
    (["run", "scenario", "t2i_reason", "--resume", "--out", "{tmp}/list-run"], "not a JSON object"),
    (["run", "scenario", "t2i_reason", "--config", "{tmp}/split.yaml"], "unknown split 'nope'"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(a[3:] or a) for a, _ in CASES])
def test_bad_input_is_one_short_line_exit_2_and_writes_nothing(args, message, tmp_path, capsys):
    files(tmp_path)
    (tmp_path / "split.yaml").write_text("eval_split: nope\n")
    (tmp_path / "canvas64.yaml").write_text("scenario_options: {image_size: 64}\n")  # the world's, not the model's
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] == "run" and "--out" not in args:
        args += ["--out", str(tmp_path / "run"), "--iterations", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert exit_info.value.code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("unigrpo: error:") and message in lines[0], lines
    assert len(lines[0]) <= len("unigrpo: error: ") + MAX_ERROR_CHARS + 40
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "run").exists()  # refused before the run folder is written
    if "--resume" in args:  # the broken folders are left as they were
        assert sorted(p.name for p in (tmp_path / args[args.index("--out") + 1]).iterdir()) == ["config.json"]


def test_a_long_error_is_cut_saying_by_how_much(tmp_path, capsys):
    files(tmp_path)
    with pytest.raises(SystemExit):
        main(["run", "scenario", "t2i_reason", "--config", str(tmp_path / "bomb.yaml"), "--out", str(tmp_path / "r")])
    line = capsys.readouterr().err.strip()
    assert line.endswith("more characters)") and len(line) < MAX_ERROR_CHARS + 80  # was 7.2 MB in one line


#: What each command needs before a flag (a command with a float flag missing here fails the test).
PREFIXES = {
    ("run",): ["run", "scenario", "t2i_reason", "--out", "{tmp}/run"],
    ("eval",): ["eval", "scenario", "t2i_reason"],
    ("serve", "reward"): ["serve", "reward", "jpeg_compressibility"],
}


def _float_flags() -> list[tuple[tuple[str, ...], str]]:
    """(command path, flag) of every float option of the command, found by walking it."""
    found, stack = [], [(typer.main.get_command(app), ())]
    while stack:
        command, path = stack.pop()
        stack += [(sub, (*path, name)) for name, sub in getattr(command, "commands", {}).items()]
        found += [(path, p.opts[0]) for p in command.params if p.type_descriptor.annotation is float]
    return sorted(found)


def test_every_float_flag_refuses_non_finite_numbers(tmp_path, capsys):
    flags = _float_flags()
    assert {flag for _, flag in flags} >= {"--eval-cfg", "--rollout-cfg", "--temperature", "--max-body-mb"}
    for path, flag in flags:
        for text in ("inf", "-inf", "nan"):
            args = [a.replace("{tmp}", str(tmp_path)) for a in PREFIXES[path]] + [flag, text]
            with pytest.raises(SystemExit) as exit_info:
                main(args)
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and err.startswith(f"unigrpo: error: Invalid value for '{flag}'"), err
    assert not (tmp_path / "run").exists()


def test_the_config_refuses_non_finite_numbers_and_seeds_out_of_range():
    from pydantic import ValidationError

    from unigrpo_env.agents.config import MAX_SEED, UniGRPOConfig

    for field in ("lora_alpha", "lr_image", "noise_level", "clip_range_image", "reward_timeout"):
        for value in (math.inf, math.nan):
            with pytest.raises(ValidationError, match="finite"):
                UniGRPOConfig(**{field: value})
    for seed in (-1, MAX_SEED + 1, 10**30):
        with pytest.raises(ValidationError, match="seed"):
            UniGRPOConfig(seed=seed)
    assert UniGRPOConfig(seed=MAX_SEED).seed == MAX_SEED
    with pytest.raises(ValidationError, match=r"options at reward_options\.w\[1\] is inf"):
        UniGRPOConfig(scenario_options={"reward_options": {"w": [1.0, math.inf]}})
    config = UniGRPOConfig()
    with pytest.raises(ValidationError, match="finite"):  # assignment is validated too
        config.policy_options = {"guidance_scale": math.nan}


def test_make_scenario_refuses_non_finite_options():
    import unigrpo_env

    with pytest.raises(ValueError, match="scenario 't2i_reason''s options at shift is inf"):
        unigrpo_env.make_scenario("t2i_reason", shift=math.inf)
    assert json.loads(json.dumps({"ok": unigrpo_env.make_scenario("t2i_reason", shift=2.0).shift})) == {"ok": 2.0}


def test_the_serve_command_does_not_import_the_main_one():
    # cli/main.py adds cli/serve.py's commands; serve used to import main's UserError and console
    # back (a cycle): both now take them from cli/usage.py
    import ast
    from pathlib import Path

    import unigrpo_env.cli.serve as serve

    tree = ast.parse(Path(serve.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "unigrpo_env.cli.usage" in imported and "unigrpo_env.cli.main" not in imported
