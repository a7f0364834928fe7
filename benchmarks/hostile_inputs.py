"""The outside probe's measurements, repeated: how the project holds against hostile input.

Run: ``python benchmarks/hostile_inputs.py [--turns 2000 16000 20000] [--drops 3000]``.

1. ``Trajectory.load`` time against the number of turns (each turn a 2-token text segment and a
   one-step image segment): loading must be linear (it was quadratic: 20,000 turns took 102 s).
2. A ``RemoteReward(timeout=2, retries=1, backoff=0.5)`` against a loopback peer that sends its
   status line and headers, then the body a byte every 0.2 s (a byte a second would only make
   the uncut request longer): the call's wall time against the documented bound
   ``(retries + 1) · timeout + backoff · (2^retries − 1)`` = 4.5 s (it took 50 s against 12 s).
3. The reward service's ``/health`` latency while one request carries (a) the largest metadata
   accepted, of the worst shape (millions of two-element lists), (b) a 46 MB metadata (refused
   by its length): the worst of back-to-back ``/health`` calls (it was 4.9 s for 46 MB).
4. ``--drops`` clients that disconnect mid-body: the service's log lines at its default level
   (WARNING) and at INFO, and the ``dropped_requests`` count in ``/health`` (it was 21,000 lines
   of tracebacks for 3,000).

Everything runs on loopback, in this process (the service in a thread, as the tests run it).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import socket
import struct
import threading
import time
from contextlib import contextmanager

import httpx
import torch
import uvicorn

from unigrpo_env import RewardInputs, Task, Trajectory
from unigrpo_env.rewards import get_reward
from unigrpo_env.rewards.remote import RemoteReward
from unigrpo_env.rewards.server import create_app, listen
from unigrpo_env.rewards.wire import MAX_METADATA_CHARS, METADATA_KEY, encode_request
from unigrpo_env.trajectory import ImageSegment, TextSegment, Turn


def long_trajectory(turns: int) -> Trajectory:
    text = TextSegment(tokens=torch.tensor([1, 2]), log_probs=torch.tensor([-0.1, -0.2]))
    image = ImageSegment(
        x_t=torch.zeros(1, 1, 1, 1),
        x_next=torch.zeros(1, 1, 1, 1),
        t=torch.ones(1),
        t_next=torch.zeros(1),
        log_prob=torch.zeros(1),
        stochastic=torch.zeros(1, dtype=torch.bool),
    )
    task = Task(prompts=("p",), category="c", split="train", index=0)
    return Trajectory(scenario="toy", task=task, turns=[Turn(prompt="p", segments=[text, image])] * turns)


def trajectory_loads(turn_counts: list[int], folder: str) -> None:
    print("1. Trajectory.load, best of 3")
    for turns in turn_counts:
        path = long_trajectory(turns).save(f"{folder}/t{turns}.safetensors")
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            Trajectory.load(path)
            best = min(best, time.perf_counter() - start)
        print(
            f"   {turns:>7,} turns  {path.stat().st_size / 1e6:6.1f} MB  {best:7.3f} s  ({best / turns * 1e6:.0f} µs a turn)"
        )


def batch(n: int) -> RewardInputs:
    tasks = [Task(prompts=("p",), category="c", split="train", index=i) for i in range(n)]
    return RewardInputs(
        images=torch.zeros(n, 16, 16, 3, dtype=torch.uint8),
        tasks=tasks,
        texts=[["t"]] * n,
        earlier_images=torch.zeros(n, 0, 16, 16, 3, dtype=torch.uint8),
    )


def trickling_server() -> tuple[str, threading.Event]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n")
                while not stop.wait(0.2):
                    conn.sendall(b" ")
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", stop


def trickle() -> None:
    url, stop = trickling_server()
    remote = RemoteReward(url, timeout=2.0, retries=1, backoff=0.5, max_batch=4)
    bound = (remote.retries + 1) * remote.timeout + remote.backoff * (2**remote.retries - 1)
    start = time.monotonic()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = remote(batch(3))
    elapsed = time.monotonic() - start
    stop.set()
    print("2. RemoteReward(timeout=2, retries=1, backoff=0.5) against a byte every 0.2 s")
    print(f"   scores {out.scores.tolist()} after {elapsed:.2f} s (documented bound {bound:.1f} s)")
    print(f"   warning: {caught[0].message}")
    remote.close()


@contextmanager
def serving():
    app = create_app(get_reward("jpeg_compressibility"), name="jpeg_compressibility")
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def body_with_metadata(text: str) -> bytes:
    body = encode_request(batch(2))
    (length,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + length])
    header["__metadata__"][METADATA_KEY] = text
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body[8 + length :]


def health_latency(url: str) -> None:
    tasks = json.dumps([{"prompts": ["p"], "category": "c", "split": "s", "index": i} for i in range(2)])
    filler = json.dumps([[i, "x"] for i in range((MAX_METADATA_CHARS - 200) // 16)])
    largest = '{"schema": "unigrpo-reward/1", "tasks": ' + tasks + ', "texts": [["a"], ["b"]], "x": ' + filler + "}"
    print("3. /health while one request's metadata is parsed (worst of back-to-back calls)")
    for label, text in (
        (f"the largest accepted, {len(largest) / 1e6:.1f} M characters of tiny values", largest),
        ("46 MB (refused by its length)", " " * 46_000_000),
    ):
        body = body_with_metadata(text)
        answered: list[httpx.Response] = []

        def send(body: bytes = body, answered: list = answered) -> None:
            answered.append(httpx.post(f"{url}/score", content=body, timeout=120))

        sender = threading.Thread(target=send, daemon=True)
        start = time.monotonic()
        sender.start()
        worst = 0.0
        while sender.is_alive():
            t0 = time.monotonic()
            httpx.get(f"{url}/health", timeout=30)
            worst = max(worst, time.monotonic() - t0)
        sender.join()
        took = time.monotonic() - start
        print(f"   {label}: answered {answered[0].status_code} in {took:.2f} s; /health at worst {worst:.3f} s")


def drops(url: str, count: int) -> None:
    port = int(url.rsplit(":", 1)[1])
    kept: dict[int, logging.LogRecord] = {}  # by identity: a record propagates to several of the loggers below

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept[id(record)] = record

    handler = Keep(level=logging.DEBUG)
    for name in ("", "uvicorn", "uvicorn.error", "unigrpo_env.rewards.server"):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("unigrpo_env.rewards.server").setLevel(logging.INFO)
    before = httpx.get(f"{url}/health").json()["dropped_requests"]
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"POST /score HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n" + b"\0" * 100)
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health").json()["dropped_requests"] < before + count and time.monotonic() < deadline:
        time.sleep(0.1)
    counted = httpx.get(f"{url}/health").json()["dropped_requests"] - before
    records = list(kept.values())
    warnings_or_worse = [r for r in records if r.levelno >= logging.WARNING]
    tracebacks = [r for r in records if r.exc_info]
    lines = sum(1 + r.getMessage().count("\n") for r in records)
    print(f"4. {count} clients disconnecting mid-body")
    print(
        f"   dropped_requests {counted}; log records {len(records)} ({lines} lines), at WARNING or above "
        f"{len(warnings_or_worse)}, with a traceback {len(tracebacks)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, nargs="+", default=[2000, 16000, 20000])
    parser.add_argument("--drops", type=int, default=3000)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        trajectory_loads(args.turns, folder)
    trickle()
    with serving() as url:
        health_latency(url)
        drops(url, args.drops)


if __name__ == "__main__":
    main()
