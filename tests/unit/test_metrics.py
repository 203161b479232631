"""Metrics the bridge counts and scrapes, trace ids, and the JSON log line format."""

from __future__ import annotations

import asyncio
import enum
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core.errors import PlatformRejected, PlatformRetryable
from core.logs import (
    TRACE_HEADER,
    JsonFormatter,
    TraceFilter,
    bind_trace,
    current_trace,
    trace_headers,
    trace_of,
)
from core.metrics import Metrics, breaker_state
from core.store import Store
from tests.bridgekit import (
    RecordingChannel,
    eventually,
    inbound,
    make_config,
    start_bridge,
    stop_bridge,
)
from tests.servers import run_asgi

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: bytes) -> Samples:
    """Every sample of a scrape, by name and sorted labels."""
    found: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


async def scrape_when(metrics: Metrics, store: Store, name: str, **labels: str) -> Samples:
    """A scrape, once the sample `name` with `labels` has been counted."""

    async def counted() -> Samples | None:
        found = samples(await metrics.render(store, ["web"]))
        return found if value(found, name, **labels) else None

    result: Samples = await eventually(counted)
    return result


# -- trace ids and log lines ---------------------------------------------------------------------


async def test_a_trace_id_is_a_short_stable_hash_scoped_to_its_task() -> None:
    trace = trace_of("slack:T1/C1/1700000000.000100")
    assert trace == trace_of("slack:T1/C1/1700000000.000100")
    assert len(trace) == 16 and int(trace, 16) >= 0
    assert trace != trace_of("slack:T1/C1/1700000000.000200")

    async def handle(event_id: str) -> tuple[str | None, dict[str, str]]:
        bind_trace(event_id)
        await asyncio.sleep(0.01)  # the other task binds its own meanwhile
        return current_trace(), trace_headers()

    (first, first_headers), (second, _) = await asyncio.gather(handle("e1"), handle("e2"))
    assert (first, second) == (trace_of("e1"), trace_of("e2"))
    assert first_headers == {TRACE_HEADER: trace_of("e1")}
    assert current_trace() is None  # nothing leaked into this task
    assert trace_headers() == {}


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.json_log")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


