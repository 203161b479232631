"""The circuit breaker per agent: its state machine on a fake clock, the store's keeping of a
message, and the bridge keeping messages while an agent is down (Engage emulator)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.agents.emulators.engage import create_app
from core.breaker import Admission, Breaker
from core.errors import ConfigError
from core.sql import inbox
from core.store import ClaimLost, NewMessage, Store
from core.tables import utcnow
from tests.bridgekit import (
    RecordingChannel,
    eventually,
    inbound,
    make_config,
    start_bridge,
    stop_bridge,
)
from tests.servers import run_asgi


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, failures: int = 3, cooldown_s: float = 30.0) -> Breaker:
    return Breaker("helper", failures, cooldown_s, clock)


# -- the state machine --------------------------------------------------------------------------


def test_it_opens_after_n_failed_turns_in_a_row_only(clock: Clock) -> None:
    b = breaker(clock)
    b.failure()
    b.failure()
    b.success()  # an answer between failures starts the count again
    b.failure()
    b.failure()
    assert (b.state, b.admit()) == ("closed", "call")
    b.failure()
    assert b.state == "open"
    assert b.admit() == "keep"
    assert b.retry_in() == 30.0


def test_after_the_cooldown_one_probe_goes_and_the_rest_wait(clock: Clock) -> None:
    b = breaker(clock, failures=1)
    b.failure()
    clock.now += 29.9
    assert (b.state, b.admit()) == ("open", "keep")
    assert b.retry_in() == pytest.approx(0.1)
    clock.now += 0.1
    assert b.state == "half_open"
    assert b.retry_in() == 0.0
    assert b.admit() == "probe"
    assert b.admit() == "wait"
    assert b.admit() == "wait"
    assert b.state == "half_open"


def test_a_probe_that_succeeds_closes_it(clock: Clock) -> None:
    b = breaker(clock, failures=1)
    b.failure()
    assert not b.answered
    clock.now += 30
    assert b.admit() == "probe"
    b.success(probe=True)
    assert (b.state, b.admit(), b.answered) == ("closed", "call", True)
    b.failure()  # the count started again: one more failure opens it
    assert b.state == "open"


def test_a_probe_that_fails_reopens_it_for_a_whole_cooldown(clock: Clock) -> None:
    b = breaker(clock, failures=2)
    b.failure()
    b.failure()
    clock.now += 45  # later than the cooldown: the next probe counts from its own failure
    assert b.admit() == "probe"
    b.failure(probe=True)
    assert (b.state, b.admit(), b.retry_in()) == ("open", "keep", 30.0)
    clock.now += 30
    assert b.admit() == "probe"


def test_a_probe_without_an_outcome_lets_the_next_one_go(clock: Clock) -> None:
    b = breaker(clock, failures=1)
    b.failure()
    clock.now += 30
    first = Admission(b, probe=b.admit() == "probe")
    assert first.probe
    assert b.admit() == "wait"
    first.close()  # cancelled or crashed before the agent said anything
    assert b.admit() == "probe"


def test_a_retry_after_longer_than_the_cooldown_holds_the_probe_back(clock: Clock) -> None:
    b = breaker(clock, failures=1, cooldown_s=5)
    b.failure(retry_after=12)
    assert (b.state, b.retry_in()) == ("open", 12.0)
    clock.now += 12
    assert b.admit() == "probe"
    b.failure(probe=True, retry_after=1)  # shorter than the cooldown: the cooldown holds
    assert b.retry_in() == 5.0


def test_failures_of_calls_that_started_before_it_opened_change_nothing(clock: Clock) -> None:
    b = breaker(clock, failures=1)
    b.failure()
    clock.now += 20
    b.failure()  # a late one: it does not push the probe back
    clock.now += 10
    assert b.admit() == "probe"
    b.failure()  # neither does one while the probe is out
    assert b.admit() == "wait"


def test_any_answer_closes_it_even_one_that_started_before(clock: Clock) -> None:
    b = breaker(clock, failures=1)
    b.failure()
    b.success()
    assert b.state == "closed"


def test_an_admission_reports_once(clock: Clock) -> None:
    b = breaker(clock, failures=1)
    admission = Admission(b, probe=False)
    admission.answered()
    admission.unavailable()
    admission.close()
    assert b.state == "closed"
    failing = Admission(b, probe=False)
    failing.unavailable()
    failing.answered()
    assert b.state == "open"


async def test_waiting_turns_wake_when_the_probe_ends(clock: Clock) -> None:
    b = breaker(clock, failures=1)
    b.failure()
    clock.now += 30
    assert b.admit() == "probe"
    assert b.admit() == "wait"
    waiter = asyncio.create_task(b.settled())
    await asyncio.sleep(0)
    assert not waiter.done()
    b.failure(probe=True)
    await asyncio.wait_for(waiter, 1)
    assert b.admit() == "keep"
    clock.now += 30
    assert b.admit() == "probe"
    waiter = asyncio.create_task(b.settled())
    await asyncio.sleep(0)
    b.success(probe=True)
    await asyncio.wait_for(waiter, 1)
    assert b.admit() == "call"


# -- configuration ------------------------------------------------------------------------------


def test_the_breaker_keys_have_defaults_and_are_checked(tmp_path: Path) -> None:
    settings = make_config(tmp_path).bridge
    assert (settings.breaker_failures, settings.breaker_cooldown_s) == (5, 30.0)
    assert (settings.on_recovery, settings.keep_max_age_s) == ("answer", 86400.0)
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, bridge={"on_recovery": "retry"})
    assert "bridge.on_recovery" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, bridge={"breaker_failures": 0})
    assert "bridge.breaker_failures" in str(caught.value)


# -- the store keeps a message ------------------------------------------------------------------


async def test_a_kept_message_is_noticed_once_and_held_back_with_its_thread(
    store_url: str,
) -> None:
    store = Store(store_url)
    await store.migrate()
    try:
        first, second = inbound("t", "first"), inbound("t", "second")
        await store.add_inbound(first)
        await store.add_inbound(second)
        [claim] = await store.claim_inbox(["web"], 10, 30)
        conversation = await store.open_conversation(first.thread, "demo", {}, None)
        notice = NewMessage(role="system", kind="notice", post=True, content="kept!")

        assert await store.keep_inbound(
            first.event_id, conversation, notice, claim=claim, delay_s=60, reason="down"
        )
        # neither it nor the message after it in its thread is taken before the delay
        assert await store.claim_inbox(["web"], 10, 30) == []
        # the message waiting behind it was told as well; nobody is told twice
        assert not await store.keep_inbound(first.event_id, conversation, notice)
        assert not await store.keep_inbound(second.event_id, conversation, notice)
        rows = await store.history(conversation.id)
        assert [(r.role, r.kind, r.content) for r in rows] == [("system", "notice", "kept!")] * 2
        replies = await store.claim_outbox(["web"], 10, 30)  # the oldest of the thread
        assert [(r.payload["text"], r.payload["reply_to"]) for r in replies] == [
            ("kept!", first.event_id)
        ]

        # the delay is up: it comes back, marked, and the try did not count
        await _expire_kept(store)
        [again] = await store.claim_inbox(["web"], 10, 30)
        assert (again.id, again.attempts) == (claim.id, 1)
        assert "kept" in again.payload
        with pytest.raises(ClaimLost):  # the old claim is not ours any more
            await store.keep_inbound(first.event_id, conversation, notice, claim=claim)
        await store.finish_turn(again, conversation, [])
        [after] = await store.claim_inbox(["web"], 10, 30)
        assert after.payload["event_id"] == second.event_id
        assert "kept" in after.payload
        await store.finish_turn(after, conversation, [])
        # a message noticed while it waits keeps its turn and its mark; a finished one is not
        # noticed at all
        third = inbound("t", "third")
        await store.add_inbound(third)
        assert await store.keep_inbound(third.event_id, conversation, notice)
        assert not await store.keep_inbound(third.event_id, conversation, notice)
        assert not await store.keep_inbound(first.event_id, conversation, notice)
        [last] = await store.claim_inbox(["web"], 10, 30)
        assert (last.payload["event_id"], last.attempts, "kept" in last.payload) == (
            third.event_id,
            1,
            True,
        )
    finally:
        await store.close()


async def _expire_kept(store: Store) -> None:
    past = utcnow() - timedelta(seconds=1)
    statement = inbox.update().where(inbox.c.claim_token.is_(None)).values(lease_until=past)
    await store.write(lambda conn: conn.execute(statement))


# -- the bridge keeps messages while an agent is down -------------------------------------------


@pytest.fixture
def engage(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("TB_ENGAGE_KEY", "key-1")
    monkeypatch.setenv("TB_ENGAGE_ORG", "org-1")
    with run_asgi(create_app(api_keys={"key-1"})) as url:
        yield url


def agent(url: str) -> dict[str, Any]:
    return {
        "service": "engage-conversations",
        "base_url": url,
        "agent": "helper",
        "api_key_env": "TB_ENGAGE_KEY",
        "org_id_env": "TB_ENGAGE_ORG",
        "retries": 0,
        "timeout_s": 10,  # a fault decides when a call fails, not the clock
    }


def down(url: str, times: int) -> None:
    body = {"status": 503, "times": times, "path_contains": "/chat"}
    httpx.post(f"{url}/_emulator/faults", json=body).raise_for_status()


async def start(tmp_path: Path, engage: str, **bridge: Any) -> tuple[Any, RecordingChannel]:
    channel = RecordingChannel()
    settings = {"breaker_failures": 1, "breaker_cooldown_s": 0.3, **bridge}
    config = make_config(
        tmp_path, agents={"eng": agent(engage)}, default_agent="eng", bridge=settings
    )
    return await start_bridge(config, channel), channel


async def test_the_bridge_keeps_a_message_then_answers_it_once_the_probe_succeeds(
    tmp_path: Path, engage: str
) -> None:
    bridge, channel = await start(tmp_path, engage, kept_notice="kept for later")
    down(engage, times=2)  # the first try and the first probe fail; the second probe answers
    await bridge.submit(inbound("t", "hello"))
    await channel.wait_for(1)
    assert channel.texts() == ["kept for later"]
    assert bridge.breakers["eng"].state in ("open", "half_open")
    await channel.wait_for(2)
    assert channel.texts() == ["kept for later", "[helper] received: hello"]
    assert bridge.breakers["eng"].state == "closed"
    counts = await bridge.store.counts()
    assert counts.get("inbox_done") == 1 and "inbox_failed" not in counts
    await stop_bridge(bridge)


async def test_a_message_kept_too_long_fails_with_the_usual_notice(
    tmp_path: Path, engage: str
) -> None:
    bridge, channel = await start(tmp_path, engage, keep_max_age_s=0.6, kept_notice="kept")
    down(engage, times=1000)
    await bridge.submit(inbound("t", "hello"))
    await channel.wait_for(2)
    assert channel.texts()[0] == "kept"
    assert "could not answer" in channel.texts()[1]
    counts = await eventually(lambda: bridge.store.counts())
    assert counts.get("inbox_failed") == 1
    conversation = await bridge.store.conversation_for_thread("web:-/-/t")
    [failure] = await bridge.store.turns_failed(conversation.id)
    assert "while the agent was unavailable" in failure.error
    await stop_bridge(bridge)


async def test_one_failed_turn_below_the_threshold_fails_as_before(
    tmp_path: Path, engage: str
) -> None:
    bridge, channel = await start(tmp_path, engage, breaker_failures=2)
    down(engage, times=1)
    await bridge.submit(inbound("t", "hello"))
    await channel.wait_for(1)
    assert "could not answer" in channel.texts()[0]
    assert bridge.breakers["eng"].state == "closed"
    await stop_bridge(bridge)


async def test_stopping_hands_back_turns_that_wait_for_the_probe(
    tmp_path: Path, engage: str
) -> None:
    bridge, channel = await start(tmp_path, engage, kept_notice="kept")
    down(engage, times=1)
    slow = {"delay_s": 1.5, "times": 1, "path_contains": "/chat"}
    httpx.post(f"{engage}/_emulator/faults", json=slow).raise_for_status()
    await bridge.submit(inbound("t1", "one"))
    await channel.wait_for(1)
    await bridge.submit(inbound("t2", "two"))
    await channel.wait_for(2)
    assert channel.texts() == ["kept", "kept"]

    def chats() -> int:
        seen = httpx.get(f"{engage}/_emulator/requests").json()
        return sum(1 for r in seen if r["path"].endswith("/chat"))

    await eventually(lambda: chats() == 2)  # the failed call, then the (slow) probe
    await eventually(lambda: len(bridge._turns) == 2)  # the other turn waits for the probe
    await stop_bridge(bridge, deadline_s=10)
    # the probe was let finish; the waiting turn did not sit through it: its message went
    # back to the inbox, kept (not answered, not cancelled)
    store = Store(bridge.store.url)
    try:
        counts = await store.counts()
    finally:
        await store.close()
    assert (counts.get("inbox_done"), counts.get("inbox_working")) == (1, 1)
