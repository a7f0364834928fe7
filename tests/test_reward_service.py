"""The reward service (``unigrpo serve reward``, :class:`RemoteReward`), on loopback only.

Servers run in a background thread (``uvicorn.Server.run``, stopped with ``should_exit``), or as
a ``unigrpo serve reward`` subprocess for the kill test. Every wait has a timeout.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import uvicorn  # noqa: E402
from safetensors.torch import save as save_safetensors  # noqa: E402

from unigrpo_env import RewardInputs, RewardOutput, Task  # noqa: E402
from unigrpo_env.rewards import RewardSpecError, get_reward, parse_reward_spec, register_reward  # noqa: E402
from unigrpo_env.rewards.remote import RemoteReward, RemoteRewardError, RemoteRewardWarning  # noqa: E402
from unigrpo_env.rewards.server import create_app, listen  # noqa: E402
from unigrpo_env.rewards.wire import METADATA_KEY, SCHEMA, encode_request  # noqa: E402

TOKEN = "s3cret-token"
SEEN: list[RewardInputs] = []  # what the recording reward was given


@register_reward("service_test_recorder", override=True)
class RecorderReward:
    """Records its inputs; scores the mean pixel value, component ``turns``."""

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        SEEN.append(inputs)
        turns = torch.tensor([float(len(t.prompts)) for t in inputs.tasks])
        return RewardOutput(scores=inputs.images.float().mean(dim=(1, 2, 3)), components={"turns": turns})


@register_reward("service_test_raises", override=True)
class RaisingReward:
    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        raise RuntimeError("the judge ran out of memory")


@register_reward("service_test_partial", override=True)
class PartialReward:
    """NaN for tasks of category 'unscorable', +inf in a component: what JSON cannot say plainly."""

    def __call__(self, inputs: RewardInputs) -> RewardOutput:
        scores = inputs.images.float().mean(dim=(1, 2, 3)) / 7.0
        nan = torch.tensor([t.category == "unscorable" for t in inputs.tasks])
        scores = torch.where(nan, torch.tensor(math.nan), scores)
        return RewardOutput(scores=scores, components={"edge": torch.where(nan, torch.tensor(math.inf), -scores)})


def batch(n: int, *, seed: int, size: int = 16, turns: int = 1, categories=None, group_ids=None) -> RewardInputs:
    g = torch.Generator().manual_seed(seed)
    tasks = [
        Task(
            prompts=tuple(f"prompt {i} turn {k} ✓" for k in range(turns)),
            category=(categories[i] if categories else "plain"),
            split="train",
            index=i,
            meta={"shapes_task": {"objects": [{"shape": "circle", "colour": "red"}]}, "seed": seed, "f": 0.1},
        )
        for i in range(n)
    ]
    return RewardInputs(
        images=torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g),
        tasks=tasks,
        texts=[[f"thinking {i}.{k} — «ünïcode»\nline two" for k in range(turns)] for i in range(n)],
        earlier_images=torch.randint(0, 256, (n, turns - 1, size, size, 3), dtype=torch.uint8, generator=g),
        group_ids=torch.arange(n) // 2 if group_ids is None else torch.tensor(group_ids),
    )


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where NaN (exactly, not approximately)."""
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and torch.equal(a.isnan(), b.isnan())
        and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(spec: str, *, log_level: str = "error", **options):
    """A reward service for ``spec`` in a background thread (uvicorn's loggers at ``log_level``);
    yields its URL."""
    app = create_app(get_reward(spec), name=spec, **options)
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start in 10 s"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "the server did not stop in 10 s"


@pytest.fixture(scope="module")
def jpeg_url():
    with serving("jpeg_compressibility") as url:
        yield url


@pytest.fixture(scope="module")
def guarded_url():
    """A service with a token and small limits: 8 episodes, 100 kB."""
    with serving("jpeg_compressibility", token=TOKEN, max_batch=8, max_body_bytes=100_000) as url:
        yield url


