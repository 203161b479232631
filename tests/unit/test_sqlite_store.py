"""The SQLite store's quick path: hot statements on the driver, quick jobs on the event loop's
thread, a write lock held by another process, and the WAL copied back off the loop."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from core import sql
from core import sqlite as sqlite_store
from core.model import Author, Inbound, ThreadRef
from core.store import NewMessage, Store


def said(n: int, text: str = "hello") -> Inbound:
    thread = ThreadRef("slack", "T1", "C1", f"{n}.000")
    return Inbound(f"ev{n}", thread, Author("U1", "Ann"), f"{text} {n}", {"team": "T1", "n": n})


async def turn(store: Store, n: int) -> None:
    """What the bridge stores for one answered Slack message."""
    inbound = said(n)
    intake = await store.add_inbound(inbound, lease_s=60)
    assert intake.added and intake.claim is not None
    conversation = await store.conversation_for_thread(inbound.thread.key)
    if conversation is None:
        conversation = await store.open_conversation(inbound.thread, "demo", inbound.data, "U1")
    user = NewMessage.of_user(inbound, intake.claim.created)
    reply = NewMessage(role="agent", content=f"answer {n} ✓", post=True)
    handoff = await store.finish_turn(
        intake.claim, conversation, [user, reply], state={"turns": n}, lease_s=60
    )
    assert handoff.posts and handoff.next_turn is None
    assert await store.draft_of(inbound.thread.key) is None
    await store.finish_outbox(handoff.posts[0], sent=True, platform_ids=[f"{n}.5"], lease_s=60)


async def test_the_quick_path_stores_and_reads_what_sqlalchemy_does(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path}/tb.db")
    await store.migrate()
    for n in range(3):
        await turn(store, n)
    thread = said(1).thread
    conversation = await store.conversation_for_thread(thread.key)
    assert conversation is not None
    assert conversation.data == {"team": "T1", "n": 1}
    assert conversation.state == {"turns": 1}
    assert conversation.created.tzinfo is not None
    history = await store.history(conversation.id, limit=10)
    assert [(m.role, m.content) for m in history] == [("user", "hello 1"), ("agent", "answer 1 ✓")]
    assert await store.get_conversation(conversation.id) == conversation
    await store.close()

    # The same file read back with no quick path: every statement through SQLAlchemy.
    engine = sa.create_engine(f"sqlite:///{tmp_path}/tb.db")
    with engine.connect() as conn:
        row = conn.execute(sql.conversation_by_thread, {"thread_key": thread.key}).first()
        inbox = conn.execute(sa.select(sql.inbox).order_by(sql.inbox.c.id)).all()
        outbox = conn.execute(sa.select(sql.outbox).order_by(sql.outbox.c.id)).all()
        stored = conn.execute(sa.select(sql.messages).order_by(sql.messages.c.id)).all()
    engine.dispose()
    assert row is not None and row.id == conversation.id and row.state == {"turns": 1}
    assert [item.status for item in inbox] == ["done"] * 3
    assert [(item.status, item.platform_ids) for item in outbox] == [
        ("sent", [f"{n}.5"]) for n in range(3)
    ]
    assert [m.content for m in stored][2:4] == ["hello 1", "answer 1 ✓"]
    assert stored[2].created == history[0].created
    assert inbox[0].payload["author"] == {"id": "U1", "name": "Ann", "is_admin": False}


async def test_a_write_lock_held_elsewhere_never_stalls_the_loop(tmp_path: Path) -> None:
    """Another process (a CLI command, say) holds SQLite's write lock: the message waits on
    the writer thread for it, while the event loop goes on serving."""
    path = tmp_path / "tb.db"
    store = Store(f"sqlite:///{path}")
    await store.migrate()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    adding = asyncio.create_task(store.add_inbound(said(1), lease_s=60))
    ticks = 0
    started = time.monotonic()
    while time.monotonic() - started < 0.5:
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks > 20  # the loop was free the whole time
    assert not adding.done()
    other.execute("COMMIT")
    other.close()
    intake = await asyncio.wait_for(adding, 5)
    assert intake.added and intake.claim is not None
    await turn(store, 2)  # and the quick path is back for the next write
    await store.close()


async def test_the_wal_is_copied_into_the_database_off_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "tb.db"
    store = Store(f"sqlite:///{path}")
    await store.migrate()
    await asyncio.sleep(1.2)  # the migration's pages are checkpointed
    before = path.stat().st_size
    await asyncio.gather(*(turn(store, n) for n in range(300)))
    for _ in range(50):  # the checkpointer runs every second
        await asyncio.sleep(0.1)
        if path.stat().st_size > before:
            break
    assert path.stat().st_size > before
    await store.close()


async def test_a_quick_read_that_meets_a_lock_goes_to_the_reader_threads(tmp_path: Path) -> None:
    """Quick reads run on the loop's thread, on the quick writer's connection, which never
    waits on a lock: a read that meets one (SQLITE_BUSY) runs again on a reader thread,
    which may wait."""
    store = Store(f"sqlite:///{tmp_path}/tb.db")
    await store.migrate()
    await turn(store, 1)
    ran_on: list[str] = []

    def count(conn: sa.Connection) -> int:
        ran_on.append(threading.current_thread().name)
        if len(ran_on) == 1:
            locked = sqlite3.OperationalError("database is locked")
            locked.sqlite_errorcode = sqlite3.SQLITE_BUSY
            raise sa.exc.OperationalError("SELECT count(*) FROM messages", (), locked)
        return int(conn.execute(sa.text("SELECT count(*) FROM messages")).scalar_one())

    assert await store.read(count, quick=True) == 2
    assert ran_on[0] == threading.current_thread().name
    assert ran_on[1].startswith("sqlite-reader")
    assert await store.read(lambda conn: len(ran_on), quick=True) == 2  # the loop's again
    await store.close()


def test_the_hot_path_writes_a_datetime_as_sqlalchemy_does() -> None:
    """The hot statements' DATETIME text is SQLAlchemy's to the character (rows are compared
    and ordered as text), for naive and aware values of any year."""
    process = sa.DateTime().dialect_impl(sqlite_dialect()).bind_processor(sqlite_dialect())
    assert sqlite_store._faster(process) is sqlite_store._datetime_text
    rng = random.Random(9)
    for _ in range(20_000):
        value = datetime(1, 1, 1) + timedelta(
            seconds=rng.randrange(315_537_897_600), microseconds=rng.randrange(1_000_000)
        )
        for v in (value, value.replace(tzinfo=UTC), value.replace(microsecond=0)):
            assert sqlite_store._datetime_text(v) == process(v)
    assert sqlite_store._datetime_text(None) is None
    assert sqlite_store._datetime_text(date(2026, 1, 2)) == process(date(2026, 1, 2))
