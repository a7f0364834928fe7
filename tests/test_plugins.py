"""Plugins: entry-point discovery (lazy and isolated), ``module:Name`` references, a broken plugin
listed with its error by ``unigrpo list``, ``unigrpo init scenario``, and a generated plugin
installed with pip into a fresh virtual environment, listed, tested and trained there.

Fake installed distributions are ``*.dist-info`` folders with an ``entry_points.txt`` in a
temporary folder on ``sys.path`` — what ``importlib.metadata`` reads for a real installation."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MeanColourReward, ToyScenario

import unigrpo_env
from unigrpo_env.registration import REWARDS, SCENARIOS, Registry, RegistryError
from unigrpo_env.rewards import WeightedSum, get_reward
from unigrpo_env.scenarios.shapes.t2i_reason import T2IReasonScenario

FAKE_OK = """
from unigrpo_env.scenarios.shapes.rewards import ImageQualityReward
from unigrpo_env.scenarios import register_scenario
from unigrpo_env.scenarios.shapes.t2i_reason import T2IReasonScenario


@register_scenario("fake_ok")  # registers itself on import, as well as through its entry point
class FakeScenario(T2IReasonScenario):
    name = "fake_ok"


class FakeReward(ImageQualityReward):
    pass
"""

FAKE_BROKEN = 'raise RuntimeError("boom, this plugin cannot be imported")\n'
FAKE_EXITING = 'import sys\nsys.exit("this plugin exits on import")\n'

FAKE_DISTS = {
    "fake_ok_plugin": {
        "unigrpo.scenarios": {"fake_ok": "fake_ok_plugin:FakeScenario"},
        "unigrpo.rewards": {"fake_quality": "fake_ok_plugin:FakeReward"},
    },
    "fake_broken_plugin": {
        "unigrpo.scenarios": {"fake_broken": "fake_broken_plugin:Scenario"},
        "unigrpo.rewards": {"fake_broken_reward": "fake_broken_plugin:Reward"},
    },
    "fake_clash_plugin": {"unigrpo.scenarios": {"t2i_reason": "fake_ok_plugin:FakeScenario"}},
    "fake_exiting_plugin": {"unigrpo.rewards": {"fake_exiting_reward": "fake_exiting_plugin:Reward"}},
}


def write_fake_dists(root: Path) -> Path:
    """Install the fake distributions into ``root`` (a folder to put on sys.path)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "fake_ok_plugin.py").write_text(FAKE_OK)
    (root / "fake_broken_plugin.py").write_text(FAKE_BROKEN)
    (root / "fake_exiting_plugin.py").write_text(FAKE_EXITING)
    for module, groups in FAKE_DISTS.items():
        dist = module.replace("_", "-")
        info = root / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(
            "".join(
                f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items()) + "\n"
                for group, points in groups.items()
            )
        )
    return root


def _state(registry: Registry) -> tuple:
    return dict(registry._entries), dict(registry._origins), list(registry._problems), registry._discovered


