"""The bridge on a real SQLite store: order, dedupe, history, rejection, restarts, posting."""

from __future__ import annotations

import pytest

from core.errors import MessageRejected, PlatformRejected, PlatformRetryable
from core.model import ThreadRef
from tests.bridgekit import (
    RecordingChannel,
    eventually,
    inbound,
    make_config,
    start_bridge,
    stop_bridge,
)


async def test_two_threads_get_their_own_conversations(store_url: str) -> None:
    channel = RecordingChannel()
    bridge = await start_bridge(make_config(store_url), channel)
    await bridge.submit(inbound("a", "hello from a"))
    await bridge.submit(inbound("b", "hello from b"))
    await channel.wait_for(2)
    await bridge.submit(inbound("a", "second in a"))
    await channel.wait_for(3)
    assert "hello from a" in channel.texts("a")[0]
    assert "message 2 of a **web** conversation" in channel.texts("a")[1]
    assert "hello from b" in channel.texts("b")[0]
    a = await bridge.store.conversation_for_thread("web:-/-/a")
    b = await bridge.store.conversation_for_thread("web:-/-/b")
    assert a is not None and b is not None and a.id != b.id
    assert (a.source, a.agent, a.data) == ("web", "demo", {"thread_id": "a"})
    roles = [row.role for row in await bridge.store.history(a.id)]
    assert roles == ["user", "agent", "user", "agent"]
    assert channel.working  # the channel was told the agent was working
    await stop_bridge(bridge)


async def test_replies_in_a_thread_keep_arrival_order(store_url: str) -> None:
    channel = RecordingChannel()
    bridge = await start_bridge(make_config(store_url), channel)
    for n in range(8):
        await bridge.submit(inbound("t", f"message {n}"))
    await channel.wait_for(8)
    assert [f"message {n}" in text for n, text in enumerate(channel.texts())] == [True] * 8
    await stop_bridge(bridge)


async def test_work_goes_straight_to_a_worker_without_waiting_for_a_poll(store_url: str) -> None:
    """A message is taken as it is stored, a turn's reply as the turn is stored, and a
    thread's next message by the worker that finishes the one before: with the claim loops
    polling only every 30 s, eight messages in one thread and one in another still go at once."""
    channel = RecordingChannel()
    config = make_config(store_url, bridge={"poll_s": 30, "working_after_s": 5})
    bridge = await start_bridge(config, channel)
    await bridge.submit(inbound("other", "alone"))
    for n in range(8):
        await bridge.submit(inbound("t", f"message {n}"))
    await channel.wait_for(9, timeout=5)
    assert [f"message {n}" in text for n, text in enumerate(channel.texts("t"))] == [True] * 8
    assert not channel.working  # quick answers: no "working" sign
    await stop_bridge(bridge)


async def test_a_nul_a_platform_lets_through_is_kept_as_a_replacement_character(
    store_url: str,
) -> None:
    """PostgreSQL refuses NUL in text and JSON: a name or text carrying one is stored with
    U+FFFD instead, so the write cannot fail each time the platform sends the event again."""
    channel = RecordingChannel()
    bridge = await start_bridge(make_config(store_url), channel)
    await bridge.submit(inbound("nul", "hello\x00there", user="a\x00b", data={"k": ["\x00"]}))
    await channel.wait_for(1)
    conversation = await bridge.store.conversation_for_thread("web:-/-/nul")
    assert conversation is not None and conversation.data == {"k": ["\ufffd"]}
    [user, _] = await bridge.store.history(conversation.id)
    assert (user.content, user.author_name) == ("hello\ufffdthere", "A\ufffdB")
    await stop_bridge(bridge)


async def test_a_duplicate_event_is_answered_once(store_url: str) -> None:
    channel = RecordingChannel()
    bridge = await start_bridge(make_config(store_url), channel)
    first = await bridge.submit(inbound("t", "once", event="evt-1"))
    again = await bridge.submit(inbound("t", "once", event="evt-1"))
    assert (first.duplicate, again.duplicate) == (False, True)
    await channel.wait_for(1)
    await bridge.submit(inbound("t", "next"))
    await channel.wait_for(2)
    assert sum("once" in t for t in channel.texts()) == 1
    await stop_bridge(bridge)


