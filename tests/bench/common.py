"""What the benchmarks share: processes on loopback, the signed Slack load, percentiles, RSS.

`process()` starts a server in its own process and yields it once it serves (its URL and pid).
`load_run()` is the open-loop generator of signed Slack `app_mention` events, each in a new
thread, sent at a fixed rate whatever the answers; the fake Slack (`fake_slack_server.py`)
records when each answer reached it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from tests.fakes.slack import app_mention as mention_event
from tests.fakes.slack import event_callback, sign

ROOT = Path(__file__).resolve().parents[2]
THREADBRIDGE = str(Path(sys.executable).parent / "threadbridge")
SECRET = "bench-signing-secret"
SERVING = re.compile(rb"serving on (http://[\d.]+:\d+)")
DRAIN_S = 30.0  # the most a run waits for a backlog to clear before the next run


@dataclass(frozen=True)
class Running:
    """A server started by `process()`."""

    url: str
    pid: int
    ready_s: float  # from the start to the first answer on /healthz


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This environment plus `env`, without proxies (everything runs on loopback)."""
    full_env = {**os.environ, **(env or {})}
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        full_env.pop(var, None)
    return full_env


@contextmanager
def process(command: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Running]:
    """Start `command` (in the repo, its own process); yield it once its URL answers."""
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=clean_env(env), stdout=out, stderr=out)
    try:
        deadline = started + 30
        while time.monotonic() < deadline:
            found = SERVING.search(log.read_bytes())
            if found:
                url = found.group(1).decode()
                if _ready(url):
                    yield Running(url, proc.pid, time.monotonic() - started)
                    return
            if proc.poll() is not None:
                raise RuntimeError(f"{command} exited:\n{log.read_text(errors='replace')}")
            time.sleep(0.01)
        raise RuntimeError(f"{command} did not start:\n{log.read_text(errors='replace')}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _ready(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=2)  # any answer: it is listening
        return True
    except httpx.HTTPError:
        return False


def emulator_command(latency_s: float, service: str = "openai") -> list[str]:
    """`threadbridge emulate SERVICE` on a free port, answering after `latency_s`."""
    return [THREADBRIDGE, "emulate", service, "--port", "0", "--latency", str(latency_s)]


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MB, read from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no VmHWM in /proc/{pid}/status")
    return int(found.group(1)) / 1024


DEMO_AGENT = """
[agents.demo]
service = "local"
"""


def openai_agent(agent_url: str, max_connections: int = 100) -> str:
    """`[agents.gpt]`: the OpenAI-compatible emulator at `agent_url` (key in BENCH_OPENAI_KEY)."""
    return f"""
[agents.gpt]
service = "openai"
base_url = "{agent_url}"
api_key_env = "BENCH_OPENAI_KEY"
model = "gpt-4o-mini"
timeout_s = 60
max_connections = {max_connections}
"""


def write_config(tmp_path: Path, default_agent: str, sections: str) -> Path:
    """`tmp_path/threadbridge.toml`: a SQLite store in `tmp_path`, then `sections`."""
    path = tmp_path / "threadbridge.toml"
    store = f'[store]\nurl = "sqlite:///{tmp_path}/tb.db"\n'
    path.write_text(f'default_agent = "{default_agent}"\n\n{store}{sections}', encoding="utf-8")
    return path


def threadbridge_config(
    tmp_path: Path, slack_api: str, agent_url: str, max_connections: int = 100
) -> Path:
    """`threadbridge serve`'s config: SQLite, the OpenAI agent at `agent_url`, Slack unpaced."""
    slack = f"""
[slack]
api_base_url = "{slack_api}/api/"
post_rate_per_channel = 0
"""
    return write_config(tmp_path, "gpt", openai_agent(agent_url, max_connections) + slack)


def build_events(run: int, count: int) -> list[tuple[str, bytes, dict[str, str]]]:
    """(token, body, headers) of `count` signed app_mentions, each in a new thread."""
    out = []
    now = int(time.time())
    for n in range(count):
        token = f"bench-{run}-{n}"
        ts = f"{now}.{run:03d}{n:06d}"
        event = mention_event(f"<@UBOT> {token}", ts=ts)
        body = json.dumps(event_callback(event)).encode()
        headers = {"Content-Type": "application/json", **sign(body, SECRET)}
        out.append((token, body, headers))
    return out


async def answers(fake: httpx.AsyncClient) -> dict[str, float]:
    """The answers the fake Slack has received (an overloaded fake may drop a poll: again)."""
    for attempt in range(5):
        try:
            response = await fake.get("/_bench/answers")
            break
        except httpx.TransportError:
            if attempt == 4:
                raise
            await asyncio.sleep(0.2)
    found: dict[str, float] = response.json()["answers"]
    return found


async def load_run(
    target: str, fake_url: str, run: int, rate: int, seconds: float, grace_s: float
) -> dict[str, Any]:
    """One open-loop run at `rate` events/s for `seconds` against `target`'s /slack/events.

    It kept up when every event was answered within `grace_s` of the end of the send window;
    then it waits (up to DRAIN_S) for the rest, so that the next run starts clean.
    """
    count = int(rate * seconds)
    events = build_events(run, count)
    sent: dict[str, float] = {}
    failed = 0
    # aiohttp: httpx cost the generator about 2 ms of CPU an event (0.3 ms here), on the cores
    # the systems under test share with it. Up to 512 requests open at once.
    connector = aiohttp.TCPConnector(limit=512)
    sender = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))
    url = f"{target}/slack/events"
    async with httpx.AsyncClient(base_url=fake_url, timeout=30) as fake:
        await fake.post("/_bench/reset")

        async def fire(n: int, token: str, body: bytes, headers: dict[str, str]) -> None:
            nonlocal failed
            sent[token] = time.time()
            try:
                async with sender.post(url, data=body, headers=headers) as response:
                    await response.read()
                    failed += response.status != 200
            except (aiohttp.ClientError, TimeoutError):
                failed += 1

        loop = asyncio.get_running_loop()
        tasks = []
        start = loop.time()
        lag = 0.0
        for n, (token, body, headers) in enumerate(events):
            delay = start + n / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                lag = max(lag, -delay)
            tasks.append(asyncio.create_task(fire(n, token, body, headers)))
        window_end = time.time()
        deadline = window_end + grace_s
        got: dict[str, float] = {}
        while time.time() < deadline:
            got = await answers(fake)
            if len(got) >= count:
                break
            await asyncio.sleep(0.1)
        in_time = {t: at for t, at in got.items() if at <= deadline}
        drain_deadline = time.time() + DRAIN_S
        while len(got) < count and time.time() < drain_deadline:  # let the backlog clear
            await asyncio.sleep(0.25)
            got = await answers(fake)
        await asyncio.gather(*tasks, return_exceptions=True)
        latencies = [(at - sent[t]) * 1000 for t, at in got.items() if t in sent]
    await sender.close()
    return {
        "rate": rate,
        "count": count,
        "answered": len(in_time),
        "answered_late": len(got),
        "failed": failed,
        "kept_up": len(in_time) >= count and failed == 0,
        "lag_ms": lag * 1000,
        "latencies": latencies,
        "sent": sent,
        "got": got,
        "window_end": window_end,
    }