def _restore(registry: Registry, state: tuple) -> None:
    registry._entries, registry._origins, registry._problems, registry._discovered = (
        dict(state[0]),
        dict(state[1]),
        list(state[2]),
        state[3],
    )


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """The fake distributions on sys.path, the global registries rediscovered; all undone after."""
    root = write_fake_dists(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    saved = {registry: _state(registry) for registry in (SCENARIOS, REWARDS)}
    SCENARIOS.discover(refresh=True)
    REWARDS.discover(refresh=True)
    yield root
    for registry, state in saved.items():
        _restore(registry, state)
    for module in ("fake_ok_plugin", "fake_broken_plugin", "fake_exiting_plugin"):
        sys.modules.pop(module, None)


def test_entry_points_are_listed_without_importing_them(fake_plugins):
    registry = Registry("scenario", entry_point_group="unigrpo.scenarios")
    assert {"fake_ok", "fake_broken"} <= set(registry.names())
    assert "fake_ok_plugin" not in sys.modules and "fake_broken_plugin" not in sys.modules  # lazy
    assert registry.origin("fake_ok") == "plugin fake-ok-plugin 0.1"
    assert registry.get("fake_ok").__name__ == "FakeScenario"  # imported now; its own decorator ran without a clash
    assert "fake_ok_plugin" in sys.modules
    with pytest.raises(RegistryError, match="could not load scenario 'fake_broken'.*RuntimeError: boom"):
        registry.get("fake_broken")
    assert "fake_broken" in registry.names()  # still listed, with its error, for `unigrpo list`


def test_a_broken_plugin_breaks_nothing_else(fake_plugins):
    env = unigrpo_env.make("fake_ok", split="heldout")
    assert isinstance(env.unwrapped.scenario, T2IReasonScenario) and env.unwrapped.scenario.name == "fake_ok"
    assert type(get_reward("fake_quality")).__name__ == "FakeReward"
    for _ in range(2):  # a failed import is not remembered as a success
        with pytest.raises(RegistryError, match="boom"):
            unigrpo_env.make_scenario("fake_broken")
    with pytest.raises(RegistryError, match="boom"):
        get_reward("quality:1.0,fake_broken_reward:0.5")
    with pytest.raises(RegistryError, match="SystemExit: this plugin exits on import"):
        get_reward("fake_exiting_reward")
    assert unigrpo_env.make("t2i_reason").unwrapped.scenario.name == "t2i_reason"
    assert isinstance(get_reward("quality:1.0,fake_quality:0.5"), WeightedSum)


def test_an_entry_point_cannot_take_a_registered_name(fake_plugins):
    assert SCENARIOS.origin("t2i_reason") == "built-in"
    assert SCENARIOS.get("t2i_reason") is T2IReasonScenario
    assert any("fake-clash-plugin" in p and "'t2i_reason'" in p for p in SCENARIOS.problems())


def test_registration_rules():
    registry = Registry("scenario")
    registry.register("toy", "conftest:ToyScenario")
    registry.register("toy", ToyScenario)  # the lazy entry's own module registering itself
    assert registry.get("toy") is ToyScenario
    registry.register("other", "fake_ok_plugin:FakeScenario")
    with pytest.raises(RegistryError, match="already registered"):
        registry.register("other", ToyScenario)  # a different module may not take the name
    with pytest.raises(ValueError, match="module:attribute"):
        registry.register("bad", "not a target")


def test_module_name_references_work_wherever_a_name_does():
    env = unigrpo_env.make("conftest:ToyScenario", num_turns=1)
    assert isinstance(env.unwrapped.scenario, ToyScenario)
    envs = unigrpo_env.make_vec("conftest:ToyScenario", num_prompts=1, group_size=2)
    assert envs.num_envs == 2
    assert isinstance(get_reward("conftest:MeanColourReward"), MeanColourReward)
    composite = get_reward("conftest:MeanColourReward:0.5,quality")
    assert composite.weights == {"conftest:MeanColourReward": 0.5, "quality": 1.0}
    with pytest.raises(RegistryError, match="AttributeError"):
        unigrpo_env.make_scenario("conftest:NoSuchScenario")
    with pytest.raises(RegistryError, match="must be a class or function"):
        get_reward("conftest:TOY_WORDS")
    assert "conftest:ToyScenario" not in SCENARIOS.names()  # used, not registered


def run_cli(*args, cwd=None, extra_path=None, python=sys.executable, timeout=300):
    env = {**os.environ, "COLUMNS": "300", "OMP_NUM_THREADS": "1"}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [str(python), "-m", "unigrpo_env.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def row(stdout: str, name: str) -> str:
    rows = [line for line in stdout.splitlines() if line.strip("│ ").startswith(name + " ")]
    assert len(rows) == 1, stdout
    return rows[0]


def test_unigrpo_list_shows_a_broken_plugin_with_its_error(tmp_path):
    root = write_fake_dists(tmp_path / "site")
    done = run_cli("list", "scenarios", extra_path=root)
    assert done.returncode == 0, done.stderr
    assert "error" in row(done.stdout, "fake_broken") and "RuntimeError: boom, this plugin cannot be imported" in row(
        done.stdout, "fake_broken"
    )
    assert row(done.stdout, "fake_ok").rstrip(" │").endswith("ok") and "plugin fake-ok-plugin 0.1" in row(
        done.stdout, "fake_ok"
    )
    assert row(done.stdout, "t2i_reason").rstrip(" │").endswith("ok") and "built-in" in row(done.stdout, "t2i_reason")
    assert "warning:" in done.stdout and "fake-clash-plugin" in done.stdout
    rewards = run_cli("list", "rewards", extra_path=root)
    assert rewards.returncode == 0 and "boom" in row(rewards.stdout, "fake_broken_reward")
    assert "SystemExit" in row(rewards.stdout, "fake_exiting_reward")
    assert row(rewards.stdout, "fake_quality").rstrip(" │").endswith("ok") and row(
        rewards.stdout, "shapes_verifier"
    ).rstrip(" │").endswith("ok")
    used = run_cli("run", "scenario", "fake_broken", "--iterations", "1", extra_path=root)
    lines = used.stderr.strip().splitlines()
    assert used.returncode == 2 and len(lines) == 1 and lines[0].startswith("unigrpo: error:") and "boom" in lines[0]


def cli_exit(args, capsys) -> tuple[int, str, str]:
    from unigrpo_env.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.mark.parametrize("name", ["My-Edit", "1edit", "class", "edit_", "x" * 41, "t2i_reason"])
def test_init_refuses_bad_or_taken_names(name, tmp_path, capsys):
    code, _, err = cli_exit(["init", "scenario", name, "--dir", str(tmp_path / "p")], capsys)
    assert code == 2 and err.startswith("unigrpo: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_init_writes_the_package_and_refuses_a_non_empty_folder(tmp_path, capsys):
    tomllib = pytest.importorskip("tomllib")
    target = tmp_path / "pkg"
    target.mkdir()  # an empty folder is fine
    code, out, _ = cli_exit(["init", "scenario", "my_edit", "--dir", str(target)], capsys)
    assert code == 0 and "pip install -e" in out
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["README.md", "pyproject.toml", "src/unigrpo_my_edit/__init__.py", "tests/test_my_edit.py"]
    project = tomllib.loads((target / "pyproject.toml").read_text())
    assert project["project"]["name"] == "unigrpo-my-edit"
    assert project["project"]["entry-points"] == {
        "unigrpo.scenarios": {"my_edit": "unigrpo_my_edit:MyEditScenario"},
        "unigrpo.rewards": {"my_edit_reward": "unigrpo_my_edit:MyEditReward"},
    }
    for path in target.rglob("*.py"):
        compile(path.read_text(), str(path), "exec")
    code, _, err = cli_exit(["init", "scenario", "other", "--dir", str(target)], capsys)
    assert code == 2 and "not an empty folder" in err


def test_a_generated_plugin_installs_into_a_fresh_venv_lists_passes_its_tests_and_trains(tmp_path, capsys):
    """`unigrpo init scenario my_edit`, pip-installed into a new virtual environment that sees
    this interpreter's packages through a .pth file (no downloads: --no-index, --no-deps)."""
    plugin = tmp_path / "unigrpo-my-edit"
    code, _, _ = cli_exit(["init", "scenario", "my_edit", "--dir", str(plugin)], capsys)
    assert code == 0
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / ("python.exe" if os.name == "nt" else "python")
    purelib = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    parents = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if Path(p).is_dir()]
    (purelib / "_parent_site_packages.pth").write_text(f"import site; list(map(site.addsitedir, {parents!r}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="300", PIP_DISABLE_PIP_VERSION_CHECK="1")

    def run(*args, cwd=tmp_path):
        return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=240)

    installed = run("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(plugin))
    assert installed.returncode == 0, installed.stderr
    assert list(purelib.glob("unigrpo_my_edit-0.1.0.dist-info"))  # into the new environment, not this one
    assert "my_edit" not in SCENARIOS.names()

    listed = run("-m", "unigrpo_env.cli.main", "list", "scenarios")
    assert listed.returncode == 0, listed.stderr
    assert "plugin unigrpo-my-edit 0.1.0" in row(listed.stdout, "my_edit") and row(listed.stdout, "my_edit").rstrip(
        " │"
    ).endswith("ok")

    tested = run("-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=plugin)
    assert tested.returncode == 0 and "5 passed" in tested.stdout, tested.stdout + tested.stderr

    out = tmp_path / "run"
    trained = run("-m", "unigrpo_env.cli.main", "run", "scenario", "my_edit", "--iterations", "2", "--out", str(out))
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"] == "my_edit" and summary["iterations"] == 2
    assert set(summary["per_category"]) == {"colors", "color_attr", "overall"}  # the plugin's own tasks
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all({"reward/correct", "reward/fraction", "reward/quality"} <= set(m) for m in metrics)
