"""Conversation search on SQLite and PostgreSQL: every filter, `data` equality, full-text
search through the index (FTS5 / tsvector), keyset pages for export, metadata updates."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from core import search as searching
from core import search_pg
from core.migrate import alembic_config
from core.model import Conversation, ThreadRef
from core.search import FilterError, search_filters, text_terms
from core.sql import conversations, insert_message, messages
from core.store import Store
from tests.pg import PostgresServer

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = Store(store_url)
    await s.migrate()
    yield s
    await s.close()


async def add(
    store: Store,
    thread: ThreadRef,
    texts: list[str | tuple[str, str, str]],
    *,
    agent: str = "demo",
    user: str = "u1",
    data: dict[str, Any] | None = None,
    created: datetime | None = None,
    status: str | None = None,
) -> Conversation:
    """A conversation with messages: a text is a user message; (role, kind, text) any other."""
    c = await store.open_conversation(thread, agent, data or {}, user)
    rows = []
    for n, item in enumerate(texts):
        role, kind, content = ("user", "message", item) if isinstance(item, str) else item
        rows.append(
            {
                "conversation_id": c.id,
                "role": role,
                "kind": kind,
                "content": content,
                "name": None,
                "author_id": user if role == "user" else None,
                "author_name": None,
                "event_id": None,
                "tool_calls": None,
                "tool_call_id": None,
                "created": (created or T0) + timedelta(seconds=n),
            }
        )
    values: dict[str, Any] = {}
    if created is not None:
        values["created"] = created
    if status is not None:
        values["status"] = status

    def job(conn: Any) -> None:
        if rows:
            conn.execute(insert_message, rows)
        if values:
            conn.execute(conversations.update().where(conversations.c.id == c.id).values(values))

    await store.write(job)
    found = await store.get_conversation(c.id)
    assert found is not None
    return found


def web(n: int | str) -> ThreadRef:
    return ThreadRef("web", "-", "-", str(n))


async def ids(store: Store, **given: Any) -> list[str]:
    found, total = await store.search(search_filters(**given))
    assert total >= len(found)
    return [c.id for c in found]


async def test_every_filter_paging_and_order(store: Store) -> None:
    a = await add(store, ThreadRef("slack", "T1", "C1", "1"), ["hi"], user="U1", created=T0)
    b = await add(
        store,
        ThreadRef("slack", "T1", "C2", "2"),
        ["hi"],
        user="U2",
        agent="coach",
        created=T0 + timedelta(hours=1),
        status="failed",
    )
    c = await add(store, ThreadRef("discord", "G", "C1", "3"), ["hi"], created=T0 + timedelta(2))
    d = await add(store, web("x"), [], created=T0 + timedelta(days=3), status="closed")

    assert await ids(store) == [d.id, c.id, b.id, a.id]  # newest first
    assert await ids(store, reversed=False) == [a.id, b.id, c.id, d.id]
    assert await ids(store, source="slack") == [b.id, a.id]
    assert await ids(store, source="slack", channel="C1") == [a.id]
    assert await ids(store, workspace="T1", user="U2") == [b.id]
    assert await ids(store, agent="coach") == [b.id]
    assert await ids(store, status="failed") == [b.id]
    assert await ids(store, status="closed") == [d.id]
    assert await ids(store, status="open") == [c.id, a.id]
    assert await ids(store, since=T0 + timedelta(minutes=30)) == [d.id, c.id, b.id]
    assert await ids(store, until=T0 + timedelta(hours=1)) == [a.id]  # until is exclusive
    assert await ids(store, since="2025-03-01T14:00:00+01:00", until="2025-03-02") == [b.id]
    page, total = await store.search(search_filters(limit=2, offset=1))
    assert total == 4 and [x.id for x in page] == [c.id, b.id]


async def test_data_filters_compare_values_as_text(store: Store) -> None:
    first = await add(
        store,
        web(1),
        [],
        data={"team_id": "T1", "chat_id": -1001234, "vip": True, "a.b": "dot", "n": None},
    )
    second = await add(store, web(2), [], data={"team_id": "T2", "chat_id": 5, "vip": False})
    assert await ids(store, data=["team_id=T1"]) == [first.id]
    assert await ids(store, data=["chat_id=-1001234"]) == [first.id]
    assert await ids(store, data=["chat_id=5", "vip=false"]) == [second.id]
    assert await ids(store, data=["vip=true"]) == [first.id]
    assert await ids(store, data=["a.b=dot"]) == [first.id]
    assert await ids(store, data=["team_id=T1", "vip=false"]) == []
    assert await ids(store, data=["missing=x"]) == []
    assert await ids(store, data=["n=null"]) == []  # a JSON null is no value
    assert await ids(store, data=["team_id=t1"]) == []  # equality, case and all


async def test_text_uses_every_message_prefixes_and_phrases(store: Store) -> None:
    split = await add(store, web(1), ["What is a pension?", "And the tax relief, please"])
    together = await add(store, web(2), ["pension fund questions", ("agent", "message", "Sure.")])
    hidden = await add(
        store,
        web(3),
        ["hello", ("agent", "hidden", "handing over to BillingAgent"), ("system", "notice", "x")],
    )
    other = await add(store, web(4), ["tax only", "see example.com or don't"])

    assert await ids(store, text="pension tax") == [split.id]  # words in different messages
    assert set(await ids(store, text="PENS")) == {split.id, together.id}  # prefix, any case
    assert await ids(store, text='"pension fund"') == [together.id]  # a phrase, as written
    assert await ids(store, text='"fund pension"') == []
    assert await ids(store, text="billingagent") == [hidden.id]  # hidden turns are searchable
    assert await ids(store, text="example.com") == [other.id]
    assert await ids(store, text="don't") == [other.id]
    assert await ids(store, text="nothing-like-this") == []
    assert await ids(store, text="naïve 東京 ² ʰ \"ʰ ²\" 'quote' a&b|c!(d):*<->") == []
    assert await ids(store, text="tax", source="web", limit=1) == [other.id]
    _, total = await store.search(search_filters(text="tax"))
    assert total == 2
    assert await ids(store, text="tax", limit=1, offset=1) == [split.id]
    assert await ids(store, text="tax", reversed=False) == [split.id, other.id]
    assert await store.search(search_filters(text="tax", offset=5)) == ([], 2)  # past the end
    assert await store.search(search_filters(text="nothing-like-this")) == ([], 0)


async def test_text_search_goes_through_the_full_text_index(store: Store) -> None:
    await add(store, web(1), ["pension"])
    query = sa.select(conversations.c.id).where(
        *searching.conditions(search_filters(text='pension "tax relief"'), store.dialect)
    )

    def plan(conn: Any) -> str:
        if conn.dialect.name == "sqlite":
            sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
            return str(conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql).all())
        conn.exec_driver_sql("SET enable_seqscan = off")  # a tiny table would be scanned anyway
        # The plan PostgreSQL caches for a statement run often on one connection: made
        # without the parameters' values, it must still match the index's expression.
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        compiled = query.compile(conn)
        conn.exec_driver_sql(f"PREPARE found AS {compiled}")
        given = [compiled.params[name] for name in compiled.positiontup or []]
        values = ", ".join("'" + str(v).replace("'", "''") + "'" for v in given)
        return str(conn.exec_driver_sql(f"EXPLAIN EXECUTE found({values})").all())

    shown = await store.read(plan)
    if store.is_sqlite:
        assert "VIRTUAL TABLE INDEX" in shown and "messages_fts" in shown, shown
    else:
        assert "ix_messages_fts" in shown, shown


@pytest.fixture
async def pg_store(postgres: PostgresServer) -> AsyncIterator[Store]:
    s = Store(postgres.database())
    await s.migrate()
    yield s
    await s.close()


async def test_postgresql_text_pages_are_exact_whichever_way_they_are_taken(
    pg_store: Store,
) -> None:
    # A search by text alone takes its page from the newest conversations, read in order,
    # when they hold it, and otherwise from every match: windows too small to hold the page,
    # or that hold part of it, give the same pages as one that holds them all.
    made = []
    for n in range(14):
        texts = ["pension and tax" if n < 5 or n % 3 == 0 else "tax only", "reply"]
        created = T0 + timedelta(hours=n if n != 7 else 6)  # 6 and 7: the id breaks the tie
        made.append(await add(pg_store, web(n), texts, created=created))
    matching = [c for n, c in enumerate(made) if n < 5 or n % 3 == 0]

    def run(query: Any) -> Any:
        return pg_store.read(lambda conn: list(conn.execute(query).all()))

    # Before ANALYZE the planner counts no conversations: every window is tried (and the
    # small ones come up short); after it, only the windows that should hold the page.
    for analyzed in (False, True):
        if analyzed:
            await pg_store.write(lambda conn: conn.exec_driver_sql("ANALYZE conversations"))
        for text, newest_first in itertools.product(("pens", 'pension "and tax"'), (True, False)):
            ordered = sorted(matching, key=lambda c: (c.created, c.id), reverse=newest_first)
            for limit, offset in ((2, 0), (3, 2), (20, 0), (4, 6), (2, 9)):
                f = search_filters(text=text, limit=limit, offset=offset, reversed=newest_first)
                expected = [c.id for c in ordered[offset : offset + limit]]
                for window in (1, 3, 6, 12, 10_000):
                    rows = await run(search_pg.page(f, window))
                    assert [r.id for r in rows] == expected, (analyzed, text, f, window)
                    assert {r.total for r in rows} <= {len(matching)}
                counted = await run(search_pg.count(f))
                assert counted[0][0] == len(matching)
    assert await ids(pg_store, text="pension tax", limit=2) == [made[12].id, made[9].id]
    assert await pg_store.search(search_filters(text="pens", offset=9)) == ([], len(matching))


async def test_a_postgresql_text_search_reads_the_newest_conversations_in_order(
    pg_store: Store,
) -> None:
    # The planner decides these from estimates: a hash of the matches probed while the
    # newest conversations are read through their index (not a join, which would read
    # them all), with the full-text index used even by a plan made without the text.
    await add(pg_store, web(1), ["pension"])
    query = search_pg.page(search_filters(text='pension "tax relief"'))

    def plan(conn: Any) -> str:
        conn.exec_driver_sql("SET enable_seqscan = off")  # a tiny table would be scanned anyway
        conn.exec_driver_sql("SET enable_sort = off")
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        compiled = query.compile(conn, compile_kwargs={"render_postcompile": True})
        conn.exec_driver_sql(f"PREPARE found AS {compiled}")
        given = [compiled.params[name] for name in compiled.positiontup or []]
        values = ", ".join("'" + str(v).replace("'", "''") + "'" for v in given)
        return "\n".join(
            row[0] for row in conn.exec_driver_sql(f"EXPLAIN VERBOSE EXECUTE found({values})")
        )

    shown = await pg_store.read(plan)
    assert "Index Scan Backward using ix_conversations_created" in shown, shown
    assert "(hashed SubPlan" in shown, shown
    assert shown.count("Bitmap Index Scan on ix_messages_fts") == 2, shown


async def test_the_migration_indexes_messages_already_stored(store_url: str) -> None:
    store = Store(store_url)
    await store.write(lambda conn: command.upgrade(alembic_config(conn), "0002"))
    now = datetime.now(UTC)

    def old_rows(conn: Any) -> None:
        conn.execute(
            conversations.insert().values(
                id="c-old",
                thread_key="web:-/-/old",
                source="web",
                workspace="-",
                channel="-",
                agent="demo",
                data={},
                status="open",
                created=now,
                updated=now,
            )
        )
        conn.execute(
            messages.insert().values(
                conversation_id="c-old", role="user", kind="message", content="ancient", created=now
            )
        )

    await store.write(old_rows)
    await store.migrate()
    assert await ids(store, text="ancient") == ["c-old"]

    def edit(conn: Any) -> None:  # the triggers (SQLite) follow an edit of the text
        conn.execute(messages.update().values(content="renewed"))

    await store.write(edit)
    assert await ids(store, text="ancient") == []
    assert await ids(store, text="renewed") == ["c-old"]
    await store.close()


async def test_pages_cover_every_match_once_in_order(store: Store) -> None:
    made = [await add(store, web(n), [f"row {n}"]) for n in range(25)]
    tie = T0 + timedelta(days=1)  # several at the same moment: the id breaks the tie

    def same_time(conn: Any) -> None:
        some = [c.id for c in made[5:12]]
        conn.execute(conversations.update().where(conversations.c.id.in_(some)).values(created=tie))

    await store.write(same_time)
    for newest_first in (True, False):
        f = search_filters(source="web", reversed=newest_first, limit=200)
        expected, total = await store.search(f)
        seen = [c.id for page in [p async for p in store.conversation_pages(f, 4)] for c in page]
        assert total == 25 and seen == [c.id for c in expected]
    pages = [p async for p in store.conversation_pages(search_filters(text="row"), 10)]
    assert [len(p) for p in pages] == [10, 10, 5]
    texts = await store.messages_of([made[0].id, made[1].id])
    assert [m.content for m in texts[made[1].id]] == ["row 1"]


async def test_update_conversation_merges_data(store: Store) -> None:
    c = await add(store, web(1), [], data={"keep": 1, "drop": "x", "change": "a"})
    updated = await store.update_conversation(
        c.id, data={"drop": None, "change": "b", "new": {"nested": True}}
    )
    assert updated is not None
    assert updated.data == {"keep": 1, "change": "b", "new": {"nested": True}}
    assert updated.source == "web"
    relabelled = await store.update_conversation(c.id, source="imported")
    assert relabelled is not None and relabelled.source == "imported"
    assert relabelled.data == updated.data
    assert await ids(store, data=["change=b"], source="imported") == [c.id]
    assert await store.update_conversation("nope", source="x") is None


def test_search_filters_refuse_bad_parameters() -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"status": "bogus"}, "open, closed or failed"),
        ({"limit": 0}, "between 1 and 200"),
        ({"limit": 201}, "between 1 and 200"),
        ({"offset": -1}, "between 0"),
        ({"text": "x" * 501}, "at most 500"),
        ({"text": "!!! ..."}, "no words"),
        ({"text": " ".join(f"w{n}" for n in range(17))}, "at most 16"),
        ({"data": ["novalue"]}, "not KEY=VALUE"),
        ({"data": ["=v"]}, "key ''"),
        ({"data": ['we"ird=v']}, "key"),
        ({"data": ["k=1", "k=2"]}, "given twice"),
        ({"data": [f"k{n}=v" for n in range(11)]}, "at most 10"),
        ({"since": "yesterday"}, "not an ISO date"),
        ({"user": "a\x00b"}, "NUL"),
        ({"data": ["k=a\x00"]}, "NUL"),
        ({"channel": "c" * 501}, "at most 500"),
        ({"since": "2025-02-01", "until": "2025-01-01"}, "before since"),
    ]
    for given, reason in bad:
        with pytest.raises(FilterError) as caught:
            search_filters(**given)
        assert reason in str(caught.value), (given, str(caught.value))
    f = search_filters(source="", text="  a  ", data=["k=v=w", "e="], since="2025-01-01")
    assert f.source is None and f.data == {"k": "v=w", "e": ""}
    assert f.since == datetime(2025, 1, 1, tzinfo=UTC)
    assert replace(f, limit=5).limit == 5


def test_text_terms() -> None:
    terms = text_terms('pens "tax relief" example.com _ "" don\'t "open')
    assert [(t.text, t.phrase) for t in terms] == [
        ("pens", False),
        ("tax relief", True),
        ("example.com", True),
        ("don't", True),
        ("open", True),
    ]
