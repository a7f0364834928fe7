"""The reward service: one reward, built once, scoring batches sent over HTTP.

So a large judge can run on its own GPU or machine while training runs elsewhere:
``unigrpo serve reward NAME`` on the judge's machine, ``--reward remote:http://HOST:PORT`` (or
:class:`~unigrpo_env.rewards.remote.RemoteReward`) on the trainer's. The wire format is
:mod:`.wire` (``unigrpo-reward/1``: safetensors in, JSON out, never pickle).

Endpoints:

* ``POST /score`` — a request body as :mod:`.wire` describes; answers ``200`` with the scores.
  A scorer that raises on the batch answers ``200`` with all-NaN scores and ``"error"``, so the
  trainer's NaN handling applies. Otherwise, with ``{"detail": "one line"}``:
  ``401`` a missing or wrong token; ``413`` a body over ``max_body_bytes`` (refused from its
  ``Content-Length`` before reading, and cut off while reading if it has none or lies) or a batch
  over ``max_batch``; ``422`` a body that is not ``unigrpo-reward/1`` (not safetensors, missing
  tensors, wrong dtypes or shapes, bad JSON, tasks that do not validate); ``500`` a failure of
  the server itself (one line, never a traceback).
* ``GET /health`` — ``{"status": "ok", "schema", "reward", "device", "max_batch",
  "max_body_bytes", "version", "dropped_requests"}``: the reward's name, the device of its model
  (its ``device`` attribute, or its ``model``'s, else ``"cpu"``; a weighted sum lists its terms'
  devices), the limits, this package's version, and how many requests were dropped because their
  client disconnected before sending the whole body (each such request is one ``INFO`` line in
  the log, never a traceback). :class:`~unigrpo_env.rewards.remote.RemoteReward` reads
  ``max_batch`` from it once and splits larger batches into requests of at most that many
  episodes.

Authentication: with a token, every ``/score`` needs ``Authorization: Bearer <token>`` (compared
in constant time). ``/health`` without a token answers only ``{"status": "ok", "schema",
"auth": "required"}`` — enough for a liveness probe, nothing about the reward, its device or
limits; with the right token it answers in full, with a wrong one ``401``. Without a token the
service trusts its network: bind it to ``127.0.0.1`` (the default) or a private network.
Clients send the token from ``token=``, ``token_file=`` or the environment variable
``UNIGRPO_REWARD_TOKEN`` (:class:`~unigrpo_env.rewards.remote.RemoteReward`).

Scoring: one batch at a time. The reward runs in a worker thread (the event loop keeps
accepting and reading requests) under a lock, since GPU models are not re-entrant; concurrent
requests queue, each answered with its own batch's scores. A request's JSON (the safetensors
header and the metadata, at most :data:`~unigrpo_env.rewards.wire.MAX_METADATA_CHARS`
characters, read within :mod:`unigrpo_env.bounded_json`'s bounds: a 100,000-deep value or a
5,000-digit integer is a ``422``) is parsed in a worker thread too, so a large one does not hold
up ``/health`` or other requests' reading.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from unigrpo_env.rewards.extras import import_serve_dependency

import_serve_dependency("fastapi")
import_serve_dependency("uvicorn")

import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.requests import ClientDisconnect  # noqa: E402

from unigrpo_env import __version__  # noqa: E402
from unigrpo_env.reward import RewardFunction, RewardInputs  # noqa: E402
from unigrpo_env.rewards.auth import bearer_matches  # noqa: E402
from unigrpo_env.rewards.wire import (  # noqa: E402
    SCHEMA,
    WireFormatError,
    decode_request,
    encode_response,
    read_request_header,
)

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_MAX_BODY_BYTES", "create_app", "reward_device", "listen", "serve"]

DEFAULT_MAX_BATCH = 256
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024

logger = logging.getLogger(__name__)


def reward_device(reward: Any) -> str:
    """The device of a reward's model: its ``device`` attribute, its ``model``'s, the distinct
    devices of a weighted sum's terms (comma-separated), else ``"cpu"``."""
    for holder in (reward, getattr(reward, "model", None)):
        device = getattr(holder, "device", None)
        if device is not None:
            return str(device)
    terms = getattr(reward, "terms", None)
    if isinstance(terms, list) and terms and all(isinstance(t, tuple) and len(t) == 3 for t in terms):
        return ",".join(sorted({reward_device(term) for _, term, _ in terms}))
    return "cpu"


