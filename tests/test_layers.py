"""The layers and the package: dependencies point one way (cli -> agents -> core, cli ->
scenarios -> rewards -> core; agents imports neither scenarios nor rewards; ShapesWorld a scenario
package on top of agents and rewards that nothing below imports), nothing outside the
core reads the episode engine's private state, and the wheel's package list cannot drop a folder."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]


def _package_of(path: Path) -> str:
    """The dotted package a source file is installed in (by the package-dir mapping)."""
    best = max((d for d in PACKAGE_DIRS.values() if path.parent.relative_to(ROOT).as_posix().startswith(d)), key=len)
    name = next(k for k, v in PACKAGE_DIRS.items() if v == best)
    rest = path.parent.relative_to(ROOT / best).parts
    return ".".join((name, *rest))


def _sources() -> list[Path]:
    return sorted({p for d in PACKAGE_DIRS.values() for p in (ROOT / d).rglob("*.py")})


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions, relative imports resolved."""
    package = _package_of(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def _layer(path: Path) -> str:
    package = _package_of(path)
    for layer in (
        "unigrpo_env.scenarios.shapes",
        "unigrpo_env.agents",
        "unigrpo_env.rewards",
        "unigrpo_env.scenarios",
        "unigrpo_env.cli",
    ):
        if package == layer or package.startswith(layer + "."):
            return layer
    return "unigrpo_env"


#: What each layer must not import (ShapesWorld, a package on top, may import agents and rewards).
FORBIDDEN = {
    "unigrpo_env": ("unigrpo_env.agents", "unigrpo_env.cli", "unigrpo_env.scenarios", "unigrpo_env.rewards"),
    "unigrpo_env.rewards": ("unigrpo_env.agents", "unigrpo_env.cli", "unigrpo_env.scenarios"),
    "unigrpo_env.scenarios": ("unigrpo_env.agents", "unigrpo_env.cli", "unigrpo_env.scenarios.shapes"),
    # the agent takes a Scenario and a RewardFunction (the core's protocols), never a scenario's or reward's module
    "unigrpo_env.agents": ("unigrpo_env.cli", "unigrpo_env.scenarios", "unigrpo_env.rewards"),
    "unigrpo_env.scenarios.shapes": ("unigrpo_env.cli",),
    "unigrpo_env.cli": ("unigrpo_env.scenarios.shapes",),
}


@pytest.mark.parametrize("path", _sources(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_point_one_way(path):
    forbidden = FORBIDDEN[_layer(path)]
    wrong = sorted(m for m in _imports(path) if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert not wrong, f"{path.relative_to(ROOT)} ({_layer(path)}) imports {wrong}"


def test_the_checker_sees_imports():
    """The checker itself: it finds a forbidden import in the core, a relative one included."""
    core = ROOT / "unigrpo_env" / "env.py"
    assert "unigrpo_env.episodes.EpisodeBatch" in _imports(core) and _layer(core) == "unigrpo_env"
    shapes = ROOT / "scenarios" / "shapes" / "rewards.py"
    assert _layer(shapes) == "unigrpo_env.scenarios.shapes" and _package_of(shapes) == "unigrpo_env.scenarios.shapes"


def _lines_matching(pattern: re.Pattern[str], folders: tuple[str, ...]) -> list[str]:
    """``path:line`` of every line of the Python files under ``folders`` (this file excepted) that
    ``pattern`` matches."""
    found = []
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            if path != Path(__file__):
                lines = path.read_text().splitlines()
                found += [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(lines, 1) if pattern.search(line)]
    return found


def test_nothing_outside_the_core_reads_the_episode_engine():
    private = re.compile(r"\.episodes\.records|_TurnRecord|\._engine\b|\bepisodes\.(tasks|reward|records|times)\b")
    found = _lines_matching(private, ("agents", "rewards", "scenarios", "cli", "tests", "examples", "benchmarks"))
    # the white-box fuzzer compares the engine's private state (RNG, open texts) before and after
    # every rejected action: reading it is its purpose
    found = [line for line in found if not line.startswith("benchmarks/fuzz_actions.py:")]
    assert not found, found


def test_nothing_outside_scenarios_imports_shapesworld():
    pattern = re.compile(
        r"(import|from)\s+unigrpo_env\.scenarios\.shapes|scenarios\.shapes\s+import|import\s+unigrpo_env\.scenarios\.shapes"
    )
    found = _lines_matching(pattern, ("unigrpo_env", "agents", "rewards", "cli"))
    assert not found, found


def test_every_package_folder_is_in_the_wheel():
    """A folder of Python files under a mapped directory is a package the wheel must list (and
    must have an ``__init__.py``, or setuptools would leave it out)."""
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    expected = set()
    for name, folder in PACKAGE_DIRS.items():
        for sub in [ROOT / folder, *(p for p in (ROOT / folder).rglob("*") if p.is_dir())]:
            if "__pycache__" in sub.parts or not any(sub.glob("*.py")):
                continue
            assert (sub / "__init__.py").is_file(), f"{sub.relative_to(ROOT)} has Python files but no __init__.py"
            expected.add(".".join((name, *sub.relative_to(ROOT / folder).parts)))
    assert expected == listed, f"pyproject's packages {sorted(listed)} differ from the folders {sorted(expected)}"
    assert (ROOT / "unigrpo_env" / "py.typed").is_file()


def test_the_algorithm_names_no_engine():
    """agents/unigrpo.py reads as the algorithm: every DDP/FSDP/DeepSpeed specific is the engine's
    (agents/engine.py)."""
    source = (ROOT / "agents" / "unigrpo.py").read_text()
    found = sorted(
        set(re.findall(r"(?i)fsdp|deepspeed|zero_stage|zero-?[123]\b|\bZeRO\b|DistributedType|ds_id", source))
    )
    assert not found, f"agents/unigrpo.py names an engine: {found}"
    assert "class TrainingForward" not in source and "Accelerator(" not in source
