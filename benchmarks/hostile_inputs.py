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
import logging
import platform
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import torch

from unigrpo_env import Trajectory
from unigrpo_env.rewards.remote import RemoteReward

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tests' peers and builders
from test_reward_service import batch, largest_metadata, raw_server, request_with, serving, trickle  # noqa: E402
from test_trajectory_files import long_trajectory  # noqa: E402


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


def trickled() -> None:
    remote = RemoteReward("http://127.0.0.1:1", timeout=2.0, retries=1, backoff=0.5, max_batch=4)
    bound = (remote.retries + 1) * remote.timeout + remote.backoff * (2**remote.retries - 1)
    with raw_server(trickle) as url, warnings.catch_warnings(record=True) as caught:
        remote.url = url
        warnings.simplefilter("always")
        start = time.monotonic()
        out = remote(batch(3, seed=0))
        elapsed = time.monotonic() - start
    print("2. RemoteReward(timeout=2, retries=1, backoff=0.5) against a byte every 0.2 s")
    print(f"   scores {out.scores.tolist()} after {elapsed:.2f} s (documented bound {bound:.1f} s)")
    print(f"   warning: {caught[0].message}")
    remote.close()


def health_latency(url: str) -> None:
    largest = largest_metadata()
    print("3. /health while one request's metadata is parsed (worst of back-to-back calls)")
    for label, text in (
        (f"the largest accepted, {len(largest) / 1e6:.1f} M characters of tiny values", largest),
        ("46 MB (refused by its length)", " " * 46_000_000),
    ):
        body = request_with(meta_text=text)
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
    trickled()
    with serving("jpeg_compressibility", log_level="warning") as url:
        health_latency(url)
        drops(url, args.drops)


if __name__ == "__main__":
    main()