def test_remote_spec_is_one_reward_not_a_weighted_sum():
    (term,) = parse_reward_spec("remote:http://judge-host:8000")
    assert term.name == "remote:http://judge-host:8000" and not term.weighted
    reward = get_reward("remote:http://judge-host:8000/", timeout=3.0, retries=1)  # builds, connects on first use
    assert isinstance(reward, RemoteReward) and reward.url == "http://judge-host:8000" and reward.retries == 1
    for bad in ("remote:http://h:8000,quality:0.2", "quality:0.2,remote:http://h:8000", "remote:ftp://h", "remote:"):
        with pytest.raises((RewardSpecError, RemoteRewardError), match="remote|URL"):
            get_reward(bad)
    with pytest.raises(RewardSpecError, match="could not build reward 'remote:"):
        get_reward("remote:http://h:1", colour="red")


def test_scores_through_remote_equal_the_local_reward_exactly_nan_included():
    spec = "jpeg_compressibility:1.0,service_test_partial:0.5"
    local = get_reward(spec)
    inputs = batch(6, seed=1, categories=["plain", "unscorable", "plain", "plain", "unscorable", "plain"])
    with serving(spec) as url:
        remote = get_reward(f"remote:{url}", timeout=10.0)
        got, want = remote(inputs), local(inputs)
        assert remote.health()["reward"] == spec and remote.health()["device"] == "cpu"
    assert same(got.scores, want.scores) and got.scores.isnan().sum() == 2
    assert sorted(got.components) == sorted(want.components)
    for key in want.components:
        assert same(got.components[key], want.components[key]), key
    assert got.components["service_test_partial/edge"].isinf().sum() == 2


def test_turns_texts_earlier_images_and_groups_arrive_intact():
    inputs = batch(4, seed=2, turns=3)
    SEEN.clear()
    with serving("service_test_recorder") as url:
        out = RemoteReward(url)(inputs)
    (seen,) = SEEN
    assert seen.tasks == inputs.tasks and seen.texts == inputs.texts
    assert torch.equal(seen.images, inputs.images) and torch.equal(seen.earlier_images, inputs.earlier_images)
    assert seen.earlier_images.shape == (4, 2, 16, 16, 3) and torch.equal(seen.group_ids, inputs.group_ids)
    assert out.components["turns"].tolist() == [3.0] * 4


def test_concurrent_clients_lose_and_duplicate_nothing(jpeg_url):
    local = get_reward("jpeg_compressibility")
    remote = RemoteReward(jpeg_url, timeout=20.0)  # one client, shared by every thread
    failures: list[str] = []

    def client(worker: int) -> None:
        for request in range(50):
            inputs = batch(2, seed=1000 * worker + request, size=8)
            if not same(remote(inputs).scores, local(inputs).scores):
                failures.append(f"worker {worker} request {request}")

    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    assert failures == []


def test_a_wrong_or_missing_token_is_refused_with_401(guarded_url, tmp_path, monkeypatch):
    inputs = batch(2, seed=3)
    monkeypatch.delenv("UNIGRPO_REWARD_TOKEN", raising=False)
    for reward in (RemoteReward(guarded_url, token="wrong"), RemoteReward(guarded_url)):
        with pytest.raises(RemoteRewardError, match="HTTP 401"):
            reward(inputs)
    (tmp_path / "token").write_text(TOKEN + "\n")
    assert RemoteReward(guarded_url, token_file=str(tmp_path / "token"))(inputs).scores.isfinite().all()
    monkeypatch.setenv("UNIGRPO_REWARD_TOKEN", TOKEN)  # what `--reward remote:URL` on the command line uses
    assert get_reward(f"remote:{guarded_url}")(inputs).scores.isfinite().all()
    # health: a liveness answer without a token (nothing about the reward), details with it, 401 with a wrong one
    assert httpx.get(f"{guarded_url}/health").json() == {"status": "ok", "schema": SCHEMA, "auth": "required"}
    assert httpx.get(f"{guarded_url}/health", headers={"authorization": "Bearer nope"}).status_code == 401
    assert RemoteReward(guarded_url, token=TOKEN).health()["max_batch"] == 8


