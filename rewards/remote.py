"""The reward service's client: :class:`RemoteReward`, a reward that scores on a server.

``--reward remote:http://HOST:PORT`` (or ``get_reward("remote:http://HOST:PORT",
token_file=...)``) builds one; the server is ``unigrpo serve reward NAME`` (:mod:`.server`), the
wire format :mod:`.wire`.

Batches larger than the server takes. A server scores at most ``max_batch`` episodes a request
(``unigrpo serve reward NAME --max-batch K``, default 256; a larger batch is answered 413). The
client splits a larger batch into requests of at most that many episodes and puts the scores and
components back in batch order, so they are those of one call of the reward on the whole batch
(for any scorer whose scores depend only on each episode or on its prompt group). The limit is
read once, on the first call, from the server's ``GET /health`` (its ``max_batch``); the
client's own ``max_batch`` option is used instead when given (a server that answers
``/health`` without ``max_batch`` — an older one, one whose token this client lacks, or one with
no ``/health`` (a 4xx other than 401) — gets the whole batch in one request). A request holds whole prompt groups (``group_ids``) where they fit:
groups are packed, in order of their first episode, into requests of at most ``max_batch``
episodes, so a group-level reward on the server sees each group whole; a group larger than the
limit is split, with a :class:`RemoteRewardWarning`. A batch without ``group_ids`` is cut into
consecutive runs. The body limit (``--max-body-mb``) is not split for: a request over it is 413.

Failures, by whether retrying can help:

* the server is unreachable, times out, or answers 5xx — retried with exponential backoff
  (``backoff · 2^k`` seconds before retry k + 1); after the last retry the request's episodes
  score NaN with a :class:`RemoteRewardWarning` naming the URL and the error, never an
  exception, so a training run neither hangs nor dies (the agent leaves NaN samples out of its
  update and stops if too large a fraction fails). The requests of a split batch after such a
  failure are not sent (they score NaN too): the requests already answered keep their scores.
  One request takes at most ``(retries + 1)`` attempts, each ended ``timeout`` seconds after it
  began whatever the server does (a wall-clock deadline over connecting, sending and reading the
  whole answer: a server that trickles its answer a byte a second, or never stops sending, is cut
  off like one that never answers), plus ``backoff · (2^retries − 1)`` seconds of waiting; so a
  request returns within ``(retries + 1) · timeout + backoff · (2^retries − 1)`` seconds, and a
  call to a server that is down costs one request's bound (on the first call, the ``/health``
  request is that one). An answer over 64 MB is cut off too (a batch's scores are a few kB).
* the server's scorer raised on a request — it answers all-NaN scores and the error; returned as
  they are, with a :class:`RemoteRewardWarning`.
* a wrong or missing token (401), a body or batch over the server's limits (413), a request the
  server cannot read (422), any other 4xx, an answer that is not ``unigrpo-reward/1``, or a
  ``/health`` whose ``max_batch`` is not a positive integer — configuration errors:
  :class:`RemoteRewardError` (a ``ValueError``) with a one-line message. An answer that is not
  JSON within :mod:`unigrpo_env.bounded_json`'s bounds (nested too deep, an integer of thousands
  of digits) is such an answer. Raised from a reward inside an environment, it scores the batch
  NaN with the error as its reason, as any failing scorer does.

The requests run on an event loop of the client's own, in a daemon thread (started on the first
request, again after a fork), so that the deadline can cancel a request in any phase; the calling
thread waits for the answer. Any thread may call, and several at once.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import torch

from unigrpo_env import bounded_json
from unigrpo_env.reward import RewardInputs, RewardOutput
from unigrpo_env.rewards.auth import bearer_header, read_token_file
from unigrpo_env.rewards.concurrency import merge_outputs
from unigrpo_env.rewards.extras import import_serve_dependency
from unigrpo_env.rewards.group import group_rows
from unigrpo_env.rewards.wire import SCHEMA, WireFormatError, decode_response, encode_request

__all__ = ["TOKEN_ENV", "RemoteReward", "RemoteRewardError", "RemoteRewardWarning"]

#: The environment variable holding the token when neither ``token`` nor ``token_file`` is given.
TOKEN_ENV = "UNIGRPO_REWARD_TOKEN"

#: The largest answer read from a server (a batch's scores and components are a few kB).
MAX_ANSWER_BYTES = 64 * 2**20


class RemoteRewardError(ValueError):
    """A remote reward that is misconfigured: retrying cannot help (bad URL or token, limits, schema)."""


class RemoteRewardWarning(RuntimeWarning):
    """A batch that a remote reward could not score (it scores NaN), or a prompt group larger than
    the server's ``max_batch``, split across requests."""


class _Unreachable(Exception):
    """Every attempt failed with a connection error, a timeout or a 5xx."""


