"""Bridge benchmarks: `make bench` prints the figures (they are not asserted).

1. Throughput and added latency of the bridge alone: the in-process demo agent, SQLite, a
   channel that records posts — what the durable inbox/outbox costs per turn.
2. Concurrency with a slow agent: the Engage emulator, in its own process, answering in 1 s,
   with many threads at once.
"""

from __future__ import annotations

import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from core.model import Reply
from tests.bridgekit import RecordingChannel, inbound, make_config, start_bridge, stop_bridge

TURNS = int(os.environ.get("BENCH_TURNS", "2000"))
SLOW_TURNS = int(os.environ.get("BENCH_SLOW_TURNS", "1000"))
THREADBRIDGE = str(Path(sys.executable).parent / "threadbridge")


class TimedChannel(RecordingChannel):
    """Records when each reply was posted."""

    def __init__(self) -> None:
        super().__init__()
        self.posted_at: dict[str, float] = {}

    async def post(self, reply: Reply) -> list[str]:
        self.posted_at[reply.thread.thread] = time.perf_counter()
        return await super().post(reply)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def report(title: str, rows: list[tuple[str, Any]]) -> None:
    print(f"\n{title}")
    for name, value in rows:
        print(f"  {name:<38} {value}")


async def run_turns(config: Any, count: int, timeout: float) -> dict[str, Any]:
    channel = TimedChannel()
    bridge = await start_bridge(config, channel)
    sent_at: dict[str, float] = {}
    started = time.perf_counter()
    for n in range(count):
        sent_at[f"t{n}"] = time.perf_counter()
        await bridge.submit(inbound(f"t{n}", f"hello {n}"))
    accepted = time.perf_counter() - started
    await channel.wait_for(count, timeout=timeout)
    elapsed = time.perf_counter() - started
    await stop_bridge(bridge)
    latencies = [(channel.posted_at[t] - sent_at[t]) * 1000 for t in sent_at]
    return {"elapsed": elapsed, "accepted": accepted, "latencies": latencies}


@pytest.mark.timeout(600)
async def test_bridge_overhead(tmp_path: Path) -> None:
    config = make_config(tmp_path, bridge={"poll_s": 0.5})
    result = await run_turns(config, TURNS, timeout=300)
    lat = result["latencies"]
    report(
        f"bridge alone: {TURNS} messages in {TURNS} threads, demo agent, SQLite",
        [
            ("submit rate (messages accepted/s)", f"{TURNS / result['accepted']:.0f}"),
            ("turns completed/s", f"{TURNS / result['elapsed']:.0f}"),
            ("submit → posted p50 (ms, queueing incl.)", f"{statistics.median(lat):.1f}"),
            ("submit → posted p99 (ms, queueing incl.)", f"{percentile(lat, 99):.1f}"),
            ("peak RSS (MB)", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"),
        ],
    )


@contextmanager
def emulator_process(latency_s: float) -> Iterator[str]:
    """`threadbridge emulate engage` in its own process, as a real service would be."""
    command = [THREADBRIDGE, "emulate", "engage", "--port", "0", "--latency", str(latency_s)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                log.seek(0)
                found = re.search(rb"serving on (http://[\d.]+:\d+)", log.read())
                if found:
                    yield found.group(1).decode()
                    return
                time.sleep(0.05)
            raise RuntimeError("the emulator did not start")
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.mark.timeout(600)
async def test_slow_agent_concurrency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_KEY", "k")
    monkeypatch.setenv("BENCH_ORG", "o")
    with emulator_process(latency_s=1.0) as url:
        agent = {
            "service": "engage-runs",
            "base_url": url,
            "agent": "a",
            "api_key_env": "BENCH_KEY",
            "org_id_env": "BENCH_ORG",
            "timeout_s": 60,
            "max_connections": 200,
        }
        config = make_config(tmp_path, agents={"slow": agent}, default_agent="slow")
        result = await run_turns(config, SLOW_TURNS, timeout=300)
    lat = result["latencies"]
    report(
        f"slow agent: {SLOW_TURNS} threads, the Engage emulator (own process) answering in 1 s",
        [
            ("all submitted after (s)", f"{result['accepted']:.2f}"),
            ("all answered after (s)", f"{result['elapsed']:.2f}"),
            ("one at a time would take (s)", f"{SLOW_TURNS * 1.0:.0f}"),
            ("end-to-end p50 (ms)", f"{statistics.median(lat):.0f}"),
            ("end-to-end p99 (ms)", f"{percentile(lat, 99):.0f}"),
        ],
    )