@pytest.mark.parametrize(
    ("text", "words"), [("", "empty"), ("  \n\t ", "empty"), ("x" * 101, "101 characters")]
)
async def test_empty_and_oversized_messages_never_reach_the_agent(
    store_url: str, text: str, words: str
) -> None:
    channel = RecordingChannel()
    bridge = await start_bridge(make_config(store_url, bridge={"max_message_chars": 100}), channel)
    with pytest.raises(MessageRejected, match=words):
        await bridge.submit(inbound("t", text))
    assert await bridge.store.counts() == {}
    await stop_bridge(bridge)


async def test_unfinished_work_is_picked_up_after_a_restart(store_url: str) -> None:
    config = make_config(store_url)
    channel = RecordingChannel()
    bridge = await start_bridge(config, channel)
    await bridge.stop()  # no workers: the message waits in the inbox
    await bridge.submit(inbound("t", "kept across restarts"))
    await bridge.store.close()
    channel2 = RecordingChannel()
    bridge2 = await start_bridge(config, channel2)
    await channel2.wait_for(1)
    assert "kept across restarts" in channel2.texts()[0]
    await stop_bridge(bridge2)


async def test_a_post_that_fails_is_retried_then_sent_once(store_url: str) -> None:
    channel = RecordingChannel()
    channel.failures = [
        PlatformRetryable("429", retry_after=0.05),
        PlatformRetryable("503", retry_after=0.05),
    ]
    bridge = await start_bridge(make_config(store_url), channel)
    await bridge.submit(inbound("t", "hi"))
    await channel.wait_for(1)
    counts = await eventually(lambda: _sent(bridge))
    assert counts == {"inbox_done": 1, "outbox_sent": 1}
    assert len(channel.posts) == 1
    await stop_bridge(bridge)


async def test_a_post_the_platform_refuses_is_not_retried(store_url: str) -> None:
    channel = RecordingChannel()
    channel.failures = [PlatformRejected("bot was removed from the channel")]
    bridge = await start_bridge(make_config(store_url), channel)
    await bridge.submit(inbound("t", "hi"))
    counts = await eventually(lambda: _failed(bridge))
    assert counts["outbox_failed"] == 1
    assert channel.posts == []
    await stop_bridge(bridge)


async def test_notices_and_new_conversations(store_url: str) -> None:
    channel = RecordingChannel()
    bridge = await start_bridge(make_config(store_url), channel)
    thread = ThreadRef("web", "-", "-", "t")
    await bridge.submit(inbound("t", "one"))
    await channel.wait_for(1)
    first = await bridge.store.conversation_for_thread(thread.key)
    assert await bridge.new_conversation(thread) == (first and first.id)
    await bridge.notify(thread, "Started a new conversation.")
    await bridge.submit(inbound("t", "two"))
    await channel.wait_for(3)
    second = await bridge.store.conversation_for_thread(thread.key)
    assert first is not None and second is not None and second.id != first.id
    closed = await bridge.store.get_conversation(first.id)
    assert closed is not None and closed.status == "closed"
    assert channel.posts[1].kind == "notice"
    assert "message 1 of" in channel.texts()[2]
    await stop_bridge(bridge)


async def _sent(bridge: object) -> dict[str, int] | None:
    counts = await bridge.store.counts()  # type: ignore[attr-defined]
    return counts if counts.get("outbox_sent") == 1 else None


async def _failed(bridge: object) -> dict[str, int] | None:
    counts = await bridge.store.counts()  # type: ignore[attr-defined]
    return counts if counts.get("outbox_failed") == 1 else None


async def test_a_thread_never_loses_sight_of_a_message_while_its_turn_finishes(
    store_url: str,
) -> None:
    # A message moves from the inbox to the conversation when its turn commits; every read
    # of the thread must show it in exactly one of the two. Twenty turns commit in one thread
    # while it is read again and again, so a read split across a commit would be seen.
    channel = RecordingChannel()
    bridge = await start_bridge(make_config(store_url), channel)
    sent = [f"message {n}" for n in range(20)]
    for text in sent:
        await bridge.submit(inbound("busy", text))
    answers = 0
    while answers < len(sent):
        stored, pending = await bridge.store.thread_view("web:-/-/busy")
        users = [r.content for r in stored if r.role == "user"]
        assert users + [r.payload["text"] for r in pending] == sent
        answers = sum(r.role == "agent" for r in stored)
    await stop_bridge(bridge)
