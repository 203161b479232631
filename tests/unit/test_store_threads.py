"""Threads that move, end together, or are found by the bot's own posts; a split reply that
resumes. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from core.errors import PlatformRetryable
from core.model import Author, Inbound, ThreadRef
from core.store import NewMessage, Store
from tests.bridgekit import RecordingChannel, eventually, make_config, start_bridge, stop_bridge
from tests.pg import PostgresServer


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


async def _waiting(watcher: AsyncConnection, n: int) -> bool:
    """Whether `n` sessions of this test's database wait for a lock now (other tests share
    the cluster)."""
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    return bool((await watcher.execute(query)).scalar_one() >= n)


async def test_a_reply_queued_while_the_one_before_is_closed_is_handed_on(
    postgres: PostgresServer,
) -> None:
    """PostgreSQL: a turn that queues its reply behind one still being posted, and the post
    closing that one, may run at once; one of them must take the new reply, or it waits for
    the outbox loop's poll. The turn is held at its last statement, after it queued the
    reply, by a lock on its conversation's row, while the post closes."""
    store = Store(postgres.database())
    await store.migrate()
    thread = ThreadRef("web", "-", "-", "a")
    first = await store.add_inbound(said(thread, "one", "e1"), lease_s=60)
    assert first.claim is not None
    conversation = await store.open_conversation(thread, "demo", {}, "u1")
    answer = [NewMessage(role="agent", content="answer 1", post=True)]
    [posting] = (await store.finish_turn(first.claim, conversation, answer, lease_s=60)).posts
    second = await store.add_inbound(said(thread, "two", "e2"), lease_s=60)
    assert second.claim is not None

    engine = create_async_engine(make_url(store.url).set(drivername="postgresql+asyncpg"))
    try:
        async with engine.connect() as holder, engine.connect() as watcher:
            watcher = await watcher.execution_options(isolation_level="AUTOCOMMIT")
            hold = "SELECT id FROM conversations WHERE id = :id FOR NO KEY UPDATE"
            await holder.execute(sa.text(hold), {"id": conversation.id})
            answer = [NewMessage(role="agent", content="answer 2", post=True)]
            turn = asyncio.create_task(
                store.finish_turn(second.claim, conversation, answer, lease_s=60)
            )
            await eventually(lambda: _waiting(watcher, 1))
            close = asyncio.create_task(store.finish_outbox(posting, sent=True, lease_s=60))
            await eventually(lambda: close.done() or _waiting(watcher, 2))
            await holder.rollback()
            handoff, taken = await turn, await close
    finally:
        await engine.dispose()
        await store.close()
    handed = [c.payload["text"] for c in handoff.posts] + ([taken.payload["text"]] if taken else [])
    assert handed == ["answer 2"]