def test_an_oversized_body_or_batch_is_refused_with_413(guarded_url):
    auth = {"authorization": f"Bearer {TOKEN}"}
    big = httpx.post(f"{guarded_url}/score", content=b"\0" * 200_000, headers=auth)
    assert big.status_code == 413 and "exceeds the limit of 100000 bytes" in big.json()["detail"]
    streamed = httpx.post(f"{guarded_url}/score", content=iter([b"\0" * 50_000] * 4), headers=auth)  # no length
    assert streamed.status_code == 413
    with pytest.raises(RemoteRewardError, match="HTTP 413.*100000 bytes"):
        RemoteReward(guarded_url, token=TOKEN)(batch(4, seed=4, size=128))  # 200 kB of images
    inputs = batch(9, seed=4, size=4)  # over max_batch: split to fit, unless the client is forced to send it whole
    assert same(
        RemoteReward(guarded_url, token=TOKEN)(inputs).scores, get_reward("jpeg_compressibility")(inputs).scores
    )
    with pytest.raises(RemoteRewardError, match="HTTP 413: a batch of 9 episodes exceeds the limit of 8"):
        RemoteReward(guarded_url, token=TOKEN, max_batch=9)(inputs)


SPLIT_SPEC = "jpeg_compressibility:1.0,service_test_partial:0.5,service_test_recorder:0"  # the recorder counts


def counted(reward: RemoteReward) -> list[tuple[str, str]]:
    """The (method, path) of every HTTP request ``reward`` sends from now on."""
    sent: list[tuple[str, str]] = []

    async def record(request) -> None:  # the client is an httpx.AsyncClient: its hooks are awaited
        sent.append((request.method, request.url.path))

    reward._http().event_hooks["request"] = [record]
    return sent


@pytest.fixture(scope="module")
def split_url():
    """A service that scores at most 2 episodes a request (``--max-batch 2``)."""
    with serving(SPLIT_SPEC, max_batch=2) as url:
        yield url


def _assert_same_output(got: RewardOutput, want: RewardOutput) -> None:
    assert same(got.scores, want.scores)
    assert sorted(got.components) == sorted(want.components)
    for key in want.components:
        assert same(got.components[key], want.components[key]), key


def test_a_batch_over_the_servers_max_batch_is_split_and_scores_as_one_local_call(split_url):
    inputs = batch(5, seed=8, categories=["plain", "unscorable", "plain", "plain", "unscorable"])  # groups 0 0 1 1 2
    want = get_reward(SPLIT_SPEC)(inputs)
    remote = RemoteReward(split_url)
    sent = counted(remote)
    assert sent == []  # the limit is read lazily, on the first call
    SEEN.clear()
    _assert_same_output(remote(inputs), want)
    assert sent == [("GET", "/health")] + [("POST", "/score")] * 3 and remote.batch_limit() == 2
    assert [len(seen) for seen in SEEN] == [2, 2, 1]  # the server scored 3 requests, groups whole
    assert [seen.group_ids.tolist() for seen in SEEN] == [[0, 0], [1, 1], [2]]
    _assert_same_output(remote(inputs), want)  # the limit is read once
    assert sent.count(("GET", "/health")) == 1 and sent.count(("POST", "/score")) == 6


def test_a_split_keeps_prompt_groups_whole_and_puts_scores_back_in_batch_order(split_url):
    categories = ["plain", "plain", "unscorable", "plain", "plain"]
    inputs = batch(5, seed=9, categories=categories, group_ids=[7, 3, 7, 5, 3])  # groups not contiguous
    want = get_reward(SPLIT_SPEC)(inputs)
    SEEN.clear()
    _assert_same_output(get_reward(f"remote:{split_url}")(inputs), want)
    assert [seen.group_ids.tolist() for seen in SEEN] == [[7, 7], [3, 3], [5]]
    assert [[t.index for t in seen.tasks] for seen in SEEN] == [[0, 2], [1, 4], [3]]


