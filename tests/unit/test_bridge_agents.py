"""The bridge against the Engage emulator: stateful sessions, retries, and failures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from core.agents.emulators.engage import create_app
from tests.bridgekit import (
    RecordingChannel,
    eventually,
    inbound,
    make_config,
    start_bridge,
    stop_bridge,
)
from tests.servers import run_asgi


@pytest.fixture
def engage(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("TB_ENGAGE_KEY", "key-1")
    monkeypatch.setenv("TB_ENGAGE_ORG", "org-1")
    with run_asgi(create_app(api_keys={"key-1"})) as url:
        yield url


def agent(url: str, service: str = "engage-conversations", **extra: Any) -> dict[str, Any]:
    return {
        "service": service,
        "base_url": url,
        "agent": "helper",
        "api_key_env": "TB_ENGAGE_KEY",
        "org_id_env": "TB_ENGAGE_ORG",
        "retries": 2,
        "backoff_s": 0.01,
        "timeout_s": 2,
        **extra,
    }


def requests(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{url}/_emulator/requests").json())


def fault(url: str, **body: Any) -> None:
    httpx.post(f"{url}/_emulator/faults", json=body).raise_for_status()


async def test_a_stateful_agent_is_opened_once_and_sent_only_new_messages(
    store_url: str, engage: str
) -> None:
    channel = RecordingChannel()
    config = make_config(store_url, agents={"eng": agent(engage)}, default_agent="eng")
    bridge = await start_bridge(config, channel)
    await bridge.submit(inbound("t", "first", data={"team": "T1"}))
    await channel.wait_for(1)
    await bridge.submit(inbound("t", "second"))
    await channel.wait_for(2)
    assert channel.texts() == ["[helper] received: first", "[helper] received: second"]
    seen = requests(engage)
    opens = [r for r in seen if r["method"] == "POST" and r["path"] == "/v1/conversations"]
    chats = [r for r in seen if r["path"].endswith("/chat")]
    assert len(opens) == 1
    assert opens[0]["json"] == {"data": {"team": "T1"}, "source": "web"}
    assert [c["json"]["messages"] for c in chats] == [
        [{"role": "user", "content": "first", "name": "Ann"}],
        [{"role": "user", "content": "second", "name": "Ann"}],
    ]
    conversation = await bridge.store.conversation_for_thread("web:-/-/t")
    assert conversation is not None and conversation.remote_id
    remote = httpx.get(
        f"{engage}/v1/conversations/{conversation.remote_id}/messages",
        headers={"X-Api-Key": "key-1", "X-Org-Id": "org-1"},
    ).json()
    assert len(remote) == 4
    await stop_bridge(bridge)


async def test_a_stateless_agent_gets_the_history(store_url: str, engage: str) -> None:
    channel = RecordingChannel()
    config = make_config(
        store_url, agents={"eng": agent(engage, "engage-runs")}, default_agent="eng"
    )
    bridge = await start_bridge(config, channel)
    await bridge.submit(inbound("t", "first"))
    await channel.wait_for(1)
    await bridge.submit(inbound("t", "second"))
    await channel.wait_for(2)
    runs = [r for r in requests(engage) if r["path"] == "/v1/runs/chat"]
    assert [m["content"] for m in runs[1]["json"]["messages"]] == [
        "first",
        "[helper] received: first",
        "second",
    ]
    assert [m["role"] for m in runs[1]["json"]["messages"]] == ["user", "agent", "user"]
    await stop_bridge(bridge)


async def test_a_stateless_agent_gets_at_most_memory_turns(store_url: str, engage: str) -> None:
    channel = RecordingChannel()
    runs = agent(engage, "engage-runs", memory=2)
    bridge = await start_bridge(
        make_config(store_url, agents={"eng": runs}, default_agent="eng"), channel
    )
    for n, text in enumerate(("one", "two", "three")):
        await bridge.submit(inbound("t", text))
        await channel.wait_for(n + 1)
    last = [r for r in requests(engage) if r["path"] == "/v1/runs/chat"][-1]
    assert [m["content"] for m in last["json"]["messages"]] == [
        "two",
        "[helper] received: two",
        "three",
    ]
    await stop_bridge(bridge)


async def test_an_agent_that_keeps_failing_tells_the_user_and_keeps_the_message(
    store_url: str, engage: str
) -> None:
    channel = RecordingChannel()
    config = make_config(store_url, agents={"eng": agent(engage)}, default_agent="eng")
    bridge = await start_bridge(config, channel)
    fault(engage, status=503, times=3, path_contains="/chat")
    await bridge.submit(inbound("t", "are you there?"))
    await channel.wait_for(1)
    assert channel.posts[0].kind == "notice"
    assert "could not answer" in channel.posts[0].text
    conversation = await bridge.store.conversation_for_thread("web:-/-/t")
    assert conversation is not None and conversation.status == "failed"
    rows = await bridge.store.history(conversation.id)
    assert [(r.role, r.content) for r in rows][0] == ("user", "are you there?")
    failures = await bridge.store.turns_failed(conversation.id)
    assert len(failures) == 1 and "503" in failures[0].error
    chats = [r for r in requests(engage) if r["path"].endswith("/chat")]
    assert len(chats) == 3  # the first try and two retries
    # the service is back: the next message is answered and the conversation is open again
    await bridge.submit(inbound("t", "now?"))
    await channel.wait_for(2)
    assert channel.texts()[1] == "[helper] received: now?"
    again = await bridge.store.get_conversation(conversation.id)
    assert again is not None and again.status == "open"
    await stop_bridge(bridge)


async def test_a_rejected_call_is_not_retried(
    store_url: str, engage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TB_ENGAGE_KEY", "wrong-key")
    channel = RecordingChannel()
    config = make_config(store_url, agents={"eng": agent(engage)}, default_agent="eng")
    bridge = await start_bridge(config, channel)
    await bridge.submit(inbound("t", "hi"))
    await channel.wait_for(1)
    assert channel.posts[0].kind == "notice"
    assert len(requests(engage)) == 1  # 401: no retry
    await stop_bridge(bridge)


async def test_429_waits_for_retry_after_then_answers(store_url: str, engage: str) -> None:
    channel = RecordingChannel()
    config = make_config(store_url, agents={"eng": agent(engage)}, default_agent="eng")
    bridge = await start_bridge(config, channel)
    fault(engage, status=429, times=1, retry_after=0.3, path_contains="/chat")
    await bridge.submit(inbound("t", "busy?"))
    await channel.wait_for(1)
    assert channel.texts() == ["[helper] received: busy?"]
    counts = await eventually(bridge.store.counts)
    assert counts.get("inbox_done") == 1
    await stop_bridge(bridge)


async def test_many_threads_are_served_at_once(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TB_ENGAGE_KEY", "k")
    monkeypatch.setenv("TB_ENGAGE_ORG", "o")
    with run_asgi(create_app(latency_s=1.0)) as url:
        channel = RecordingChannel()
        config = make_config(store_url, agents={"eng": agent(url)}, default_agent="eng")
        bridge = await start_bridge(config, channel)
        for n in range(60):
            await bridge.submit(inbound(f"t{n}", f"hello {n}"))
        # one at a time, 60 one-second turns would take a minute
        await channel.wait_for(60, timeout=15)
        assert sorted(channel.texts()) == sorted(f"[helper] received: hello {n}" for n in range(60))
        await stop_bridge(bridge)
