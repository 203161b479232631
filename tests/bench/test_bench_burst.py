"""Benchmark 4 (issue 9): a burst of web-chat messages, the agent answering in 2 s.

2,000 messages in 2,000 threads are posted to `threadbridge serve` (SQLite, the web chat, the
OpenAI emulator at 2 s in its own process) as fast as one client can: one aiohttp client, a few
dozen requests open at once. Every message must be answered within 12 s of the first post, and
the serve process's peak RSS (VmHWM) stay ≤ 300 MB. An answer counts when its agent message is
in the store, which is when `GET /api/chat/{thread}/messages` shows it; the store is read
directly (read-only), as polling 2,000 threads over HTTP would load the server under test.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from tests.bench.common import (
    THREADBRIDGE,
    emulator_command,
    openai_agent,
    peak_rss_mb,
    process,
    write_config,
)
from tests.bench.table import BenchTable

MESSAGES = int(os.environ.get("BENCH_BURST_MESSAGES", "2000"))
LATENCY_S = 2.0
DEADLINE_S = 12.0
WAIT_S = 60.0  # the most we wait for the last answers (the figure says how long they took)
CLIENT_CONCURRENCY = 32  # requests one client keeps open
MAX_CONNECTIONS = 1000  # [agents.gpt] max_connections, as many as [bridge] max_turns
BENCH_4 = "4 web burst"


def config(tmp_path: Path, agent_url: str) -> Path:
    web = "\n[web]\nenabled = true\n"
    return write_config(tmp_path, "gpt", openai_agent(agent_url, MAX_CONNECTIONS) + web)


async def post_all(url: str, count: int) -> tuple[float, float, int]:
    """Post `count` messages, each in its own thread: (first post's time, last's, failures).

    The client is aiohttp: httpx spent 4.7 ms of CPU a post here, more than the server under
    test, on a machine of 2 cores the server shares with it.
    """
    failures = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(count):
        queue.put_nowait(n)
    connector = aiohttp.TCPConnector(limit=CLIENT_CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                n = queue.get_nowait()
                body = {"text": f"burst {n}", "user": "bench", "id": f"m{n}"}
                try:
                    async with client.post(f"/api/chat/burst-{n}", json=body) as response:
                        await response.read()
                        failures += response.status != 202
                except (aiohttp.ClientError, TimeoutError):
                    failures += 1

        first = time.time()
        await asyncio.gather(*(worker() for _ in range(CLIENT_CONCURRENCY)))
        return first, time.time(), failures


def answered(db: Path) -> tuple[int, float | None]:
    """(agent answers stored, when the last one was stored as a unix time)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        count, last = conn.execute(
            "SELECT count(*), max(created) FROM messages WHERE role = 'agent' AND kind = 'message'"
        ).fetchone()
    if last is None:
        return count, None
    stamp = datetime.fromisoformat(last)
    return count, (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


async def wait_answers(db: Path, count: int, first: float) -> tuple[int, float | None]:
    while True:
        found, last = await asyncio.to_thread(answered, db)
        if found >= count or time.time() > first + WAIT_S:
            return found, last
        await asyncio.sleep(0.25)


@pytest.mark.timeout(300)
async def test_web_burst(tmp_path: Path, bench: BenchTable) -> None:
    env = {"BENCH_OPENAI_KEY": "bench"}
    with process(emulator_command(LATENCY_S), tmp_path / "agent.log") as agent:
        serve_cmd = [THREADBRIDGE, "serve", "--config", str(config(tmp_path, agent.url))]
        with process([*serve_cmd, "--port", "0"], tmp_path / "serve.log", env) as tb:
            client_cpu = time.process_time()
            first, last_post, failures = await post_all(tb.url, MESSAGES)
            client_cpu = time.process_time() - client_cpu
            found, last_answer = await wait_answers(tmp_path / "tb.db", MESSAGES, first)
            rss = peak_rss_mb(tb.pid)
    took = last_answer - first if last_answer is not None and found >= MESSAGES else None
    print(
        f"\nweb burst: {MESSAGES} messages posted in {last_post - first:.2f} s "
        f"({failures} failed), {found} answered, the last {took or float('nan'):.2f} s after "
        f"the first post; peak RSS {rss:.0f} MB; logs in {tmp_path}"
    )
    bench.record(BENCH_4, "posting took (one client)", last_post - first, "s")
    bench.record(BENCH_4, "the client's CPU a post", 1000 * client_cpu / MESSAGES, "ms")
    bench.record(BENCH_4, "posts refused or failed", failures, at_most=0)
    bench.record(BENCH_4, "answered", 100 * found / MESSAGES, "%", at_least=100)
    bench.record(BENCH_4, "all answered, after the first post", took, "s", at_most=DEADLINE_S)
    bench.record(BENCH_4, "serve peak RSS (VmHWM)", rss, "MB", at_most=300)
