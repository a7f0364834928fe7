"""The ``unigrpo`` command (Typer).

Commands so far: ``unigrpo list scenarios|rewards``. Bad arguments print one line and exit with
code 2.
"""

from __future__ import annotations

from enum import Enum

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="unigrpo",
    help="Gymnasium environments and UniGRPO for RL of interleaved text-and-image generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _root() -> None:
    """Gymnasium environments and UniGRPO for RL of interleaved text-and-image generation."""


class Listable(str, Enum):
    scenarios = "scenarios"
    rewards = "rewards"


@app.command("list")
def list_(what: Listable = typer.Argument(..., help="What to list: scenarios or rewards.")) -> None:
    """List the registered scenarios or rewards."""
    from unigrpo_env.registration import GYM_IDS, REWARDS, SCENARIOS

    registry = SCENARIOS if what is Listable.scenarios else REWARDS
    gym_ids = {name: env_id for env_id, name in GYM_IDS.items()}
    table = Table(title=f"registered {what.value}")
    table.add_column("name")
    if what is Listable.scenarios:
        table.add_column("gymnasium id")
    table.add_column("status")
    for name in registry.names():
        try:
            registry.get(name)
            status = "ok"
        except Exception as exc:  # noqa: BLE001 - a broken entry is listed with its error
            status = f"[red]error: {exc}[/red]"
        row = [name, gym_ids.get(name, "")] if what is Listable.scenarios else [name]
        table.add_row(*row, status)
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; usage errors print one line (``unigrpo: error: ...``) and exit with code 2."""
    try:
        code = app(args=argv, standalone_mode=False)
    except _ABORT_TYPES:
        raise SystemExit(130)
    except _USAGE_ERROR_TYPES as exc:  # bad command, option or value
        message = " ".join(exc.format_message().split())
        typer.echo(f"unigrpo: error: {message}", err=True)
        raise SystemExit(2)
    raise SystemExit(code if isinstance(code, int) else 0)


def _exception_types(name: str) -> tuple[type[BaseException], ...]:
    """Click's exception ``name`` from the click Typer runs on (Typer may vendor its own copy)."""
    found = {c for c in typer.BadParameter.__mro__ if c.__name__ == name}
    try:
        import click

        found.add(getattr(click.exceptions, name))
    except ImportError:
        pass
    if not found:  # Abort is not in BadParameter's ancestry: look beside it
        module = __import__(typer.BadParameter.__module__, fromlist=[name])
        found.add(getattr(module, name))
    return tuple(found)


_USAGE_ERROR_TYPES = _exception_types("ClickException")
_ABORT_TYPES = _exception_types("Abort")


if __name__ == "__main__":
    main()
