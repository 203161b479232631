"""Which errors mean the store is out of reach, and how an outage is said in the log."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa

from core.errors import AgentUnavailable
from core.outage import StoreOutage, describe, store_unavailable
from core.store import Store
from tests.pg import PostgresServer


async def failure(store: Store, statement: str) -> BaseException:
    try:
        await store.read(lambda conn: conn.execute(sa.text(statement)).all())
    except Exception as exc:
        return exc
    raise AssertionError(f"{statement!r} did not fail")


async def cut_connections(url: str) -> None:
    """End every server session of the database `url` names but this one's own."""
    admin = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await admin.close()


async def test_a_refused_connection_is_an_outage_said_in_one_line() -> None:
    store = Store("postgresql+asyncpg://nobody@127.0.0.1:1/none")  # nothing listens on port 1
    try:
        exc = await failure(store, "SELECT 1")
        with pytest.raises(OSError) as quick:  # a quick read: a held connection, refused
            await store.read(lambda conn: conn.execute(sa.text("SELECT 1")).all(), quick=True)
    finally:
        await store.close()
    assert store_unavailable(exc)
    assert "\n" not in describe(exc)
    assert store_unavailable(quick.value)


async def test_a_dropped_connection_is_an_outage(postgres: PostgresServer) -> None:
    url = postgres.database()
    store = Store(url)
    try:
        await store.read(lambda conn: conn.execute(sa.text("SELECT 1")).all())  # pooled now
        await cut_connections(url)
        exc = await failure(store, "SELECT 1 AS secret_marker")
    finally:
        await store.close()
    assert store_unavailable(exc)
    assert "secret_marker" not in describe(exc)  # the statement stays out of the log line


async def test_quick_reads_answer_on_after_their_held_connections_drop(
    postgres: PostgresServer,
) -> None:
    """PostgreSQL's quick reads run on connections held open (core.pg_quick): when those are
    cut, the reads that meet them are asked again on a fresh connection, and answer."""
    url = postgres.database()
    store = Store(url)

    async def quick(statement: str) -> list[Any]:
        return await store.read(lambda conn: conn.execute(sa.text(statement)).all(), quick=True)

    try:
        assert await quick("SELECT 1") == [(1,)]
        await asyncio.gather(*(quick("SELECT pg_sleep(0.01)") for _ in range(4)))  # both held
        await cut_connections(url)
        together = await asyncio.gather(*(quick(f"SELECT {n}") for n in range(4)))
        then = [await quick(f"SELECT {n}") for n in range(4, 6)]
    finally:
        await store.close()
    assert together == [[(n,)] for n in range(4)]
    assert then == [[(4,)], [(5,)]]


async def test_a_wrong_statement_or_an_agent_error_is_not_an_outage(tmp_path: Path) -> None:
    store = Store(f"sqlite+aiosqlite:///{tmp_path}/tb.db")
    try:
        wrong = await failure(store, "SELECT * FROM nowhere")
    finally:
        await store.close()
    assert not store_unavailable(wrong)
    agent_down = AgentUnavailable("agent 'gpt': connection refused")
    agent_down.__cause__ = ConnectionRefusedError(111, "Connect call failed")
    assert not store_unavailable(agent_down)
    assert not store_unavailable(ValueError("a bug"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_is_said_once_reminded_each_minute_and_its_end_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    outage = StoreOutage(logging.getLogger("tb.outage"), remind_s=60, clock=clock)
    caplog.set_level(logging.INFO, "tb.outage")
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)")
    outage.ok()  # nothing to say while the store is up
    for _ in range(100):  # 50 s of polls every 0.5 s, from three loops
        for doing in ("claiming inbox work", "claiming outbox work", "renewing inbox leases"):
            outage.failed(doing, refused)
        clock.now += 0.5
    clock.now += 15  # 65 s down
    outage.failed("claiming inbox work", refused)
    outage.failed("claiming inbox work", refused)
    clock.now += 2.5
    outage.ok()
    outage.ok()
    said = [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records]
    assert said == [
        (
            "WARNING",
            "the store is unavailable (ConnectionRefusedError: [Errno 111] Connect call failed "
            "('127.0.0.1', 5432), claiming inbox work); retrying until it is back",
            None,
        ),
        (
            "WARNING",
            "the store is still unavailable after 65 s (ConnectionRefusedError: [Errno 111] "
            "Connect call failed ('127.0.0.1', 5432))",
            None,
        ),
        ("INFO", "store is back after 67.5 s", None),
    ]


def test_an_unknown_failure_keeps_its_traceback_once(caplog: pytest.LogCaptureFixture) -> None:
    outage = StoreOutage(logging.getLogger("tb.outage"), clock=Clock())
    caplog.set_level(logging.INFO, "tb.outage")
    for _ in range(10):
        outage.failed("claiming inbox work", KeyError("payload"))
    [record] = caplog.records
    assert record.levelname == "ERROR" and record.exc_info is not None
    assert record.getMessage() == "claiming inbox work failed; retrying until it works"