class _TooLong(Exception):
    """An answer over :data:`MAX_ANSWER_BYTES`."""


@dataclass(frozen=True)
class _Answer:
    """A server's whole answer, read within the attempt's deadline."""

    status_code: int
    content: bytes
    reason_phrase: str

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self, what: str) -> Any:
        return bounded_json.loads(self.content, what=what)


class _EventLoop:
    """An asyncio event loop running in a daemon thread, with the HTTP client used on it;
    :meth:`run` runs a coroutine on it from any other thread and waits for its result.

    It holds no reference to its :class:`RemoteReward`, so a client that is dropped without
    :meth:`RemoteReward.close` is collected, and its finalizer shuts the loop down: the
    connections closed, the thread ended."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pid = os.getpid()
        self.client: Any = None  # an httpx.AsyncClient, made by RemoteReward._http
        self.thread = threading.Thread(target=self._serve, name="unigrpo-remote-reward", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def drop_client(self) -> None:
        """Close the client and its connections (after a cut-off attempt: a connection left
        mid-answer is not reused); the next request makes a new one."""
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()

    def shutdown(self) -> None:
        """Close the client, stop the loop and end the thread (waiting for it, unless called on it)."""
        if self.pid != os.getpid():  # a forked child: the thread and connections are the parent's
            return

        async def close() -> None:
            await self.drop_client()
            self.loop.stop()

        try:
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(close()))
        except RuntimeError:  # the loop is closed already
            return
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=10)


class RemoteReward:
    """A reward scored by a reward service at ``url`` (see the module docstring for failures).

    Args:
        url: the service's base URL, ``http://HOST:PORT`` (or ``https://``).
        token: the bearer token, if the server was started with ``--token-file``.
        token_file: a file holding the token (instead of ``token``). With neither, the token is
            the environment variable ``UNIGRPO_REWARD_TOKEN`` if set (so ``--reward
            remote:URL`` on the command line needs no token in its text), else none.
        timeout: seconds one attempt may take in all (connecting, sending, reading the answer).
        retries: attempts after the first, on connection errors, timeouts and 5xx.
        backoff: seconds before the first retry, doubled before each next one.
        max_batch: the most episodes sent in one request (a larger batch is split, see the
            module docstring); ``None`` (default): the server's ``max_batch``, read from its
            ``/health`` on the first call. A value above the server's limit gets 413.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_file: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_batch: int | None = None,
    ):
        self.url = _check_url(url)
        if token is not None and token_file is not None:
            raise RemoteRewardError("give the remote reward's token or its token_file, not both")
        if token_file is not None:
            try:
                token = read_token_file(token_file)
            except ValueError as exc:
                raise RemoteRewardError(str(exc)) from exc
        if token is None and token_file is None:
            token = os.environ.get(TOKEN_ENV) or None
        if token is not None and (not isinstance(token, str) or not token.strip()):
            raise RemoteRewardError("the remote reward's token must be a non-empty string")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise RemoteRewardError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise RemoteRewardError(f"retries must be an integer >= 0, got {retries!r}")
        if not (isinstance(backoff, (int, float)) and math.isfinite(backoff) and backoff >= 0):
            raise RemoteRewardError(f"backoff must be a number of seconds >= 0, got {backoff!r}")
        if max_batch is not None and not _positive_int(max_batch):
            raise RemoteRewardError(f"max_batch must be an integer >= 1 or None (the server's), got {max_batch!r}")
        self._httpx = import_serve_dependency("httpx")
        self._token = None if token is None else token.strip()
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.max_batch = max_batch
        self._server_max_batch: int | None = None  # the server's limit, once read
        self._limit_read = False  # whether /health was read for it (with an answer)
        self._event_loop: _EventLoop | None = None  # the event loop thread and its HTTP client
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()
        self._limit_lock = threading.Lock()

    # --- scoring ---------------------------------------------------------------------------------------------

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        n = len(inputs)
        try:
            limit = self.batch_limit()
        except _Unreachable as exc:
            return self._unscored(n, str(exc))
        if limit is None or n <= limit:
            try:
                return self._score(inputs, f"a batch of {n}")
            except _Unreachable as exc:
                return self._unscored(n, str(exc))
        requests = self._split(inputs, limit)
        parts: list[tuple[list[int], RewardOutput]] = []
        for k, rows in enumerate(requests):
            try:
                what = f"request {k + 1} of {len(requests)} ({len(rows)} episodes of a batch of {n})"
                parts.append((rows, self._score(inputs.select(rows), what)))
            except _Unreachable as exc:
                unscored = sum(len(r) for r in requests[k:])
                warnings.warn(
                    f"remote reward {self.url} could not score {unscored} of a batch of {n} (requests {k + 1} to "
                    f"{len(requests)} of {len(requests)}, at most {limit} episodes each), which score NaN: {exc}",
                    RemoteRewardWarning,
                    stacklevel=2,
                )
                break
        return merge_outputs(n, parts)

    def batch_limit(self) -> int | None:
        """The most episodes one request holds: the ``max_batch`` option, else the server's
        ``max_batch`` from ``/health`` (read on the first call only), else ``None`` (no limit known:
        the server did not say)."""
        if self.max_batch is not None:
            return self.max_batch
        with self._limit_lock:  # one /health request, however many threads call at once
            if not self._limit_read:
                self._server_max_batch = self._read_limit()
                self._limit_read = True
            return self._server_max_batch

    def _read_limit(self) -> int | None:
        response = self._send("GET", "/health")  # _Unreachable: not cached, asked again next call
        if response.status_code == 401:
            self._raise_for_status(response)
        if response.status_code != 200:
            return None  # no health endpoint: send whole batches, as before
        try:
            payload = response.json("/health's answer")
        except ValueError as exc:
            raise RemoteRewardError(f"remote reward {self.url}: {_words(exc)}") from exc
        limit = payload.get("max_batch") if isinstance(payload, dict) else None
        if limit is not None and not _positive_int(limit):
            raise RemoteRewardError(
                f"remote reward {self.url}: /health says max_batch={limit!r}; expected an integer >= 1"
            )
        return limit

    def _split(self, inputs: RewardInputs, limit: int) -> list[list[int]]:
        """The rows of each request: whole groups packed in order into requests of at most
        ``limit`` rows; a group over ``limit`` (or a batch without ids) cut into runs of ``limit``."""
        requests: list[list[int]] = []
        current: list[int] = []
        for group in group_rows(inputs):
            if len(group) > limit and inputs.group_ids is not None:
                warnings.warn(
                    f"remote reward {self.url}: a prompt group of {len(group)} episodes is larger than the "
                    f"max_batch of {limit} and is split across requests; a group-level reward on the server sees "
                    "it in parts (raise the server's --max-batch, or the client's max_batch, to the group size)",
                    RemoteRewardWarning,
                    stacklevel=3,
                )
            for start in range(0, len(group), limit):
                piece = group[start : start + limit]
                if len(current) + len(piece) > limit:
                    requests.append(current)
                    current = []
                current = current + piece
        if current:
            requests.append(current)
        return requests

    def _score(self, inputs: RewardInputs, what: str) -> RewardOutput:
        """One ``POST /score`` of ``inputs`` (raises :class:`_Unreachable` after the retries)."""
        n = len(inputs)
        body = encode_request(inputs)
        response = self._send("POST", "/score", content=body, headers={"content-type": "application/octet-stream"})
        self._raise_for_status(response)
        try:
            output, error = decode_response(response.json("the answer"), n)
        except (ValueError, WireFormatError) as exc:  # JSON errors are ValueErrors too
            raise RemoteRewardError(f"remote reward {self.url}: the answer is not {SCHEMA}: {_words(exc)}") from exc
        if error is not None:
            warnings.warn(
                f"remote reward {self.url}: the scorer failed on {what}, which scores NaN: {error}",
                RemoteRewardWarning,
                stacklevel=3,
            )
        return output

    def health(self) -> dict[str, Any]:
        """The server's ``/health`` answer (raises :class:`RemoteRewardError` if unreachable)."""
        try:
            response = self._send("GET", "/health")
        except _Unreachable as exc:
            raise RemoteRewardError(f"remote reward {self.url} is unreachable: {exc}") from exc
        self._raise_for_status(response)
        try:
            return response.json("/health's answer")
        except ValueError as exc:
            raise RemoteRewardError(f"remote reward {self.url}: {_words(exc)}") from exc

    def _send(self, method: str, path: str, **request: Any) -> _Answer:
        """One request with its retries: the first answer below 500, or :class:`_Unreachable`."""
        error = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                loop = self._loop()
                answer = loop.run(self._attempt(loop, method, path, request))
            except self._httpx.TransportError as exc:  # connection refused or reset, timeouts, broken answers
                error = f"{type(exc).__name__}: {_words(exc) or 'no detail'}"
                continue
            except asyncio.TimeoutError:  # the attempt's deadline (TimeoutError itself from Python 3.11)
                error = f"no whole answer within the timeout of {self.timeout:g} s"
                continue
            except _TooLong:
                error = f"an answer of more than {MAX_ANSWER_BYTES} bytes"
                continue
            if answer.status_code >= 500:
                error = f"HTTP {answer.status_code}: {_detail(answer)}"
                continue
            return answer
        raise _Unreachable(f"{error} (after {self.retries + 1} attempts)")

    async def _attempt(self, loop: _EventLoop, method: str, path: str, request: dict[str, Any]) -> _Answer:
        """One attempt on ``loop``, cancelled ``timeout`` seconds after it began (``asyncio.TimeoutError``)."""
        try:
            return await asyncio.wait_for(self._exchange(loop, method, path, request), timeout=self.timeout)
        except (asyncio.TimeoutError, _TooLong):
            await loop.drop_client()
            raise

    async def _exchange(self, loop: _EventLoop, method: str, path: str, request: dict[str, Any]) -> _Answer:
        async with self._client_on(loop).stream(method, path, **request) as response:
            content = bytearray()
            async for chunk in response.aiter_bytes():
                content += chunk
                if len(content) > MAX_ANSWER_BYTES:
                    raise _TooLong
            return _Answer(response.status_code, bytes(content), response.reason_phrase)

    def _raise_for_status(self, response: Any) -> None:
        status = response.status_code
        if status == 200:
            return
        hint = {
            401: "; pass the server's token (token= or token_file=)",
            413: "; raise the server's --max-batch / --max-body-mb, or send smaller batches (a lower max_batch)",
            422: "; are client and server the same unigrpo-env version?",
        }.get(status, "")
        raise RemoteRewardError(f"remote reward {self.url}: HTTP {status}: {_detail(response)}{hint}")

    def _unscored(self, n: int, error: str) -> RewardOutput:
        warnings.warn(
            f"remote reward {self.url} could not score a batch of {n}, which scores NaN: {error}",
            RemoteRewardWarning,
            stacklevel=3,
        )
        return RewardOutput(scores=torch.full((n,), math.nan))

    # --- the HTTP client -------------------------------------------------------------------------------------

    def _loop(self) -> _EventLoop:
        """The client's event loop thread (a new one in a forked child, where the thread is gone)."""
        with self._lock:
            if self._event_loop is not None and self._event_loop.pid != os.getpid():
                self._event_loop = None  # the parent's thread and connections
            if self._event_loop is None:
                self._event_loop = _EventLoop()
                self._finalizer = weakref.finalize(self, self._event_loop.shutdown)
            return self._event_loop

    def _http(self) -> Any:
        """The HTTP client (an ``httpx.AsyncClient``, used on the event loop's thread only)."""
        return self._client_on(self._loop())

    def _client_on(self, loop: _EventLoop) -> Any:
        if loop.client is None:
            headers = {"accept-encoding": "identity", **(bearer_header(self._token) if self._token else {})}
            loop.client = self._httpx.AsyncClient(
                base_url=self.url, timeout=self._httpx.Timeout(self.timeout), headers=headers
            )
        return loop.client

    def close(self) -> None:
        """Close the connections and stop the event loop's thread (a later call starts them again)."""
        with self._lock:
            finalizer, self._finalizer, self._event_loop = self._finalizer, None, None
        if finalizer is not None:
            finalizer()  # runs the loop's shutdown once

    def __getstate__(self) -> dict[str, Any]:  # connections and modules cannot be copied; reopen lazily
        state = self.__dict__.copy()
        for key in ("_event_loop", "_finalizer", "_lock", "_limit_lock", "_httpx"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._httpx = import_serve_dependency("httpx")
        self._event_loop = None
        self._finalizer = None
        self._lock = threading.Lock()
        self._limit_lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> RemoteReward:
        copy = RemoteReward.__new__(RemoteReward)
        copy.__setstate__(self.__getstate__())
        return copy

    def __repr__(self) -> str:  # never the token
        limit = "" if self.max_batch is None else f", max_batch={self.max_batch}"
        return f"RemoteReward({self.url!r}, timeout={self.timeout:g}, retries={self.retries}{limit})"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_url(url: Any) -> str:
    if not isinstance(url, str):
        raise RemoteRewardError(f"a remote reward's URL must be a string, got {url!r}")
    text = url.strip().rstrip("/")
    if "," in text:
        raise RemoteRewardError(
            f"bad remote reward URL {url!r}: 'remote:URL' is a whole reward, not a term of a weighted sum "
            f"(to weight it, register it under a name, see unigrpo_env.rewards.composite)"
        )
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in 0..65535
        port_ok = True
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok or parts.query or parts.fragment:
        raise RemoteRewardError(f"bad remote reward URL {url!r}: expected http://HOST:PORT or https://HOST:PORT")
    return text


def _detail(response: _Answer) -> str:
    try:
        payload = response.json("the answer")
        detail = payload.get("detail") if isinstance(payload, dict) else None
    except ValueError:
        detail = None
    return _words(detail if detail is not None else response.text[:200] or response.reason_phrase)


def _words(value: Any) -> str:
    """A value's text on one line, cut to a readable length (a server chooses what it says)."""
    return bounded_json.shorten(str(value), 300)