async def test_json_lines_carry_time_level_logger_message_trace_and_extras(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_log

    async def in_a_turn() -> None:
        bind_trace("web:t1:1")
        logger.info("turn answered by %s", "demo", extra={"agent": "demo", "seconds": 0.5})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("it failed: %s", "ünïcode")

    await asyncio.create_task(in_a_turn())
    logger.warning('outside any message "quoted"\nsecond line')
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # a multi-line message and a traceback stay on one line each
    answered, failed, outside = (json.loads(line) for line in lines)
    assert answered["message"] == "turn answered by demo"
    assert answered["level"] == "INFO"
    assert answered["logger"] == "tests.json_log"
    assert answered["trace_id"] == trace_of("web:t1:1")
    assert (answered["agent"], answered["seconds"]) == ("demo", 0.5)
    assert answered["time"].endswith("+00:00")
    assert failed["message"] == "it failed: ünïcode"
    assert "RuntimeError: boom" in failed["exc"]
    assert failed["trace_id"] == answered["trace_id"]
    assert outside["trace_id"] is None
    assert outside["message"] == 'outside any message "quoted"\nsecond line'


def test_breaker_states_become_labels() -> None:
    class State(enum.Enum):
        HALF_OPEN = 1

    class Breaker:
        def __init__(self, state: Any) -> None:
            self.state = state

    assert breaker_state(Breaker("closed")) == "closed"
    assert breaker_state(Breaker("half-open")) == "half_open"
    assert breaker_state(Breaker(State.HALF_OPEN)) == "half_open"
    assert breaker_state("OPEN") == "open"


# -- counting through a real bridge -------------------------------------------------------------


async def test_messages_turns_and_replies_are_counted(tmp_path: Path) -> None:
    channel = RecordingChannel("web")
    bridge = await start_bridge(make_config(tmp_path), channel)
    try:
        first = inbound("t1", "hello")
        await bridge.submit(first)
        await bridge.submit(first)  # a redelivery
        await bridge.submit(inbound("t2", "hi there"))
        await channel.wait_for(2)
        await scrape_when(
            bridge.metrics,
            bridge.store,
            "threadbridge_replies_posted_total",
            source="web",
            kind="answer",
        )
        found = samples(await bridge.metrics.render(bridge.store, ["web"], bridge.breakers))
    finally:
        await stop_bridge(bridge)
    assert value(found, "threadbridge_messages_received_total", source="web") == 2
    assert value(found, "threadbridge_messages_duplicate_total", source="web") == 1
    turns = value(found, "threadbridge_turn_seconds_count", agent="demo", outcome="answered")
    assert turns == 2
    assert value(found, "threadbridge_replies_posted_total", source="web", kind="answer") == 2
    assert value(found, "threadbridge_store_up") == 1
    for queue in ("inbox", "outbox"):
        for status in ("pending", "working"):
            assert value(found, f"threadbridge_{queue}_depth", source="web", status=status) == 0
    assert value(found, "threadbridge_breaker_state", agent="demo", state="closed") == 1
    assert value(found, "threadbridge_breaker_state", agent="demo", state="open") == 0


async def test_post_retries_and_replies_given_up_are_counted(tmp_path: Path) -> None:
    channel = RecordingChannel("web")
    channel.failures = [PlatformRetryable("503", retry_after=0.05)]
    bridge = await start_bridge(make_config(tmp_path), channel)
    try:
        await bridge.submit(inbound("t1", "retry me"))
        await channel.wait_for(1)
        channel.failures = [PlatformRejected("the bot was removed")]
        await bridge.submit(inbound("t2", "refused"))
        name = "threadbridge_replies_failed_total"
        found = await scrape_when(bridge.metrics, bridge.store, name, source="web")
    finally:
        await stop_bridge(bridge)
    assert value(found, "threadbridge_post_retries_total", source="web") == 1
    assert value(found, "threadbridge_replies_failed_total", source="web") == 1
    assert value(found, "threadbridge_replies_posted_total", source="web", kind="answer") == 1


@pytest.fixture
def refusing_agent() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """An OpenAI-compatible endpoint that refuses every key, recording each request's headers."""
    seen: list[dict[str, str]] = []

    async def completions(request: Request) -> JSONResponse:
        seen.append(dict(request.headers))
        return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    with run_asgi(app) as url:
        yield f"{url}/v1", seen


async def test_a_failed_turn_counts_an_agent_error_and_the_agent_got_the_trace(
    tmp_path: Path, refusing_agent: tuple[str, list[dict[str, str]]]
) -> None:
    url, seen = refusing_agent
    agent = {"service": "openai", "base_url": url, "model": "m", "retries": 0, "api_key_env": ""}
    agents = {"gpt": agent}
    config = make_config(tmp_path, default_agent="gpt", agents=agents)
    channel = RecordingChannel("web")
    bridge = await start_bridge(config, channel)
    try:
        message = inbound("t1", "are you there?")
        await bridge.submit(message)
        await channel.wait_for(1)  # the failure notice
        name = "threadbridge_replies_posted_total"
        found = await scrape_when(bridge.metrics, bridge.store, name, source="web", kind="notice")
    finally:
        await stop_bridge(bridge)
    assert channel.posts[0].kind == "notice"
    assert value(found, "threadbridge_agent_errors_total", agent="gpt", error="AgentRejected") == 1
    assert value(found, "threadbridge_turn_seconds_count", agent="gpt", outcome="failed") == 1
    assert value(found, "threadbridge_replies_posted_total", source="web", kind="notice") == 1
    assert [h.get(TRACE_HEADER.lower()) for h in seen] == [trace_of(message.event_id)]


# -- scrape-time gauges --------------------------------------------------------------------------


async def test_queue_depths_are_read_from_the_store_at_scrape_time(tmp_path: Path) -> None:
    store = Store(f"sqlite+aiosqlite:///{tmp_path}/tb.db")
    await store.migrate()
    try:
        for i in range(3):
            await store.add_inbound(inbound(f"t{i}", "waiting", source="slack"))
        found = samples(await Metrics().render(store, ["web"]))
    finally:
        await store.close()
    assert value(found, "threadbridge_inbox_depth", source="slack", status="pending") == 3
    assert value(found, "threadbridge_inbox_depth", source="web", status="pending") == 0
    assert value(found, "threadbridge_outbox_depth", source="web", status="pending") == 0


async def test_a_store_that_does_not_answer_is_said_and_the_scrape_still_answers() -> None:
    store = Store("postgresql+asyncpg://nobody@127.0.0.1:1/none")  # nothing listens on port 1
    try:
        metrics = Metrics()
        metrics.post_retried("slack")
        found = samples(await metrics.render(store, ["slack"]))
    finally:
        await store.close()
    assert value(found, "threadbridge_store_up") == 0
    assert not [name for name, _ in found if name.startswith("threadbridge_outbox_depth")]
    assert value(found, "threadbridge_post_retries_total", source="slack") == 1


async def test_the_leader_gauge_says_which_roles_this_instance_holds(tmp_path: Path) -> None:
    a, b = (Store(f"sqlite+aiosqlite:///{tmp_path}/tb.db") for _ in range(2))
    await a.migrate()
    leading, standing_by = Metrics(), Metrics()
    first, second = a.leadership("telegram-poll:1"), b.leadership("telegram-poll:1")
    leading.watch(first)
    standing_by.watch(second)
    try:
        assert await first.acquire() and not await second.acquire()
        found = [samples(await m.render(a, ["telegram"])) for m in (leading, standing_by)]
        await first.release()
        assert await second.acquire()
        after = samples(await standing_by.render(a, ["telegram"]))
        await second.release()
    finally:
        await a.close()
        await b.close()
    assert [value(f, "threadbridge_leader", role="telegram-poll:1") for f in found] == [1, 0]
    assert value(after, "threadbridge_leader", role="telegram-poll:1") == 1