def test_a_group_over_the_limit_is_split_with_a_warning(split_url):
    inputs = batch(5, seed=10, group_ids=[0] * 5)
    want = get_reward(SPLIT_SPEC)(inputs)
    SEEN.clear()
    with pytest.warns(RemoteRewardWarning, match="a prompt group of 5 episodes is larger than the max_batch of 2"):
        got = RemoteReward(split_url)(inputs)
    _assert_same_output(got, want)
    assert [len(seen) for seen in SEEN] == [2, 2, 1]


def test_the_clients_max_batch_overrides_the_servers(split_url):
    inputs = batch(5, seed=11)
    want = get_reward(SPLIT_SPEC)(inputs)
    one = get_reward(f"remote:{split_url}", max_batch=1)
    sent = counted(one)
    SEEN.clear()
    with pytest.warns(RemoteRewardWarning, match="a prompt group of 2 episodes is larger than the max_batch of 1"):
        _assert_same_output(one(inputs), want)
    assert sent == [("POST", "/score")] * 5 and [len(seen) for seen in SEEN] == [1] * 5  # /health not asked
    forced = RemoteReward(split_url, max_batch=5)  # more than the server takes: 413, as before
    with pytest.raises(RemoteRewardError, match="HTTP 413: a batch of 5 episodes exceeds the limit of 2"):
        forced(inputs)
    assert repr(forced).endswith("max_batch=5)")
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(RemoteRewardError, match="max_batch must be an integer >= 1"):
            RemoteReward(split_url, max_batch=bad)


def test_a_request_of_a_split_batch_that_fails_leaves_it_and_the_rest_nan(split_url, monkeypatch):
    from unigrpo_env.rewards.remote import _Unreachable

    inputs = batch(5, seed=12)
    want = get_reward(SPLIT_SPEC)(inputs)
    remote = RemoteReward(split_url)
    real_send, posts = remote._send, []

    def send(method, path, **request):
        if method == "POST":
            posts.append(path)
            if len(posts) == 2:  # the server is gone for the second request, after its retries
                raise _Unreachable("ConnectError: connection refused (after 4 attempts)")
        return real_send(method, path, **request)

    monkeypatch.setattr(remote, "_send", send)
    with pytest.warns(RemoteRewardWarning, match=r"could not score 3 of a batch of 5 \(requests 2 to 3 of 3"):
        out = remote(inputs)
    assert len(posts) == 2  # the third request is not sent
    assert same(out.scores[:2], want.scores[:2]) and out.scores[2:].isnan().all()
    assert out.components["jpeg_compressibility"][2:].isnan().all()


def test_a_server_that_does_not_advertise_max_batch_gets_whole_batches(monkeypatch, guarded_url):
    monkeypatch.delenv("UNIGRPO_REWARD_TOKEN", raising=False)
    remote = RemoteReward(guarded_url)  # no token: /health answers only its liveness, no max_batch
    with pytest.raises(RemoteRewardError, match="HTTP 401"):
        remote(batch(2, seed=13))
    assert remote.batch_limit() is None


def _blob(tensors=None, meta=None, raw_meta=None) -> bytes:
    inputs = batch(2, seed=5)
    tensors = tensors if tensors is not None else {"images": inputs.images, "earlier_images": inputs.earlier_images}
    meta = meta if meta is not None else {"schema": SCHEMA, "tasks": [t.model_dump(mode="json") for t in inputs.tasks]}
    meta = {"texts": inputs.texts, **meta}
    return save_safetensors(tensors, metadata={METADATA_KEY: raw_meta if raw_meta is not None else json.dumps(meta)})


