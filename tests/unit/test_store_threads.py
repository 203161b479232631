"""Threads that move, end together, or are found by the bot's own posts; a split reply that
resumes. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from core.errors import PlatformRetryable
from core.model import Author, Inbound, ThreadRef
from core.store import Claim, NewMessage, Store
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


async def _turn(store: Store, thread: ThreadRef, text: str, event: str) -> tuple[Inbound, Claim]:
    inbound = said(thread, text, event)
    intake = await store.add_inbound(inbound, lease_s=60)
    assert intake.claim is not None
    return inbound, intake.claim


async def test_a_conversation_opened_with_its_turn_is_written_by_the_turn(store_url: str) -> None:
    """`with_turn`: nothing is written until the turn's finish, which writes the conversation,
    linked to its thread, in the transaction that stores the turn."""
    store = Store(store_url)
    await store.migrate()
    thread = ThreadRef("web", "-", "-", "a")
    inbound, claim = await _turn(store, thread, "hello", "e1")
    conversation = await store.open_conversation(thread, "demo", {"k": 1}, "u1", with_turn=True)
    assert await store.conversation_for_thread(thread.key) is None  # a turn may yet end unwritten

    answer = NewMessage(role="agent", content="hi", post=True)
    await store.finish_turn(
        claim, conversation, [NewMessage.of_user(inbound, None), answer], remote_id="r-1"
    )
    stored = await store.conversation_for_thread(thread.key)
    assert stored is not None and stored.id == conversation.id
    assert (stored.agent, stored.data, stored.remote_id, stored.status) == (
        "demo",
        {"k": 1},
        "r-1",
        "open",
    )
    assert [m.content for m in await store.history(conversation.id)] == ["hello", "hi"]
    assert conversation.unsaved is None
    await store.close()


async def test_a_turn_whose_thread_was_linked_meanwhile_joins_that_conversation(
    store_url: str,
) -> None:
    """Another conversation took the thread between the turn's start and its finish: the turn
    is stored in that one, as `open_conversation` would have returned it."""
    store = Store(store_url)
    await store.migrate()
    thread = ThreadRef("web", "-", "-", "a")
    inbound, claim = await _turn(store, thread, "hello", "e1")
    conversation = await store.open_conversation(thread, "demo", {}, "u1", with_turn=True)
    other = await store.open_conversation(thread, "demo", {"first": True}, "u1")

    await store.finish_turn(claim, conversation, [NewMessage.of_user(inbound, None)])
    assert conversation.id == other.id
    assert conversation.data == {"first": True}
    assert [m.content for m in await store.history(other.id)] == ["hello"]
    assert [c.id for c in await store.thread_conversations(thread.key)] == [other.id]
    await store.close()


async def test_a_remote_session_is_written_before_the_agent_is_asked(store_url: str) -> None:
    """A stateful service's session id is written as soon as it is opened, with the
    conversation it belongs to; the turn's finish then writes into that conversation."""
    store = Store(store_url)
    await store.migrate()
    thread = ThreadRef("web", "-", "-", "a")
    inbound, claim = await _turn(store, thread, "hello", "e1")
    conversation = await store.open_conversation(thread, "demo", {}, "u1", with_turn=True)
    conversation.remote_id = "session-1"
    await store.save_remote(conversation)
    stored = await store.conversation_for_thread(thread.key)
    assert stored is not None and (stored.id, stored.remote_id) == (conversation.id, "session-1")

    await store.finish_turn(claim, conversation, [NewMessage.of_user(inbound, None)])
    assert [m.content for m in await store.history(conversation.id)] == ["hello"]
    assert len(await store.thread_conversations(thread.key)) == 1
    await store.close()
