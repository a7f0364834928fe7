"""``unigrpo serve reward NAME``: serve a reward over HTTP (:mod:`unigrpo_env.rewards.server`).

    unigrpo serve reward NAME [--host 127.0.0.1] [--port 8000] [--token-file F] [--max-batch N] [--max-body-mb M]

``NAME`` is any registered reward or weighted-sum spec, built once; trainers elsewhere use it as
``--reward remote:http://HOST:PORT``. Needs the ``serve`` extra (``pip install 'unigrpo-env[serve]'``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from unigrpo_env.cli.usage import UserError, console, finite

__all__ = ["serve_app"]

serve_app = typer.Typer(name="serve", help="Serve a reward over HTTP.", no_args_is_help=True)


@serve_app.command("reward")
def reward(
    name: str = typer.Argument(
        ..., help="The reward to serve: a registered name or a weighted sum such as 'clip_score:1.0,quality:0.2'."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0: any free one)."),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        dir_okay=False,
        help="A file holding a token every request must carry as 'Authorization: Bearer <token>'.",
    ),
    max_batch: int = typer.Option(
        256,
        "--max-batch",
        min=1,
        help="The largest batch scored at once (larger: 413; remote:URL clients split to fit).",
    ),
    max_body_mb: float = typer.Option(
        256.0,
        "--max-body-mb",
        min=0.001,
        callback=finite,
        help="The largest request body in MB of 10^6 bytes (larger: 413).",
    ),
) -> None:
    """Serve a reward over HTTP: POST /score scores a batch, GET /health describes the service."""
    from unigrpo_env.rewards.extras import MissingExtraError

    try:
        from unigrpo_env.rewards.server import create_app, listen, reward_device, serve
    except MissingExtraError as exc:
        raise UserError(str(exc)) from exc
    from unigrpo_env.rewards import RewardSpecError, get_reward
    from unigrpo_env.rewards.auth import read_token_file

    try:
        token = None if token_file is None else read_token_file(token_file)
    except ValueError as exc:
        raise UserError(f"--token-file: {exc}") from exc
    try:
        scorer = get_reward(name)
    except (RewardSpecError, ValueError, TypeError) as exc:  # an unknown name is a RegistryError: one line too
        raise UserError(f"reward {name!r}: {exc}") from exc
    app = create_app(scorer, name=name, token=token, max_batch=max_batch, max_body_bytes=int(max_body_mb * 1e6))
    try:
        sock = listen(host, port)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    bound = sock.getsockname()[1]
    auth = "token required" if token else "no token: trusts its network"
    console.print(
        f"serving reward [bold]{name}[/bold] on {reward_device(scorer)} at http://{host}:{bound} "
        f"(POST /score, GET /health; max batch {max_batch}; {auth})",
        soft_wrap=True,
    )
    serve(app, sock)