@pytest.mark.parametrize(
    "body, message",
    [
        (b"garbage, not safetensors at all", "not a safetensors blob"),
        (encode_request(batch(2, seed=5))[:-10], "not a valid safetensors blob"),
        (_blob(tensors={"images": torch.zeros(2, 4, 4, 3, dtype=torch.uint8)}), "missing tensor 'earlier_images'"),
        (_blob(tensors={"images": torch.zeros(2, 4, 4, 3), "earlier_images": torch.zeros(2, 0, 4, 4, 3)}), "U8"),
        (
            _blob(
                tensors={
                    "images": torch.zeros(2, 4, 3, dtype=torch.uint8),
                    "earlier_images": torch.zeros(2, 0, dtype=torch.uint8),
                }
            ),
            "dimensions",
        ),
        (_blob(raw_meta="{not json"), "not JSON"),
        (_blob(meta={"schema": "unigrpo-reward/0", "tasks": []}), "unsupported schema"),
        (_blob(meta={"schema": SCHEMA, "tasks": [{"category": "x"}] * 2}), "invalid task: prompts"),
        (_blob(meta={"schema": SCHEMA, "tasks": []}), "list of 2 tasks"),
    ],
)
def test_a_malformed_body_is_refused_with_422(jpeg_url, body, message):
    response = httpx.post(f"{jpeg_url}/score", content=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail


def test_a_scorer_that_raises_scores_nan_with_the_error():
    inputs = batch(3, seed=6)
    with serving("service_test_raises") as url:
        raw = httpx.post(f"{url}/score", content=encode_request(inputs))
        with pytest.warns(RemoteRewardWarning, match="RuntimeError: the judge ran out of memory"):
            out = RemoteReward(url)(inputs)
    assert raw.status_code == 200 and raw.json()["error"] == "RuntimeError: the judge ran out of memory"
    assert raw.json()["scores"] == [None] * 3 and out.scores.isnan().all() and out.scores.shape == (3,)


def _start_cli_server(port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    return subprocess.Popen(
        [sys.executable, "-m", "unigrpo_env.cli.main", "serve", "reward", "jpeg_compressibility", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the server at {url} was not healthy within {timeout} s")


def test_a_killed_server_scores_nan_within_the_bound_and_a_restarted_one_recovers():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    inputs, local = batch(3, seed=7), get_reward("jpeg_compressibility")
    remote = RemoteReward(url, timeout=2.0, retries=2, backoff=0.1)
    bound = (remote.retries + 1) * remote.timeout + remote.backoff * (2**remote.retries - 1)
    server = _start_cli_server(port)
    try:
        _wait_healthy(url, server)
        assert same(remote(inputs).scores, local(inputs).scores)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        start = time.monotonic()
        with pytest.warns(RemoteRewardWarning, match=f"remote reward {url} could not score a batch of 3"):
            out = remote(inputs)
        assert time.monotonic() - start < bound + 1.0 and out.scores.isnan().all()
        server = _start_cli_server(port)
        _wait_healthy(url, server)
        assert same(remote(inputs).scores, local(inputs).scores)  # the same client, recovered
    finally:
        server.kill()
        server.wait(timeout=10)
        for stream in (server.stdout, server.stderr):
            stream.close()


def test_cli_unknown_reward_is_one_line_and_exit_2(capsys):
    from unigrpo_env.cli.main import main

    for args in (
        ["serve", "reward", "no_such_reward"],
        ["serve", "reward", "jpeg_compressibility", "--max-batch", "0"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("unigrpo: error:") and len(err.strip().splitlines()) == 1


# --- hostile or broken peers (issue: hardening from an outside probe) ----------------------------------------


def _read_request(conn: socket.socket) -> None:
    """Read one HTTP request (headers and a Content-Length body) from ``conn``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


@contextmanager
def raw_server(answer):
    """A loopback HTTP peer that reads each request and then runs ``answer(conn, stop)``; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                _read_request(conn)
                answer(conn, stop)
            except OSError:  # the client gave up: what a hostile peer sees
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def trickle(conn, stop):  # a whole status line and headers, then the body a byte every 0.2 s
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n")
    while not stop.wait(0.2):
        conn.sendall(b" ")


def trickle_status(conn, stop):  # even the status line a byte at a time
    for byte in b"HTTP/1.1 200 OK\r\n":
        if stop.wait(0.2):
            return
        conn.sendall(bytes([byte]))


def flood(conn, stop):  # an answer that never ends, sent as fast as it is read
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n")
    chunk = b"[1," * 20000
    while not stop.is_set():
        conn.sendall(chunk)


@pytest.mark.parametrize("answer", [trickle, trickle_status, flood])
def test_a_server_that_trickles_or_never_stops_is_cut_off_within_the_documented_bound(answer):
    # httpx's timeouts are per read: a byte a second used to keep one request alive for minutes
    remote = RemoteReward("http://127.0.0.1:1", timeout=1.0, retries=1, backoff=0.1)
    bound = (remote.retries + 1) * remote.timeout + remote.backoff * (2**remote.retries - 1)
    with raw_server(answer) as url:
        remote.url = url
        for max_batch in (None, 4):  # the /health request first, then /score alone
            remote.max_batch = max_batch
            start = time.monotonic()
            with pytest.warns(RemoteRewardWarning, match="could not score a batch of 3") as caught:
                out = remote(batch(3, seed=1))
            elapsed = time.monotonic() - start
            assert out.scores.isnan().all() and elapsed < bound + 1.0, elapsed
            (message,) = [str(w.message) for w in caught if w.category is RemoteRewardWarning]
            if answer is flood:  # cut off by the answer's size, or by the deadline on a slow machine
                assert "more than 67108864 bytes" in message or "within the timeout of 1 s" in message, message
            else:  # every attempt runs to its deadline
                assert "within the timeout of 1 s (after 2 attempts)" in message and elapsed > bound - 0.2, message
    thread = remote._event_loop.thread
    with warnings.catch_warnings(record=True) as caught:  # the cut-off connections were closed, not leaked
        warnings.simplefilter("always")
        remote.close()
        del remote
        gc.collect()
    assert not thread.is_alive() and not [w for w in caught if w.category is ResourceWarning]


def test_a_client_dropped_without_close_ends_its_thread_and_connections(jpeg_url):
    remote = RemoteReward(jpeg_url)
    remote(batch(2, seed=4))
    thread = remote._event_loop.thread
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del remote
        gc.collect()
        thread.join(timeout=10)
    assert not thread.is_alive() and not [w for w in caught if w.category is ResourceWarning]


def test_a_deeply_nested_answer_is_a_remote_reward_error_not_a_recursion_error():
    nested = b"[" * 100_000 + b"]" * 100_000

    def answer(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(nested))
        conn.sendall(nested)

    with raw_server(answer) as url:
        for max_batch in (None, 4):  # the /health answer, then the /score answer
            remote = RemoteReward(url, max_batch=max_batch, retries=0)
            with pytest.raises(RemoteRewardError, match="nests deeper than"):
                remote(batch(3, seed=2))
            remote.close()
        # inside an environment the batch scores NaN, with the error as its reason
        from conftest import ToyScenario

        import unigrpo_env
        from unigrpo_env import FlowAction, TextAction

        envs = unigrpo_env.InterleavedVectorEnv(ToyScenario(num_turns=1), 1, 2, reward=RemoteReward(url, max_batch=4))
        obs, _ = envs.reset(seed=0)
        obs, *_ = envs.step(TextAction(tokens=[[3, 2], [3, 2]]))
        done = False
        while not done:
            obs, rewards, dones, _, info = envs.step(FlowAction(x_next=obs.x_t * 0.5))
            done = bool(dones.all())
        assert all(math.isnan(r) for r in rewards) and "RemoteRewardError" in envs.trajectory.reward_error
        assert "nests deeper than" in envs.trajectory.reward_error


def request_with(header_edit=None, meta_text=None) -> bytes:
    """A valid request body of 2 episodes, its safetensors header JSON or metadata text replaced."""
    body = encode_request(batch(2, seed=3))
    (length,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + length])
    if meta_text is not None:
        header["__metadata__"][METADATA_KEY] = meta_text
    text = json.dumps(header) if header_edit is None else header_edit(header)
    return encode_header(text) + body[8 + length :]


def encode_header(text: str) -> bytes:
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize(
    "body,message",
    [
        (lambda: request_with(meta_text='{"schema": ' + "[" * 100_000 + "]" * 100_000 + "}"), "nests"),
        (
            lambda: request_with(
                header_edit=lambda h: json.dumps(h)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
            ),
            "nests",
        ),
        (lambda: request_with(meta_text='{"schema": "unigrpo-reward/1", "n": ' + "7" * 5000 + "}"), "more digits"),
        (
            lambda: request_with(
                header_edit=lambda h: json.dumps(h).replace('"shape": [2', '"shape": [' + "2" * 5000, 1)
            ),
            "more digits",
        ),
        (lambda: request_with(meta_text='{"schema": "unigrpo-reward/1", "f": NaN}'), "finite numbers only"),
        (lambda: request_with(meta_text=" " * (9 * 2**20)), "more than the"),
    ],
)
def test_json_beyond_the_bounds_is_a_422_not_a_500(jpeg_url, body, message):
    response = httpx.post(f"{jpeg_url}/score", content=body(), timeout=30)
    assert response.status_code == 422 and message in response.json()["detail"], response.text
    assert httpx.get(f"{jpeg_url}/health").status_code == 200  # still up


def largest_metadata() -> str:
    """Valid metadata of two episodes padded to nearly the largest size accepted, in the worst
    shape to parse: a million small two-element lists."""
    from unigrpo_env.rewards.wire import MAX_METADATA_CHARS

    tasks = json.dumps([{"prompts": ["p"], "category": "c", "split": "s", "index": i} for i in range(2)])
    filler = json.dumps([[i, "x"] for i in range((MAX_METADATA_CHARS - 200) // 16)])
    return '{"schema": "unigrpo-reward/1", "tasks": ' + tasks + ', "texts": [["a"], ["b"]], "filler": ' + filler + "}"


def test_a_large_metadata_header_is_parsed_off_the_event_loop(jpeg_url):
    # a 46 MB metadata used to be parsed on the loop and delay /health by 4.9 s; now it is refused by
    # its length, and the largest accepted one (of millions of tiny values) is parsed in a worker thread
    from unigrpo_env.rewards.wire import MAX_METADATA_CHARS

    meta = largest_metadata()
    assert len(meta) <= MAX_METADATA_CHARS
    bodies = [request_with(meta_text=meta), request_with(meta_text=" " * (46 * 10**6))]
    for body in bodies:
        answered: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda body=body, answered=answered: answered.append(
                httpx.post(f"{jpeg_url}/score", content=body, timeout=60)
            )
        )
        sender.start()
        worst = 0.0
        while sender.is_alive():
            start = time.monotonic()
            assert httpx.get(f"{jpeg_url}/health", timeout=10).status_code == 200
            worst = max(worst, time.monotonic() - start)
            time.sleep(0.02)
        sender.join()
        assert answered and answered[0].status_code in (200, 422), answered[0].text
        assert worst < 1.5, worst  # the GIL: the largest metadata of the worst shape parses in about 0.7 s


def test_clients_that_disconnect_mid_body_are_counted_not_logged_as_tracebacks(jpeg_url, caplog):
    # each used to write a full traceback to the service log (3,000 dropped connections: 21,000 lines)
    port = int(jpeg_url.rsplit(":", 1)[1])
    before = httpx.get(f"{jpeg_url}/health").json()["dropped_requests"]
    with caplog.at_level(logging.INFO):
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n" + b"\0" * 100)
        deadline = time.monotonic() + 10
        while httpx.get(f"{jpeg_url}/health").json()["dropped_requests"] < before + 20:
            assert time.monotonic() < deadline, "the dropped requests were not counted"
            time.sleep(0.05)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    lines = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(lines) == 20 and all("\n" not in r.getMessage() for r in lines)