def create_app(
    reward: RewardFunction,
    *,
    name: str,
    token: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The ASGI app serving ``reward`` (see the module docstring for the endpoints)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if token is not None and not token:
        raise ValueError("the token must not be empty")
    app = FastAPI(title="unigrpo reward service", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()
    details = {
        "status": "ok",
        "schema": SCHEMA,
        "reward": name,
        "device": reward_device(reward),
        "max_batch": max_batch,
        "max_body_bytes": max_body_bytes,
        "version": __version__,
    }
    counts = {"dropped_requests": 0}  # requests whose client disconnected before sending the whole body

    def authorised(request: Request) -> bool | None:
        """True: the right token (or none needed); False: a wrong one; None: none given."""
        if token is None:
            return True
        given = request.headers.get("authorization")
        if given is None:
            return None
        return bearer_matches(given, token)

    def score(inputs: RewardInputs) -> dict[str, Any]:
        n = len(inputs)
        with lock:
            try:
                output = reward(inputs)
            except Exception as exc:  # noqa: BLE001 - the batch scores NaN, the error goes back
                message = _one_line(exc)
                logger.warning("reward %s failed on a batch of %d: %s", name, n, message)
                return encode_response(None, n, error=message)
        try:
            return encode_response(output, n)
        except (WireFormatError, TypeError, ValueError, RuntimeError) as exc:  # a malformed RewardOutput
            message = _one_line(exc)
            logger.warning("reward %s returned a malformed output: %s", name, message)
            return encode_response(None, n, error=message)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        allowed = authorised(request)
        if allowed is False:
            return _error(401, "wrong token", auth=True)
        if allowed is None:
            return JSONResponse({"status": "ok", "schema": SCHEMA, "auth": "required"})
        return JSONResponse({**details, **counts})

    @app.post("/score")
    async def score_batch(request: Request) -> JSONResponse:
        if not authorised(request):
            return _error(401, "missing or wrong token (send 'Authorization: Bearer <token>')", auth=True)
        try:
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
                return _error(413, f"the body of {int(declared)} bytes exceeds the limit of {max_body_bytes} bytes")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    return _error(413, f"the body exceeds the limit of {max_body_bytes} bytes")
            body = bytes(body)
            try:  # the header's JSON is parsed in a worker thread: the loop keeps answering /health
                header = await run_in_threadpool(read_request_header, body)
                if header.size > max_batch:
                    return _error(413, f"a batch of {header.size} episodes exceeds the limit of {max_batch}")
                inputs = await run_in_threadpool(decode_request, body, header)
            except WireFormatError as exc:
                return _error(422, str(exc))
            return JSONResponse(await run_in_threadpool(score, inputs))
        except ClientDisconnect:  # the client went away mid-body: nothing to answer, one line in the log
            counts["dropped_requests"] += 1
            logger.info(
                "a client disconnected before sending its whole request (%d so far)", counts["dropped_requests"]
            )
            return _error(400, "the client disconnected")
        except Exception as exc:  # noqa: BLE001 - one line to the client, the traceback to the log
            logger.exception("the reward service failed on a request")
            return _error(500, f"internal error: {_one_line(exc)}")

    return app


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: any free one), reusable at once after a restart;
    ``OSError`` if it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that name
    # it; without, every response waits ~40 ms for the client's delayed acknowledgement
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve ``app`` on the bound socket ``sock`` until interrupted (SIGINT or SIGTERM)."""
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


def _error(status: int, message: str, *, auth: bool = False) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if auth else None
    return JSONResponse({"detail": " ".join(message.split())}, status_code=status, headers=headers)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())
