"""Bridge benchmarks: `make bench` prints the figures (they are not asserted).

1. Throughput and added latency of the bridge alone: the in-process demo agent, SQLite, a
   channel that records posts — what the durable inbox/outbox costs per turn.
2. Concurrency with a slow agent: the Engage emulator, in its own process, answering in 1 s,
   with many threads at once.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from core.model import Reply
from tests.bench.common import emulator_command, percentile, process
from tests.bench.table import BenchTable
from tests.bridgekit import RecordingChannel, inbound, make_config, start_bridge, stop_bridge

TURNS = int(os.environ.get("BENCH_TURNS", "2000"))
SLOW_TURNS = int(os.environ.get("BENCH_SLOW_TURNS", "1000"))


class TimedChannel(RecordingChannel):
    """Records when each reply was posted."""

    def __init__(self) -> None:
        super().__init__()
        self.posted_at: dict[str, float] = {}

    async def post(self, reply: Reply) -> list[str]:
        self.posted_at[reply.thread.thread] = time.perf_counter()
        return await super().post(reply)


def report(
    bench: BenchTable, benchmark: str, title: str, rows: list[tuple[str, float, str]]
) -> None:
    """Print the figures under `title` and record them in the table (for information)."""
    print(f"\n{title}")
    for name, value, unit in rows:
        print(f"  {name:<38} {value:.1f} {unit}")
        bench.record(benchmark, name, value, unit)


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
async def test_bridge_overhead(tmp_path: Path, bench: BenchTable) -> None:
    config = make_config(tmp_path, bridge={"poll_s": 0.5})
    result = await run_turns(config, TURNS, timeout=300)
    lat = result["latencies"]
    report(
        bench,
        "bridge alone",
        f"bridge alone: {TURNS} messages in {TURNS} threads, demo agent, SQLite",
        [
            ("submit rate", TURNS / result["accepted"], "messages/s"),
            ("turns completed", TURNS / result["elapsed"], "turns/s"),
            ("submit → posted p50 (queueing incl.)", statistics.median(lat), "ms"),
            ("submit → posted p99 (queueing incl.)", percentile(lat, 99), "ms"),
            ("peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MB"),
        ],
    )


@pytest.mark.timeout(600)
async def test_slow_agent_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bench: BenchTable
) -> None:
    monkeypatch.setenv("BENCH_KEY", "k")
    monkeypatch.setenv("BENCH_ORG", "o")
    emulate = emulator_command(1.0, "engage")
    with process(emulate, tmp_path / "agent.log") as emulator:
        agent = {
            "service": "engage-runs",
            "base_url": emulator.url,
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
        bench,
        "bridge, agent at 1 s",
        f"slow agent: {SLOW_TURNS} threads, the Engage emulator (own process) answering in 1 s",
        [
            ("all submitted after", result["accepted"], "s"),
            ("all answered after", result["elapsed"], "s"),
            ("one at a time would take", SLOW_TURNS * 1.0, "s"),
            ("end-to-end p50", statistics.median(lat), "ms"),
            ("end-to-end p99", percentile(lat, 99), "ms"),
        ],
    )
