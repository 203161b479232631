"""Threads that move, end together, or are found by the bot's own posts; a split reply that
resumes. On SQLite and PostgreSQL."""

from __future__ import annotations

from core.errors import PlatformRetryable
from core.model import Author, Inbound, ThreadRef
from tests.bridgekit import RecordingChannel, make_config, start_bridge, stop_bridge


def said(thread: ThreadRef, text: str, event: str) -> Inbound:
    return Inbound(event, thread, Author("u1", "Ann"), text, {"chat_id": thread.channel})


async def test_threads_move_end_and_are_found_by_posts(store_url: str) -> None:
    channel = RecordingChannel("telegram")
    bridge = await start_bridge(make_config(store_url), channel)
    store = bridge.store
    old = [ThreadRef("telegram", "-", "-400", str(n)) for n in (10, 20)]
    other = ThreadRef("telegram", "-", "-4001", "10")  # shares the prefix's digits, not the chat
    for n, thread in enumerate([*old, other]):
        await bridge.submit(said(thread, "hello", f"e{n}"))
    await channel.wait_for(3)

    await store.remember_posts(old[0].key, ["telegram:-400:11", "telegram:-400:12"])
    assert await store.thread_of_post("telegram:-400:12") == old[0].key
    assert await store.thread_of_post("telegram:-400:99") is None

    assert await store.move_threads("telegram:-/-400/", "telegram:-/-100500/", "-100500") == 2
    moved = await store.conversation_for_thread("telegram:-/-100500/10")
    assert moved is not None
    assert await store.conversation_for_thread(old[0].key) is None
    assert await store.conversation_for_thread(other.key) is not None  # untouched
    assert await store.thread_of_post("telegram:-400:11") == "telegram:-/-100500/10"

    ended = await store.end_threads_under("telegram:-/-100500/")
    assert len(ended) == 2
    assert await store.conversation_for_thread("telegram:-/-100500/20") is None
    assert await store.conversation_for_thread(other.key) is not None
    await stop_bridge(bridge)


async def test_a_split_reply_resumes_after_the_parts_posted(store_url: str) -> None:
    channel = RecordingChannel()
    channel.failures.append(PlatformRetryable("429", retry_after=0.05, posted=["p-1", "p-2"]))
    bridge = await start_bridge(make_config(store_url), channel)
    await bridge.submit(said(ThreadRef("web", "-", "-", "a"), "hello", "e1"))
    await channel.wait_for(1)
    assert channel.posts[0].posted == ("p-1", "p-2")  # the retry knows what went out
    await stop_bridge(bridge)
